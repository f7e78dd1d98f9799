// Runtime of the CPU emulation of CUDA (declarations and model: cuda_emu.h). Tests only.
//
// Each emulated thread of the running block is a fiber: a ucontext with its own stack (mmap'd
// once, with a guard page, reused by every block). The scheduler runs every ready fiber in the
// chosen order until it finishes or waits; then it releases the complete waits and repeats. All of
// it runs on the OS thread that launched the kernel, so the emulation is deterministic for a given
// schedule. Control and inspection from the tests: the extern "C" cuda_emu_* functions below.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

thread_local uint3 threadIdx = {0, 0, 0};
thread_local uint3 blockIdx = {0, 0, 0};
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace cuda_emu {
namespace {

constexpr int kMaxBlockThreads = 1024;
constexpr std::size_t kStackBytes = std::size_t(128) << 10;
constexpr std::size_t kGuardBytes = 4096;

enum class State { Ready, AtBarrier, AtWarpSync, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::Done;
  int line = 0;       // source line of the barrier or shuffle it waits at
  unsigned mask = 0;  // lanes named by the warp-synchronous call it waits at
};

struct Emu {
  // Settings.
  unsigned max_grid = 0;  // 0: the launch's grid; else gridDim.x = min(grid.x, max_grid)
  int schedule = 0;       // 0 ascending, 1 descending, 2 seeded random
  std::uint64_t seed = 1;
  int occupancy = 8;  // blocks per SM the occupancy query reports
  // Errors: the launch error (cudaGetLastError) and the first fault of a kernel.
  cudaError_t last_error = cudaSuccess;
  std::string fault;
  // Statistics since the last reset.
  std::int64_t launches = 0, blocks = 0, barriers = 0, warp_syncs = 0;
  std::vector<std::int64_t> grids;  // gridDim.x of each launch
  // The running block.
  Fiber fibers[kMaxBlockThreads];
  std::uint64_t exchange[kMaxBlockThreads];
  std::vector<const void*> shared_seen;  // __shared__ variables declared in the running block
  int nthreads = 0;
  int current = 0;
  ucontext_t scheduler;
  void (*thread_main)(void*) = nullptr;
  void* ctx = nullptr;
};
Emu g;

void set_fault(const std::string& what) {
  if (g.fault.empty()) g.fault = what;
}

std::string where() {
  char buf[96];
  std::snprintf(buf, sizeof(buf), " (block %u, thread %u)", blockIdx.x, threadIdx.x);
  return buf;
}

void set_thread_index(int t) {
  threadIdx.x = unsigned(t) % blockDim.x;
  threadIdx.y = unsigned(t) / blockDim.x % blockDim.y;
  threadIdx.z = unsigned(t) / (blockDim.x * blockDim.y);
}

void fiber_entry() {
  g.thread_main(g.ctx);
  g.fibers[g.current].state = State::Done;
}  // returns to uc_link: the scheduler

char* stack_of(int t) {
  Fiber& f = g.fibers[t];
  if (f.stack == nullptr) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("cuda_emu: mmap");
      std::abort();
    }
    mprotect(p, kGuardBytes, PROT_NONE);  // stacks grow down: overflow faults here
    f.stack = static_cast<char*>(p);
    getcontext(&f.ctx);
  }
  return f.stack;
}

// Parks the current fiber until the scheduler releases it.
void wait(State s, int line, unsigned mask) {
  Fiber& f = g.fibers[g.current];
  f.state = s;
  f.line = line;
  f.mask = mask;
  swapcontext(&f.ctx, &g.scheduler);
}

std::uint64_t next_random() {
  g.seed ^= g.seed << 13;
  g.seed ^= g.seed >> 7;
  g.seed ^= g.seed << 17;
  return g.seed;
}

std::vector<int> order(int n) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = g.schedule == 1 ? n - 1 - i : i;
  if (g.schedule == 2) {
    for (int i = n - 1; i > 0; --i) std::swap(o[i], o[next_random() % std::uint64_t(i + 1)]);
  }
  return o;
}

