// See isa.h.
#include "isa.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace cast_ext {
namespace {

CpuIsa detect() {
  CpuIsa best = CpuIsa::Default;
#if defined(__x86_64__)
  __builtin_cpu_init();
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
#else  // level names need GCC 12; older compilers test the features that matter here (every
       // CPU with AVX2 and FMA also has F16C, BMI and LZCNT)
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#endif
  if (v4)
    best = CpuIsa::Avx512;
  else if (v3)
    best = CpuIsa::Avx2;
#endif
  const char* env = std::getenv("CAST_EXT_CPU_ISA");
  std::string want = env ? env : "";
  std::transform(want.begin(), want.end(), want.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  CpuIsa cap = CpuIsa::Avx512;
  if (want == "default") {
    cap = CpuIsa::Default;
  } else if (want == "avx2") {
    cap = CpuIsa::Avx2;
  } else if (!want.empty() && want != "avx512") {
    // Runs while the library loads (a namespace-scope constant asks): no exception, no
    // Python warning machinery; a line on stderr, and the cap is not applied.
    std::fprintf(stderr,
                 "cast_ext: CAST_EXT_CPU_ISA=%s is not one of avx512, avx2, default; ignored "
                 "(kernels run as %s)\n",
                 env, cpu_isa_name(best));
  }
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
