// Register tiles of 8 elements shared by the CUDA kernels (plain CUDA, no torch headers): the
// fp32 conversions of each storage type, and 8-element loads/stores that use 16-byte vectors
// when the caller has checked that the 8 elements are contiguous and 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cast_ext {
namespace cuda {

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
struct alignas(16) Pack8 {
  T v[8];
};

// 8 (or `count` < 8, the rest zero) elements; `vec`: 16-byte loads.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int count, bool vec, Pack8<T>& out) {
  if (vec) {
    const uint4* src = reinterpret_cast<const uint4*>(p);
    uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
    for (int i = 0; i < int(sizeof(Pack8<T>) / 16); ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out.v[i] = i < count ? p[i] : Conv<T>::from(0.f);
  }
}

// The first `count` elements; `vec`: 16-byte stores of all 8.
template <typename T>
__device__ __forceinline__ void store8(T* p, int count, bool vec, const Pack8<T>& in) {
  if (vec) {
    uint4* dst = reinterpret_cast<uint4*>(p);
    const uint4* src = reinterpret_cast<const uint4*>(&in);
#pragma unroll
    for (int i = 0; i < int(sizeof(Pack8<T>) / 16); ++i) dst[i] = src[i];
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < count) p[i] = in.v[i];
  }
}

}  // namespace cuda
}  // namespace cast_ext
