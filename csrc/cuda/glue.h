// Helpers shared by the torch glue of the CUDA kernels (csrc/cuda/*_cuda.cpp): dtype mapping,
// launch-error checks and a kernel's error flag (its pool: glue.cpp). Includes torch headers: never
// include it from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "cast_ext.h"
#include "cuda/kernels.h"

namespace cast_ext {

inline cuda::DType to_cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", st);
  }
}

inline void check_launch(const char* op, cudaError_t err) {
  CAST_CHECK(err == cudaSuccess, op, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline bool capturing_cuda_graph() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// One int of pinned, device-mapped host memory (cudaHostAlloc, portable): `host` for the CPU,
// `dev` for kernels. Slots come from a process-wide pool (glue.cpp) and go back to it.
struct HostFlagSlot {
  int* host = nullptr;
  int* dev = nullptr;
};
HostFlagSlot acquire_host_flag();
void release_host_flag(HostFlagSlot slot);

// A kernel's error flag: an int in pinned host memory, zeroed by the host, that the kernel sets
// (a plain store) on bad data; read after a sync of the stream. No fill kernel and no
// device-to-host copy: on the H200 the checked mask ops took about 16 us more than unchecked
// ones with a zeroed device int read back by a copy (a fill, a copy, a sync). Off (the kernel
// gets nullptr, nothing is synced) when the caller does not ask for it, while a CUDA graph is
// captured (no sync allowed) and when the user turned the value checks off
// (cast_ext.set_cuda_value_checks). A flag handed to a launch and never read (an error between
// the launch and the read) keeps its slot: a kernel still in flight could set it for the next
// user. One never handed to a kernel (an error before the launch: an allocation) goes back.
class DeviceFlag {
 public:
  DeviceFlag(const at::Tensor& like, bool wanted)
      : on_(wanted && cuda_value_checks().load(std::memory_order_relaxed) &&
            !capturing_cuda_graph()) {
    if (!on_) return;
    stream_ = at::cuda::getCurrentCUDAStream(like.device().index()).stream();
    slot_ = acquire_host_flag();
    *slot_.host = 0;
  }
  ~DeviceFlag() {
    if (on_ && (read_ || !handed_)) release_host_flag(slot_);
  }
  DeviceFlag(const DeviceFlag&) = delete;
  DeviceFlag& operator=(const DeviceFlag&) = delete;

  // The device pointer for the kernel's launch (nullptr when off).
  int* ptr() {
    if (!on_) return nullptr;
    handed_ = true;
    return slot_.dev;
  }
  // Syncs the stream the kernel ran on (torch's sync-debug mode sees it), then reads the flag.
  bool raised() {
    if (!on_) return false;
    c10::cuda::stream_synchronize(stream_);
    read_ = true;
    return *static_cast<volatile int*>(slot_.host) != 0;
  }

 private:
  bool on_;
  bool handed_ = false;
  bool read_ = false;
  cudaStream_t stream_ = nullptr;
  HostFlagSlot slot_;
};

// The dense weight [..., k] of a packed 2:4 one (values [..., k/2], meta [..., ceil(k/8)],
// arguments already checked, on the current device), for `op`'s errors; with check_meta, an
// invalid meta raises (csrc/cuda/sparse24_mask_cuda.cpp; sparse24_gemm's large-M path uses it).
at::Tensor decompress_weight(const char* op, const at::Tensor& values, const at::Tensor& meta,
                             bool check_meta);

}  // namespace cast_ext