// Releases the warp sync of warp w if every lane named in its mask waits at it; true if released.
bool release_warp(int w) {
  const int l0 = w * 32, l1 = std::min(g.nthreads, l0 + 32);
  int first = -1;
  for (int l = l0; l < l1; ++l)
    if (g.fibers[l].state == State::AtWarpSync) {
      first = l;
      break;
    }
  if (first < 0) return false;
  const Fiber& f0 = g.fibers[first];
  bool complete = true;
  for (int l = l0; l < l1; ++l) {
    const Fiber& f = g.fibers[l];
    const bool named = (f0.mask >> (l - l0)) & 1u;
    if (f.state == State::AtWarpSync && (f.mask != f0.mask || f.line != f0.line || !named)) {
      set_fault("warp-synchronous calls disagree on the mask or call site (warp " +
                std::to_string(w) + ", lines " + std::to_string(f0.line) + " and " +
                std::to_string(f.line) + ")");
    } else if (named && f.state == State::Done) {
      set_fault("warp-synchronous call names an exited lane (warp " + std::to_string(w) +
                ", lane " + std::to_string(l - l0) + ", line " + std::to_string(f0.line) + ")");
    } else if (named && f.state != State::AtWarpSync) {
      complete = false;
    }
  }
  if (!complete) return false;
  for (int l = l0; l < l1; ++l) {
    if (g.fibers[l].state == State::AtWarpSync) g.fibers[l].state = State::Ready;
  }
  ++g.warp_syncs;
  return true;
}

// Releases the complete waits of the block; false if none could be released (deadlock).
bool release() {
  bool any = false;
  // Warp syncs: released once every lane named in the mask waits at the same call.
  const int nwarps = (g.nthreads + 31) / 32;
  for (int w = 0; w < nwarps; ++w) any |= release_warp(w);
  if (any) return true;
  // Block barrier: released once every live thread waits at it (exited threads count as arrived).
  int first = -1;
  for (int t = 0; t < g.nthreads; ++t) {
    const State s = g.fibers[t].state;
    if (s == State::AtWarpSync || s == State::Ready) return false;
    if (s == State::AtBarrier && first < 0) first = t;
  }
  if (first < 0) return false;
  for (int t = 0; t < g.nthreads; ++t) {
    Fiber& f = g.fibers[t];
    if (f.state != State::AtBarrier) continue;
    if (f.line != g.fibers[first].line) {
      set_fault("__syncthreads() reached at different lines " + std::to_string(f.line) + " and " +
                std::to_string(g.fibers[first].line));
    }
    f.state = State::Ready;
  }
  ++g.barriers;
  return true;
}

void run_block(dim3 b) {
  blockIdx = {b.x, b.y, b.z};
  g.shared_seen.clear();
  for (int t = 0; t < g.nthreads; ++t) {
    Fiber& f = g.fibers[t];
    char* stack = stack_of(t);
    f.ctx.uc_stack.ss_sp = stack + kGuardBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
  }
  const auto run = [](int t) {
    g.current = t;
    set_thread_index(t);
    swapcontext(&g.scheduler, &g.fibers[t].ctx);
  };
  for (;;) {
    if (g.schedule == 3) {
      // Warps run ahead: the last warp first, each until its lanes wait at a block barrier or
      // finish, its warp syncs released as soon as its own lanes arrive. On the device warps are
      // independent between barriers, so a warp may write shared memory for its next pass before
      // a lower warp has read what it wrote for this one: a missing barrier shows here.
      for (int w = (g.nthreads + 31) / 32 - 1; w >= 0; --w) {
        do {
          for (int t = w * 32; t < std::min(g.nthreads, w * 32 + 32); ++t)
            if (g.fibers[t].state == State::Ready) run(t);
        } while (release_warp(w));
      }
    } else {
      for (const int t : order(g.nthreads))
        if (g.fibers[t].state == State::Ready) run(t);
    }
    bool done = true;
    for (int t = 0; t < g.nthreads && done; ++t) done = g.fibers[t].state == State::Done;
    if (done) return;
    if (!release()) {
      set_fault("deadlock: threads wait at barriers or shuffles that cannot complete" + where());
      for (int t = 0; t < g.nthreads; ++t) g.fibers[t].state = State::Done;  // abandon the block
      return;
    }
  }
}

}  // namespace

void vector_copy(void* dst, const void* src, std::size_t bytes) {
  check_aligned(src, bytes, "vector load");
  check_aligned(dst, bytes, "vector store");
  std::memcpy(dst, src, bytes);
}

void check_aligned(const void* p, std::size_t bytes, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "misaligned address: %zu-byte %s at %p", bytes, what, p);
    set_fault(buf + where());
  }
}

void shared_declared(void* p, std::size_t bytes) {
  if (std::find(g.shared_seen.begin(), g.shared_seen.end(), p) != g.shared_seen.end()) return;
  g.shared_seen.push_back(p);
  std::memset(p, 0xFF, bytes);
}

void block_barrier(int line) { wait(State::AtBarrier, line, 0); }

