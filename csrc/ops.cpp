// Every cast_ext op schema, always compiled (CPU-only builds included), so a build without CUDA
// still knows each op and the dispatcher can name it in errors. Kernels register their impls
// beside themselves (csrc/cpu/*.cpp, csrc/cuda/*.cpp); fakes live in cast_ext/ops.py; the
// semantics are cast_ext/reference.py.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <vector>

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

  // A prepared layer's forward (reference: scaled_linear; csrc/scaled_linear.cpp):
  // y = F.linear(x, A * W, bias), A [out, blocks] scaling each row's blocks of W [out, in].
  m.def("scaled_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, int blocks) -> Tensor");

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

namespace {

// A tensor adams_step_ writes (one of its Tensor(x!)[] arguments): the argument and the index
// there name it in errors (built only when one is raised: a step reads no string).
struct Written {
  const c10::Argument* arg;
  size_t index;
  at::Tensor tensor;
};

std::vector<Written> written_tensors(const c10::OperatorHandle& op,
                                     const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t start = stack.size() - args.size();
  std::vector<Written> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::List<at::Tensor> list = stack[start + i].toTensorList();
    for (size_t j = 0; j < list.size(); ++j) out.push_back({&args[i], j, list.get(j)});
  }
  return out;
}

// adams_step_ writes its tensors in place as torch's own in-place ops do. Autograd key: with
// grad mode on, a tensor that requires grad is refused before anything is written (the step is
// not differentiable; torch.optim steps under no_grad).
void adams_step_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                         torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    for (const Written& w : written_tensors(op, *stack))
      TORCH_CHECK(!w.tensor.requires_grad(), "cast_ext.adams_step_: ", w.arg->name(), "[", w.index,
                  "] requires grad and would be written in place with grad mode on; call it "
                  "under torch.no_grad() (AdamS.step does)");
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView key (reached inside inference mode too, for normal tensors, and outside it
// for inference tensors alone): an inference tensor outside inference mode is refused before
// anything is written; afterwards every tensor written gets a new version, so autograd refuses
// a backward through a weight the step changed, as after torch.optim.Adam's step.
void adams_step_inplace(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                        torch::jit::Stack* stack) {
  const std::vector<Written> written = written_tensors(op, *stack);
  const bool inference = c10::InferenceMode::is_enabled();
  for (const Written& w : written)
    TORCH_CHECK(!w.tensor.is_inference() || inference, "cast_ext.adams_step_: ", w.arg->name(), "[",
                w.index,
                "] is an inference tensor, which cannot be written in place outside "
                "torch.inference_mode()");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const Written& w : written)
    if (!w.tensor.is_inference()) w.tensor.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, Autograd, m) {
  m.impl("adams_step_", torch::CppFunction::makeFromBoxedFunction<&adams_step_autograd>());
}
TORCH_LIBRARY_IMPL(cast_ext, ADInplaceOrView, m) {
  m.impl("adams_step_", torch::CppFunction::makeFromBoxedFunction<&adams_step_inplace>());
}
