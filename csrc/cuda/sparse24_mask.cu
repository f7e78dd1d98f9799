// N:M mask selection, pruning, 2:4 compression and packed-mask kernels (CUDA, no torch headers).
//
// Algorithm: a thread's unit is one byte of the packed mask, i.e. 8 consecutive elements of a row
// (two 2:4 groups or one 8-wide group; 4 elements at the end of a row whose length is 4 mod 8).
// It loads them (one 16-byte load for fp16/bf16, two for fp32, when rows are 8-aligned; the
// selection kernel loads two units per thread for fp16/bf16 before ranking either), ranks
// each group in registers with the branch-free count of csrc/nm_select.h (shared with the CPU
// kernels, so both agree bit for bit) and writes its outputs: 8 bools, 8 pruned values, or 4
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

// Bits of the kept elements among the `count` (4 or 8) loaded ones.
template <typename T, int M>
__device__ __forceinline__ uint32_t select_bits(const Pack8<T>& x, int count, int n, bool& bad) {
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

// One unit's outputs: 8 bools, 8 pruned values, or 4 kept values and one metadata byte.
template <typename T, MaskOut MODE>
__device__ __forceinline__ void write_unit(const Pack8<T>& x, uint32_t bits, int64_t j, int64_t r,
                                           int64_t col, int count, int64_t k, bool aligned_rows,
                                           bool* __restrict__ mask_out, T* __restrict__ values_out,
                                           uint8_t* __restrict__ meta_out) {
  const int64_t off = r * k + col;
  if (MODE == MaskOut::Mask) {
    Pack8<bool> mk;
#pragma unroll
    for (int i = 0; i < 8; ++i) mk.v[i] = (bits >> i) & 1u;
    if (aligned_rows) {
      *reinterpret_cast<uint2*>(mask_out + off) = *reinterpret_cast<const uint2*>(&mk);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < count) mask_out[off + i] = mk.v[i];
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
