// N:M mask selection, pruning, 2:4 compression and packed-mask kernels (CUDA, no torch headers).
//
// Algorithm: a thread's unit is one byte of the packed mask, i.e. 8 consecutive elements of a row
// (two 2:4 groups or one 8-wide group; 4 elements at the end of a row whose length is 4 mod 8).
// It loads them (one 16-byte load for fp16/bf16, two for fp32, when rows are 8-aligned; the
// selection kernel loads two units per thread for fp16/bf16 before ranking either), ranks
// each group in registers without branches on the data (2:4 of fp16/bf16: integer keys from
// the bits, top2_bits16; otherwise the count of csrc/nm_select.h, shared with the CPU kernels;
// both agree with the CPU bit for bit) and writes its outputs: 8 bools, 8 pruned values, or 4
// kept values plus one metadata byte.
// Layout: rows x k row-major contiguous; groups of m along k; packed masks rows x ceil(k/8)
// bytes, LSB first (reference.pack_mask). Dtypes: fp32, fp16, bf16 (ranked as fp32 |w|).
// Archs: any (plain loads and stores); built for sm80/sm90.
// Reference: cast_ext/reference.py nm_mask, sparse24_prune, sparse24_compress,
// sparse24_decompress, pack_mask, unpack_mask, mask_flips.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/kernels.h"
#include "cuda/vec8.cuh"
#include "nm_select.h"

namespace cast_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// flips_kernel's cap: still 132 SMs x 8 resident blocks several times over, and few enough
// that its one atomic per block costs nothing.
constexpr int kFlipsMaxBlocks = 4096;

// A rows x k tensor's units (8 elements: a byte of packed mask): kb per row, total in all, and
// index j of a unit -> (row, byte in row). A 64-bit division is a long software routine on the
// GPU, and the kernels below split every thread's index. Where every index is below 2^31
// (tensors of fewer than 2^34 elements) it is a multiply-high, an add and a shift by a magic
// number made on the host (Granlund & Montgomery, the form of PyTorch's IntDivider: exact for
// dividends below 2^31); else the plain division.
struct RowSplit {
  int64_t kb, total;
  uint32_t magic, shift;
  bool fast;

  static RowSplit make(int64_t rows, int64_t k) {
    const int64_t kb = (k + 7) / 8, total = rows * kb;
    RowSplit rs{kb, total, 0, 0, kb > 0 && total < (int64_t(1) << 31)};
    if (rs.fast) {
      while ((int64_t(1) << rs.shift) < kb) ++rs.shift;
      const uint64_t one = 1;
      rs.magic = uint32_t(((one << 32) * ((one << rs.shift) - uint64_t(kb))) / uint64_t(kb) + 1);
    }
    return rs;
  }
  __device__ __forceinline__ int64_t row(int64_t j) const {
    if (!fast) return j / kb;
    const uint32_t n = uint32_t(j);
    return int64_t((__umulhi(n, magic) + n) >> shift);
  }
};

// Elements a thread owns: 8, or 4 at the end of a row whose length is 4 mod 8.
__device__ __forceinline__ int count8(int64_t k, int64_t col) {
  return k - col < 8 ? int(k - col) : 8;
}

// 2:4 of fp16/bf16 from their bits, as the CPU kernels rank them (csrc/cpu/sparse24_mask.cpp,
// Bits16): with the sign cleared, a finite value's 15-bit pattern grows with |x| (+0 and -0 are
// both 0), and every NaN/Inf pattern is at least kInfBits. Element i of a group gets the key
// (pattern << 2) | (3 - i): equal magnitudes order by position (the lower index beats the
// higher), so the 4 keys differ, and the 2 kept are those at least the second largest key. The
// same bits as keep2_of_4 on the fp32 magnitudes for every finite input, in integer min/max and
// compares without conversions to fp32: 51 sm_90 instructions rank 8 elements where the fp32
// path takes 120. (On the H200 the bf16 mask ran at 0.59 of a clone's bandwidth, fp32 at
// 0.83-0.99: per byte, bf16 has twice the elements to rank.)
template <typename T>
constexpr uint32_t kInfBits = 0;
template <>
constexpr uint32_t kInfBits<__half> = 0x7C00u;
template <>
constexpr uint32_t kInfBits<__nv_bfloat16> = 0x7F80u;

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }
__device__ __forceinline__ uint32_t umin(uint32_t a, uint32_t b) { return a < b ? a : b; }

