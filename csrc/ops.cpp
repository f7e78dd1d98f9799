// Every cast_ext op schema, always compiled (CPU-only builds included), so a build without CUDA
// still knows each op and the dispatcher can name it in errors. Kernels register their impls
// beside themselves (csrc/cpu/*.cpp, csrc/cuda/*.cpp); fakes live in cast_ext/ops.py; the
// semantics are cast_ext/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(cast_ext, m) {
  // N:M masks, pruning and the packed 2:4 format (reference: nm_mask ... sparse24_decompress).
  m.def("sparse24_mask(Tensor w) -> Tensor");
  m.def("nm_mask(Tensor w, int n, int m) -> Tensor");
  m.def("sparse24_prune(Tensor w) -> Tensor");
  m.def("sparse24_compress(Tensor w) -> (Tensor values, Tensor meta)");
  m.def("sparse24_decompress(Tensor values, Tensor meta) -> Tensor");
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor packed, int last_dim) -> Tensor");
  m.def("mask_flips(Tensor a, Tensor b, int m=4) -> Tensor");

  // 2:4 sparse GEMM (reference: sparse24_gemm): y = x @ W^T (+ bias) on the portable packed
  // format (CPU kernel; CUDA runs decompress + cuBLAS). cslt_*: cuSPARSELt (CUDA only):
  // cslt_compress packs a 2:4 weight [n, k] into the library's opaque buffer; cslt_linear
  // computes y = act(x @ W^T + bias) with it.
  // check_meta=False: the caller vouches for meta (CUDA then skips the flag read-back, a sync).
  m.def(
      "sparse24_gemm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, *, "
      "bool check_meta=True) -> Tensor");
  m.def("cslt_compress(Tensor w) -> Tensor");
  m.def(
      "cslt_linear(Tensor x, Tensor w_compressed, int n, int k, Tensor? bias=None, "
      "str activation=\"none\") -> Tensor");

  // AdamS (reference: adams_step_; csrc/cpu/adams.cpp, csrc/cuda/adams.cu).
  // Multi-tensor, in place, like aten::_fused_adam_. prev_masks (empty, or one per mask) receives
  // the old packed mask at a refresh, so mask flips are countable without a host sync.
  m.def(
      "adams_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masks, Tensor(e!)[] steps, "
      "Tensor(f!)[] master_params, Tensor(g!)[] prev_masks, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, float decay, int total_steps, "
      "int mask_interval, int n, int m, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // CAST's distillation loss, fused (reference: distill_fwd, distill_bwd; csrc/cpu/distill.cpp,
  // csrc/cuda/distill.cu): per-row KL and CE terms plus the log-sum-exps the backward rebuilds
  // the softmaxes from, so no [tokens, vocab] fp32 temporary exists.
  m.def(
      "distill_fwd(Tensor student, Tensor? teacher, Tensor labels, float temperature=1.0, "
      "int ignore_index=-100) -> (Tensor kl, Tensor ce, Tensor lse)");
  m.def(
      "distill_bwd(Tensor student, Tensor? teacher, Tensor labels, Tensor lse, Tensor grad_scale, "
      "float eta, float temperature=1.0, int ignore_index=-100) -> Tensor");
}
