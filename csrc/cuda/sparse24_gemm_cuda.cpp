// sparse24_gemm on CUDA tensors, from the portable packed format (values + meta):
// * M <= 16 rows of x (decode-sized), K % 16 == 0, aligned: the packed small-M kernels
//   (csrc/cuda/sparse24_gemv.cu: tensor cores for fp16/bf16 at M >= 2 on sm80+), which read the
//   2:4 weight once in its packed form (56% of a dense fp16/bf16 weight's bytes);
// * otherwise: the mask file's decompress kernel, then a dense cuBLAS GEMM with fused bias.
// Both accumulate in fp32 and round once. Invalid meta is reported through an error flag read
// like the mask ops' (a sync); check_meta=False skips it, for callers that checked the meta
// once (cast_ext.nn.SparseLinear does, per weight), as do graph capture and the value checks off.
// The cuSPARSELt path (cslt_linear, csrc/cuda/cusparselt.cpp) is the fast one at large M; it
// needs the library's own compressed buffer, which cast_ext.nn.SparseLinear keeps.
// Layout: x [..., K], values [N, K/2], meta [N, ceil(K/8)] uint8, y [..., N].
// Dtypes: fp32, fp16, bf16. Reference: cast_ext/reference.py sparse24_gemm.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cast_ext.h"
#include "cuda/glue.h"
#include "cuda/kernels.h"

namespace cast_ext {
namespace {

at::Tensor sparse24_gemm_cuda(const at::Tensor& x_in, const at::Tensor& values_in,
                              const at::Tensor& meta_in, const std::optional<at::Tensor>& bias,
                              bool check_meta) {
  const char* op = "sparse24_gemm";
  check_gemm_args(op, x_in, values_in, meta_in, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = values_in.size(0), k = values_in.size(1) * 2;
  const int64_t m = c10::multiply_integers(x_in.sizes().slice(0, x_in.dim() - 1));
  if (m >= 1 && m <= cuda::kGemv24MaxM && k % 16 == 0) {
    const at::Tensor x = x_in.contiguous(), values = values_in.contiguous();
    const at::Tensor meta = meta_in.contiguous();
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    auto oshape = x_in.sizes().vec();
    oshape.back() = n;
    at::Tensor y = at::empty(oshape, x.options());
    const void* bp = b ? b->const_data_ptr() : nullptr;
    if (cuda::sparse24_gemv_supported(m, k, x.const_data_ptr(), values.const_data_ptr(),
                                      meta.const_data_ptr<uint8_t>(), bp, y.const_data_ptr())) {
      DeviceFlag flag(x, check_meta);
      const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8;
      check_launch(op, cuda::sparse24_gemv(to_cuda_dtype(x.scalar_type()), x.const_data_ptr(),
                                           values.const_data_ptr(), meta.const_data_ptr<uint8_t>(),
                                           bp, m, n, k, y.data_ptr(), flag.ptr(), tensor_cores,
                                           at::cuda::getCurrentCUDAStream()));
      check_meta_flag(op, meta_in, flag.raised());
      return y;
    }
  }
  // contiguous: at::linear fuses the bias (one rounding) only for 2-D or contiguous x
  return at::linear(x_in.contiguous(), decompress_weight(op, values_in, meta_in, check_meta), bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) { m.impl("sparse24_gemm", &sparse24_gemm_cuda); }

}  // namespace cast_ext
