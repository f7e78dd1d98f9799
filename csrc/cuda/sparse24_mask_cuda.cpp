// Torch glue for the CUDA mask kernels (csrc/cuda/sparse24_mask.cu): argument checks, device
// guard, current stream, allocation, launch-error checks. Non-finite weights and invalid meta
// are reported through an error flag read after the kernel (glue.h's DeviceFlag: pinned host
// memory and a sync); the read is skipped while a CUDA graph is being captured, where a sync is not
// allowed, and when the user turned the checks off (cast_ext.set_cuda_value_checks).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cast_ext.h"
#include "cuda/glue.h"
#include "cuda/kernels.h"

namespace cast_ext {

at::Tensor decompress_weight(const char* op, const at::Tensor& values_in, const at::Tensor& meta_in,
                             bool check_meta) {
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t k = values.size(-1) * 2;
  const int64_t rows = k == 0 ? 0 : values.numel() * 2 / k;
  auto oshape = values.sizes().vec();
  oshape.back() = k;
  auto out = at::empty(oshape, values.options());
  DeviceFlag flag(values, check_meta && values.numel() > 0);  // empty: no launch, no sync
  check_launch(
      op, cuda::sparse24_decompress(to_cuda_dtype(values.scalar_type()), values.const_data_ptr(),
                                    meta.const_data_ptr<uint8_t>(), rows, k, out.data_ptr(),
                                    flag.ptr(), at::cuda::getCurrentCUDAStream()));
  check_meta_flag(op, meta_in, flag.raised());
  return out;
}

namespace {

std::vector<at::Tensor> nm_select_cuda(const char* op, cuda::MaskOut mode, const at::Tensor& w_in,
                                       int64_t n, int64_t m) {
  check_nm(op, n, m);
  check_grouped_weight(op, "w", w_in, m);
  const c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor w = w_in.contiguous();
  if (reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 != 0) w = w.clone();
  const int64_t k = w.size(-1);
  const int64_t rows = k == 0 ? 0 : w.numel() / k;
  DeviceFlag flag(w, w.numel() > 0);  // empty: nothing to check, no sync
  std::vector<at::Tensor> outs;
  bool* mask = nullptr;
  void* values = nullptr;
  uint8_t* meta = nullptr;
  if (mode == cuda::MaskOut::Mask) {
    outs.push_back(at::empty(w.sizes(), w.options().dtype(at::kBool)));
    mask = outs[0].data_ptr<bool>();
  } else if (mode == cuda::MaskOut::Prune) {
    outs.push_back(at::empty_like(w));
    values = outs[0].data_ptr();
  } else {
    auto vshape = w.sizes().vec();
    vshape.back() = k / 2;
    auto mshape = w.sizes().vec();
    mshape.back() = packed_last_dim(k);
    outs.push_back(at::empty(vshape, w.options()));
    outs.push_back(at::empty(mshape, w.options().dtype(at::kByte)));
    values = outs[0].data_ptr();
    meta = outs[1].data_ptr<uint8_t>();
  }
  check_launch(op, cuda::nm_select(to_cuda_dtype(w.scalar_type()), mode, w.const_data_ptr(), rows,
                                   k, int(n), int(m), mask, values, meta, flag.ptr(),
                                   at::cuda::getCurrentCUDAStream()));
  check_finite_flag(op, "w", w_in, flag.raised());
  return outs;
}

at::Tensor nm_mask_cuda(const at::Tensor& w, int64_t n, int64_t m) {
  return nm_select_cuda("nm_mask", cuda::MaskOut::Mask, w, n, m)[0];
}

at::Tensor sparse24_mask_cuda(const at::Tensor& w) {
  return nm_select_cuda("sparse24_mask", cuda::MaskOut::Mask, w, 2, 4)[0];
}

at::Tensor sparse24_prune_cuda(const at::Tensor& w) {
  return nm_select_cuda("sparse24_prune", cuda::MaskOut::Prune, w, 2, 4)[0];
}

std::tuple<at::Tensor, at::Tensor> sparse24_compress_cuda(const at::Tensor& w) {
  auto outs = nm_select_cuda("sparse24_compress", cuda::MaskOut::Compress, w, 2, 4);
  return {outs[0], outs[1]};
}

at::Tensor sparse24_decompress_cuda(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const char* op = "sparse24_decompress";
  check_compressed(op, values_in, meta_in);
  const c10::cuda::CUDAGuard guard(values_in.device());
  return decompress_weight(op, values_in, meta_in, true);
}

at::Tensor pack_mask_cuda(const at::Tensor& mask_in) {
  check_bool_mask("pack_mask", mask_in);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t k = mask.size(-1);
  const int64_t rows = k == 0 ? 0 : mask.numel() / k;
  auto shape = mask.sizes().vec();
  shape.back() = packed_last_dim(k);
  auto packed = at::empty(shape, mask.options().dtype(at::kByte));
  check_launch("pack_mask",
               cuda::pack_mask(mask.const_data_ptr<bool>(), rows, k, packed.data_ptr<uint8_t>(),
                               at::cuda::getCurrentCUDAStream()));
  return packed;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed_in, int64_t last_dim) {
  check_packed_mask("unpack_mask", "packed", packed_in, last_dim);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t kb = packed_last_dim(last_dim);
  const int64_t rows = kb == 0 ? 0 : packed.numel() / kb;
  auto shape = packed.sizes().vec();
  shape.back() = last_dim;
  auto mask = at::empty(shape, packed.options().dtype(at::kBool));
  check_launch("unpack_mask",
               cuda::unpack_mask(packed.const_data_ptr<uint8_t>(), rows, last_dim,
                                 mask.data_ptr<bool>(), at::cuda::getCurrentCUDAStream()));
  return mask;
}

at::Tensor mask_flips_cuda(const at::Tensor& a_in, const at::Tensor& b_in, int64_t m) {
  check_flips("mask_flips", a_in, b_in, m);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  auto out = at::zeros({}, a.options().dtype(at::kLong));
  check_launch("mask_flips",
               cuda::mask_flips(a.const_data_ptr<uint8_t>(), b.const_data_ptr<uint8_t>(), a.numel(),
                                int(m), out.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) {
  m.impl("sparse24_mask", &sparse24_mask_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
  m.impl("sparse24_prune", &sparse24_prune_cuda);
  m.impl("sparse24_compress", &sparse24_compress_cuda);
  m.impl("sparse24_decompress", &sparse24_decompress_cuda);
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
  m.impl("mask_flips", &mask_flips_cuda);
}

}  // namespace cast_ext
