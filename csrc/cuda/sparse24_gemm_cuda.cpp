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
  check_gemm_args(op, x, values, meta, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  static const auto decompress = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("cast_ext::sparse24_decompress", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return at::linear(x, decompress.call(values, meta), bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) { m.impl("sparse24_gemm", &sparse24_gemm_cuda); }

}  // namespace cast_ext
