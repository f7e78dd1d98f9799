"""cast_ext.peft: PEFT LoRA adapters on a frozen 2:4 base (SparseLinear), against the same LoRA
by hand and against PEFT's own LoRA on the dense model that holds the same 2:4 weights."""

from __future__ import annotations

import copy
import importlib
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tol
from torch import Tensor, nn

from cast_ext import ops
from cast_ext.nn import SparseLinear, to_dense, to_sparse

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from cast_ext.peft import SparseLoraLinear, lora_config, register  # noqa: E402

TARGETS = ["up", "down", "head"]


class Net(nn.Module):
    """Two 2:4 layers (``sparse_net`` makes them SparseLinear) and a dense head."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32, bias=bias)
        self.down = nn.Linear(32, 24, bias=bias)
        self.head = nn.Linear(24, 8, bias=bias)
        with torch.no_grad():
            for lin in (self.up, self.down):
                lin.weight.copy_(ops.sparse24_prune(lin.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def sparse_net(bias: bool = True, dtype: torch.dtype = torch.float32) -> Net:
    """``Net`` with ``up`` and ``down`` SparseLinear (the packed 2:4 kernel), ``head`` dense."""
    return to_sparse(Net(bias).to(dtype), lambda name, _: name != "head", mode="sparse")


def randomize_b(model: nn.Module) -> None:
    """LoRA's B starts at 0 (the adapter adds nothing): give every adapter a nonzero one."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                for b in layer.lora_B.values():
                    b.weight.normal_(std=0.5)


