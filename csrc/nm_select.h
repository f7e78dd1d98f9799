// N:M selection shared by the CPU and CUDA kernels (plain C++, no torch headers), so that every
// device ranks a group with the same comparisons and agrees bit for bit.
//
// Rule (cast_ext/reference.py: nm_mask): in a group of m magnitudes keep the n largest; on equal
// magnitudes the lower index wins. Element i is kept iff fewer than n members beat it, where j
// beats i iff |a_j| > |a_i|, or |a_j| == |a_i| and j < i. Ranks are a permutation of 0..m-1, so
// exactly n bits are set. No branch depends on the data (a sorting-network-like count).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CAST_HD __host__ __device__ __forceinline__
#else
#define CAST_HD inline
#endif
// The unroll pragma of the compiler that sees the code: nvcc's device pass, or GCC for the CPU
// kernels (nvcc's host pass needs none: the .cu files run these loops on the device only).
#if defined(__CUDA_ARCH__)
#define CAST_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define CAST_UNROLL
#else
#define CAST_UNROLL _Pragma("GCC unroll 8")
#endif

namespace cast_ext {

// Which of 4 magnitudes are the 2 largest (ties to the lower index). A struct of flags rather
// than a bit field so that the CPU loops over groups stay auto-vectorisable.
struct Keep4 {
  bool k0, k1, k2, k3;
};

CAST_HD Keep4 keep2_of_4(float a0, float a1, float a2, float a3) {
  // cij (i < j): i beats j iff a_i >= a_j.
  const uint32_t c01 = a0 >= a1, c02 = a0 >= a2, c03 = a0 >= a3;
  const uint32_t c12 = a1 >= a2, c13 = a1 >= a3, c23 = a2 >= a3;
  // Rank of element i = how many beat it; kept iff rank < 2.
  return {3u - c01 - c02 - c03 < 2u, c01 + 2u - c12 - c13 < 2u, c02 + c12 + 1u - c23 < 2u,
          c03 + c13 + c23 < 2u};
}

// Bit i set iff element i is among the 2 largest of 4 magnitudes (ties to the lower index).
CAST_HD uint32_t top2_of_4(float a0, float a1, float a2, float a3) {
  const Keep4 k = keep2_of_4(a0, a1, a2, a3);
  return uint32_t(k.k0) | (uint32_t(k.k1) << 1) | (uint32_t(k.k2) << 2) | (uint32_t(k.k3) << 3);
}

// General N:M for M <= 8: bit i set iff element i is among the n largest of a[0..M).
template <int M>
CAST_HD uint32_t topn_of_m(const float* a, int n) {
  uint32_t bits = 0;
  CAST_UNROLL
  for (int i = 0; i < M; ++i) {
    uint32_t rank = 0;
    CAST_UNROLL
    for (int j = 0; j < M; ++j) {
      // j beats i: strictly larger, or equal at a lower index.
      rank += (j < i) ? uint32_t(a[j] >= a[i]) : uint32_t(a[j] > a[i]);
    }
    bits |= uint32_t(rank < uint32_t(n)) << i;
  }
  return bits;
}

CAST_HD float abs_f(float x) { return x < 0.f ? -x : x; }

// 1 if the magnitude is NaN or Inf (NaN fails every comparison).
CAST_HD uint32_t nonfinite(float a) { return uint32_t(!(a <= 3.402823466e+38f)); }

// |x| as float, with non-finite inputs reported through `bad`.
CAST_HD float checked_abs(float x, bool& bad) {
  const float a = abs_f(x);
  bad |= nonfinite(a) != 0u;
  return a;
}

}  // namespace cast_ext
