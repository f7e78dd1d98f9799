// Torch glue for the CUDA AdamS step (csrc/cuda/adams.cu): the shared argument checks
// (csrc/adams.h, before anything is launched), device guard, current stream, launch checks.
// Nothing is read back to the host: steps, grad_scale and found_inf stay on the device, so the
// step never syncs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "adams.h"
#include "cast_ext.h"
#include "cuda/glue.h"
#include "cuda/kernels.h"

namespace cast_ext {
namespace {

void adams_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList masks, at::TensorList steps,
                     at::TensorList master_params, at::TensorList prev_masks, double lr,
                     double beta1, double beta2, double eps, double weight_decay, double decay,
                     int64_t total_steps, int64_t mask_interval, int64_t n, int64_t m,
                     const c10::optional<at::Tensor>& grad_scale,
                     const c10::optional<at::Tensor>& found_inf) {
  const char* op = "adams_step_";
  const AdamsHyper h{lr, beta1, beta2, eps, weight_decay, decay, total_steps, mask_interval, n, m};
  check_adams_args(op, params, grads, exp_avgs, exp_avg_sqs, masks, steps, master_params,
                   prev_masks, h, grad_scale, found_inf, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool sparse = !masks.empty();
  const bool master = !master_params.empty();
  std::vector<cuda::AdamsTensorArgs> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    cuda::AdamsTensorArgs& t = ts[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.mask = sparse ? masks[i].data_ptr<uint8_t>() : nullptr;
    t.prev_mask = prev_masks.empty() ? nullptr : prev_masks[i].data_ptr<uint8_t>();
    t.master = master ? master_params[i].data_ptr<float>() : nullptr;
    t.step = steps[i].data_ptr<float>();
    const int64_t numel = params[i].numel();
    t.k = sparse ? params[i].size(-1) : numel;
    t.rows = t.k == 0 ? 0 : numel / t.k;
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  check_launch(
      op, cuda::adams_step(to_cuda_dtype(params[0].scalar_type()), master, sparse, ts.data(),
                           int64_t(ts.size()), h,
                           grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr,
                           found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr,
                           sms, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) { m.impl("adams_step_", &adams_step_cuda); }

}  // namespace cast_ext