// Kept positions (a nibble) of 4 distinct keys: the 2 at least the second largest, which is the
// larger of the two pairs' smaller maximum and their larger minimum. `top`: the largest key.
__device__ __forceinline__ uint32_t top2_of_keys(const uint32_t* key, uint32_t& top) {
  const uint32_t hi01 = umax(key[0], key[1]), lo01 = umin(key[0], key[1]);
  const uint32_t hi23 = umax(key[2], key[3]), lo23 = umin(key[2], key[3]);
  const uint32_t second = umax(umin(hi01, hi23), umax(lo01, lo23));
  top = umax(hi01, hi23);
  return uint32_t(key[0] >= second) | (uint32_t(key[1] >= second) << 1) |
         (uint32_t(key[2] >= second) << 2) | (uint32_t(key[3] >= second) << 3);
}

template <typename T>
__device__ __forceinline__ uint32_t top2_bits16(const Pack8<T>& x, int count, bool& bad) {
  // Two elements per 32-bit word, the lower index in the low half; a key from each half is a
  // shift, a mask that drops the sign and the other half, and the position.
  uint32_t word[4], key[8];
  memcpy(word, &x, sizeof(word));
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    key[i] = ((word[i / 2] << 2) & 0x1FFFCu) | (3u - (i & 3));
    key[i + 1] = ((word[i / 2] >> 14) & 0x1FFFCu) | (2u - (i & 3));
  }
  uint32_t top, top_hi;
  uint32_t bits = top2_of_keys(key, top);
  const uint32_t bits_hi = top2_of_keys(key + 4, top_hi);
  if (count == 8) {
    bits |= bits_hi << 4;
    top = umax(top, top_hi);
  }
  bad |= top >= (kInfBits<T> << 2);
  return bits;
}

// Bits of the kept elements among the `count` (4 or 8) loaded ones.
template <typename T, int M>
__device__ __forceinline__ uint32_t select_bits(const Pack8<T>& x, int count, int n, bool& bad) {
  if constexpr (sizeof(T) == 2) {
    if (M == 4 && n == 2) return top2_bits16(x, count, bad);
  }
  float a[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) a[i] = checked_abs(Conv<T>::to(x.v[i]), bad);
  if (M == 8) return topn_of_m<8>(a, n);  // the host checks k % 8 == 0: count is 8
  uint32_t bits = n == 2 ? top2_of_4(a[0], a[1], a[2], a[3]) : topn_of_m<4>(a, n);
  if (count == 8)
    bits |= (n == 2 ? top2_of_4(a[4], a[5], a[6], a[7]) : topn_of_m<4>(a + 4, n)) << 4;
  return bits;
}

// The 2 kept values of a 2:4 group (nibble `nib` of kept positions) in ascending position: the
// first kept of {0, 1, 2} and the last kept of {1, 2, 3}, which covers all 6 patterns in
// registers (the CPU kernel's kept_pair).
template <typename T>
__device__ __forceinline__ void kept_pair(const T* x, uint32_t nib, T* v) {
  v[0] = (nib & 1u) ? x[0] : ((nib & 2u) ? x[1] : x[2]);
  v[1] = (nib & 8u) ? x[3] : ((nib & 4u) ? x[2] : x[1]);
}

// 4 kept values: 8 bytes (fp16/bf16) or 16 bytes (fp32), one vector store.
template <typename T>
struct alignas(4 * sizeof(T)) Kept4 {
  T v[4];
};

// Units (8 elements each) a thread of nm_select_kernel loads before it ranks the first: 32 bytes
// of w in flight per thread (one 16-byte load per unit of fp16/bf16, two of fp32).
template <typename T>
constexpr int kSelectUnits = sizeof(T) == 4 ? 1 : 2;

// Bits 0-3 of b to the lowest bit of bytes 0-3: b, b << 7, b << 14 and b << 21 do not overlap.
__device__ __forceinline__ uint32_t spread4(uint32_t b) {
  return ((b & 0xFu) * 0x00204081u) & 0x01010101u;
}

