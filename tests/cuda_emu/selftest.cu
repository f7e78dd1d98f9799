// Kernels with deliberate defects (and two correct ones), so tests/test_cuda_emulated.py can check
// that the emulator reports what it claims to (cuda_emu.h). Compiled by the harness like the
// kernels of csrc/cuda: launches and __shared__ rewritten, then g++. Tests only.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Correct: a warp-shuffle sum of the thread indices, one result per warp.
__global__ void shuffle_sum(int* out) {
  int v = int(threadIdx.x);
  for (int s = 16; s > 0; s >>= 1) v += __shfl_down_sync(0xffffffffu, v, s);
  if ((threadIdx.x & 31) == 0) out[blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32] = v;
}

// Correct: thread 0 publishes through shared memory, behind a barrier.
__global__ void shared_broadcast(int* out) {
  __shared__ int s;
  if (threadIdx.x == 0) s = int(blockIdx.x) + 100;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Defect: the read has no barrier after thread 0's write (a race; which value a thread sees
// depends on the schedule: the write, or the poison of a fresh block).
__global__ void shared_race(int* out) {
  __shared__ int s;
  if (threadIdx.x == 0) s = int(blockIdx.x) + 100;
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Defect: two different __syncthreads() call sites.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Defect: a full-mask shuffle after lane 5 exited.
__global__ void exited_lane_shuffle(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Defect: half a warp shuffles (naming all lanes) while the other half waits at a barrier.
__global__ void deadlock(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
  } else {
    __syncthreads();
  }
}

// Defect: a 16-byte vector load 4 bytes past an aligned address.
__global__ void misaligned_vector(int* out) {
  __shared__ uint4 buf[2];
  const char* p = reinterpret_cast<const char*>(buf) + 4;
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  out[threadIdx.x] = int(v.x & 0);
}

// Defect: per-warp partial sums pass through shared memory in a loop of 2 passes, with a barrier
// before thread 0 reads them but none after, so a warp that runs ahead overwrites its slot with
// the next pass's value before thread 0 has read this pass's (only a schedule in which warps run
// ahead of each other shows it). out[pass] = sum over warps of (warp + 1) * (pass + 1).
__global__ void shared_reuse_race(int* out) {
  __shared__ int partial[32];
  const int warp = int(threadIdx.x) / 32, nwarps = int(blockDim.x + 31) / 32;
  for (int pass = 0; pass < 2; ++pass) {
    int v = (warp + 1) * (pass + 1);
    v = __shfl_down_sync(0xffffffffu, v, 0);  // warp-synchronous work before the write
    if (threadIdx.x % 32 == 0) partial[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      int sum = 0;
      for (int w = 0; w < nwarps; ++w) sum += partial[w];
      out[pass] = sum;
    }
  }
}

}  // namespace

// Runs kernel `which` with `grid` x `block` threads on `out`; returns cudaGetLastError().
extern "C" int cuda_emu_selftest(int which, int grid, int block, int* out) {
  switch (which) {
    case 0: shuffle_sum<<<grid, block>>>(out); break;
    case 1: shared_broadcast<<<grid, block>>>(out); break;
    case 2: shared_race<<<grid, block>>>(out); break;
    case 3: divergent_barrier<<<grid, block>>>(out); break;
    case 4: exited_lane_shuffle<<<grid, block>>>(out); break;
    case 5: deadlock<<<grid, block>>>(out); break;
    case 6: misaligned_vector<<<grid, block>>>(out); break;
    case 7: shared_reuse_race<<<grid, block>>>(out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
