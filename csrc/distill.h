// The distillation loss ops (cast_ext::distill_fwd / distill_bwd): the argument checks shared by
// the CPU kernel (csrc/cpu/distill.cpp) and the CUDA glue (csrc/cuda/distill_cuda.cpp), so both
// devices reject the same inputs with the same messages before anything is computed.
// Semantics: cast_ext/reference.py distill_fwd, distill_bwd (SPEC.md section 4).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <tuple>

#include "cast_ext.h"

namespace cast_ext {

// student [N, V] (fp32/fp16/bf16, contiguous), teacher undefined or the same, labels [N] int64.
inline void check_distill_args(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& labels, double temperature) {
  CAST_CHECK(student.dim() == 2, op, "student of shape ", shape_str(student),
             " must be 2-D [tokens, vocab]");
  const auto st = student.scalar_type();
  CAST_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, "student of shape ",
             shape_str(student), " has dtype ", st, "; expected float32, float16 or bfloat16");
  CAST_CHECK(student.size(1) > 0, op, "student of shape ", shape_str(student),
             " has an empty vocab dim");
  CAST_CHECK(student.is_contiguous(), op, "student of shape ", shape_str(student),
             " must be contiguous");
  if (teacher.defined()) {
    check_same_device(op, "teacher", teacher, "student", student);
    CAST_CHECK(teacher.sizes() == student.sizes() && teacher.scalar_type() == st, op,
               "teacher of shape ", shape_str(teacher), " and dtype ", teacher.scalar_type(),
               " must match student (shape ", shape_str(student), ", dtype ", st, ")");
    CAST_CHECK(teacher.is_contiguous(), op, "teacher of shape ", shape_str(teacher),
               " must be contiguous");
  }
  check_same_device(op, "labels", labels, "student", student);
  CAST_CHECK(
      labels.dim() == 1 && labels.size(0) == student.size(0) && labels.scalar_type() == at::kLong,
      op, "labels of shape ", shape_str(labels), " and dtype ", labels.scalar_type(),
      " must be int64 of shape [", student.size(0), "] (one per row of student)");
  CAST_CHECK(labels.is_contiguous(), op, "labels of shape ", shape_str(labels),
             " must be contiguous");
  CAST_CHECK(std::isfinite(temperature) && temperature > 0, op,
             "temperature must be finite and > 0, got ", temperature);
}

// distill_bwd's inputs: distill_fwd's, plus lse [N, 3] fp32 (distill_fwd's output), grad_scale
// a one-element fp32 tensor on the logits' device, eta in [0, 1] (0 when there is no teacher).
inline void check_distill_bwd_args(const char* op, const at::Tensor& student,
                                   const at::Tensor& teacher, const at::Tensor& labels,
                                   const at::Tensor& lse, const at::Tensor& grad_scale, double eta,
                                   double temperature) {
  check_distill_args(op, student, teacher, labels, temperature);
  check_same_device(op, "lse", lse, "student", student);
  CAST_CHECK(lse.dim() == 2 && lse.size(0) == student.size(0) && lse.size(1) == 3 &&
                 lse.scalar_type() == at::kFloat && lse.is_contiguous(),
             op, "lse of shape ", shape_str(lse), " and dtype ", lse.scalar_type(),
             " must be a contiguous float32 [", student.size(0), ", 3] (distill_fwd's output)");
  check_same_device(op, "grad_scale", grad_scale, "student", student);
  CAST_CHECK(grad_scale.numel() == 1 && grad_scale.scalar_type() == at::kFloat, op,
             "grad_scale of shape ", shape_str(grad_scale), " and dtype ", grad_scale.scalar_type(),
             " must be a one-element float32 tensor");
  CAST_CHECK(eta >= 0.0 && eta <= 1.0, op, "eta must be in [0, 1], got ", eta);
  CAST_CHECK(teacher.defined() || eta == 0.0, op, "teacher is None but eta = ", eta,
             " (the KL term needs the teacher's logits)");
}

// distill_fwd's outputs for student [N, V]: kl [N], ce [N], lse [N, 3], fp32, on its device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_fwd_outputs(
    const at::Tensor& student) {
  const auto f32 = student.options().dtype(at::kFloat);
  const int64_t rows = student.size(0);
  return {at::empty({rows}, f32), at::empty({rows}, f32), at::empty({rows, 3}, f32)};
}

inline void check_label_flag(const char* op, const at::Tensor& labels, int64_t vocab,
                             int64_t ignore_index, bool bad) {
  CAST_CHECK(!bad, op, "labels of shape ", shape_str(labels), " hold a value outside [0, ", vocab,
             ") that is not ignore_index (", ignore_index, ")");
}

}  // namespace cast_ext