def lora_delta(layer: LoraLinear, adapter: str, x: Tensor, scaling: float) -> Tensor:
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return (x.to(a.dtype) @ a.t() @ b.t()) * scaling


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def dense_twin(sparse: nn.Module, peft_model: nn.Module, cfg: dict, **kw: object) -> nn.Module:
    """PEFT's own LoRA (``cfg``) on the sparse base model ``sparse`` made dense (nn.Linear layers
    holding the decompressed 2:4 weights), with ``peft_model``'s adapter weights."""
    twin = get_peft_model(to_dense(sparse), LoraConfig(**cfg), **kw)
    assert not twin.load_state_dict(lora_state(peft_model), strict=False).unexpected_keys
    return twin


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The frozen base: every tensor but the adapters', cloned."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(5, 16), (3, 5, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_r", "rslora"])
def test_forward_is_the_base_plus_the_lora_delta(bias: bool, shape: tuple, rslora: bool) -> None:
    """At init (B = 0) the sparse base's output exactly; then, per layer, the SparseLinear's output
    plus B A x * scaling (alpha / r, or alpha / sqrt(r) with use_rslora)."""
    model = sparse_net(bias)
    x = torch.randn(shape)
    want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT knows the layer: no "unsupported layer type"
        p = get_peft_model(
            model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=rslora)
        )
    assert torch.equal(p(x), want)
    randomize_b(p)
    scaling = 8 / math.sqrt(4) if rslora else 8 / 4
    h = x
    for name in ("up", "down"):
        layer = p.base_model.model.get_submodule(name)
        assert type(layer) is SparseLoraLinear and type(layer.base_layer) is SparseLinear
        got = layer(h)
        torch.testing.assert_close(
            got, layer.base_layer(h) + lora_delta(layer, "default", h, scaling)
        )
        h = torch.relu(got)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_backward_and_training_match_peft_on_the_dense_model(bias: bool) -> None:
    """Gradients reach the adapters only (the 2:4 buffers and the bias are frozen), equal to those
    of PEFT's LoRA on the dense twin; a few Adam steps lower the loss on both alike; the dense
    head gets PEFT's own lora.Linear."""
    model = sparse_net(bias)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    twin = copy.deepcopy(model)
    p = get_peft_model(model, lora_config(**cfg))
    assert type(p.base_model.model.head) is LoraLinear
    randomize_b(p)
    ref = dense_twin(twin, p, cfg)
    frozen = base_state(p)
    x, y = torch.randn(3, 5, 16), torch.randn(3, 5, 8)
    opts = [
        torch.optim.Adam([q for q in m.parameters() if q.requires_grad], lr=1e-2) for m in (p, ref)
    ]
    losses = []
    for _ in range(10):
        loss, ref_loss = (F.mse_loss(m(x), y) for m in (p, ref))
        torch.testing.assert_close(loss, ref_loss)
        losses.append(loss.item())
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        ref_loss.backward()
        grads = {n: q.grad for n, q in p.named_parameters() if q.grad is not None}
        assert sorted(grads) == sorted(n for n, _ in p.named_parameters() if ".lora_" in n)
        for n, q in ref.named_parameters():
            if ".lora_" in n:
                torch.testing.assert_close(grads[n], q.grad, rtol=1e-5, atol=1e-6, msg=n)
            else:
                assert q.grad is None, n
        for opt in opts:
            opt.step()
    assert not any(q.requires_grad for n, q in p.named_parameters() if ".lora_" not in n)
    assert not any(t.requires_grad or t.grad is not None for t in p.buffers())
    assert losses[-1] < 0.5 * losses[0], losses
    after = base_state(p)
    assert all(same_bits(after[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("autocast", [True, False], ids=["fp32_adapters", "bf16_adapters"])
def test_bf16_base(autocast: bool) -> None:
    """A bf16 base: adapters in the dtype PEFT gives them on a bf16 nn.Linear (fp32 under
    autocast_adapter_dtype, its default; else the base's), the input cast to it, the output bf16;
    the same outputs and gradients as PEFT's LoRA on the dense twin."""
    model = sparse_net(dtype=torch.bfloat16)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    twin = copy.deepcopy(model)
    p = get_peft_model(model, lora_config(**cfg), autocast_adapter_dtype=autocast)
    randomize_b(p)
    ref = dense_twin(twin, p, cfg, autocast_adapter_dtype=autocast)
    adapter_dtype = torch.float32 if autocast else torch.bfloat16
    adapters = {n: (q, ref.get_parameter(n)) for n, q in p.named_parameters() if ".lora_" in n}
    assert all(q.dtype == r.dtype == adapter_dtype for q, r in adapters.values())
    layer = p.base_model.model.up
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    want = layer.base_layer(x).to(adapter_dtype) + lora_delta(layer, "default", x, 2.0)
    torch.testing.assert_close(got, want.bfloat16())
    out, ref_out = p(x), ref(x)
    torch.testing.assert_close(out, ref_out)
    out.float().square().mean().backward()
    ref_out.float().square().mean().backward()
    for n, (q, r) in adapters.items():
        assert q.grad.dtype == adapter_dtype
        torch.testing.assert_close(q.grad, r.grad, **tol(torch.bfloat16), msg=n)


def test_adapters_switch_and_disable() -> None:
    """Two adapters: the active one(s) add their delta, disable_adapter() gives the base alone,
    adapter_names= picks one per sample (PEFT's mixed batches, in eval mode)."""
    p = get_peft_model(sparse_net(), lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    p.add_adapter("b", lora_config(r=2, lora_alpha=6, target_modules=["up", "down"]))
    randomize_b(p)
    layer = p.base_model.model.up
    x = torch.randn(5, 16)
    base = layer.base_layer(x)
    d = {"default": lora_delta(layer, "default", x, 2.0), "b": lora_delta(layer, "b", x, 3.0)}
    assert layer.active_adapters == ["default"]
    torch.testing.assert_close(layer(x), base + d["default"])
    p.set_adapter("b")
    torch.testing.assert_close(layer(x), base + d["b"])
    p.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(layer(x), base + d["default"] + d["b"])
    with p.disable_adapter():
        assert torch.equal(layer(x), base)
    torch.testing.assert_close(layer(x), base + d["default"] + d["b"])
    names = ["b", "__base__", "default", "b", "default"]
    want = torch.stack([base[i] + d[n][i] if n in d else base[i] for i, n in enumerate(names)])
    torch.testing.assert_close(layer.eval()(x, adapter_names=names), want)


def test_bias_all_trains_the_sparse_layers_bias() -> None:
    """bias="all": PEFT makes the SparseLinear's bias trainable, and it gets its gradient."""
    p = get_peft_model(sparse_net(), lora_config(r=4, target_modules=["up"], bias="all"))
    p(torch.randn(5, 16)).sum().backward()
    assert p.base_model.model.up.base_layer.bias.grad is not None


def test_unload_gives_back_the_sparse_layers_untouched() -> None:
    """After training, unload() puts the very SparseLinear layers back, their buffers and bias
    bit for bit as before, and the model computes what it did before the adapters."""
    model = sparse_net()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    before = base_state(model)
    x = torch.randn(5, 16)
    want = model(x)
    p = get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    opt = torch.optim.SGD([q for q in p.parameters() if q.requires_grad], lr=0.1)
    for _ in range(2):
        p(x).square().mean().backward()
        opt.step()
    out = p.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in out.modules())
    assert {n: m for n, m in out.named_modules() if isinstance(m, SparseLinear)} == layers
    after = out.state_dict()
    assert after.keys() == before.keys()
    assert all(same_bits(after[k], v) for k, v in before.items())
    assert torch.equal(out(x), want)


def test_save_and_load(tmp_path) -> None:
    """A saved adapter is a plain LoRA adapter: on a fresh to_sparse model with the config
    registered it gives the same outputs; unregistered, PEFT refuses the SparseLinear targets; on
    the dense twin, PEFT loads and merges it (what the merge refusal advises)."""
    model = sparse_net()
    fresh = copy.deepcopy(model)
    p = get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_b(p)
    x = torch.randn(3, 5, 16)
    want = p(x)
    p.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path)
    config = register(LoraConfig.from_pretrained(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path, config=config)
    assert type(loaded.base_model.model.up) is SparseLoraLinear
    assert torch.equal(loaded(x), want)
    merged = PeftModel.from_pretrained(to_dense(fresh), tmp_path).merge_and_unload()
    assert type(merged.up) is nn.Linear
    torch.testing.assert_close(merged(x), want)


REFUSED = [
    ({"use_dora": True}, r"DoRA \(use_dora=True\) is not supported"),
    ({"alora_invocation_tokens": [3]}, r"LoRA variants are not supported .*alora_invocation"),
    ({"lora_bias": True}, r"lora_bias=True is not supported"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported"),
]


@pytest.mark.filterwarnings("ignore:aLoRA is currently only supported")
@pytest.mark.parametrize("kwargs, why", REFUSED, ids=["dora", "variant", "lora_bias", "pissa"])
def test_refused_configs(kwargs: dict, why: str) -> None:
    """register refuses what SparseLoraLinear cannot do; an adapter added with an unregistered
    config (add_adapter reaches wrapped layers without the mapping) is refused by the layer,
    which names itself; nothing changes."""
    with pytest.raises(ValueError, match=rf"^cast_ext\.peft\.register: {why}"):
        lora_config(r=4, target_modules=TARGETS, **kwargs)
    p = get_peft_model(sparse_net(), lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_b(p)
    state = {k: v.clone() for k, v in p.state_dict().items()}
    x = torch.randn(5, 16)
    want = p(x)
    where = r"cast_ext\.peft\.SparseLoraLinear: layer 'up': adapter 'new'"
    with pytest.raises(ValueError, match=rf"^{where}: {why}"):
        p.add_adapter("new", LoraConfig(r=4, target_modules=TARGETS, **kwargs))
    assert list(p.peft_config) == ["default"]
    assert all(list(m.lora_A) == ["default"] for m in p.modules() if isinstance(m, LoraLinear))
    after = p.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(p(x), want)


def test_merge_refused() -> None:
    """merge, merge_adapter and merge_and_unload: refused by the first SparseLoraLinear, which
    says how to get a dense merged model; nothing was merged or unloaded."""
    p = get_peft_model(sparse_net(), lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_b(p)
    state = {k: v.clone() for k, v in p.state_dict().items()}
    x = torch.randn(5, 16)
    want = p(x)
    calls = {"up": [p.merge_adapter, p.merge_and_unload], "down": [p.base_model.model.down.merge]}
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(
                ValueError,
                match=rf"^cast_ext\.peft\.SparseLoraLinear: layer '{name}': cannot merge .*2:4.*"
                r"cast_ext\.nn\.to_dense",
            ):
                fn()
    assert not any(m.merged for m in p.modules() if isinstance(m, LoraLinear))
    after = p.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(p(x), want)


def test_peft_is_imported_by_cast_ext_peft_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import cast_ext`` leaves peft alone; without peft, ``cast_ext.peft`` says to install it."""
    script = "import sys, cast_ext; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", script], check=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "cast_ext.peft")
    with pytest.raises(ImportError, match=r"^cast_ext\.peft needs peft: pip install peft"):
        importlib.import_module("cast_ext.peft")


def test_register_takes_lora_configs_only() -> None:
    with pytest.raises(TypeError, match=r"cast_ext\.peft\.register: expected a peft\.LoraConfig"):
        register(peft.IA3Config(target_modules=["up"]))


# peft 0.21.2 calls transformers 5's deprecated is_gradient_checkpointing
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_tiny_llama() -> None:
    """A LLaMA after to_sparse: LoRA on its 14 SparseLinear projections and on the lm_head that
    to_sparse left dense; at init the sparse model's logits; then loss and gradients as PEFT's
    LoRA on the dense twin, and training lowers the loss."""
    pytest.importorskip("transformers")
    model = tiny_llama(64, tied=False)
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and name != "lm_head":
                lin.weight.copy_(ops.sparse24_prune(lin.weight))
    model = to_sparse(model, mode="sparse")
    ids = torch.randint(64, (2, 12))
    want = model(input_ids=ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": [*targets, "lm_head"]}
    twin = copy.deepcopy(model)
    p = get_peft_model(model, lora_config(**cfg))
    kinds = [type(m) for m in p.modules() if isinstance(m, BaseTunerLayer)]
    assert kinds.count(SparseLoraLinear) == 14 and kinds.count(LoraLinear) == 1
    assert type(p.base_model.model.lm_head) is LoraLinear
    assert torch.equal(p(input_ids=ids).logits, want)
    randomize_b(p)
    ref = dense_twin(twin, p, cfg)
    loss, ref_loss = (m(input_ids=ids, labels=ids).loss for m in (p, ref))
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    grads = {n: q.grad for n, q in p.named_parameters() if q.grad is not None}
    ref_grads = {n: q.grad for n, q in ref.named_parameters() if q.grad is not None}
    assert sorted(grads) == sorted(ref_grads) and len(grads) == 2 * 15
    assert all(".lora_" in n for n in grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    opt = torch.optim.Adam([q for q in p.parameters() if q.requires_grad], lr=1e-2)
    losses = [loss.item()]
    for _ in range(8):
        opt.step()
        opt.zero_grad()
        loss = p(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def _lora_layers(model: nn.Module, adapter: str) -> dict[str, type]:
    """{qualified name: layer class} of the layers holding ``adapter``."""
    return {
        n: type(m)
        for n, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and adapter in m.lora_A
    }


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*were not 2.4 sparse and were pruned")
@pytest.mark.parametrize("spelling", ["all-linear", "ALL-Linear"])
def test_all_linear(spelling: str) -> None:
    """``target_modules="all-linear"`` with the model: the layers PEFT's "all-linear" finds on
    the dense model (every projection, not the head), SparseLinear ones wrapped in
    SparseLoraLinear; a second adapter through the PeftModel lands on the same layers (not on
    the SparseLinear inside a SparseLoraLinear); without the model, a clear refusal."""
    pytest.importorskip("transformers")
    model = to_sparse(tiny_llama(64, tied=False), mode="sparse")
    dense = get_peft_model(to_dense(copy.deepcopy(model)), LoraConfig(r=4, target_modules=spelling))
    want = {n: LoraLinear for n in _lora_layers(dense, "default")}
    assert len(want) == 14 and not any(n.endswith("lm_head") for n in want)
    config = LoraConfig(r=4, target_modules=spelling)
    with pytest.raises(
        ValueError,
        match=rf"^cast_ext\.peft\.register: target_modules='{spelling}' needs the model "
        r"\(register\(config, model\) or lora_config\(model=model, \.\.\.\)\)",
    ):
        register(config)
    assert config.target_modules == spelling and not config._custom_modules
    with pytest.raises(TypeError, match=r"^cast_ext\.peft\.register: model must be an nn\.Module"):
        register(config, model={"up": None})
    p = get_peft_model(model, lora_config(model=model, r=4, target_modules=spelling))
    assert _lora_layers(p, "default") == {n: SparseLoraLinear for n in want}
    p.add_adapter("two", lora_config(model=p, r=2, target_modules=spelling))
    assert _lora_layers(p, "two") == _lora_layers(p, "default")
    # a to_sparse that left some layers dense: those get PEFT's LoRA, the others SparseLoraLinear
    mixed = to_sparse(tiny_llama(64, tied=False), lambda n, _: "mlp" in n, mode="sparse")
    p = get_peft_model(mixed, lora_config(model=mixed, r=4, target_modules=spelling))
    got = _lora_layers(p, "default")
    assert got.keys() == want.keys()
    assert all((got[n] is SparseLoraLinear) == (".mlp." in n) for n in got)
