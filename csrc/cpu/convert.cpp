// Row conversions between the 16-bit float dtypes and fp32 shared by the CPU kernels (vec.h):
// bf16 by bit shifts (x86-64-v4/v3/baseline versions, csrc/cpu/isa.h), fp16 with F16C from the
// v3 level on (GCC vectorises c10::Half's scalar routine only with AVX-512).
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

#include "isa.h"
#include "vec.h"

namespace cast_ext {
namespace {

#define CAST_CONVERT_LEVEL(LEVEL, ATTR)                                                  \
  ATTR void bf16_to_float_##LEVEL(const c10::BFloat16* src, int64_t n, float* dst) {     \
    const uint16_t* b = reinterpret_cast<const uint16_t*>(src);                          \
    for (int64_t i = 0; i < n; ++i) dst[i] = c10::bit_cast<float>(uint32_t(b[i]) << 16); \
  }                                                                                      \
  ATTR void float_to_bf16_##LEVEL(const float* src, int64_t n, c10::BFloat16* dst) {     \
    for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);                      \
  }
CAST_CONVERT_LEVEL(v4, CAST_TARGET_V4)
CAST_CONVERT_LEVEL(v3, CAST_TARGET_V3)
CAST_CONVERT_LEVEL(base, )
#undef CAST_CONVERT_LEVEL

}  // namespace

void bf16_to_float(const c10::BFloat16* src, int64_t n, float* dst) {
  CAST_ISA_CALL(bf16_to_float, src, n, dst);
}

void float_to_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
  CAST_ISA_CALL(float_to_bf16, src, n, dst);
}

void half_to_float(const c10::Half* src, int64_t n, float* dst) {
#if defined(__x86_64__)
  if (cpu_isa() >= CpuIsa::Avx2) return f16_to_f32_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void float_to_half(const float* src, int64_t n, c10::Half* dst) {
#if defined(__x86_64__)
  if (cpu_isa() >= CpuIsa::Avx2) return f32_to_f16_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

}  // namespace cast_ext
