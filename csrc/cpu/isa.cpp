// See isa.h.
#include "isa.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace cast_ext {
namespace {

struct Detected {
  CpuIsa isa;
  bool bf16;  // AVX-512 BF16 on top of isa == Avx512
};

Detected detect() {
  CpuIsa best = CpuIsa::Default;
  bool bf16 = false;
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
  bf16 = v4 && __builtin_cpu_supports("avx512bf16");
#endif
  const char* env = std::getenv("CAST_EXT_CPU_ISA");
  std::string want = env ? env : "";
  std::transform(want.begin(), want.end(), want.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  CpuIsa cap = CpuIsa::Avx512;
  bool bf16_cap = true;
  if (want == "default") {
    cap = CpuIsa::Default;
  } else if (want == "avx2") {
    cap = CpuIsa::Avx2;
  } else if (want == "avx512") {
    bf16_cap = false;
  } else if (!want.empty() && want != "avx512_bf16") {
    // Runs while the library loads (a namespace-scope constant asks): no exception, no
    // Python warning machinery; a line on stderr, and the cap is not applied.
    std::fprintf(stderr,
                 "cast_ext: CAST_EXT_CPU_ISA=%s is not one of avx512_bf16, avx512, avx2, default; "
                 "ignored (kernels run as %s)\n",
                 env, bf16 ? "avx512_bf16" : cpu_isa_name(best));
  }
  const CpuIsa isa = std::min(best, cap);
  return {isa, bf16 && bf16_cap && isa == CpuIsa::Avx512};
}

const Detected& detected() {
  static const Detected d = detect();
  return d;
}

}  // namespace

CpuIsa cpu_isa() { return detected().isa; }

bool cpu_avx512_bf16() { return detected().bf16; }

const char* cpu_isa_label() { return cpu_avx512_bf16() ? "avx512_bf16" : cpu_isa_name(cpu_isa()); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cast_ext
