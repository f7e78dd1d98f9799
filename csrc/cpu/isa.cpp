// See isa.h.
#include "isa.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace cast_ext {
namespace {

CpuIsa detect() {
  CpuIsa best = CpuIsa::Default;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4"))
    best = CpuIsa::Avx512;
  else if (__builtin_cpu_supports("x86-64-v3"))
    best = CpuIsa::Avx2;
#endif
  const char* env = std::getenv("CAST_EXT_CPU_ISA");
  const std::string want = env ? env : "";
  const CpuIsa cap = want == "default" ? CpuIsa::Default
                     : want == "avx2"  ? CpuIsa::Avx2
                                       : CpuIsa::Avx512;
  return std::min(best, cap);
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cast_ext
