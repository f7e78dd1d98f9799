// Small-M 2:4 sparse GEMM straight from the packed format (CUDA, no torch headers):
// y[M, N] = x[M, K] @ W^T (+ bias), W [N, K] held as values [N, K/2] + meta [N, K/8], M <= 16.
//
// Why: at decode-sized M the product is a matrix-vector one and memory-bound, and a dense GEMV
// reads N*K weight elements while the packed form is N*K/2 values plus N*K/8 meta bytes: 56% of
// the bytes for fp16/bf16. cuSPARSELt is slower than dense there (plan and tile overheads), and
// the portable path (decompress, then cuBLAS) reads the weight three times over.
//
// Two kernels. Both accumulate in fp32, add the bias in fp32 and round once to T, like the
// tensor-core GEMMs; an invalid nibble (not exactly 2 bits) contributes zeros and sets
// `bad_meta`.
// * SIMT (fp32, M = 1, pre-sm80, K % 32 != 0): one warp per output row. Each lane takes chunks of
//   16 dense columns (8 values, one 16-byte load for fp16/bf16; 2 meta bytes, one 2-byte load;
//   both streaming loads, and 4 chunks' loads issued before the first is used), expands the 4
//   groups in registers with selects (no indexing by data: the first kept position gets the
//   group's first value, the second its second), and accumulates against the same 16 columns of
//   every token of x (16-byte loads, from L1/L2) in fp32. Lanes are reduced with shuffles. Every
//   warp reads all of x: at M = 16 (128 KB of bf16 x at K = 4096) that traffic, not the weight,
//   set its pace on an H200 (0.11-0.21x dense there).
// * Tensor cores (fp16/bf16, 2 <= M <= 16, K % 32 == 0, sm80+): mma.sync m16n8k16, with the
//   weight as the 16 x 16 A operand and x^T as B (one 8-token tile, two above 8 tokens). A block
//   of 8 warps computes 16 output rows, the warps splitting K (each warp a contiguous run of
//   32-column steps), and sums their partial tiles in shared memory in a fixed order. A lane
//   loads, from the two rows of W its A fragment covers (rows g and g + 8 of the tile,
//   g = lane / 4), the 4 words of each 32-column step's values it uses and the step's 4 meta
//   bytes, for kMmaUnroll steps before the first is used, and builds its fragment registers (the
//   pair of columns 2t, 2t + 1 and 2t + 8, 2t + 9, t = lane % 4, each within one group) with
//   selects; x's fragments are 4-byte loads. x is read once per 16 rows, not per row. Off sm80
//   (the CPU emulation, older archs) the product is formed from the same fragments with warp
//   shuffles.
// Layout: x [M, K] row-major, values [N, K/2], meta [N, K/8] (nibble per group, LSB first),
// y [M, N]; K % 16 == 0 and 16-byte-aligned x/values, 2-byte-aligned meta (checked here; the
// tensor-core kernel also needs K % 32 == 0 and 4-byte-aligned meta, else the SIMT one runs).
// Dtypes: fp32, fp16, bf16 (x, values, bias, y share T). Archs: any.
// Reference: cast_ext/reference.py sparse24_gemm.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/kernels.h"
#include "cuda/vec8.cuh"

namespace cast_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;
constexpr int kBatch = 4;  // chunks of 16 columns per lane whose loads are in flight together

// A chunk's 8 values with streaming (evict-first) 16-byte loads: the weight is read once, and
// must not push x, which every warp reads again, out of L1.
template <typename T>
__device__ __forceinline__ void load8_streaming(const T* p, Pack8<T>& out) {
  const uint4* src = reinterpret_cast<const uint4*>(p);
  uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
  for (int i = 0; i < int(sizeof(Pack8<T>) / 16); ++i) dst[i] = __ldcs(src + i);
}

