"""CAST on mixture-of-experts models whose experts are stacked 3-D weights (transformers 5's
experts modules): tiny random Mixtral ([experts, out, in]), Qwen3-MoE and gpt-oss ([experts,
in, out], ``is_transposed``), built from configs (no downloads)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import enable_activation_checkpointing, requires_cuda
from torch import nn
from torch.nn.utils import parametrize

import cast_ext
from cast_ext import cast

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 64
ARCHS = ["mixtral", "qwen3_moe", "gpt_oss"]


def tiny_moe(arch: str, experts_implementation: str = "grouped_mm") -> nn.Module:
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8, **common
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.GptOssConfig(
            intermediate_size=48, num_local_experts=4, head_dim=8,
            layer_types=["sliding_attention", "full_attention"], **common,
        )  # fmt: skip
        cls = transformers.GptOssForCausalLM
    cfg._experts_implementation = experts_implementation
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # spread the router, so that every expert gets tokens
        for m in model.modules():
            if "Router" in type(m).__name__:
                m.weight.normal_(0, 1)
    return model


def ids(seed: int = 1, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def in_out(layer_tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A stack as the module holds it, made ``[experts, out, in]``."""
    return layer_tensor.transpose(-2, -1) if transposed else layer_tensor


def is_24(w: torch.Tensor) -> bool:
    return bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_scales_every_expert_stack_and_keeps_outputs(arch):
    model = tiny_moe(arch)
    x = ids()
    before = model(x).logits
    plain = {name: tuple(p.shape) for name, p in model.named_parameters()}
    layers = cast.prepare(model)
    stacks = [layer for layer in layers if layer.kind == "experts"]
    # gate_up_proj and down_proj of 2 layers; the routers (not Linears) stay dense
    assert [layer.param for layer in stacks] == ["gate_up_proj", "down_proj"] * 2
    assert not any("router" in layer.name or "gate." in layer.name for layer in layers)
    assert len(layers) == 8 + 4  # q, k, v, o per layer and the 4 stacks
    for layer in stacks:
        module_name = next(n for n, m in model.named_modules() if m is layer.module)
        assert layer.name == layer.weight_name == f"{module_name}.{layer.param}"
        assert module_name.endswith("mlp.experts")
        assert layer.transposed == (arch == "gpt_oss")
        e, out_f, in_f = layer.experts, layer.out_features, layer.in_features
        assert layer.weight.shape == (e, out_f, in_f)  # the optimizer's layout
        assert layer.scale.shape == (e, out_f, 2) and layer.scale.dtype == torch.float32
        held = getattr(layer.module, layer.param)  # the module's own layout, as before
        assert tuple(held.shape) == plain[layer.name]
        torch.testing.assert_close(in_out(held, layer.transposed), layer.weight, rtol=0, atol=0)
        # W_used[e, r, c] = A[e, r, c // (in / 2)] * W[e, r, c]
        with torch.no_grad():
            layer.scale.copy_(torch.rand_like(layer.scale) + 0.5)
        cols = torch.arange(in_f) // (in_f // 2)
        want = layer.scale.detach()[:, :, cols] * layer.weight.detach()
        got = in_out(getattr(layer.module, layer.param), layer.transposed)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with torch.no_grad():
            layer.scale.fill_(1.0)
    # gpt-oss computes with the transposed view of the re-stored stack: its sums may round
    # in another order
    torch.testing.assert_close(model(x).logits, before, rtol=1e-6, atol=1e-6)
    groups = {g["name"]: g for g in cast.param_groups(model)}
    sparse = {id(p) for p in groups["sparse"]["params"]}
    assert all(id(layer.weight) in sparse for layer in stacks)
    assert {id(layer.scale) for layer in stacks} <= {id(p) for p in groups["scales"]["params"]}


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cast_train_then_finalize_gives_exactly_24_experts_and_the_masked_logits(
    arch, impl, tmp_path
):
    model = tiny_moe(arch, impl)
    teacher = copy.deepcopy(model).requires_grad_(False)
    plain_keys = sorted(model.state_dict())
    cls = {id(m): type(m) for m in experts_modules(model)}
    cast.prepare(model)
    groups = cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
    opt = cast_ext.AdamS(groups, lr=3e-3, decay=1e-2, total_steps=6, mask_interval=2)
    hist = cast.train(
        model, opt, (ids(seed=10 + s) for s in range(6)), total_steps=6, teacher=teacher,
        health_every=3, progress=False,
    )  # fmt: skip
    assert hist.steps == 6 and all(math.isfinite(r["loss"]) for r in hist.train)
    health = hist.health[-1]
    assert 0 < health["pruned_kept_ratio"] < 1 and health["mask_flips"] >= 0
    layers = cast.sparse_layers(model)
    stacks = [layer for layer in layers if layer.experts]
    assert all(float((layer.scale.detach() - 1).abs().max()) > 0 for layer in stacks)
    masks = {layer.name: opt.mask(layer.weight) for layer in layers}
    transposed = {layer.name: layer.transposed for layer in stacks}
    assert all(masks[layer.name].shape == layer.weight.shape for layer in stacks)
    x = ids(seed=99)
    pruned = cast.export_state_dict(model, opt)
    assert sorted(pruned) == plain_keys
    masked = copy.deepcopy(teacher)
    masked.load_state_dict(pruned)  # strict: the plain model's keys and layouts
    with torch.no_grad():
        expected = masked(x).logits
        dense = model(x).logits
    reports = cast.finalize(model, opt)
    assert not cast.sparse_layers(model)
    by_name = {r.name: r for r in reports}
    for layer in stacks:
        r = by_name[layer.name]
        assert r.exactly_24 and r.mask_source == "optimizer" and 0 < r.pruned_magnitude_share < 0.5
        module = layer.module
        assert type(module) is cls[id(module)]  # the transformers class again, no hooks left
        assert not parametrize.is_parametrized(module) and not module._forward_hooks
        assert not module._forward_pre_hooks
        w = getattr(module, layer.param)
        assert isinstance(w, nn.Parameter) and w.requires_grad and list(w.shape) == r.shape
        w_oi = in_out(w.detach(), transposed[layer.name])  # [experts, out, in]: 2:4 along in
        assert is_24(w_oi) and bool((w_oi[~masks[layer.name]] == 0).all())
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-4)  # the prune did something
    assert sorted(model.state_dict()) == plain_keys

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    final = model.state_dict()  # transformers reloads every tensor bit for bit, still 2:4
    assert all(torch.equal(v, final[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():  # (it picks its default experts implementation, not the eager loop)
        torch.testing.assert_close(reloaded(x).logits, got, rtol=1e-6, atol=1e-6)


def test_the_eager_experts_loop_scales_each_stack_once_per_forward(monkeypatch):
    """The eager experts forward reads a stack once per routed expert; prepare's hooks run it
    under parametrize.cached(), so each scaled stack is computed once (4 experts: 4x fewer),
    the gradients are the same, and the cache is off again after a forward that raised."""
    calls = []
    real = cast.WeightScale.forward

    def counted(self, w):
        calls.append(self.experts)
        return real(self, w)

    model = tiny_moe("mixtral", "eager")
    reference = copy.deepcopy(model)
    cast.prepare(model)
    monkeypatch.setattr(cast.WeightScale, "forward", counted)
    x = ids()
    model(x).logits.sum().backward()
    # 2 layers x (gate_up_proj, down_proj), each once (the attention Linears compute their
    # scaled weight in their own forward)
    assert calls == [4, 4, 4, 4]
    # the same gradients as the plain model (A = 1): the cached stack sums its uses' grads
    reference(x).logits.sum().backward()
    for layer in cast.sparse_layers(model):
        if layer.experts:
            g = getattr(reference.get_submodule(layer.name.rsplit(".", 1)[0]), layer.param).grad
            torch.testing.assert_close(layer.weight.grad, g, rtol=1e-5, atol=1e-6)

    experts = experts_modules(model)[0]

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    monkeypatch.setattr(experts, "act_fn", Boom())
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    assert parametrize._cache_enabled == 0 and not parametrize._cache
    monkeypatch.undo()
    # a deepcopy has hooks of its own: finalizing it leaves the original's
    twin = copy.deepcopy(model)
    cast.finalize(twin)
    assert not experts_modules(twin)[0]._forward_hooks and experts._forward_hooks


def test_prepared_state_dict_loads_a_plain_moe_checkpoint_into_a_meta_built_model():
    dense = tiny_moe("gpt_oss")
    plain = dense.state_dict()
    with torch.device("meta"):
        model = tiny_moe("gpt_oss")
    layers = cast.prepare(model)
    model.to_empty(device="cpu")
    model.load_state_dict(cast.prepared_state_dict(model, plain))  # strict
    with torch.no_grad():
        for name, buf in dense.named_buffers():
            model.get_buffer(name).copy_(buf)
        torch.testing.assert_close(model(ids()).logits, dense(ids()).logits, rtol=1e-6, atol=1e-6)
    back = cast.export_state_dict(model, prune=False)
    assert all(torch.equal(back[k], v) for k, v in plain.items())
    stack = next(layer for layer in layers if layer.experts)
    bad = {**plain, stack.name: plain[stack.name][:, :4]}
    with pytest.raises(ValueError, match=f"{stack.name} has shape .* stores \\[4, 32, 96\\]"):
        cast.prepared_state_dict(model, bad)


class StackedExperts(nn.Module):
    """Experts of another library: one [experts, out, in] stack, a token routed to expert 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w[0].t()


def test_experts_that_do_not_say_their_layout_stay_dense_until_they_do():
    net = nn.Sequential(nn.Linear(16, 16), StackedExperts())
    with pytest.warns(UserWarning, match=r"1 MoE expert weight\(s\) .*1\.w.*is_transposed"):
        assert [layer.name for layer in cast.prepare(net)] == ["0"]
    net = nn.Sequential(nn.Linear(16, 16), StackedExperts())
    net[1].is_transposed = False
    x = torch.randn(2, 16)
    before = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = cast.prepare(net)
    assert [(layer.name, layer.kind, layer.experts) for layer in layers] == [
        ("0", "linear", 0),
        ("1.w", "experts", 3),
    ]
    assert torch.equal(net(x), before)
    # filter_fn chooses the experts module as a whole; one it leaves out gets no hooks
    net = nn.Sequential(nn.Linear(16, 16), StackedExperts())
    net[1].is_transposed = False
    assert len(cast.prepare(net, filter_fn=lambda name, m: name == "0")) == 1
    assert not net[1]._forward_pre_hooks
    # a stack whose input dim is not a multiple of 4, chosen by filter_fn: named
    odd = StackedExperts()
    odd.w = nn.Parameter(torch.randn(3, 8, 6))
    odd.is_transposed = False
    with pytest.raises(ValueError, match=r"w has input dim 6 \(stored \[3, 8, 6\]\)"):
        cast.prepare(nn.Sequential(odd), filter_fn=lambda name, m: True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_expert_stacks_scale_in_fp32_per_expert(dtype):
    net = nn.Sequential(StackedExperts())
    net[0].is_transposed = False
    net.to(dtype)
    (layer,) = cast.prepare(net)
    assert layer.scale.dtype == torch.float32
    with torch.no_grad():
        layer.scale.copy_(1 + 0.003 * torch.rand_like(layer.scale))
    w, a = layer.weight.detach(), layer.scale.detach()
    cols = torch.arange(16) // 8
    assert torch.equal(net[0].w, (w.float() * a[:, :, cols]).to(dtype))
    g = torch.randn(3, 8, 16).to(dtype)
    net[0].w.backward(g)
    want = (g.float() * w.float()).reshape(3, 8, 2, 8).sum(-1)
    torch.testing.assert_close(layer.scale.grad, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.weight.grad, (g.float() * a[:, :, cols]).to(dtype))


def test_the_demo_s_magnitude_prune_keys_its_masks_by_weight_name():
    """The demo's fixed-mask fine-tune finds each pruned weight by name, expert stacks too."""
    from cast_ext import demo

    model = tiny_moe("gpt_oss")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reports, masks = demo.magnitude_prune(model)
    assert "model.layers.0.mlp.experts.gate_up_proj" in masks and len(masks) == len(reports)
    for name, mask in masks.items():
        w = model.get_parameter(name)  # [experts, in, out] for gpt-oss, as the module holds it
        assert mask.shape == w.shape and torch.equal(w, before[name] * mask), name


def test_an_expert_stack_with_a_parametrization_of_its_own_is_refused_by_name():
    class Identity(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w

    net = nn.Sequential(nn.Linear(16, 16), StackedExperts())
    net[1].is_transposed = False
    parametrize.register_parametrization(net[1], "w", Identity())
    with pytest.raises(ValueError, match=r"1\.w already has parametrizations \['Identity'\]"):
        cast.prepare(net)
    assert not parametrize.is_parametrized(net[0]) and not net[1]._forward_pre_hooks


@requires_cuda
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_moe_cast_on_cuda_in_bf16(impl):
    """The recipe on the GPU in bf16 (grouped_mm wants 16-bit stacks): prepare keeps the
    logits, AdamS trains the stacks as sparse params, finalize leaves each expert exactly 2:4
    and the logits of the exported state."""
    model = tiny_moe("mixtral", impl).cuda().bfloat16()
    teacher = copy.deepcopy(model).requires_grad_(False)
    x = ids().cuda()
    with torch.no_grad():
        before = model(x).logits
    cast.prepare(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    opt = cast_ext.AdamS(cast.param_groups(model), lr=3e-3, decay=1e-2, total_steps=4)
    for s in range(4):
        batch = ids(seed=10 + s).cuda()
        with torch.no_grad():
            t = teacher(batch).logits
        cast.distill_loss(model(batch).logits, t, cast.shift_labels(batch)).backward()
        opt.step()
        opt.zero_grad()
    masked = copy.deepcopy(teacher)
    masked.load_state_dict(cast.export_state_dict(model, opt))
    reports = cast.finalize(model, opt)
    assert all(r.exactly_24 for r in reports) and any("experts" in r.name for r in reports)
    for m in experts_modules(model):
        assert is_24(m.gate_up_proj) and is_24(m.down_proj)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=0, atol=0)


def test_eager_experts_under_activation_checkpointing_train_as_without_it():
    """A checkpoint's recomputation stops once it has what the backward needs (an exception
    inside the experts forward): the cache hooks' exit still runs (always_call), so the cache
    is off after every step, and training is bit for bit the run without checkpointing."""

    def run(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_moe("mixtral", "eager").train()
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        cast.prepare(model)
        if checkpointing:
            enable_activation_checkpointing(model)
        opt = cast_ext.AdamS(cast.param_groups(model), lr=3e-3, decay=1e-2, total_steps=3)
        for s in range(3):
            x = ids(seed=20 + s)
            with torch.no_grad():
                t = teacher(x).logits
            cast.distill_loss(model(x, use_cache=False).logits, t, cast.shift_labels(x)).backward()
            assert parametrize._cache_enabled == 0 and not parametrize._cache
            opt.step()
            opt.zero_grad()
        return model.state_dict()

    plain, ckpt = run(False), run(True)
    assert all(torch.equal(ckpt[k], v) for k, v in plain.items())


# ---- nn.to_sparse: finalized experts on 2:4 kernels --------------------------------------------


def finalized_moe(arch: str, impl: str = "grouped_mm", dtype=torch.float32) -> nn.Module:
    """A tiny MoE with every prepared layer (expert stacks included) pruned to 2:4 by
    cast.finalize (fresh magnitude masks), and random expert biases (gpt-oss)."""
    model = tiny_moe(arch, impl).to(dtype)
    cast.prepare(model)
    cast.finalize(model)
    with torch.no_grad():  # gpt-oss's expert biases start at zero: give them values to carry
        for name, p in model.named_parameters():
            if name.endswith("_proj_bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def sparse_experts(model: nn.Module) -> list[cast_ext.nn.SparseExperts]:
    return [m for m in model.modules() if isinstance(m, cast_ext.nn.SparseExperts)]


def set_mode(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, cast_ext.nn.SparseLinear):
            m.mode = mode


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_to_sparse_runs_each_expert_on_24_layers_with_the_finalized_logits(arch, impl):
    model = finalized_moe(arch, impl)
    x = ids(seed=5)
    with torch.no_grad():
        expected = model(x).logits
    dense_cls = {type(m) for m in experts_modules(model)}
    stacks = {
        name: (getattr(m, name).detach(), m.is_transposed)
        for m in experts_modules(model)[:1]
        for name in ("gate_up_proj", "down_proj")
    }
    sparse = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already 2:4: nothing pruned, nothing left dense
        cast_ext.nn.to_sparse(sparse, experts=True)
    converted = sparse_experts(sparse)
    assert len(converted) == 2 and all(type(m).__mro__[2] in dense_cls for m in converted)
    first = converted[0]
    for name, (w, transposed) in stacks.items():
        layers = first._modules[name]
        assert isinstance(layers, nn.ModuleList) and len(layers) == 4
        assert not isinstance(getattr(type(first), name, None), nn.Parameter)
        assert name not in first._parameters
        w_oi = in_out(w, transposed)
        for e, layer in enumerate(layers):  # expert e's weight [out, in], compressed
            assert isinstance(layer, cast_ext.nn.SparseLinear) and layer.bias is None
            assert torch.equal(layer.dense_weight(), w_oi[e])
    keys = sparse.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj.3.values" in keys
    assert "model.layers.0.mlp.experts.down_proj.0.metadata" in keys
    assert ("model.layers.0.mlp.experts.gate_up_proj_bias" in keys) == (arch == "gpt_oss")
    for mode in ("sparse", "dense", "auto"):  # the packed 2:4 kernel, the dense one, dispatched
        set_mode(sparse, mode)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_to_dense_gives_back_the_experts_class_and_its_stacks_bit_for_bit(arch, tmp_path):
    model = finalized_moe(arch)
    order = [list(m._parameters) for m in experts_modules(model)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(model), experts=True)
    back = cast_ext.nn.to_dense(sparse)
    assert {type(m) for m in experts_modules(back)} == {type(m) for m in experts_modules(model)}
    assert not sparse_experts(back)
    assert [list(m._parameters) for m in experts_modules(back)] == order  # in their order
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())
    assert sorted(back.state_dict()) == sorted(state)
    assert all(p.requires_grad for p in back.parameters())
    back.save_pretrained(tmp_path)  # a checkpoint transformers loads
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())


def test_sparse_experts_pickle_deepcopy_and_state_dict_round_trip(tmp_path):
    model = cast_ext.nn.to_sparse(
        finalized_moe("gpt_oss"), mode="sparse", experts=True
    )  # one path: bitwise
    x = ids(seed=6)
    with torch.no_grad():
        expected = model(x).logits
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    twin = copy.deepcopy(model)
    fresh = cast_ext.nn.to_sparse(finalized_moe("gpt_oss"), mode="sparse", experts=True)
    with torch.no_grad():
        for experts in sparse_experts(fresh):  # other weights, until the load
            for layer in experts.down_proj:
                layer.values.zero_()
        assert not torch.allclose(fresh(x).logits, expected)
    fresh.load_state_dict(model.state_dict())
    for m in (loaded, twin, fresh):
        assert [type(e).__name__ for e in sparse_experts(m)] == ["SparseGptOssExperts"] * 2
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_sparse_experts_train_what_a_frozen_24_base_trains_with_the_dense_gradients(arch):
    """Adapters or biases trained on a frozen 2:4 base: the gradients that flow through the
    experts (to the router, the embeddings, gpt-oss's expert biases) are the dense model's."""

    def grads(model: nn.Module) -> dict[str, torch.Tensor]:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith(("gate_up_proj", "down_proj")))
        model.zero_grad()
        x = ids(seed=7)
        F.cross_entropy(model(x).logits.flatten(0, 1), x.flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model = finalized_moe(arch)
    experts_only = lambda name, m: name.endswith("experts")  # noqa: E731
    # the packed kernel forward, its dense backward
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(model), experts_only, mode="sparse", experts=True)
    want, got = grads(model), grads(sparse)
    assert "model.layers.0.mlp.router.weight" in want or "model.layers.0.mlp.gate.weight" in want
    assert ("model.layers.1.mlp.experts.down_proj_bias" in want) == (arch == "gpt_oss")
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_experts_skip_unrouted_experts_sentinels_and_empty_batches():
    model = finalized_moe("mixtral")
    dense = experts_modules(model)[0]
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(dense), experts=True)
    assert isinstance(sparse, cast_ext.nn.SparseExperts)  # the module converted itself
    torch.manual_seed(3)
    h = torch.randn(5, 32)
    index = torch.tensor(
        [[0, 2], [2, 0], [2, 2], [0, 4], [4, 4]]
    )  # 4: a sentinel (expert parallel)
    weights = torch.rand(5, 2)
    calls = []
    for e, layer in enumerate(sparse.gate_up_proj):
        layer.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    with torch.no_grad():
        got = sparse(h, index, weights)
    assert calls == [(0, 3), (2, 4)]  # experts 1 and 3 got no tokens: nothing ran for them
    expected = torch.zeros(5, 32)
    with torch.no_grad():
        for t in range(5):
            for j in range(2):
                e = int(index[t, j])
                if e < 4:
                    gate, up = F.linear(h[t], dense.gate_up_proj[e]).chunk(2)
                    y = F.linear(dense.act_fn(gate) * up, dense.down_proj[e])
                    expected[t] += weights[t, j] * y
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        empty = sparse(h[:0], index[:0], weights[:0])
    assert empty.shape == (0, 32)
    with pytest.raises(RuntimeError, match=r"SparseExperts: the routing .* \[tokens, k\]"):
        sparse(h, index[:4], weights[:4])
    with pytest.raises(
        RuntimeError, match=r"SparseExperts: hidden_states must be \[tokens, hidden\]"
    ):
        sparse(h[None], index, weights)


def test_gpt_oss_sparse_experts_take_the_model_s_keyword_names():
    model = finalized_moe("gpt_oss")
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(experts_modules(model)[0]), experts=True)
    h, index, weights = torch.randn(3, 32), torch.tensor([[1, 0], [3, 1], [2, 3]]), torch.rand(3, 2)
    with torch.no_grad():
        by_name = sparse(hidden_states=h, router_indices=index, routing_weights=weights)
        torch.testing.assert_close(by_name, sparse(h, index, weights), rtol=0, atol=0)


def test_to_sparse_prunes_dense_experts_and_says_which_stacks():
    model = tiny_moe("qwen3_moe")
    with pytest.warns(
        UserWarning, match=r"were not 2:4 .*model\.layers\.0\.mlp\.experts\.gate_up_proj"
    ):
        cast_ext.nn.to_sparse(
            model, filter_fn=lambda name, m: name.endswith("experts"), experts=True
        )
    assert len(sparse_experts(model)) == 2
    assert not any(
        isinstance(m, cast_ext.nn.SparseLinear)
        for m in model.modules()
        if not any(m is q for e in sparse_experts(model) for q in e.modules())
    )
    for experts in sparse_experts(model):
        for layer in [*experts.gate_up_proj, *experts.down_proj]:
            assert is_24(layer.dense_weight())


class UnknownExperts(nn.Module):
    """Says its layout (enough for cast.prepare), not its forward."""

    is_transposed = False

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w[0].t()


@pytest.mark.filterwarnings("ignore:.*were not 2.4 sparse")  # the Linear beside it
def test_experts_whose_forward_is_unknown_stay_dense_or_are_refused_by_name():
    net = nn.Sequential(nn.Linear(8, 8), UnknownExperts())
    with pytest.warns(UserWarning, match=r"1 MoE experts module\(s\) stay dense: \[.1 \(it lacks"):
        cast_ext.nn.to_sparse(net, experts=True)
    assert isinstance(net[0], cast_ext.nn.SparseLinear) and type(net[1]) is UnknownExperts
    net = nn.Sequential(nn.Linear(8, 8), UnknownExperts())
    with pytest.raises(ValueError, match=r"experts module '1' cannot be converted: it lacks"):
        cast_ext.nn.to_sparse(net, filter_fn=lambda name, m: True, experts=True)
    assert type(net[0]) is nn.Linear  # nothing was replaced


def test_an_experts_module_with_a_parametrized_stack_stays_dense_or_is_refused():
    model = finalized_moe("mixtral")

    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    experts = experts_modules(model)[0]
    parametrize.register_parametrization(experts, "down_proj", Twice())
    chosen = lambda name, m: name.endswith("experts")  # noqa: E731
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts' cannot be .* parametrization"):
        cast_ext.nn.to_sparse(model, chosen, experts=True)
    assert not sparse_experts(model)
    with pytest.warns(UserWarning, match=r"1 MoE experts module\(s\) stay dense: .*parametriz"):
        cast_ext.nn.to_sparse(model, experts=True)
    assert len(sparse_experts(model)) == 1 and model.model.layers[0].mlp.experts is experts


def test_an_expert_stack_whose_input_dim_is_not_a_multiple_of_4_is_refused_when_chosen():
    model = tiny_moe("mixtral")
    experts = experts_modules(model)[0]
    experts.down_proj = nn.Parameter(torch.randn(4, 32, 46))  # in = 46
    with pytest.raises(ValueError, match=r"multiples of 4: \['down_proj \(input dim 46\)'\]"):
        cast_ext.nn.to_sparse(
            model, filter_fn=lambda name, m: name.endswith("experts"), experts=True
        )
    assert not sparse_experts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cast_ext.nn.to_sparse(
            model, experts=True
        )  # the default rule leaves it dense, as a short Linear
    assert len(sparse_experts(model)) == 1 and type(model.model.layers[0].mlp.experts) is type(
        experts
    )


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_bf16_sparse_experts_on_the_cpu(arch):
    model = finalized_moe(arch, dtype=torch.bfloat16)
    x = ids(seed=8)
    with torch.no_grad():
        expected = model(x).logits.float()
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(model), mode="sparse", experts=True)
    with torch.no_grad():
        got = sparse(x).logits.float()
    assert sparse_experts(sparse)[0].gate_up_proj[0].values.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