// One unit's outputs: 8 bools, 8 pruned values, or 4 kept values and one metadata byte.
template <typename T, MaskOut MODE>
__device__ __forceinline__ void write_unit(const Pack8<T>& x, uint32_t bits, int64_t j, int64_t r,
                                           int64_t col, int count, int64_t k, bool aligned_rows,
                                           bool* __restrict__ mask_out, T* __restrict__ values_out,
                                           uint8_t* __restrict__ meta_out) {
  const int64_t off = r * k + col;
  if (MODE == MaskOut::Mask) {
    if (aligned_rows) {  // bit i -> byte i (0 or 1, a bool), little-endian
      uint2 mk;
      mk.x = spread4(bits);
      mk.y = spread4(bits >> 4);
      *reinterpret_cast<uint2*>(mask_out + off) = mk;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < count) mask_out[off + i] = (bits >> i) & 1u;
    }
  } else if (MODE == MaskOut::Prune) {
    Pack8<T> y;
#pragma unroll
    for (int i = 0; i < 8; ++i) y.v[i] = ((bits >> i) & 1u) ? x.v[i] : Conv<T>::from(0.f);
    store8(values_out + off, count, aligned_rows, y);
  } else {  // Compress (2:4): the 2 kept values of each group in ascending position.
    Kept4<T> kp;
    kept_pair(x.v, bits & 0xFu, kp.v);
    if (count == 8) kept_pair(x.v + 4, bits >> 4, kp.v + 2);
    T* dst = values_out + r * (k / 2) + col / 2;
    if (aligned_rows) {  // k % 8 == 0: dst is 4-element aligned within an aligned buffer
      if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&kp);
      } else {
        *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(&kp);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < count / 2) dst[i] = kp.v[i];
    }
    meta_out[j] = uint8_t(bits);
  }
}

// A block takes kSelectUnits<T> * blockDim.x consecutive units per pass (unit u of a thread is
// blockDim.x units after its unit u - 1, so each load instruction of a warp stays coalesced),
// loads all of a thread's units, then ranks and writes them.
template <typename T, int M, MaskOut MODE>
__global__ void __launch_bounds__(kThreads)
    nm_select_kernel(const T* __restrict__ w, int64_t k, RowSplit split, int n,
                     bool* __restrict__ mask_out, T* __restrict__ values_out,
                     uint8_t* __restrict__ meta_out, int* __restrict__ bad_flag) {
  constexpr int U = kSelectUnits<T>;
  const int64_t kb = split.kb, total = split.total;
  // Vector loads need every thread's 8 elements contiguous and 16-byte aligned: k % 8 == 0 and
  // (checked by the launcher) an aligned base pointer.
  const bool aligned_rows = (k % 8) == 0;
  const int64_t tile = int64_t(blockDim.x) * U;
  bool bad = false;
  for (int64_t base = blockIdx.x * tile + threadIdx.x; base < total;
       base += int64_t(gridDim.x) * tile) {
    Pack8<T> x[U];
    int64_t r[U], col[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + int64_t(u) * blockDim.x;
      if (j < total) {
        r[u] = split.row(j);
        col[u] = (j - r[u] * kb) * 8;
        load8(w + r[u] * k + col[u], count8(k, col[u]), aligned_rows, x[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + int64_t(u) * blockDim.x;
      if (j >= total) break;
      const int count = count8(k, col[u]);
      const uint32_t bits = select_bits<T, M>(x[u], count, n, bad);
      write_unit<T, MODE>(x[u], bits, j, r[u], col[u], count, k, aligned_rows, mask_out, values_out,
                          meta_out);
    }
  }
  if (bad && bad_flag != nullptr) *bad_flag = 1;  // a plain store: pinned host memory (glue.h)
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    decompress_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta, int64_t k,
                      RowSplit split, T* __restrict__ out, int* __restrict__ bad_meta) {
  const int64_t kb = split.kb, total = split.total;
  const bool aligned_rows = (k % 8) == 0;
  bool bad = false;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = split.row(j);
    const int64_t col = (j - r * kb) * 8;
    const int count = count8(k, col);
    const uint32_t bits = meta[j];
    const T* src = values + r * (k / 2) + col / 2;
    // A valid 2:4 byte has exactly 2 bits in each used nibble and none past the row's end. Like
    // the CPU kernel, an invalid group decompresses to zeros and its neighbour is unaffected.
    const bool ok_lo = __popc(bits & 0xFu) == 2;
    const bool ok_hi = count == 8 ? __popc(bits >> 4) == 2 : (bits >> 4) == 0u;
    bad |= !(ok_lo && ok_hi);
    Pack8<T> y;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t nib = (bits >> (4 * h)) & 0xFu;
      const bool ok = h == 0 ? ok_lo : (ok_hi && count == 8);
      int c = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool keep = ok && ((nib >> i) & 1u);
        y.v[4 * h + i] = keep ? src[2 * h + (c & 1)] : Conv<T>::from(0.f);
        c += keep;
      }
    }
    store8(out + r * k + col, count, aligned_rows, y);
  }
  if (bad && bad_meta != nullptr) *bad_meta = 1;  // once per thread: a plain store (glue.h)
}