// The 16 dense weights of one chunk from its 8 values and 16 meta bits.
template <typename T>
__device__ __forceinline__ void expand16(const Pack8<T>& v, uint32_t bits, float* w, bool& bad) {
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const uint32_t nib = (bits >> (4 * g)) & 0xFu;
    const bool ok = __popc(nib) == 2;
    bad |= !ok;
    const float v0 = Conv<T>::to(v.v[2 * g]), v1 = Conv<T>::to(v.v[2 * g + 1]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool keep = ok && ((nib >> i) & 1u);
      const bool second = (nib & ((1u << i) - 1u)) != 0u;  // a kept position below this one
      w[4 * g + i] = keep ? (second ? v1 : v0) : 0.f;
    }
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    gemv24_kernel(const T* __restrict__ x, const T* __restrict__ values,
                  const uint8_t* __restrict__ meta, const T* __restrict__ bias, int m, int64_t n,
                  int64_t k, T* __restrict__ y, int* __restrict__ bad_meta) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= n) return;  // the whole warp: `row` is uniform across it
  const int64_t chunks = k / 16;
  const T* vrow = values + row * (k / 2);
  const uint8_t* mrow = meta + row * (k / 8);
  float acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0.f;
  bool bad = false;
  // kBatch chunks per lane per pass, all their weight loads issued before any is used: a warp
  // holds 4 x 18 bytes per lane in flight, not one chunk's.
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kBatch) {
    Pack8<T> v[kBatch];
    uint32_t bits[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < chunks) {
        load8_streaming(vrow + c * 8, v[u]);
        bits[u] = __ldcs(reinterpret_cast<const unsigned short*>(mrow + c * 2));
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
      float w[16];
      expand16(v[u], bits[u], w, bad);
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if (t < m) {
          Pack8<T> xa, xb;
          load8(x + t * k + c * 16, 8, true, xa);
          load8(x + t * k + c * 16 + 8, 8, true, xb);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            acc[t] = fmaf(Conv<T>::to(xa.v[i]), w[i], acc[t]);
            acc[t] = fmaf(Conv<T>::to(xb.v[i]), w[8 + i], acc[t]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MT; ++t) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], s);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? Conv<T>::to(bias[row]) : 0.f;
#pragma unroll
    for (int t = 0; t < MT; ++t)
      if (t < m) y[t * n + row] = Conv<T>::from(acc[t] + b);
  }
  if (bad && bad_meta != nullptr) *bad_meta = 1;  // a plain store: pinned host memory (glue.h)
}

// ---- the tensor-core kernel --------------------------------------------------------------------

constexpr int kMmaWarps = 8;   // warps per block, splitting K; a block computes 16 output rows
constexpr int kMmaUnroll = 4;  // 32-column steps per warp whose weight loads are in flight together

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800  // for mma16816 without the instruction
template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint32_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
#endif

// d += A @ B for one m16n8k16 tile, fragments as PTX lays them out ("Matrix Fragments for
// mma.m16n8k16 with floating point type"; g = lane / 4, t = lane % 4): a[0] holds A[g][2t, 2t+1]
// (low half first), a[1] A[g+8][2t, 2t+1], a[2] A[g][2t+8, 2t+9], a[3] A[g+8][2t+8, 2t+9];
// b[0] B[2t, 2t+1][g], b[1] B[2t+8, 2t+9][g]; d[0], d[1] D[g][2t, 2t+1], d[2], d[3]
// D[g+8][2t, 2t+1]. The whole warp must call it.
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  // The same product from the same fragments: the 4 lanes of row group g hold A's rows g and
  // g + 8; the 4 lanes of group 2t + c hold B's column 2t + c. Each lane fetches their registers
  // (lane ^ src names the source lane) and sums its 4 outputs over k.
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const auto lo = [](uint32_t r) { return half_bits_to_float<T>(r & 0xFFFFu); };
  const auto hi = [](uint32_t r) { return half_bits_to_float<T>(r >> 16); };
#pragma unroll
  for (int tp = 0; tp < 4; ++tp) {  // the lanes holding k = 2tp, 2tp + 1, 2tp + 8, 2tp + 9
    uint32_t ar[4], br[2][2];
#pragma unroll
    for (int r = 0; r < 4; ++r) ar[r] = __shfl_xor_sync(0xffffffffu, a[r], lane ^ (4 * g + tp));
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        br[c][r] = __shfl_xor_sync(0xffffffffu, b[r], lane ^ (4 * (2 * t + c) + tp));
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // d[i]: row g (+ 8 for i >= 2), column 2t + (i & 1)
      const uint32_t a_lo = ar[i >> 1], a_hi = ar[2 + (i >> 1)];  // k 2tp.. and 2tp + 8..
      const uint32_t* bc = br[i & 1];
      d[i] +=
          lo(a_lo) * lo(bc[0]) + hi(a_lo) * hi(bc[0]) + lo(a_hi) * lo(bc[1]) + hi(a_hi) * hi(bc[1]);
    }
  }
