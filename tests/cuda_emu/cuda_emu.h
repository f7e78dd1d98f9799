// CPU emulation of the CUDA subset used by csrc/cuda/sparse24_mask.cu and csrc/cuda/adams.cu, so
// that g++ compiles those files as C++ and tests/test_cuda_emulated.py runs their kernels against
// cast_ext/reference.py on a machine without a GPU. Tests only: never linked into cast_ext.
//
// Execution model (cuda_emu.cpp): a launch runs its blocks one after another; the threads of a
// block are fibers (ucontext, one stack each) scheduled on the calling OS thread. A fiber runs
// until it finishes or waits at __syncthreads() or a warp-synchronous intrinsic; when every live
// fiber waits, the waits that are complete are released (a block barrier once all live threads of
// the block reached it, a warp sync once every lane named in its mask did). The order in which
// fibers run between barriers is ascending, descending or seeded-random (cuda_emu_set_schedule),
// which exposes missing barriers around shared memory; a fourth schedule runs the block warp by
// warp, the last warp first, each warp's syncs released as soon as its own lanes arrive, so a warp
// runs ahead to its next block barrier (and past writes another warp has yet to read). Blocks
// running one at a time makes
// `__shared__` a static variable. The harness rewrites each `__shared__ T x;` into
// `static T x; ::cuda_emu::shared_declared(&x, sizeof(x));`, which fills x with 0xFF bytes when the
// first thread of a block passes the declaration, so a read before the block's first write shows.
//
// Checked like the hardware faults (reported through cuda_emu_fault(), the launch itself is not
// aborted): misaligned 8/16-byte vector accesses (uint2/uint4 copies) and misaligned atomics;
// __syncthreads() reached at different source lines; shuffles whose mask names an exited lane or
// lanes waiting elsewhere; deadlocks. Launch configurations are validated as the driver does
// (cudaGetLastError() returns cudaErrorInvalidConfiguration).
//
// Arithmetic: __f*_rn are plain IEEE fp32 operations (build with -ffp-contract=off); fp16 and bf16
// conversions round to nearest even as the device's cvt.rn does. Plain a * b + c is two roundings
// here, where nvcc (--fmad=true) fuses it, and expf/logf are glibc's, not the device's: kernels
// that use them (distill.cu) are emulated to within a few ulp, and their tests compare within
// tolerances; the bit-exact ones (masks, AdamS's __f*_rn) are exact here too. The torch build
// compiles the .cu files with __CUDA_NO_HALF_CONVERSIONS__ and friends, so __half and __nv_bfloat16
// here convert only through the intrinsics, never implicitly.
#pragma once

#include <math.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One instance per kernel: blocks run one at a time. (The harness also registers each one.)
#define __shared__ static
// __restrict__ is a GCC keyword already.

// ---- runtime types -----------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace cuda_emu {
int occupancy();  // the blocks per SM cudaOccupancyMaxActiveBlocksPerMultiprocessor reports
}
// Reports cuda_emu_set_occupancy's value for any kernel (0 or less: fails with
// cudaErrorInvalidValue, as the runtime does for a bad kernel or block size).
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, std::size_t) {
  *blocks = cuda_emu::occupancy();
  return *blocks > 0 ? cudaSuccess : cudaErrorInvalidValue;
}

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace cuda_emu {

// Copies `bytes` (8 or 16) from src to dst, recording a misaligned-address fault unless both are
// aligned to `bytes`: what a vector load or store does on the device.
void vector_copy(void* dst, const void* src, std::size_t bytes);
// Records a misaligned-address fault unless p is aligned to `bytes`.
void check_aligned(const void* p, std::size_t bytes, const char* what);

// Poisons the __shared__ variable at p the first time a thread of the running block declares it.
void shared_declared(void* p, std::size_t bytes);

void block_barrier(int line);
// The value `bits` of lane (lane + delta) of the caller's width-segment (its own when out of
// range), after every lane named in `mask` has arrived (see __shfl_down_sync).
std::uint64_t shfl(unsigned mask, std::uint64_t bits, unsigned arg, int width, int line,
                   bool xor_mode);

struct LaunchConfig {
  dim3 grid, block;
  std::size_t smem;
  cudaStream_t stream;
};
// Validates the configuration (sets the launch error if bad) and runs thread_main(ctx) for every
// thread of every block.
void run_grid(const LaunchConfig& cfg, void (*thread_main)(void*), void* ctx);

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten by the test harness into
// `::cuda_emu::launch([](const auto&... a) { kernel(a...); }, grid, block, smem, stream)(args...)`:
// the lambda lets the call deduce the kernel's template arguments from the launch arguments, as
// nvcc does.
template <typename F>
struct Launch {
  F kernel;
  LaunchConfig cfg;

  template <typename... A>
  void operator()(A&&... a) const {
    // Copied once, like the driver's parameter buffer; each thread's call copies them again into
    // the kernel's by-value parameters.
    using Args = std::tuple<std::decay_t<A>...>;
    const Args args(std::forward<A>(a)...);
    struct Ctx {
      const F* kernel;
      const Args* args;
    } ctx{&kernel, &args};
    run_grid(
        cfg,
        [](void* c) {
          const Ctx* x = static_cast<const Ctx*>(c);
          std::apply(*x->kernel, *x->args);
        },
        &ctx);
  }
};

template <typename F>
Launch<F> launch(F kernel, dim3 grid, dim3 block, std::size_t smem = 0,
                 cudaStream_t stream = nullptr) {
  return Launch<F>{kernel, LaunchConfig{grid, block, smem, stream}};
}

}  // namespace cuda_emu