__global__ void __launch_bounds__(kThreads)
    pack_kernel(const bool* __restrict__ mask, int64_t k, RowSplit split,
                uint8_t* __restrict__ packed) {
  const int64_t kb = split.kb, total = split.total;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = split.row(j);
    const int64_t col = (j - r * kb) * 8;
    const int count = count8(k, col);
    // Bytes, not bools: a bool whose byte is neither 0 nor 1 (a uint8 tensor viewed as bool)
    // is true, as torch reads it, and sets one bit.
    const uint8_t* src = reinterpret_cast<const uint8_t*>(mask) + r * k + col;
    uint32_t bits = 0;
    for (int i = 0; i < count; ++i) bits |= uint32_t(src[i] != 0) << i;
    packed[j] = uint8_t(bits);
  }
}

__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint8_t* __restrict__ packed, int64_t k, RowSplit split,
                  bool* __restrict__ mask) {
  const int64_t kb = split.kb, total = split.total;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = split.row(j);
    const int64_t col = (j - r * kb) * 8;
    const int count = count8(k, col);
    const uint32_t bits = packed[j];
    bool* dst = mask + r * k + col;
    for (int i = 0; i < count; ++i) dst[i] = (bits >> i) & 1u;
  }
}

// Changed groups among the packed-mask bits of one 32-bit word: nonzero nibbles (m = 4) or
// bytes (m = 8) of a ^ b, each folded onto its lowest bit and counted.
__device__ __forceinline__ int changed_groups(uint32_t d, int m) {
  if (m == 8) {
    d |= d >> 4;
    d |= d >> 2;
    return __popc((d | (d >> 1)) & 0x01010101u);
  }
  d |= d >> 2;
  return __popc((d | (d >> 1)) & 0x11111111u);
}

// Grid-stride over 16-byte units of both masks (kVec: both 16-byte aligned; else single bytes),
// the bytes past the last whole unit taken by the first threads. Each block sums its counts
// (warp shuffles, then one thread over the warps' sums) and adds them with one atomic.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    flips_kernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, int64_t nbytes,
                 int m, unsigned long long* __restrict__ out) {
  __shared__ unsigned long long warp_counts[kThreads / 32];
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t units = kVec ? nbytes / 16 : 0;
  unsigned long long count = 0;
  if (kVec) {
    const uint4* av = reinterpret_cast<const uint4*>(a);
    const uint4* bv = reinterpret_cast<const uint4*>(b);
    for (int64_t j = tid; j < units; j += stride) {
      const uint4 x = av[j], y = bv[j];
      count += changed_groups(x.x ^ y.x, m) + changed_groups(x.y ^ y.y, m) +
               changed_groups(x.z ^ y.z, m) + changed_groups(x.w ^ y.w, m);
    }
  }
  for (int64_t j = units * 16 + tid; j < nbytes; j += stride)
    count += changed_groups(uint32_t(a[j] ^ b[j]), m);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) count += __shfl_down_sync(0xffffffffu, count, s);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_counts[w];
    if (total) atomicAdd(out, total);
  }
}

