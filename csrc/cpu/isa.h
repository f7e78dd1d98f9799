// The vector instruction set of the CPU kernels that pick their version at run time (AdamS's
// update, the decode-sized 2:4 GEMM): the best the CPU has, capped by the environment variable
// CAST_EXT_CPU_ISA ("avx512", "avx2" or "default"), read once. The tests run every version on
// one machine through the cap. The target_clones kernels (masks, compression) follow the CPU
// alone.
#pragma once

namespace cast_ext {

enum class CpuIsa { Default, Avx2, Avx512 };  // in increasing order

// Avx512: AVX-512 F, BW, VL and F16C; Avx2: AVX2 and F16C.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace cast_ext
