// The pool of DeviceFlag's slots (csrc/cuda/glue.h): ints of pinned host memory that kernels can
// write (cudaHostAllocMapped; portable: any device's kernels). Pages of 1024 slots are allocated
// as needed and never freed: a slot goes back to the pool once its flag was read.
#include "cuda/glue.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

namespace cast_ext {
namespace {

constexpr int kSlotsPerPage = 1024;  // 4 KiB

struct Pool {
  std::mutex mutex;
  std::vector<HostFlagSlot> free;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: flags may be read during interpreter exit
  return *p;
}

}  // namespace

HostFlagSlot acquire_host_flag() {
  Pool& p = pool();
  const std::lock_guard<std::mutex> lock(p.mutex);
  if (p.free.empty()) {
    void* host = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&host, kSlotsPerPage * sizeof(int),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    void* dev = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    for (int i = kSlotsPerPage - 1; i >= 0; --i)
      p.free.push_back({static_cast<int*>(host) + i, static_cast<int*>(dev) + i});
  }
  const HostFlagSlot slot = p.free.back();
  p.free.pop_back();
  return slot;
}

void release_host_flag(HostFlagSlot slot) {
  Pool& p = pool();
  const std::lock_guard<std::mutex> lock(p.mutex);
  p.free.push_back(slot);
}

}  // namespace cast_ext