// One thread per unit of `work`, at most `cap` blocks: enough to fill any current GPU several
// times over; the loops stride past the rest.
int grid_for(int64_t work, int64_t cap = 65535 * 8) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return int(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <typename T>
cudaError_t nm_select_t(MaskOut mode, const T* w, int64_t rows, int64_t k, int n, int m,
                        bool* mask_out, T* values_out, uint8_t* meta_out, int* bad,
                        cudaStream_t s) {
  const RowSplit split = RowSplit::make(rows, k);
  const int grid = grid_for((split.total + kSelectUnits<T> - 1) / kSelectUnits<T>);
#define CAST_LAUNCH(M, MODE)   \
  nm_select_kernel<T, M, MODE> \
      <<<grid, kThreads, 0, s>>>(w, k, split, n, mask_out, values_out, meta_out, bad)
  if (m == 8) {
    switch (mode) {
      case MaskOut::Mask: CAST_LAUNCH(8, MaskOut::Mask); break;
      case MaskOut::Prune: CAST_LAUNCH(8, MaskOut::Prune); break;
      default: return cudaErrorInvalidValue;  // compression is 2:4 only
    }
  } else {
    switch (mode) {
      case MaskOut::Mask: CAST_LAUNCH(4, MaskOut::Mask); break;
      case MaskOut::Prune: CAST_LAUNCH(4, MaskOut::Prune); break;
      case MaskOut::Compress: CAST_LAUNCH(4, MaskOut::Compress); break;
    }
  }
#undef CAST_LAUNCH
  return cudaGetLastError();
}

}  // namespace

cudaError_t nm_select(DType dt, MaskOut mode, const void* w, int64_t rows, int64_t k, int n, int m,
                      bool* mask_out, void* values_out, uint8_t* meta_out, int* bad,
                      cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  // The vector path (k % 8 == 0) loads and stores 16 bytes (8 for bool masks, fp16 values).
  const auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (k % 8 == 0 && (misaligned(w) || (mask_out != nullptr && misaligned(mask_out)) ||
                     (values_out != nullptr && misaligned(values_out)))) {
    return cudaErrorMisalignedAddress;
  }
  switch (dt) {
    case DType::F32:
      return nm_select_t(mode, static_cast<const float*>(w), rows, k, n, m, mask_out,
                         static_cast<float*>(values_out), meta_out, bad, stream);
    case DType::F16:
      return nm_select_t(mode, static_cast<const __half*>(w), rows, k, n, m, mask_out,
                         static_cast<__half*>(values_out), meta_out, bad, stream);
    case DType::BF16:
      return nm_select_t(mode, static_cast<const __nv_bfloat16*>(w), rows, k, n, m, mask_out,
                         static_cast<__nv_bfloat16*>(values_out), meta_out, bad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sparse24_decompress(DType dt, const void* values, const uint8_t* meta, int64_t rows,
                                int64_t k, void* out, int* bad_meta, cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  // Rows of a multiple of 8 are written with 16-byte stores (store8): `out` must allow them.
  if (k % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 != 0) return cudaErrorMisalignedAddress;
  const RowSplit split = RowSplit::make(rows, k);
  const int grid = grid_for(split.total);
  switch (dt) {
    case DType::F32:
      decompress_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(values), meta, k,
                                                       split, static_cast<float*>(out), bad_meta);
      break;
    case DType::F16:
      decompress_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(values), meta, k,
                                                       split, static_cast<__half*>(out), bad_meta);
      break;
    case DType::BF16:
      decompress_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(values),
                                                       meta, k, split,
                                                       static_cast<__nv_bfloat16*>(out), bad_meta);
      break;
  }
  return cudaGetLastError();
}

cudaError_t pack_mask(const bool* mask, int64_t rows, int64_t k, uint8_t* packed,
                      cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  const RowSplit split = RowSplit::make(rows, k);
  pack_kernel<<<grid_for(split.total), kThreads, 0, stream>>>(mask, k, split, packed);
  return cudaGetLastError();
}

cudaError_t unpack_mask(const uint8_t* packed, int64_t rows, int64_t k, bool* mask,
                        cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  const RowSplit split = RowSplit::make(rows, k);
  unpack_kernel<<<grid_for(split.total), kThreads, 0, stream>>>(packed, k, split, mask);
  return cudaGetLastError();
}

cudaError_t mask_flips(const uint8_t* a, const uint8_t* b, int64_t nbytes, int m, int64_t* out,
                       cudaStream_t stream) {
  if (nbytes == 0) return cudaSuccess;
  auto* o = reinterpret_cast<unsigned long long*>(out);
  if (reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0) {
    flips_kernel<true><<<grid_for((nbytes + 15) / 16, kFlipsMaxBlocks), kThreads, 0, stream>>>(
        a, b, nbytes, m, o);
  } else {
    flips_kernel<false>
        <<<grid_for(nbytes, kFlipsMaxBlocks), kThreads, 0, stream>>>(a, b, nbytes, m, o);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cast_ext
