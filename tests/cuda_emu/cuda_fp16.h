// Stand-in for CUDA's <cuda_fp16.h> in the CPU emulation (see cuda_emu.h). Tests only.
// __half holds IEEE binary16 bits. As under the torch build's __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_HALF_OPERATORS__, it converts only through the intrinsics and has no arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

struct alignas(2) __half {
  unsigned short __x;
};

// Round to nearest even (GCC's _Float16 conversion); NaN becomes the canonical 0x7FFF, as the
// device's cvt.rn.f16.f32 returns.
inline __half __float2half_rn(float f) {
  __half h;
  if (f != f) {
    h.__x = 0x7FFFu;
    return h;
  }
  const _Float16 v = static_cast<_Float16>(f);
  std::memcpy(&h.__x, &v, sizeof(h.__x));
  return h;
}

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, sizeof(v));
  return static_cast<float>(v);
}

inline __half __ushort_as_half(unsigned short x) {
  __half h;
  h.__x = x;
  return h;
}