@requires_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_experts_on_cuda_in_bf16(arch):
    """Dispatched on the GPU (cuSPARSELt, the small-M kernel or cuBLAS per token count)."""
    model = finalized_moe(arch).cuda().bfloat16()
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(model), experts=True)
    assert len(sparse_experts(sparse)) == 2
    for seed, length in ((9, 16), (10, 64)):
        x = ids(seed=seed, length=length).cuda()
        for _ in range(14):  # through the dispatch's trials, into its decisions
            with torch.no_grad():
                got = sparse(x).logits.float()
        with torch.no_grad():
            expected = model(x).logits.float()
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_all_linear_on_sparse_experts_gives_each_expert_an_adapter():
    """On a to_sparse MoE, "all-linear" puts a SparseLoraLinear on every SparseLinear, each
    expert's too (a rank-r adapter per expert, as PEFT's ParamWrapper gives a dense stack); the
    forward runs through the wrapped experts, the base's outputs at the start, and the experts'
    lora_B weights get gradients (lora_A's are 0 while lora_B is)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cast_ext.peft import SparseLoraLinear, lora_config

    sparse = cast_ext.nn.to_sparse(finalized_moe("mixtral"), mode="sparse", experts=True)
    x = ids(seed=11)
    with torch.no_grad():
        base = sparse(x).logits
    p = peft.get_peft_model(sparse, lora_config(model=sparse, r=4, target_modules="all-linear"))
    got = {n: type(m) for n, m in p.named_modules() if isinstance(m, BaseTunerLayer)}
    prefix = "base_model.model.model.layers"
    assert got.keys() == {
        f"{prefix}.{i}.{name}"
        for i in range(2)
        for name in [f"self_attn.{proj}_proj" for proj in "qkvo"]
        + [f"mlp.experts.{stack}.{e}" for stack in ("gate_up_proj", "down_proj") for e in range(4)]
    }
    assert set(got.values()) == {SparseLoraLinear}
    with torch.no_grad():
        torch.testing.assert_close(p(x).logits, base, rtol=0, atol=0)  # lora_B starts at 0
    F.cross_entropy(p(x).logits.flatten(0, 1), x.flatten()).backward()
    grads = [q.grad for n, q in p.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(grads) == 16 and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_experts_modules_without_the_post_expert_norm_flag_convert(arch):
    """transformers 5.17 (the GPU machine's) sets is_transposed, has_gate and has_bias but no
    has_post_expert_norm (no norm after the experts there): its experts modules still become
    SparseExperts, with the same logits. A flag that is set must be a bool."""
    model = finalized_moe(arch)
    x = ids(seed=11)
    with torch.no_grad():
        expected = model(x).logits
    older = copy.deepcopy(model)
    for m in experts_modules(older):  # (transformers 5.17 has none to remove)
        assert m.__dict__.pop("has_post_expert_norm", False) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense
        cast_ext.nn.to_sparse(older, experts=True)
    assert len(sparse_experts(older)) == 2
    with torch.no_grad():
        torch.testing.assert_close(older(x).logits, expected, rtol=1e-5, atol=1e-5)
    odd = copy.deepcopy(model)
    experts_modules(odd)[1].has_post_expert_norm = None
    with pytest.raises(ValueError, match=r"experts module '.*' cannot be converted: it lacks"):
        cast_ext.nn.to_sparse(odd, experts=True, filter_fn=lambda name, m: "experts" in name)


def test_to_sparse_leaves_experts_dense_unless_asked_and_says_so():
    model = finalized_moe("qwen3_moe")
    stacks = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    with pytest.warns(UserWarning, match=r"2 MoE experts module\(s\) stay dense .*experts=True"):
        cast_ext.nn.to_sparse(model)
    assert not sparse_experts(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, cast_ext.nn.SparseLinear)
    assert all(torch.equal(model.get_parameter(n), w) for n, w in stacks.items())


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_sparse_experts_generate_and_run_under_inference_mode_and_autocast(arch):
    """A user's flows on the converted model: greedy generation with the KV cache (one token per
    step after the prompt), and bf16 autocast under inference_mode, as the dense model."""
    model = finalized_moe(arch)
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(model), mode="sparse", experts=True)
    prompt = ids(seed=12, batch=1, length=5)
    kwargs = dict(
        max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    want = model.generate(prompt, **kwargs)
    got = sparse.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x = ids(seed=13)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).logits
        out = sparse(x).logits
    assert out.dtype == expected.dtype == torch.bfloat16  # logits of at most 0.4 here
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.01)


def test_sparse_experts_of_a_meta_built_model_load_a_saved_sparse_state_dict():
    """A large MoE's way in: build on the meta device, to_sparse(experts=True), to_empty, then
    load the 2:4 state dict saved from a converted model."""
    model = finalized_moe("gpt_oss")
    sparse = cast_ext.nn.to_sparse(copy.deepcopy(model), mode="sparse", experts=True)
    with torch.device("meta"):
        meta = type(model)(model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meta weights: nothing to prune, the 2:4 count unknown
        cast_ext.nn.to_sparse(meta, mode="sparse", experts=True)
    assert all(b.is_meta for e in sparse_experts(meta) for b in e.buffers())
    meta = meta.to_empty(device="cpu").eval()
    meta.load_state_dict(sparse.state_dict())  # strict: the same keys
    for name, buf in sparse.named_buffers():  # the rotary tables, which no state dict holds
        if "rotary" in name:
            meta.get_buffer(name).copy_(buf)
    x = ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(meta(x).logits, sparse(x).logits, rtol=0, atol=0)