#endif
}

// One A-fragment register: W[row][p], W[row][p + 1] of a 2:4 group (p = 0 or 2) as two 16-bit
// halves, from the group's kept pair `vv` (its first kept value in the low half) and its nibble.
// An invalid nibble gives zeros and sets `bad`.
__device__ __forceinline__ uint32_t group_pair(uint32_t vv, uint32_t nib, int p, bool& bad) {
  const bool ok = __popc(nib) == 2;
  bad |= !ok;
  const uint32_t v0 = vv & 0xFFFFu, v1 = vv >> 16;
  const bool k0 = ok && ((nib >> p) & 1u), k1 = ok && ((nib >> (p + 1)) & 1u);
  const bool s0 = (nib & ((1u << p) - 1u)) != 0u;  // a kept position below column p
  const bool s1 = (nib & ((1u << (p + 1)) - 1u)) != 0u;
  const uint32_t lo = k0 ? (s0 ? v1 : v0) : 0u, hi = k1 ? (s1 ? v1 : v0) : 0u;
  return lo | (hi << 16);
}

// NT: token tiles of 8 (1 for M <= 8, 2 for M <= 16).
template <typename T, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32, 2)
    gemv24_mma_kernel(const T* __restrict__ x, const T* __restrict__ values,
                      const uint8_t* __restrict__ meta, const T* __restrict__ bias, int m,
                      int64_t n, int64_t k, T* __restrict__ y, int* __restrict__ bad_meta) {
  __shared__ float part[kMmaWarps][16][8 * NT];  // each warp's partial 16-row tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * 16;
  const int64_t rows[2] = {row0 + g, row0 + g + 8};  // the two rows of W this lane's A holds
  const int64_t steps = k / 32, s_begin = steps * warp / kMmaWarps;
  const int64_t s_end = steps * (warp + 1) / kMmaWarps;
  const int ga = t >> 1, p = 2 * (t & 1);  // columns 2t, 2t + 1: group ga of a 16-column chunk
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
  bool bad = false;
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kMmaUnroll) {
    // per step and row, the 4 words of values this lane's fragments use (the kept pairs of
    // groups ga and 2 + ga of both 16-column chunks) and the step's 8 nibbles; a row past n
    // reads as zeros with valid nibbles
    uint32_t v[kMmaUnroll][2][4], nib8[kMmaUnroll][2];
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t s = s0 + u;
        const bool in = s < s_end && rows[r] < n;
        const unsigned int* vp =
            reinterpret_cast<const unsigned int*>(values + rows[r] * (k / 2)) + 8 * s + ga;
#pragma unroll
        for (int j = 0; j < 4; ++j) v[u][r][j] = in ? __ldg(vp + 2 * j) : 0u;
        nib8[u][r] = in ? __ldg(reinterpret_cast<const unsigned int*>(meta + rows[r] * (k / 8)) + s)
                        : 0x33333333u;
      }
    }
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int64_t s = s0 + u;
      if (s >= s_end) break;  // uniform across the warp
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the step's two 16-column chunks: one k16 tile each
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t bits = nib8[u][r] >> (16 * h);
          // groups ga (columns 2t, 2t + 1) and 2 + ga (columns 2t + 8, 2t + 9) of the chunk
          a[r] = group_pair(v[u][r][2 * h], (bits >> (4 * ga)) & 0xFu, p, bad);
          a[2 + r] = group_pair(v[u][r][2 * h + 1], (bits >> (8 + 4 * ga)) & 0xFu, p, bad);
        }
        const int64_t col = s * 32 + h * 16;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int tok = nt * 8 + g;
          uint32_t b[2] = {0u, 0u};
          if (tok < m) {
            const unsigned int* xr = reinterpret_cast<const unsigned int*>(x + tok * k + col);
            b[0] = __ldg(xr + t);
            b[1] = __ldg(xr + t + 4);
          }
          mma16816<T>(acc[nt], a, b);
        }
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][g + 8 * (i >> 1)][nt * 8 + 2 * t + (i & 1)] = acc[nt][i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8 * NT; i += blockDim.x) {
    const int r = i % 16, tok = i / 16;  // consecutive threads: consecutive rows of one token
    const int64_t row = row0 + r;
    if (row < n && tok < m) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) sum += part[w][r][tok];
      const float b = bias != nullptr ? Conv<T>::to(bias[row]) : 0.f;
      y[tok * n + row] = Conv<T>::from(sum + b);
    }
  }
  if (bad && bad_meta != nullptr) *bad_meta = 1;  // a plain store: pinned host memory (glue.h)
}