// ---- vector types: copies are 8/16-byte vector accesses, checked for alignment -----------------
struct alignas(8) uint2 {
  unsigned int x, y;
  uint2() = default;
  uint2(const uint2& o) { cuda_emu::vector_copy(this, &o, sizeof(uint2)); }
  uint2& operator=(const uint2& o) {
    cuda_emu::vector_copy(this, &o, sizeof(uint2));
    return *this;
  }
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) { cuda_emu::vector_copy(this, &o, sizeof(uint4)); }
  uint4& operator=(const uint4& o) {
    cuda_emu::vector_copy(this, &o, sizeof(uint4));
    return *this;
  }
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  uint4 v;
  v.x = x;
  v.y = y;
  v.z = z;
  v.w = w;
  return v;
}

// ---- synchronisation ---------------------------------------------------------------------------
inline void __syncthreads(int line = __builtin_LINE()) { cuda_emu::block_barrier(line); }

template <typename T>
inline T cuda_emu_shfl(unsigned mask, T var, unsigned arg, int width, int line, bool xor_mode) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "unsupported shuffle type");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = cuda_emu::shfl(mask, bits, arg, width, line, xor_mode);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          int line = __builtin_LINE()) {
  return cuda_emu_shfl(mask, var, delta, width, line, false);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         int line = __builtin_LINE()) {
  return cuda_emu_shfl(mask, var, unsigned(lane_mask), width, line, true);
}

// ---- atomics (device-wide; blocks and fibers share one OS thread, atomic_ref keeps it honest) --
template <typename T>
inline T cuda_emu_atomic_or(T* p, T v) {
  cuda_emu::check_aligned(p, sizeof(T), "atomicOr");
  return std::atomic_ref<T>(*p).fetch_or(v);
}
template <typename T>
inline T cuda_emu_atomic_add(T* p, T v) {
  cuda_emu::check_aligned(p, sizeof(T), "atomicAdd");
  return std::atomic_ref<T>(*p).fetch_add(v);
}
inline int atomicOr(int* p, int v) { return cuda_emu_atomic_or(p, v); }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) { return cuda_emu_atomic_or(p, v); }
inline int atomicAdd(int* p, int v) { return cuda_emu_atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return cuda_emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return cuda_emu_atomic_add(p, v);
}
inline float atomicAdd(float* p, float v) { return cuda_emu_atomic_add(p, v); }

// ---- integer and fp32 intrinsics ---------------------------------------------------------------
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
// Cache-hinted loads: a plain load here (a uint2/uint4 copy checks its alignment).
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
// Read-only-cache load: a plain load here, its alignment checked as the device's would fault.
template <typename T>
inline T __ldg(const T* p) {
  cuda_emu::check_aligned(p, sizeof(T), "__ldg");
  return *p;
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return (unsigned int)(((unsigned long long)a * b) >> 32);
}
// Correctly rounded IEEE operations, never contracted into an FMA with their neighbours (the
// emulation compiles with -ffp-contract=fast, as nvcc contracts plain a * b + c): the result
// passes through an empty asm statement, which the compiler cannot see into.
inline float emu_rounded(float r) {
#if defined(__x86_64__)
  asm("" : "+x"(r));  // in its SSE register
#else
  asm("" : "+m"(r));
#endif
  return r;
}
inline float __fmul_rn(float a, float b) { return emu_rounded(a * b); }
inline float __fadd_rn(float a, float b) { return emu_rounded(a + b); }
inline float __fsub_rn(float a, float b) { return emu_rounded(a - b); }
inline float __fdiv_rn(float a, float b) { return emu_rounded(a / b); }
inline float __fsqrt_rn(float a) { return __builtin_sqrtf(a); }
