// AdamS (cast_ext::adams_step_): the argument checks shared by the CPU kernel
// (csrc/cpu/adams.cpp) and the CUDA glue (csrc/cuda/adams_cuda.cpp), so both devices reject the
// same inputs with the same messages, before anything is written. The coefficients of a step
// live in the torch-free csrc/adams_coeffs.h, which the CUDA kernel includes too.
// Semantics: cast_ext/reference.py adams_step_ (SPEC.md section 2).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "adams_coeffs.h"
#include "cast_ext.h"

namespace cast_ext {

namespace adams_detail {

inline std::string item(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

inline void check_tensor(const char* op, const std::string& name, const at::Tensor& t,
                         const at::Tensor& ref, at::ScalarType dtype, at::IntArrayRef shape) {
  CAST_CHECK(t.defined(), op, name, " is undefined");
  CAST_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but params[0] is on ",
             ref.device());
  CAST_CHECK(t.scalar_type() == dtype, op, name, " of shape ", shape_str(t), " has dtype ",
             t.scalar_type(), "; expected ", dtype);
  CAST_CHECK(t.sizes() == shape, op, name, " of shape ", shape_str(t), " must have shape ", shape);
  CAST_CHECK(t.is_contiguous(), op, name, " of shape ", shape_str(t),
             " must be contiguous (the kernels walk every tensor as one flat array)");
}

inline void check_scalar_tensor(const char* op, const std::string& name, const at::Tensor& t,
                                const at::Tensor& ref) {
  CAST_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but params[0] is on ",
             ref.device());
  CAST_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1, op, name, " of shape ", shape_str(t),
             " and dtype ", t.scalar_type(), " must be a one-element float32 tensor");
}

// One tensor's bytes, [begin, end), for the overlap check.
struct Span {
  uintptr_t begin, end;
  bool written;
  const char* list;
  size_t index;
};

inline void add_spans(std::vector<Span>& out, at::TensorList ts, const char* list, bool written) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    if (t.numel() == 0) continue;
    const auto b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    out.push_back({b, b + uintptr_t(t.numel()) * uintptr_t(t.element_size()), written, list, i});
  }
}

// No tensor the op writes may share memory with any other tensor of the call (the same tensor
// passed as a param and an exp_avg, twice in a list, or overlapping views of one buffer): the
// kernels read and write each element once in an unspecified order, so aliasing would make the
// result depend on that order. Grads are only read and may alias each other; disjoint views of
// one buffer (flat-parameter layouts) are fine. Called after the contiguity checks, so each
// tensor is one byte range; sorting the ranges finds an overlap in O(N log N).
inline void check_no_overlap(const char* op, std::vector<Span>& spans) {
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  const Span* wmax = nullptr;  // the written span reaching furthest so far
  const Span* rmax = nullptr;  // the read-only span reaching furthest so far
  for (const Span& s : spans) {
    const Span* hit = nullptr;
    if (wmax && s.begin < wmax->end)
      hit = wmax;
    else if (s.written && rmax && s.begin < rmax->end)
      hit = rmax;
    CAST_CHECK(hit == nullptr, op, item(s.list, s.index), " shares memory with ",
               hit ? item(hit->list, hit->index) : std::string(),
               "; every tensor the op writes must have memory of its own (no aliasing or "
               "overlapping tensors)");
    const Span*& top = s.written ? wmax : rmax;
    if (!top || s.end > top->end) top = &s;
  }
}

}  // namespace adams_detail

