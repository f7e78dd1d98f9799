// Small-M 2:4 sparse GEMM straight from the packed format (CUDA, no torch headers):
// y[M, N] = x[M, K] @ W^T (+ bias), W [N, K] held as values [N, K/2] + meta [N, K/8], M <= 16.
//
// Why: at decode-sized M the product is a matrix-vector one and memory-bound, and a dense GEMV
// reads N*K weight elements while the packed form is N*K/2 values plus N*K/8 meta bytes: 56% of
// the bytes for fp16/bf16. cuSPARSELt is slower than dense there (plan and tile overheads), and
// the portable path (decompress, then cuBLAS) reads the weight three times over.
// Algorithm: one warp per output row. Each lane takes chunks of 16 dense columns (8 values,
// one 16-byte load for fp16/bf16; 2 meta bytes, one 2-byte load; both streaming loads, and 4
// chunks' loads issued before the first is used), expands the 4 groups in
// registers with selects (no indexing by data: the first kept position gets the group's first
// value, the second its second; an invalid nibble, not exactly 2 bits, contributes zeros and
// sets `bad_meta`), and accumulates against the same 16 columns of every token of x (16-byte
// loads, served from L1/L2: x is tiny next to W) in fp32. Lanes are reduced with shuffles; lane 0
// adds the bias in fp32 and rounds once to T, like the tensor-core GEMMs.
// Layout: x [M, K] row-major, values [N, K/2], meta [N, K/8] (nibble per group, LSB first),
// y [M, N]; K % 16 == 0 and 16-byte-aligned x/values, 2-byte-aligned meta (checked here).
// Dtypes: fp32, fp16, bf16 (x, values, bias, y share T). Archs: any.
// Reference: cast_ext/reference.py sparse24_gemm.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

template <typename T>
cudaError_t gemv24_t(const T* x, const T* values, const uint8_t* meta, const T* bias, int m,
                     int64_t n, int64_t k, T* y, int* bad_meta, cudaStream_t s) {
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

bool misaligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a != 0; }

}  // namespace

bool sparse24_gemv_supported(int64_t m, int64_t k, const void* x, const void* values,
                             const uint8_t* meta, const void* bias, const void* y) {
  return m >= 1 && m <= kGemv24MaxM && k % 16 == 0 && !misaligned(x, 16) &&
         !misaligned(values, 16) && !misaligned(meta, 2) && !misaligned(bias, 2) &&
         !misaligned(y, 2);
}

cudaError_t sparse24_gemv(DType dt, const void* x, const void* values, const uint8_t* meta,
                          const void* bias, int64_t m, int64_t n, int64_t k, void* y, int* bad_meta,
                          cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (!sparse24_gemv_supported(m, k, x, values, meta, bias, y)) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::F32:
      return gemv24_t(static_cast<const float*>(x), static_cast<const float*>(values), meta,
                      static_cast<const float*>(bias), int(m), n, k, static_cast<float*>(y),
                      bad_meta, stream);
    case DType::F16:
      return gemv24_t(static_cast<const __half*>(x), static_cast<const __half*>(values), meta,
                      static_cast<const __half*>(bias), int(m), n, k, static_cast<__half*>(y),
                      bad_meta, stream);
    case DType::BF16:
      return gemv24_t(static_cast<const __nv_bfloat16*>(x),
                      static_cast<const __nv_bfloat16*>(values), meta,
                      static_cast<const __nv_bfloat16*>(bias), int(m), n, k,
                      static_cast<__nv_bfloat16*>(y), bad_meta, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace cast_ext
