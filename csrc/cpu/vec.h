// Small vector helpers shared by the CPU kernels (adams.cpp, sparse24_gemm.cpp, distill.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace cast_ext {

// Bit 31 of the result is set iff one of x[0..cnt) is NaN or Inf: an integer test of the
// exponent field, (u & exp) + 0x00800000 carries into bit 31 exactly when the exponent is all
// ones, so the loop vectorises at any SSE level. ORing results over several calls keeps the bit.
inline uint32_t nonfinite_bits(const float* x, int64_t cnt) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t acc = 0;
  for (int64_t i = 0; i < cnt; ++i) acc |= (u[i] & 0x7f800000u) + 0x00800000u;
  return acc & 0x80000000u;
}

#if defined(__x86_64__)
// fp16 <-> fp32 with F16C (vcvtph2ps / vcvtps2ph; round to nearest even, like c10::Half).
// GCC 12 vectorises neither c10::Half's conversion routine below AVX-512 nor _Float16's, and a
// scalar conversion made the fp16 AdamS step and the fp16 GEMM several times slower. Call only
// where cpu_isa() >= CpuIsa::Avx2 (isa.h), whose level includes F16C.
__attribute__((target("avx,f16c"))) inline void f16_to_f32_f16c(const c10::Half* src, int64_t n,
                                                                float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}
__attribute__((target("avx,f16c"))) inline void f32_to_f16_f16c(const float* src, int64_t n,
                                                                c10::Half* dst) {
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRne);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = c10::Half(_cvtss_sh(src[i], kRne), c10::Half::from_bits());
}
#endif

// Rows of n elements between bf16/fp16 and fp32 (round to nearest even), each at the best
// instruction-set level the CPU has (convert.cpp).
void bf16_to_float(const c10::BFloat16* src, int64_t n, float* dst);
void float_to_bf16(const float* src, int64_t n, c10::BFloat16* dst);
void half_to_float(const c10::Half* src, int64_t n, float* dst);
void float_to_half(const float* src, int64_t n, c10::Half* dst);

}  // namespace cast_ext
