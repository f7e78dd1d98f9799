// cast_ext::scaled_linear: y = F.linear(x, A * W, bias), the forward of a layer prepare()
// sparsified (reference: scaled_linear; W [out, in], A [out, blocks] scales each row's blocks of
// in / blocks columns). One op with its backward in C++, for every device: composed of ATen
// ops, so CPU and CUDA tensors (and meta/fake ones, for torch.compile) run the same code.
//
// Why an op: through the parametrization a layer's forward was six Python-level torch calls and
// its backward five autograd nodes, whose host time rivalled a small layer's GEMMs; and F.linear
// saved the product A * W (a copy of the weight) for the backward. Here the backward is one node
// that saves x, W and A and forms A * W again. The arithmetic is the parametrization's, op for op
// (a 16-bit W: the product in fp32, rounded once; the scale's gradient an fp32 sum), so outputs
// and gradients match it bit for bit on the CPU, under autocast too (the backward's matmuls take
// the forward's autocast dtype). W's gradient is gy^T @ x where autograd forms (x^T @ gy)^T: the
// same sums, which a GPU library may order differently.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

void check_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                const std::optional<at::Tensor>& bias, int64_t blocks) {
  TORCH_CHECK(w.dim() == 2, "cast_ext.scaled_linear: w must be 2-D [out, in], got shape ",
              w.sym_sizes());
  const c10::SymInt &out = w.sym_size(0), &in = w.sym_size(1);
  TORCH_CHECK(blocks >= 1 && in > 0 && in % blocks == 0, "cast_ext.scaled_linear: w's in = ", in,
              " is not divisible into blocks = ", blocks);
  TORCH_CHECK(scale.dim() == 2 && scale.sym_size(0) == out && scale.sym_size(1) == blocks,
              "cast_ext.scaled_linear: scale must be [out, blocks] = [", out, ", ", blocks,
              "] for w of shape ", w.sym_sizes(), ", got ", scale.sym_sizes());
  TORCH_CHECK(scale.is_floating_point(),
              "cast_ext.scaled_linear: scale must be floating point, got ", scale.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == in, "cast_ext.scaled_linear: x of shape ",
              x.sym_sizes(), " must end in w's in = ", in);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->sym_size(0) == out),
              "cast_ext.scaled_linear: bias must be [out] = [", out, "], got ",
              has_bias ? bias->sym_sizes() : c10::SymIntArrayRef{});
}

// A in W's dtype, for an fp32/fp64 W's products.
at::Tensor scale_as(const at::Tensor& w, const at::Tensor& scale) {
  return scale.scalar_type() == w.scalar_type() ? scale : scale.to(w.scalar_type());
}

// A * W, [out, in]: W's dtype for fp32/fp64 (A cast to it), fp32 rounded once for fp16/bf16.
// Sizes are SymInts throughout: torch.compile traces the op with symbolic (dynamic) shapes.
at::Tensor scale_product(const at::Tensor& w, const at::Tensor& scale, int64_t blocks) {
  const c10::SymInt &out = w.sym_size(0), &in = w.sym_size(1);
  const at::Tensor grouped = w.reshape_symint({out, blocks, in / blocks});
  at::Tensor used;
  if (half(w)) {
    used = (grouped.to(at::kFloat) * scale.unsqueeze(-1)).to(w.scalar_type());
  } else {
    used = grouped * scale_as(w, scale).unsqueeze(-1);
  }
  return used.reshape_symint({out, in});
}

// The forward's kernel for every backend (CompositeExplicitAutograd): the product, then F.linear,
// which autocast (when on) casts as it does a Linear's.
at::Tensor scaled_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias, int64_t blocks) {
  check_args(x, w, scale, bias, blocks);
  return at::linear(x, scale_product(w, scale, blocks), bias);
}

// A cast as autocast makes one for a matmul: floating-point tensors other than fp64.
at::Tensor amp_cast(const at::Tensor& t, std::optional<at::ScalarType> amp) {
  if (!amp || !t.is_floating_point() || t.scalar_type() == at::kDouble) return t;
  return t.scalar_type() == *amp ? t : t.to(*amp);
}

struct ScaledLinearFn : torch::autograd::Function<ScaledLinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                            int64_t blocks) {
    ctx->save_for_backward({x, w, scale});
    ctx->saved_data["blocks"] = blocks;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    const at::DeviceType dev = x.device().type();
    // the autocast dtype of the forward's matmul (-1: none), for the backward's
    const bool amp =
        (dev == at::kCPU || dev == at::kCUDA) && at::autocast::is_autocast_enabled(dev);
    ctx->saved_data["amp"] =
        amp ? static_cast<int64_t>(at::autocast::get_autocast_dtype(dev)) : int64_t{-1};
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("cast_ext::scaled_linear", "")
                               .typed<decltype(scaled_linear)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, w, scale, bias, blocks);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &scale = saved[2];
    const int64_t blocks = ctx->saved_data["blocks"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t amp_code = ctx->saved_data["amp"].toInt();
    const std::optional<at::ScalarType> amp =
        amp_code < 0 ? std::nullopt : std::optional(static_cast<at::ScalarType>(amp_code));
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_s = ctx->needs_input_grad(2), need_b = has_bias && ctx->needs_input_grad(3);
    const c10::SymInt &out = w.sym_size(0), &in = w.sym_size(1);
    const c10::SymInt rows = x.sym_numel() / in;  // 1 for a 1-D x
    const at::Tensor gy = grads[0].reshape_symint({rows, out});
    at::Tensor gx, gw, gs, gb;
    if (need_x) {
      gx = amp_cast(gy, amp)
               .mm(amp_cast(scale_product(w, scale, blocks), amp))
               .view_symint(x.sym_sizes());
      if (amp) gx = gx.to(x.scalar_type());
    }
    if (need_w || need_s) {
      at::Tensor g_used = amp_cast(gy.t(), amp).mm(amp_cast(x.reshape_symint({rows, in}), amp));
      if (amp) g_used = g_used.to(w.scalar_type());
      const at::Tensor gg = g_used.reshape_symint({out, blocks, in / blocks});
      const at::Tensor grouped = w.reshape_symint(gg.sym_sizes());
      if (half(w)) {
        const at::Tensor g32 = gg.to(at::kFloat);
        if (need_w) gw = (g32 * scale.unsqueeze(-1)).to(w.scalar_type()).reshape_symint({out, in});
        if (need_s)
          gs = at::einsum("...bg,...bg->...b", {g32, grouped.to(at::kFloat)})
                   .to(scale.scalar_type());
      } else {
        if (need_w) gw = (gg * scale_as(w, scale).unsqueeze(-1)).reshape_symint({out, in});
        if (need_s) {
          gs = (gg * grouped).sum(-1);
          if (gs.scalar_type() != scale.scalar_type()) gs = gs.to(scale.scalar_type());
        }
      }
    }
    if (need_b) gb = gy.sum(0);
    return {gx, gw, gs, gb, at::Tensor()};
  }
};

at::Tensor scaled_linear_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, int64_t blocks) {
  return ScaledLinearFn::apply(x, w, scale, bias, blocks);
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CompositeExplicitAutograd, m) {
  m.impl("scaled_linear", &scaled_linear);
}
TORCH_LIBRARY_IMPL(cast_ext, Autograd, m) { m.impl("scaled_linear", &scaled_linear_autograd); }