// Every rule of the op, checked before anything is written. `device_type` is the dispatch key's
// device (all tensors must live on params[0]'s device of that type).
inline void check_adams_args(const char* op, at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList masks, at::TensorList steps,
                             at::TensorList master_params, at::TensorList prev_masks,
                             const AdamsHyper& h, const c10::optional<at::Tensor>& grad_scale,
                             const c10::optional<at::Tensor>& found_inf,
                             c10::DeviceType device_type) {
  using adams_detail::item;
  const size_t n = params.size();
  CAST_CHECK(
      grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n, op,
      "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, got ", n, ", ",
      grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  CAST_CHECK(masks.empty() || masks.size() == n, op,
             "masks must be empty (plain Adam) or have one packed mask per param, got ",
             masks.size(), " for ", n, " params");
  CAST_CHECK(master_params.empty() || master_params.size() == n, op,
             "master_params must be empty or have one per param, got ", master_params.size(),
             " for ", n, " params");
  CAST_CHECK(prev_masks.empty() || (!masks.empty() && prev_masks.size() == n), op,
             "prev_masks must be empty or have one per packed mask, got ", prev_masks.size(),
             " for ", masks.size(), " masks");
  CAST_CHECK(h.lr >= 0.0 && std::isfinite(h.lr), op, "lr must be finite and >= 0, got ", h.lr);
  CAST_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0, op, "beta1 must be in [0, 1), got ", h.beta1);
  CAST_CHECK(h.beta2 >= 0.0 && h.beta2 < 1.0, op, "beta2 must be in [0, 1), got ", h.beta2);
  CAST_CHECK(h.eps >= 0.0 && std::isfinite(h.eps), op, "eps must be finite and >= 0, got ", h.eps);
  CAST_CHECK(h.weight_decay >= 0.0 && std::isfinite(h.weight_decay), op,
             "weight_decay must be finite and >= 0, got ", h.weight_decay);
  CAST_CHECK(h.decay >= 0.0 && std::isfinite(h.decay), op, "decay must be finite and >= 0, got ",
             h.decay);
  CAST_CHECK(h.total_steps >= 1, op, "total_steps must be >= 1, got ", h.total_steps);
  CAST_CHECK(h.mask_interval >= 1, op, "mask_interval must be >= 1, got ", h.mask_interval);
  check_nm(op, h.n, h.m);
  if (n == 0) return;

  const at::Tensor& ref = params[0];
  CAST_CHECK(ref.defined(), op, "params[0] is undefined");
  CAST_CHECK(ref.device().type() == device_type, op, "params[0] is on ", ref.device(),
             "; this kernel is for ", device_type, " tensors");
  const auto pdt = ref.scalar_type();
  if (master_params.empty()) {
    CAST_CHECK(pdt == at::kFloat, op, "params[0] of shape ", shape_str(ref), " has dtype ", pdt,
               "; without master_params the params must be float32 (bf16/fp16 params need fp32 "
               "master weights: the decay vanishes in low precision)");
  } else {
    CAST_CHECK(pdt == at::kFloat || pdt == at::kHalf || pdt == at::kBFloat16, op,
               "params[0] of shape ", shape_str(ref), " has dtype ", pdt,
               "; expected float32, float16 or bfloat16");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const auto shape = p.sizes();
    adams_detail::check_tensor(op, item("params", i), p, ref, pdt, shape);
    adams_detail::check_tensor(op, item("grads", i), grads[i], ref, pdt, shape);
    adams_detail::check_tensor(op, item("exp_avgs", i), exp_avgs[i], ref, at::kFloat, shape);
    adams_detail::check_tensor(op, item("exp_avg_sqs", i), exp_avg_sqs[i], ref, at::kFloat, shape);
    adams_detail::check_scalar_tensor(op, item("steps", i), steps[i], ref);
    if (!master_params.empty()) {
      adams_detail::check_tensor(op, item("master_params", i), master_params[i], ref, at::kFloat,
                                 shape);
    }
    if (!masks.empty()) {
      CAST_CHECK(p.dim() >= 1, op, item("params", i), " is 0-d; a sparse param needs a last dim");
      CAST_CHECK(p.size(-1) % h.m == 0, op, item("params", i), " of shape ", shape_str(p),
                 ": last dim must be a multiple of m=", h.m);
      std::vector<int64_t> mshape = shape.vec();
      mshape.back() = packed_last_dim(mshape.back());
      adams_detail::check_tensor(op, item("masks", i), masks[i], ref, at::kByte, mshape);
      if (!prev_masks.empty()) {
        adams_detail::check_tensor(op, item("prev_masks", i), prev_masks[i], ref, at::kByte,
                                   mshape);
      }
    }
  }
  if (grad_scale.has_value()) adams_detail::check_scalar_tensor(op, "grad_scale", *grad_scale, ref);
  if (found_inf.has_value()) adams_detail::check_scalar_tensor(op, "found_inf", *found_inf, ref);

  std::vector<adams_detail::Span> spans;
  spans.reserve(8 * n);
  adams_detail::add_spans(spans, params, "params", true);
  adams_detail::add_spans(spans, grads, "grads", false);
  adams_detail::add_spans(spans, exp_avgs, "exp_avgs", true);
  adams_detail::add_spans(spans, exp_avg_sqs, "exp_avg_sqs", true);
  adams_detail::add_spans(spans, masks, "masks", true);
  adams_detail::add_spans(spans, steps, "steps", true);
  adams_detail::add_spans(spans, master_params, "master_params", true);
  adams_detail::add_spans(spans, prev_masks, "prev_masks", true);
  adams_detail::check_no_overlap(op, spans);
}

}  // namespace cast_ext
