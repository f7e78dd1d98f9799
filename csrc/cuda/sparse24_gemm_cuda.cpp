// sparse24_gemm on CUDA tensors: the packed format (values + meta) through the mask file's
// decompress kernel, then a dense cuBLAS GEMM (fp32 accumulation, one rounding, fused bias).
//
// This keeps the portable op working on every device with the same checks and semantics as the
// CPU kernel. It is not the fast path: that is cslt_linear (csrc/cuda/cusparselt.cpp), which
// needs the cuSPARSELt buffer that cast_ext.nn.SparseLinear keeps beside values + meta.
// Layout: x [..., K], values [N, K/2], meta [N, ceil(K/8)] uint8, y [..., N].
// Dtypes: fp32, fp16, bf16. Reference: cast_ext/reference.py sparse24_gemm.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cast_ext.h"

namespace cast_ext {
namespace {

at::Tensor sparse24_gemm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const std::optional<at::Tensor>& bias) {
  const char* op = "sparse24_gemm";
  check_compressed(op, values, meta);
  CAST_CHECK(values.dim() == 2, op, "values of shape ", shape_str(values),
             " must be 2-D [out_features, in_features / 2] (one weight matrix)");
  CAST_CHECK(x.dim() >= 1, op, "x must have at least one dim, got a 0-d tensor");
  CAST_CHECK(x.scalar_type() == values.scalar_type(), op, "x has dtype ", x.scalar_type(),
             " but values has dtype ", values.scalar_type(), "; they must match");
  check_same_device(op, "x", x, "values", values);
  CAST_CHECK(x.size(-1) == values.size(1) * 2, op, "x of shape ", shape_str(x),
             " and values of shape ", shape_str(values),
             ": x's last dim must be in_features = 2 * values.size(1) = ", values.size(1) * 2);
  if (bias.has_value()) {
    CAST_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0), op, "bias of shape ",
               shape_str(*bias), " must be 1-D of size out_features = ", values.size(0));
    CAST_CHECK(bias->scalar_type() == x.scalar_type(), op, "bias has dtype ", bias->scalar_type(),
               " but x has dtype ", x.scalar_type(), "; they must match");
    check_same_device(op, "bias", *bias, "x", x);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  static const auto decompress = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("cast_ext::sparse24_decompress", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return at::linear(x, decompress.call(values, meta), bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) { m.impl("sparse24_gemm", &sparse24_gemm_cuda); }

}  // namespace cast_ext
