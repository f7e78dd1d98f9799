// Torch glue for the fused distillation loss on CUDA (csrc/cuda/distill.cu): the shared argument
// checks (csrc/distill.h), device guard, current stream, allocation, launch checks. A label out
// of range is reported through an error flag read after the forward kernel (glue.h's DeviceFlag:
// pinned host memory and a sync), skipped while a CUDA graph is captured and when the user turned
// the value checks off (cast_ext.set_cuda_value_checks); the backward reads grad_scale on the
// device and never syncs.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "cast_ext.h"
#include "cuda/glue.h"
#include "cuda/kernels.h"
#include "distill.h"

namespace cast_ext {
namespace {

// The current device's SM count and resident threads per SM (they size the grid).
std::pair<int, int> sm_shape() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return {p->multiProcessorCount, p->maxThreadsPerMultiProcessor};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_fwd_cuda(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher_opt,
    const at::Tensor& labels, double temperature, int64_t ignore_index) {
  const char* op = "distill_fwd";
  const at::Tensor teacher = teacher_opt.value_or(at::Tensor());
  check_distill_args(op, student, teacher, labels, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), v = student.size(1);
  at::Tensor kl, ce, lse;
  std::tie(kl, ce, lse) = distill_fwd_outputs(student);
  DeviceFlag flag(student, rows > 0);
  const auto [sms, threads_per_sm] = sm_shape();
  check_launch(
      op, cuda::distill_fwd(to_cuda_dtype(student.scalar_type()), student.const_data_ptr(),
                            teacher.defined() ? teacher.const_data_ptr() : nullptr,
                            labels.const_data_ptr<int64_t>(), rows, v, temperature, ignore_index,
                            kl.data_ptr<float>(), ce.data_ptr<float>(), lse.data_ptr<float>(),
                            flag.ptr(), sms, threads_per_sm, at::cuda::getCurrentCUDAStream()));
  check_label_flag(op, labels, v, ignore_index, flag.raised());
  return {kl, ce, lse};
}

at::Tensor distill_bwd_cuda(const at::Tensor& student, const c10::optional<at::Tensor>& teacher_opt,
                            const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& grad_scale, double eta, double temperature,
                            int64_t ignore_index) {
  const char* op = "distill_bwd";
  const at::Tensor teacher = teacher_opt.value_or(at::Tensor());
  check_distill_bwd_args(op, student, teacher, labels, lse, grad_scale, eta, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad = at::empty_like(student);
  const auto [sms, threads_per_sm] = sm_shape();
  check_launch(
      op, cuda::distill_bwd(to_cuda_dtype(student.scalar_type()), student.const_data_ptr(),
                            teacher.defined() ? teacher.const_data_ptr() : nullptr,
                            labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                            grad_scale.const_data_ptr<float>(), student.size(0), student.size(1),
                            eta, temperature, ignore_index, grad.data_ptr(), sms, threads_per_sm,
                            at::cuda::getCurrentCUDAStream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) {
  m.impl("distill_fwd", &distill_fwd_cuda);
  m.impl("distill_bwd", &distill_bwd_cuda);
}

}  // namespace cast_ext