std::uint64_t shfl(unsigned mask, std::uint64_t bits, unsigned arg, int width, int line,
                   bool xor_mode) {
  const int t = g.current;
  const int lane = t % 32, warp0 = t - lane;
  const int live = std::min(32, g.nthreads - warp0);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) set_fault("shuffle width" + where());
  if (((mask >> lane) & 1u) == 0u) set_fault("shuffle by a lane outside its mask" + where());
  if (live < 32 && (mask >> live) != 0u) set_fault("shuffle mask names missing lanes" + where());
  g.exchange[t] = bits;
  wait(State::AtWarpSync, line, mask);  // every named lane has stored its value
  const int seg = lane & ~(width - 1);
  // down: lane + arg within the segment; xor: lane ^ arg within the segment; else the own value.
  const int want = xor_mode ? (lane ^ int(arg)) : lane + int(arg);
  const int src = want >= seg && want < seg + width ? want : lane;
  std::uint64_t out = bits;
  if (src != lane) {
    if (src >= live || ((mask >> src) & 1u) == 0u) {
      set_fault("shuffle reads a lane outside the mask" + where());
    } else {
      out = g.exchange[warp0 + src];
    }
  }
  wait(State::AtWarpSync, line, mask);  // every named lane has read before any overwrites
  return out;
}

void run_grid(const LaunchConfig& cfg, void (*thread_main)(void*), void* ctx) {
  const std::uint64_t threads = std::uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  const bool ok = threads >= 1 && threads <= kMaxBlockThreads && cfg.block.x <= 1024 &&
                  cfg.block.y <= 1024 && cfg.block.z <= 64 && cfg.grid.x >= 1 &&
                  cfg.grid.x <= 0x7FFFFFFFu && cfg.grid.y >= 1 && cfg.grid.y <= 65535 &&
                  cfg.grid.z >= 1 && cfg.grid.z <= 65535 && cfg.smem <= 48 * 1024;
  if (!ok) {
    g.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const dim3 saved_block = blockDim, saved_grid = gridDim;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  if (g.max_grid != 0) gridDim.x = std::min(gridDim.x, g.max_grid);
  g.nthreads = int(threads);
  g.thread_main = thread_main;
  g.ctx = ctx;
  ++g.launches;
  g.grids.push_back(gridDim.x);
  for (unsigned z = 0; z < gridDim.z; ++z)
    for (unsigned y = 0; y < gridDim.y; ++y)
      for (unsigned x = 0; x < gridDim.x; ++x) {
        run_block(dim3(x, y, z));
        ++g.blocks;
      }
  blockDim = saved_block;
  gridDim = saved_grid;
}

int occupancy() { return g.occupancy; }

}  // namespace cuda_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g.last_error;
  cuda_emu::g.last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// ---- control and inspection from the tests (ctypes) ---------------------------------------------
extern "C" {

// gridDim.x = min(launch grid, max_grid) when max_grid > 0: forces grid-stride loops to iterate.
void cuda_emu_set_max_grid(unsigned max_grid) { cuda_emu::g.max_grid = max_grid; }

// What cudaOccupancyMaxActiveBlocksPerMultiprocessor reports (<= 0: the query fails).
void cuda_emu_set_occupancy(int blocks_per_sm) { cuda_emu::g.occupancy = blocks_per_sm; }

// 0: threads run in ascending order between barriers, 1: descending, 2: random from `seed`,
// 3: warp by warp, the last first, each running ahead to its next block barrier.
void cuda_emu_set_schedule(int schedule, unsigned long long seed) {
  cuda_emu::g.schedule = schedule;
  cuda_emu::g.seed = seed != 0 ? seed : 1;
}

// The first fault since the last reset ("" if none).
const char* cuda_emu_fault() { return cuda_emu::g.fault.c_str(); }

// Counters since the last reset: launches, blocks run, block barriers and warp syncs released.
void cuda_emu_stats(long long* out4) {
  out4[0] = cuda_emu::g.launches;
  out4[1] = cuda_emu::g.blocks;
  out4[2] = cuda_emu::g.barriers;
  out4[3] = cuda_emu::g.warp_syncs;
}

// gridDim.x of the launches since the last reset; returns how many (writes at most `cap`).
long long cuda_emu_grids(long long* out, long long cap) {
  const auto& v = cuda_emu::g.grids;
  for (std::size_t i = 0; i < v.size() && std::int64_t(i) < cap; ++i) out[i] = v[i];
  return static_cast<long long>(v.size());
}

void cuda_emu_reset() {
  cuda_emu::g.fault.clear();
  cuda_emu::g.last_error = cudaSuccess;
  cuda_emu::g.launches = cuda_emu::g.blocks = cuda_emu::g.barriers = cuda_emu::g.warp_syncs = 0;
  cuda_emu::g.grids.clear();
}

}  // extern "C"
