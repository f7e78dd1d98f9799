// The vector instruction set of the CPU kernels, which pick their version at run time (masks
// and compression, AdamS's update, the 2:4 GEMM): the best the CPU has, capped by the
// environment variable CAST_EXT_CPU_ISA ("avx512_bf16", "avx512", "avx2" or "default"), read
// once. The tests
// run every version on one machine through the cap. No -march flag is needed at build time.
#pragma once

namespace cast_ext {

enum class CpuIsa { Default, Avx2, Avx512 };  // in increasing order

// Avx512: the x86-64-v4 level (AVX-512 F, BW, CD, DQ, VL, and all of v3); Avx2: x86-64-v3
// (AVX2, FMA, F16C, BMI1/2, ...).
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// Whether the kernels may use AVX-512 BF16 (vdpbf16ps; the bf16 2:4 GEMM for a few rows of x):
// cpu_isa() is Avx512, the CPU has it, and CAST_EXT_CPU_ISA does not cap it ("avx512" does).
bool cpu_avx512_bf16();
// What build_info reports: cpu_isa_name(cpu_isa()), or "avx512_bf16" where cpu_avx512_bf16().
const char* cpu_isa_label();

// Function attributes compiling a body for one level (nothing off x86, where every version is
// the baseline one).
#if defined(__x86_64__)
#define CAST_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define CAST_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define CAST_TARGET_V4
#define CAST_TARGET_V3
#endif

// Calls NAME_v4, NAME_v3 or NAME_base (defined by the caller, same parameters) by cpu_isa().
#define CAST_ISA_CALL(NAME, ...)                                                \
  (::cast_ext::cpu_isa() == ::cast_ext::CpuIsa::Avx512 ? NAME##_v4(__VA_ARGS__) \
   : ::cast_ext::cpu_isa() == ::cast_ext::CpuIsa::Avx2 ? NAME##_v3(__VA_ARGS__) \
                                                       : NAME##_base(__VA_ARGS__))

}  // namespace cast_ext
