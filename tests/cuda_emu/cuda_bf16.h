// Stand-in for CUDA's <cuda_bf16.h> in the CPU emulation (see cuda_emu.h). Tests only.
// __nv_bfloat16 holds the top 16 bits of an fp32. As under the torch build's
// __CUDA_NO_BFLOAT16_CONVERSIONS__, it converts only through the intrinsics and has no arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};

// Round to nearest even, NaN to the canonical 0x7FFF: cuda_bf16.hpp's __float2bfloat16_rn.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  __nv_bfloat16 b;
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
    b.__x = 0x7FFFu;
    return b;
  }
  const std::uint32_t rest = x << 16;
  std::uint32_t hi = x >> 16;
  if (rest > 0x80000000u || (rest == 0x80000000u && (hi & 1u) != 0u)) ++hi;
  b.__x = static_cast<unsigned short>(hi);
  return b;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t x = std::uint32_t(b.__x) << 16;
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) {
  __nv_bfloat16 h;
  h.__x = x;
  return h;
}
