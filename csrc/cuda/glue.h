// Helpers shared by the torch glue of the CUDA kernels (csrc/cuda/*_cuda.cpp): dtype mapping,
// launch-error checks and a kernel's device error flag. Includes torch headers: never
// include it from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
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

// A kernel's error flag: a zeroed device int the kernel sets on bad data, read back with one
// small copy and a sync. Off (no allocation, no memset, no read; the kernel gets nullptr) when the
// caller does not ask for it, while a CUDA graph is captured (no sync allowed) and when the user
// turned the value checks off (cast_ext.set_cuda_value_checks).
class DeviceFlag {
 public:
  DeviceFlag(const at::Tensor& like, bool wanted)
      : on_(wanted && cuda_value_checks().load(std::memory_order_relaxed) &&
            !capturing_cuda_graph()) {
    if (on_) flag_ = at::zeros({1}, like.options().dtype(at::kInt));
  }
  int* ptr() { return on_ ? flag_.data_ptr<int>() : nullptr; }
  bool raised() const { return on_ && flag_.item<int>() != 0; }

 private:
  bool on_;
  at::Tensor flag_;
};

// The dense weight [..., k] of a packed 2:4 one (values [..., k/2], meta [..., ceil(k/8)],
// arguments already checked, on the current device), for `op`'s errors; with check_meta, an
// invalid meta raises (csrc/cuda/sparse24_mask_cuda.cpp; sparse24_gemm's large-M path uses it).
at::Tensor decompress_weight(const char* op, const at::Tensor& values, const at::Tensor& meta,
                             bool check_meta);

}  // namespace cast_ext