bool misaligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; }

// Whether the tensor-core kernel takes these arguments (see kernels.h).
bool uses_tensor_cores(DType dt, int64_t m, int64_t k, const uint8_t* meta, bool tensor_cores) {
  return tensor_cores && dt != DType::F32 && m >= 2 && m <= kGemv24MaxM && k % 32 == 0 &&
         !misaligned(meta, 4);
}

// `mma`: the tensor-core kernel (fp16/bf16 only; the caller checked its conditions).
template <typename T>
cudaError_t gemv24_t(const T* x, const T* values, const uint8_t* meta, const T* bias, int m,
                     int64_t n, int64_t k, T* y, int* bad_meta, bool mma, cudaStream_t s) {
  if constexpr (!std::is_same_v<T, float>) {
    if (mma) {
      const int64_t blocks = (n + 15) / 16;
      if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
      const dim3 grid(static_cast<unsigned>(blocks));
      if (m <= 8) {
        gemv24_mma_kernel<T, 1>
            <<<grid, kMmaWarps * 32, 0, s>>>(x, values, meta, bias, m, n, k, y, bad_meta);
      } else {
        gemv24_mma_kernel<T, 2>
            <<<grid, kMmaWarps * 32, 0, s>>>(x, values, meta, bias, m, n, k, y, bad_meta);
      }
      return cudaGetLastError();
    }
  }
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks));
#define CAST_GEMV(MT) \
  gemv24_kernel<T, MT><<<grid, kThreads, 0, s>>>(x, values, meta, bias, m, n, k, y, bad_meta)
  if (m <= 1) {
    CAST_GEMV(1);
  } else if (m <= 2) {
    CAST_GEMV(2);
  } else if (m <= 4) {
    CAST_GEMV(4);
  } else if (m <= 8) {
    CAST_GEMV(8);
  } else {
    CAST_GEMV(16);
  }
#undef CAST_GEMV
  return cudaGetLastError();
}

}  // namespace

bool sparse24_gemv_supported(int64_t m, int64_t k, const void* x, const void* values,
                             const uint8_t* meta, const void* bias, const void* y) {
  return m >= 1 && m <= kGemv24MaxM && k % 16 == 0 && !misaligned(x, 16) &&
         !misaligned(values, 16) && !misaligned(meta, 2) && !misaligned(bias, 2) &&
         !misaligned(y, 2);
}

cudaError_t sparse24_gemv(DType dt, const void* x, const void* values, const uint8_t* meta,
                          const void* bias, int64_t m, int64_t n, int64_t k, void* y, int* bad_meta,
                          bool tensor_cores, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (!sparse24_gemv_supported(m, k, x, values, meta, bias, y)) return cudaErrorInvalidValue;
  const bool mma = uses_tensor_cores(dt, m, k, meta, tensor_cores);
  switch (dt) {
    case DType::F32:
      return gemv24_t(static_cast<const float*>(x), static_cast<const float*>(values), meta,
                      static_cast<const float*>(bias), int(m), n, k, static_cast<float*>(y),
                      bad_meta, false, stream);
    case DType::F16:
      return gemv24_t(static_cast<const __half*>(x), static_cast<const __half*>(values), meta,
                      static_cast<const __half*>(bias), int(m), n, k, static_cast<__half*>(y),
                      bad_meta, mma, stream);
    case DType::BF16:
      return gemv24_t(static_cast<const __nv_bfloat16*>(x),
                      static_cast<const __nv_bfloat16*>(values), meta,
                      static_cast<const __nv_bfloat16*>(bias), int(m), n, k,
                      static_cast<__nv_bfloat16*>(y), bad_meta, mma, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace cast_ext
