"""The CAST recipe on any model built from ``nn.Linear`` layers (SPEC §3-§6).

CAST turns a dense model into a 2:4 sparse one by training it further: AdamS (the
sparsity-aware optimizer, :class:`cast_ext.AdamS`), a learnable per-row, per-block weight scale,
and distillation from the frozen dense model. This module holds the pieces a user composes in
their own training loop, and a reference loop (:func:`train`) that the demo uses::

    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    layers = cast_ext.cast.prepare(model)                  # attach the scales A = 1
    groups = cast_ext.cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
    opt = cast_ext.AdamS(groups, lr=3e-4, decay=1e-3, total_steps=T)
    sched = cast_ext.cast.warmup_cosine(3e-4, T, warmup_steps=10)
    print(cast_ext.cast.decay_budget(model, sched, T, decay=1e-3))   # preflight
    ...  # loss = distill_loss(student_logits, teacher_logits, shift_labels(input_ids))
    report = cast_ext.cast.finalize(model, opt)            # hard 2:4, scales folded, plain modules

Layouts. A sparsified weight is always seen by the optimizer as ``[out, in]`` with the 2:4 groups
along ``in`` (SPEC §1). ``nn.Linear`` stores exactly that. Hugging Face's GPT-2 ``Conv1D`` stores
``[in, out]``; :func:`prepare` re-stores it transposed behind the parametrization, so its
``parametrizations.weight.original`` is ``[out, in]`` like a Linear's, and the module still sees
its ``[in, out]`` weight. A mixture-of-experts layer whose experts are one 3-D Parameter per
projection (transformers 5's experts modules: Mixtral, Qwen3-MoE, gpt-oss, ...) is sparsified
per stack: ``parametrizations.gate_up_proj.original`` is ``[experts, out, in]`` (a stack the
module stores as ``[experts, in, out]``, ``is_transposed``, re-stored transposed the same way).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _build, ops, reference
from .nn import (
    SparseLinear,
    _adapter_modules,
    _conv1d_class,
    _excluded_weights,
    _is_conv1d,
    _param_holders,
)
from .optim import AdamS, DTensor, _assemble, _local, _over_shards, _shard_dim

__all__ = [
    "CudaGraphTeacher",
    "DecayBudget",
    "LayerReport",
    "SparseLayer",
    "WarmupCosine",
    "WeightScale",
    "decay_budget",
    "distill_loss",
    "export_state_dict",
    "finalize",
    "param_groups",
    "perplexity",
    "prepare",
    "prepared_state_dict",
    "shift_labels",
    "sparse_layers",
    "sparsity_health",
    "train",
    "tune_cpu_malloc",
    "warmup_cosine",
]

_N, _M = 2, 4  # the 2:4 pattern


# --------------------------------------------------------------------------------------------
# Weight scaling (SPEC §3) and prepare()
# --------------------------------------------------------------------------------------------


class WeightScale(nn.Module):
    """Parametrization ``W_used[r, c] = A[r, c // (in / blocks)] * W[r, c]`` (paper Eq. 11-12).

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` on a layer's
    ``weight`` (or on each stacked weight of a MoE experts module, then per expert:
    ``W_used[e, r, c] = A[e, r, c // (in / blocks)] * W[e, r, c]``). The stored tensor
    (``parametrizations.weight.original``) is always ``[out, in]`` (``[experts, out, in]``);
    for a ``transposed`` layer (GPT-2 ``Conv1D``, an ``is_transposed`` experts module) the module
    gets ``W_used`` with its last two dims swapped.

    Args:
        out_features: rows of the stored weight.
        in_features: columns of the stored weight (the 2:4 group axis).
        blocks: column blocks per row, each sharing one scale; ``in_features / blocks`` must be a
            multiple of 4 so that a scale never changes which 2 of a group are largest.
        transposed: the module stores its weight as ``[in, out]`` (``[experts, in, out]``).
        experts: the stack's leading dim (a MoE experts weight), or 0 for a plain matrix.

    Shape:
        ``scale``: ``[out_features, blocks]`` (``[experts, out_features, blocks]``), fp32 (also
        after ``model.half()`` or ``model.bfloat16()``), initialised to ones.
    """

    def __init__(
        self, out_features: int, in_features: int, blocks: int, transposed: bool, experts: int = 0
    ) -> None:
        super().__init__()
        if blocks < 1 or in_features % (blocks * _M) != 0:
            raise ValueError(
                f"cast_ext.cast.WeightScale: in_features={in_features} is not divisible into "
                f"{blocks} blocks of a multiple of {_M} columns"
            )
        self.out_features = out_features
        self.in_features = in_features
        self.blocks = blocks
        self.transposed = transposed
        self.experts = experts
        lead = (experts,) if experts else ()
        self.scale = nn.Parameter(torch.ones(*lead, out_features, blocks, dtype=torch.float32))

    def _apply(self, fn: Any, recurse: bool = True) -> WeightScale:
        # model.half() / .bfloat16() leave the scale fp32: a 16-bit A moves in steps of 0.4-0.8%
        # near 1, where it lives (see _HalfTimesScale). Devices and other casts apply as usual.
        def keep_fp32(t: Tensor) -> Tensor:
            new = fn(t)
            if new.dtype in (torch.float16, torch.bfloat16) and t.is_floating_point():
                return t.to(device=new.device, dtype=torch.float32)
            return new

        return super()._apply(keep_fp32, recurse)

    def _scaled(self, w: Tensor, inverse: bool = False) -> Tensor:
        if isinstance(w, DTensor):
            return _scaled_shards(w, self.scale, self.blocks, inverse)
        lead = (self.experts,) if self.experts else ()
        g = self.in_features // self.blocks
        grouped = w.reshape(*lead, self.out_features, self.blocks, g)
        scaled = _times_scale(grouped, self.scale, inverse)
        return scaled.reshape(*lead, self.out_features, self.in_features)

    def forward(self, w: Tensor) -> Tensor:
        used = self._scaled(w)
        return used.transpose(-2, -1) if self.transposed else used

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Called on registration (A = 1) and when a user assigns `module.weight = X`: store the
        # W with A * W = X, in the [out, in] layout.
        w = weight.transpose(-2, -1) if self.transposed else weight
        with torch.no_grad():
            return self._scaled(w.contiguous(), inverse=True).contiguous()

    def extra_repr(self) -> str:
        experts = f"experts={self.experts}, " if self.experts else ""
        return (
            f"{experts}out={self.out_features}, in={self.in_features}, blocks={self.blocks}, "
            f"transposed={self.transposed}"
        )


class _HalfTimesScale(torch.autograd.Function):
    """``W * A`` for a 16-bit ``W`` ``[..., rows, blocks, g]`` and a scale ``A``
    ``[..., rows, blocks]``: the product in fp32, rounded once. (``A`` rounded to bf16 first
    moves in steps of 0.4-0.8% near 1, where a scale lives, so small changes of ``A`` would
    change nothing and others jump.) Saves ``W`` and ``A``, not an fp32 copy of ``W``; the
    gradients are fp32 sums."""

    @staticmethod
    def forward(ctx: Any, grouped: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grouped, scale)
        return (grouped.float() * scale.unsqueeze(-1)).to(grouped.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        grouped, scale = ctx.saved_tensors
        return _half_times_grads(grad, grouped, scale, *ctx.needs_input_grad)


def _half_times_grads(
    grad: Tensor, grouped: Tensor, scale: Tensor, need_w: bool, need_s: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of :class:`_HalfTimesScale` for the gradient ``grad`` of its product:
    ``A * grad`` rounded once to ``W``'s dtype, and the fp32 sums of ``grad * W`` per block."""
    g32 = grad.float()
    dw = (g32 * scale.unsqueeze(-1)).to(grouped.dtype) if need_w else None
    ds = torch.einsum("...bg,...bg->...b", g32, grouped.float()).to(scale.dtype) if need_s else None
    return dw, ds


def _times_scale(grouped: Tensor, scale: Tensor, inverse: bool) -> Tensor:
    """``grouped * A`` (or ``/ A``, no gradient) with ``A`` ``[..., rows, blocks]`` broadcast over
    the last dim: in ``W``'s dtype for fp32/fp64, in fp32 rounded once for fp16/bf16."""
    if grouped.dtype in (torch.float16, torch.bfloat16):
        if inverse:
            return (grouped.float() / scale.float().unsqueeze(-1)).to(grouped.dtype)
        return _HalfTimesScale.apply(grouped, scale)
    s = scale.to(grouped.dtype).unsqueeze(-1)
    return grouped / s if inverse else grouped * s


_SCALED_LINEAR = torch.ops.cast_ext.scaled_linear.default


def _scaled_operands(module: nn.Module) -> tuple[Tensor, Tensor, int] | None:
    """``(W, A, blocks)`` of a prepared layer for :data:`_SCALED_LINEAR`, or None where it takes
    the parametrized weight: a DTensor weight (tensor parallel), one with further
    parametrizations, and calls under forward-mode AD or a torch.func transform (jvp, grad,
    vmap: the op has a reverse-mode C++ backward only). Each attribute from its module's dict:
    nn.Module.__getattr__ cost 4 us a layer here (so no dict.get with it as the default, which
    would run it on every call)."""
    plist = module._modules["parametrizations"]._modules["weight"]
    held = plist._parameters
    w = held["original"] if "original" in held else plist.original  # noqa: SIM401
    if (
        isinstance(w, DTensor)
        or len(plist._modules) != 1
        or fwAD._current_level >= 0  # the op has no forward-mode derivative (a 0 tangent)
        or torch._C._functorch.maybe_current_level() is not None  # C++ autograd: no torch.func
    ):
        return None
    p = plist._modules["0"]
    return w, p._parameters["scale"], p.blocks


def _scaled_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """The forward a prepared ``nn.Linear`` gets (on the class parametrize made for it):
    ``F.linear(x, A * W, bias)`` as one op (``cast_ext::scaled_linear``, csrc/scaled_linear.cpp)
    whose backward, one C++ autograd node, saves ``x``, ``W`` and ``A`` and forms ``A * W``
    again: the parametrized weight's outputs and gradients bit for bit, without the copy of the
    weight that ``F.linear`` on it kept for the backward, and without the property's Python
    calls (``benchmarks/cpu/test_bench_prepared.py``, one CPU thread, same run: a 30-layer LLaMA
    of width 64 took 0.81x the host time of the parametrized path for a forward + backward).
    Where :func:`_scaled_operands` says so, the parametrized weight."""
    own = self._parameters
    bias = own["bias"] if "bias" in own else self.bias  # noqa: SIM401 (parametrized: the property)
    operands = _scaled_operands(self)
    if operands is None:
        return F.linear(x, self.weight, bias)
    w, scale, blocks = operands
    return _SCALED_LINEAR(x, w, scale, bias, blocks)


def _scaled_conv1d_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The forward a prepared Hugging Face ``Conv1D`` gets: its own computation,
    ``addmm(bias, x.view(-1, in), W_used^T)``, through :data:`_SCALED_LINEAR` on the weight as
    stored (``[out, in]``) with the input flattened as ``Conv1D`` does (``F.linear`` of a 2-D
    input is that very ``addmm``): the same outputs and gradients, bit for bit, and no copy of
    ``A * W`` kept for the backward. Where :func:`_scaled_operands` says so, ``Conv1D``'s own
    forward on the parametrized weight."""
    operands = _scaled_operands(self)
    if operands is None:
        return super(type(self), self).forward(x)  # type: ignore[misc]  # Conv1D's
    w, scale, blocks = operands
    y = _SCALED_LINEAR(x.view(-1, x.size(-1)), w, scale, self._parameters["bias"], blocks)
    return y.view(*x.shape[:-1], y.shape[-1])


def _op_forward(module: nn.Module, kind: str) -> Callable[..., Tensor] | None:
    """The forward through :data:`_SCALED_LINEAR` that :func:`prepare` gives a chosen layer of
    ``kind`` whose forward is its library's own (not overridden), else None."""
    forward = type(module).forward
    if kind == "linear" and forward is nn.Linear.forward:
        return _scaled_linear_forward
    conv1d = _conv1d_class(module) if kind == "conv1d" else None
    if conv1d is not None and forward is conv1d.forward:
        return _scaled_conv1d_forward
    return None


def _scale_placements(weight: DTensor) -> list[Any]:
    """The scale's layout for a DTensor weight: its rows (and experts) sharded like the
    weight's, replicated over mesh dims that shard the weight's columns (or replicate it)."""
    from torch.distributed.tensor import Replicate

    def columns(pl: Any) -> bool:
        dim = _shard_dim(pl)
        return dim is None or dim % weight.dim() == weight.dim() - 1

    return [Replicate() if columns(pl) else pl for pl in weight.placements]


def _ones_like_rows(shape: torch.Size, weight: DTensor) -> DTensor:
    """Fp32 ones of ``shape`` as a DTensor laid out by :func:`_scale_placements` (built from
    the local shard: no communication, so the meta device works too)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, _scale_placements(weight)
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = torch.ones(local_shape, dtype=torch.float32, device=weight.to_local().device)
    return _assemble(local, mesh, placements, shape)


class _ScaleShard(torch.autograd.Function):
    """A scale DTensor's local shard whose gradient, summed over the ranks that hold parts of
    the weight's columns, comes back laid out like the scale (an all-reduce in backward)."""

    @staticmethod
    def forward(ctx: Any, scale: DTensor, weight_placements: list[Any]) -> Tensor:  # type: ignore[override]
        ctx.scale = (scale.device_mesh, scale.placements, scale.shape, scale.stride())
        # a replicated scale gets only this rank's columns' share of its gradient
        ctx.partial_sum = [
            _shard_dim(wp) is not None and _shard_dim(sp) is None
            for wp, sp in zip(weight_placements, scale.placements, strict=True)
        ]
        return scale.to_local()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[DTensor, None]:  # type: ignore[override]
        from torch.distributed.tensor import Partial

        mesh, placements, shape, stride = ctx.scale
        grad_placements = [
            Partial() if summed else pl
            for summed, pl in zip(ctx.partial_sum, placements, strict=True)
        ]
        partial = DTensor.from_local(
            grad, mesh, grad_placements, run_check=False, shape=shape, stride=stride
        )
        return partial.redistribute(mesh, placements), None


def _scaled_shards(w: DTensor, scale: Tensor, blocks: int, inverse: bool) -> DTensor:
    """``A * W`` (or ``W / A``) for a DTensor ``W`` ``[out, in]`` (tensor parallel; or
    ``[experts, out, in]``), computed on the local shard with no communication in the forward.

    The local columns ``[c0, c0 + k)`` are cut into segments of ``g = gcd(k, in / blocks, c0)``
    columns, none of which straddles a scale block, and each segment is multiplied by its
    block's scale: the same products as the plain path, bit for bit.
    """
    if not isinstance(scale, DTensor) or list(scale.placements) != _scale_placements(w):
        raise ValueError(
            f"cast_ext.cast.WeightScale: the weight is a DTensor with placements "
            f"{tuple(w.placements)}, so the scale must be one laid out as "
            f"{tuple(_scale_placements(w))} on the same mesh (cast.prepare builds it so when the "
            f"weight is already distributed); got "
            f"{tuple(scale.placements) if isinstance(scale, DTensor) else 'a plain tensor'}"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    local = w.to_local()
    *rows, k = local.shape
    width = w.shape[-1] // blocks
    g = math.gcd(k, width, offset[-1])
    block = torch.arange(offset[-1], offset[-1] + k, g, device=local.device) // width
    s = _ScaleShard.apply(scale, list(w.placements))[..., block]
    out = _times_scale(local.reshape(*rows, k // g, g), s, inverse).reshape(*rows, k)
    return DTensor.from_local(
        out, w.device_mesh, w.placements, run_check=False, shape=w.shape, stride=w.stride()
    )


@dataclass
class SparseLayer:
    """A layer :func:`prepare` sparsified: a Linear-like module's weight, or one stacked weight
    of a MoE experts module.

    Attributes:
        name: qualified module name in the model; for an expert stack, the stack's own name
            (``<experts module>.gate_up_proj``).
        module: the module (still an ``nn.Linear`` / ``Conv1D`` / experts module, parametrized).
        kind: ``"linear"``, ``"conv1d"`` or ``"experts"``.
        out_features, in_features: the stored ``[out, in]`` weight shape (per expert).
        blocks: scale blocks per row.
        param: the module's attribute the layer scales (``"weight"``, ``"gate_up_proj"``, ...).
        experts: the stack's leading dim (``kind == "experts"``), else 0.
    """

    name: str
    module: nn.Module
    kind: str
    out_features: int
    in_features: int
    blocks: int
    param: str = "weight"
    experts: int = 0

    @property
    def weight(self) -> Tensor:
        """The stored ``[out, in]`` (``[experts, out, in]``) weight the optimizer trains (a
        leaf ``nn.Parameter``)."""
        return self.module.parametrizations[self.param].original

    @property
    def scale(self) -> Tensor:
        """The learnable scale ``A``, ``[out, blocks]`` (``[experts, out, blocks]``; one tensor
        for the layers that share a weight)."""
        return self._param().scale

    @property
    def transposed(self) -> bool:
        """The module holds the weight with its last two dims swapped (``Conv1D``, an
        ``is_transposed`` experts module)."""
        return self._param().transposed

    @property
    def weight_name(self) -> str:
        """The weight's qualified name in the plain model (before :func:`prepare`, after
        :func:`finalize`): ``<module>.weight``, ``<experts module>.gate_up_proj``."""
        return self.name if self.experts else _join(self.name, self.param)

    def _param(self) -> WeightScale:
        return self.module.parametrizations[self.param][0]

    def __repr__(self) -> str:
        shape = [self.experts] if self.experts else []
        shape += [self.out_features, self.in_features]
        return f"SparseLayer({self.name!r}, {self.kind}, {shape}, blocks={self.blocks})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layout(module: nn.Module) -> tuple[str, int, int] | None:
    """``(kind, out, in)`` for a Linear-like module, else None."""
    parametrized = parametrize.is_parametrized(module, "weight")
    if parametrized and hasattr(module.parametrizations.weight, "original"):  # weight_norm: 0/1
        w = module.parametrizations.weight.original
        return (
            "conv1d" if _is_conv1d(module) else "linear",
            int(w.shape[0]),
            int(w.shape[1]),
        )
    if isinstance(module, nn.Linear):
        return "linear", module.out_features, module.in_features
    if _is_conv1d(module) and module.weight.dim() == 2:
        return "conv1d", int(module.weight.shape[1]), int(module.weight.shape[0])
    return None


def _expert_stacks(module: nn.Module) -> list[tuple[str, int, int, int]]:
    """``(param, experts, out, in)`` per stacked weight of a MoE experts module whose layout is
    known, else ``[]``.

    transformers 5 stores a MoE layer's experts as one 3-D Parameter per projection
    (``gate_up_proj``, ``down_proj``) in a module its ``use_experts_implementation`` decorator
    gives ``is_transposed``: ``[experts, out, in]`` (Mixtral, Qwen3-MoE, ...) or, when True,
    ``[experts, in, out]`` (gpt-oss). A module of another library says its layout by that
    attribute too (set it before :func:`prepare`). A stack that already has a parametrization is
    listed too (by its original's shape), so that :func:`prepare` refuses it by name.
    """
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool):
        return []
    found = {k: p for k, p in module._parameters.items() if p is not None}
    if parametrize.is_parametrized(module):
        for k, plist in module.parametrizations.items():
            found[k] = getattr(plist, "original", None)
    out = []
    for k, p in found.items():
        if isinstance(p, Tensor) and p.dim() == 3:
            e, a, b = (int(n) for n in p.shape)
            out.append((k, e, b, a) if transposed else (k, e, a, b))
    return out


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    """The layers of ``model`` that :func:`prepare` has parametrized, in module order (an
    experts module's stacks in its parameters' order).

    Raises:
        ValueError: a layer's weight has CAST's scaling and another parametrization (added
            after :func:`prepare`): it would train as a plain dense weight, unseen here.
    """
    out = []
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname, plist in module.parametrizations.items():
            if len(plist) != 1 and any(isinstance(q, WeightScale) for q in plist):
                found = [type(q).__name__ for q in plist]
                raise ValueError(
                    f"cast_ext.cast: {_join(name, pname) or 'the model'} has parametrizations "
                    f"{found}: CAST's WeightScale must be its only one (a layer with another "
                    "would train as a plain dense weight and stay dense at finalize); remove the "
                    "others (torch.nn.utils.parametrize.remove_parametrizations), or add them "
                    "after finalize"
                )
            if isinstance(plist[0], WeightScale):
                out.append(_sparse_layer(name, module, pname, plist[0]))
    return out


def _sparse_layer(name: str, module: nn.Module, param: str, p: WeightScale) -> SparseLayer:
    """The :class:`SparseLayer` of ``module``'s attribute ``param`` (module name ``name``)
    scaled by ``p``: an expert stack is named by its own name, a Linear-like layer by its
    module's."""
    if p.experts:
        kind, lname = "experts", _join(name, param)
    else:
        kind, lname = ("conv1d" if p.transposed else "linear"), name
    return SparseLayer(
        lname, module, kind, p.out_features, p.in_features, p.blocks, param, p.experts
    )


@dataclass
class _Choice:
    """A weight :func:`prepare` chose: ``module``'s attribute ``param``, ``[experts,] out, in``
    as stored for the optimizer, and whether the module holds it transposed."""

    name: str  # the module's
    module: nn.Module
    param: str
    kind: str
    out_f: int
    in_f: int
    experts: int
    transposed: bool

    @property
    def where(self) -> str:
        return _join(self.name, self.param)

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.param)


# The cache of each experts module's forward: the eager experts loop reads its stacks once per
# routed expert, and a scaled stack would otherwise be computed again at every read.
_cache_stacks = threading.local()


def _cache_enter(module: nn.Module, args: Any) -> None:
    ctx = parametrize.cached()
    ctx.__enter__()
    stack = getattr(_cache_stacks, "stack", None)
    if stack is None:
        stack = _cache_stacks.stack = []
    stack.append(ctx)


def _cache_exit(module: nn.Module, args: Any, output: Any) -> None:
    stack = getattr(_cache_stacks, "stack", None)
    if stack:
        stack.pop().__exit__(None, None, None)


def _cache_hooks(module: nn.Module, on: bool) -> None:
    """Adds (or removes) the hooks that run ``module``'s forward under
    :func:`torch.nn.utils.parametrize.cached`: each scaled stack once per forward. The exit hook
    runs if the forward raises too. Found by identity, so a deepcopy's hooks are its own."""
    if on:
        module.register_forward_pre_hook(_cache_enter)
        module.register_forward_hook(_cache_exit, always_call=True)
        return
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_cache_enter, _cache_exit)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def prepare(
    model: nn.Module,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    scale_blocks: int = 2,
) -> list[SparseLayer]:
    """Pick the layers to sparsify and attach CAST's learnable weight scaling to each.

    Default selection: every ``nn.Linear`` (and Hugging Face ``Conv1D``) whose input dimension is
    a multiple of 4, except the output head, any weight shared with an embedding and the layers
    of PEFT adapters (LoRA's ``lora_A``/``lora_B``; the ``base_layer`` they wrap is chosen as
    any other Linear); and every stacked weight of a mixture-of-experts module that says its
    layout (transformers 5's experts modules, by their ``is_transposed``: Mixtral, Qwen3-MoE,
    gpt-oss, ...), each expert 2:4 along its own input dim. The head
    is found by the model's ``get_output_embeddings()`` (Hugging Face language models have
    one; for a Hugging Face classifier, which has none, the head is everything outside its
    ``base_model``); for another model an untied head is a Linear like any other: leave it out
    with ``filter_fn``. MoE routers are not Linears, and stay dense.
    Each chosen layer gets a :class:`WeightScale` parametrization with ``A = 1`` (so the
    model's outputs are unchanged); the layer stays an ordinary module of its class. Layers
    that share one weight (ALBERT-style) share one :class:`WeightScale`, hence one ``A``: the
    weight they compute with, ``A * W``, stays one tensor, and :func:`finalize` keeps them tied.
    An experts module also gets forward hooks that compute each scaled stack once per forward
    (the eager experts loop reads it once per expert). Build the optimizer afterwards: the
    trainable weight is now ``<layer>.parametrizations.weight.original`` (an experts module's
    ``parametrizations.gate_up_proj.original``, ``[experts, out, in]``).

    Args:
        model: the model, modified in place.
        filter_fn: ``(name, module) -> bool`` choosing among Linear-like modules and experts
            modules (all of an experts module's stacks, or none) instead of the default rule. A
            chosen layer whose input dim is not a multiple of 4 is an error, and so is one whose
            weight another module holds that is not chosen (an input embedding tied to the
            head, say).
        scale_blocks: ``n`` of SPEC §3 (paper: 2). A layer whose input dim is not a multiple of
            ``4 * scale_blocks`` gets one block per row instead (recorded in its ``blocks``).

    Returns:
        The :class:`SparseLayer` s changed, in module order.

    Warns:
        UserWarning: no layer was chosen; an experts module of 3-D weights that does not say
            its layout (no ``is_transposed``) stays dense.

    Raises:
        ValueError: a chosen layer has an input dim that is not a multiple of 4 or a weight it
            cannot scale (one a module not chosen holds too, such as a tied embedding; a shared
            ``Conv1D`` weight; a weight with another parametrization; an uninitialized lazy
            one; a DTensor expert stack), ``model`` has already been prepared, or
            ``scale_blocks`` < 1 (nothing is changed).
    """
    if isinstance(scale_blocks, bool) or not (isinstance(scale_blocks, int) and scale_blocks >= 1):
        raise ValueError(
            f"cast_ext.cast.prepare: scale_blocks must be an int >= 1, got {scale_blocks!r}"
        )
    if sparse_layers(model):
        raise ValueError("cast_ext.cast.prepare: model already has CAST weight scaling attached")
    excluded = _excluded_weights(model)
    adapters, _ = _adapter_modules(model)
    chosen: list[_Choice] = []
    for name, module in model.named_modules():
        lay = _layout(module)
        if lay is not None:
            kind, out_f, in_f = lay
            found = [_Choice(name, module, "weight", kind, out_f, in_f, 0, kind == "conv1d")]
        else:
            found = [
                _Choice(name, module, pname, "experts", out_f, in_f, experts, module.is_transposed)
                for pname, experts, out_f, in_f in _expert_stacks(module)
            ]
        if not found or (filter_fn is not None and not filter_fn(name, module)):
            continue
        for c in found:
            if nn.parameter.is_lazy(c.tensor):
                raise ValueError(
                    f"cast_ext.cast.prepare: {c.where} is uninitialized (a lazy module): run a "
                    "forward pass first, so its input dim is known, or leave it out with "
                    "filter_fn (nothing was changed)"
                )
            shape = f"[{c.experts}, {c.out_f}, {c.in_f}]" if c.experts else f"[{c.out_f}, {c.in_f}]"
            if filter_fn is not None:
                if c.in_f % _M != 0:
                    raise ValueError(
                        f"cast_ext.cast.prepare: {c.where} has input dim {c.in_f} (stored "
                        f"{shape}); 2:4 sparsity needs a multiple of {_M}"
                    )
            elif c.in_f % _M != 0 or id(c.tensor) in excluded or id(module) in adapters:
                continue
            if c.transposed and isinstance(c.tensor, DTensor):
                raise ValueError(
                    f"cast_ext.cast.prepare: {c.where} is a {type(module).__name__} weight stored "
                    f"transposed, as a DTensor; tensor parallel layers must be nn.Linear "
                    "(nothing was changed)"
                )
            if c.experts and isinstance(c.tensor, DTensor):
                raise ValueError(
                    f"cast_ext.cast.prepare: {c.where} is an expert stack {shape} that is already "
                    "a DTensor (expert or tensor parallel): prepare the model before sharding "
                    "it (FSDP2's fully_shard after prepare is supported; nothing was changed)"
                )
            chosen.append(c)
    if not chosen:
        frozen = any(isinstance(m, SparseLinear) for m in model.modules())
        warnings.warn(
            "cast_ext.cast.prepare: no layer was chosen"
            + (
                " (filter_fn chose none)"
                if filter_fn is not None
                else ": no nn.Linear or Conv1D with an input dim that is a multiple of 4, "
                "outside the head, the embeddings and PEFT adapters"
            )
            + (
                "; its SparseLinear layers (nn.to_sparse) are 2:4 and frozen already"
                if frozen
                else ""
            ),
            stacklevel=2,
        )
    _refuse_unscalable(model, chosen)
    built_in_inference = [c.where for c in chosen if c.tensor.is_inference()]
    if built_in_inference:
        raise ValueError(
            f"cast_ext.cast.prepare: {built_in_inference[0]} is an inference tensor (the "
            "model was built or loaded under torch.inference_mode), which cannot be trained: "
            "build it outside inference mode (nothing was changed)"
        )
    unknown = [
        _join(mname, pname)
        for mname, module in model.named_modules()
        if "expert" in type(module).__name__.lower() and not _expert_stacks(module)
        for pname, p in module.named_parameters(recurse=False)
        if p.dim() == 3
    ]
    if unknown:
        warnings.warn(
            f"cast_ext.cast.prepare: {len(unknown)} MoE expert weight(s) stored as one 3-D "
            f"tensor per layer stay dense ({unknown[:3]}): their module does not say whether "
            "a stack is [experts, out, in] or [experts, in, out]; set its is_transposed "
            "attribute (False for the first) before prepare to have them sparsified",
            stacklevel=2,
        )

    changed = []
    shared: dict[int, WeightScale] = {}  # weight id -> its scaling, for every layer holding it
    hooked: set[int] = set()  # experts modules given the cache hooks
    # the scales and stored weights it makes are trained: never inference tensors
    with torch.inference_mode(False):
        for c in chosen:
            w = c.tensor
            blocks = scale_blocks if c.in_f % (scale_blocks * _M) == 0 else 1
            p = shared.get(id(w))  # still the plain Parameter under a later holder
            if p is None:
                p = WeightScale(c.out_f, c.in_f, blocks, c.transposed, c.experts)
                p.to(device=w.device)
                if isinstance(w, DTensor):  # tensor parallel: scale follows rows
                    p.scale = nn.Parameter(_ones_like_rows(p.scale.shape, w))
                shared[id(w)] = p
            requires_grad = w.requires_grad
            own = _op_forward(c.module, c.kind)
            parametrize.register_parametrization(c.module, c.param, p)
            if own is not None:  # on the class parametrize made for this module
                type(c.module).forward = own
            c.module.parametrizations[c.param].original.requires_grad_(requires_grad)
            # a frozen layer's scale does not train either
            p.scale.requires_grad_(bool(requires_grad))
            if c.experts and id(c.module) not in hooked:
                _cache_hooks(c.module, on=True)
                hooked.add(id(c.module))
            changed.append(_sparse_layer(c.name, c.module, c.param, p))
    return changed


def _refuse_unscalable(model: nn.Module, chosen: list[_Choice]) -> None:
    """Raise, before :func:`prepare` changes anything, for a chosen layer it cannot scale: one
    whose weight already has a parametrization (CAST's scaling must be the only one: the layer
    would train dense, unseen by :func:`sparse_layers`), a transposed weight (``Conv1D``) that
    another module shares (its ``[in, out]`` weight is re-stored as ``[out, in]``, under the
    other), and one whose weight a module not chosen holds (an embedding tied to the head: that
    module would use the 2:4-decayed ``W`` without ``A``, and :func:`finalize` would untie the
    two). Chosen layers sharing one weight are fine: they share one scale."""
    users = _param_holders(model)
    chosen_ids = {id(c.module) for c in chosen}
    for c in chosen:
        if parametrize.is_parametrized(c.module, c.param):
            found = [type(q).__name__ for q in c.module.parametrizations[c.param]]
            raise ValueError(
                f"cast_ext.cast.prepare: {c.where} already has parametrizations {found}; "
                "CAST's weight scaling must be its only one: remove them "
                "(torch.nn.utils.parametrize.remove_parametrizations) or leave the layer out "
                "with filter_fn (nothing was changed)"
            )
        holders = users.get(id(c.tensor), {})
        if c.transposed and len(holders) > 1:
            raise ValueError(
                f"cast_ext.cast.prepare: {c.name} is a {type(c.module).__name__} whose "
                f"{c.param} is shared ({', '.join(k for k, _ in holders.values())}); stored "
                "transposed, prepared, it is stored as "
                "[out, in] under every holder: untie it or leave it out with filter_fn (nothing "
                "was changed)"
            )
        others = [(k, m) for i, (k, m) in holders.items() if i not in chosen_ids]
        embeddings = [k for k, m in others if isinstance(m, nn.Embedding)]
        if embeddings:
            raise ValueError(
                f"cast_ext.cast.prepare: {c.where} is the embedding {embeddings[0]} (tied); "
                "AdamS would 2:4-decay the embedding and finalize would untie the two: untie "
                f"it first ({c.where} = nn.Parameter({c.where}.detach().clone()), or "
                "tie_word_embeddings=False) or leave it out with filter_fn (nothing was changed)"
            )
        if others:
            raise ValueError(
                f"cast_ext.cast.prepare: {c.where} is shared with "
                f"{', '.join(k for k, _ in others)}, which prepare does not sparsify: that module "
                "would use W without the scale A, and finalize would untie them: choose every "
                "layer that holds it, untie it, or leave it out with filter_fn (nothing was "
                "changed)"
            )


def param_groups(
    model: nn.Module,
    *,
    lr: float | None = None,
    scale_lr: float | None = None,
    weight_decay: float | None = None,
    freeze_embeddings: bool = False,
    freeze_norms: bool = False,
) -> list[dict[str, Any]]:
    """AdamS parameter groups for a prepared model.

    Three groups (empty ones are left out), each with a ``name`` and an explicit ``sparse`` flag:
    ``"sparse"`` (the stored ``[out, in]`` weights of the prepared layers, expert stacks
    ``[experts, out, in]``, ``sparse=True``),
    ``"scales"`` (the ``A`` tensors, ``sparse=False``) and ``"dense"`` (every other trainable
    parameter: biases, norms, embeddings, the head; ``sparse=False``).

    Args:
        model: a model :func:`prepare` has been applied to.
        lr: per-group lr for all groups (else the optimizer's default).
        scale_lr: lr of the scales group (default: ``lr``).
        weight_decay: per-group decoupled weight decay for the sparse and dense groups (the
            scales never get any).
        freeze_embeddings: set ``requires_grad=False`` on every ``nn.Embedding`` weight (a head
            tied to the input embedding is the same tensor, hence frozen too) and leave them out.
        freeze_norms: same for the parameters of every module whose class name contains "Norm".

    Returns:
        A list of dicts for ``cast_ext.AdamS(groups, ...)``.
    """
    if freeze_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.requires_grad_(False)
    if freeze_norms:
        for m in model.modules():
            if "Norm" in type(m).__name__:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    layers = sparse_layers(model)
    taken: set[int] = set()

    def fresh(params: Iterable[Tensor]) -> list[Tensor]:
        """The trainable ones not taken yet, once each (a weight tied between layers too)."""
        out = []
        for p in params:
            if p.requires_grad and id(p) not in taken:
                out.append(p)
                taken.add(id(p))
        return out

    sparse = fresh(layer.weight for layer in layers)
    scales = fresh(layer.scale for layer in layers)
    dense = fresh(model.parameters())

    def group(name: str, params: list[Tensor], is_sparse: bool, g_lr: float | None, wd: bool):
        g: dict[str, Any] = {"params": params, "sparse": is_sparse, "name": name}
        if g_lr is not None:
            g["lr"] = g_lr
        if not wd:
            g["weight_decay"] = 0.0  # not the optimizer's default either
        elif weight_decay is not None:
            g["weight_decay"] = weight_decay
        return g

    groups = [
        group("sparse", sparse, True, lr, True),
        group("scales", scales, False, scale_lr if scale_lr is not None else lr, False),
        group("dense", dense, False, lr, True),
    ]
    if not sparse and layers:
        warnings.warn(
            f"cast_ext.cast.param_groups: the weights of all {len(layers)} prepared layers are "
            "frozen (requires_grad=False; a PEFT model freezes its base layers): no sparse group",
            stacklevel=2,
        )
    elif not sparse:
        warnings.warn(
            "cast_ext.cast.param_groups: no sparse weights found; call prepare(model) first",
            stacklevel=2,
        )
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------
# Distillation loss (SPEC §4)
# --------------------------------------------------------------------------------------------


def shift_labels(input_ids: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token labels aligned with the logits, as Hugging Face causal LMs shift them.

    ``labels[..., t] = input_ids[..., t + 1]`` and the last position gets ``ignore_index``.
    ``distill_loss(model(ids).logits, None, shift_labels(ids), eta=0)`` equals
    ``model(ids, labels=ids).loss``.
    """
    return F.pad(input_ids[..., 1:], (0, 1), value=ignore_index)


def _fused_distill(student: Tensor, impl: str) -> bool:
    """Whether the fused ops (cast_ext::distill_fwd/bwd) take these logits."""
    if impl == "reference" or student.dtype not in ops._FLOATS:
        return False
    return student.device.type == "cpu" or (
        student.device.type == "cuda" and _build.cuda_kernels_available()
    )


def _rows(t: Tensor | None, i: int, chunk: int) -> Tensor | None:
    return None if t is None else t[i : i + chunk]


def _chunks(n: int, chunk: int) -> range:
    return range(0, max(n, 1), chunk)  # one (empty) chunk for 0 rows


def _fwd_in_chunks(
    fwd: Callable[..., tuple[Tensor, Tensor, Tensor]],
    student: Tensor, teacher: Tensor | None, labels: Tensor, t_: float, ignore: int, chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``fwd(student, teacher, labels, T, ignore_index)`` (reference.distill_fwd's arguments)
    in chunks of ``chunk`` rows (bounded fp32 temporaries), its results concatenated."""
    parts = [
        fwd(student[i : i + chunk], _rows(teacher, i, chunk), labels[i : i + chunk], t_, ignore)
        for i in _chunks(student.shape[0], chunk)
    ]
    kl, ce, lse = (torch.cat(p) for p in zip(*parts, strict=True))
    return kl, ce, lse


def _bwd_in_chunks(
    bwd: Callable[..., Tensor],
    student: Tensor, teacher: Tensor | None, labels: Tensor, lse: Tensor, scale: Tensor,
    eta: float, t_: float, ignore: int, chunk: int,
) -> Tensor:  # fmt: skip
    """``bwd(student, teacher, labels, lse, scale, eta, T, ignore_index)`` (reference.
    distill_bwd's arguments) in chunks of ``chunk`` rows, the gradients concatenated."""
    return torch.cat([
        bwd(student[i : i + chunk], _rows(teacher, i, chunk), labels[i : i + chunk],
            lse[i : i + chunk], scale, eta, t_, ignore)
        for i in _chunks(student.shape[0], chunk)
    ])  # fmt: skip


def _fp32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float().contiguous()  # a view where t is fp32 already


def _fused_fp32_fwd(
    s: Tensor, t: Tensor | None, y: Tensor, t_: float, ignore: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused forward on rows of a student and teacher of different dtypes, both in fp32."""
    return ops.distill_fwd(_fp32(s), _fp32(t), y, temperature=t_, ignore_index=ignore)


def _fused_fp32_bwd(
    s: Tensor, t: Tensor | None, y: Tensor, lse: Tensor, scale: Tensor, eta: float, t_: float,
    ignore: int,
) -> Tensor:  # fmt: skip
    """The fused backward on such rows, the gradient in the student's dtype."""
    g = ops.distill_bwd(_fp32(s), _fp32(t), y, lse, scale, eta=eta, temperature=t_,
                        ignore_index=ignore)  # fmt: skip
    return g.to(s.dtype)


class _DistillLoss(torch.autograd.Function):
    """KL + CE from per-row terms; the backward rebuilds the softmaxes from the saved
    log-sum-exps instead of saving probabilities. Fused ops on CPU/CUDA, else the reference in
    chunks of rows. Fused with a teacher of another dtype than the student's: both in fp32, in
    chunks of rows (neither is rounded to the other's dtype, and no fp32 copy of a whole
    tensor is made)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        teacher: Tensor | None,
        labels: Tensor,
        eta: float,
        temperature: float,
        ignore_index: int,
        chunk: int,
        impl: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        fused = _fused_distill(student, impl)
        mixed = fused and teacher is not None and teacher.dtype != student.dtype
        args = (student, teacher, labels, temperature, ignore_index, chunk)
        if mixed:
            kl, ce, lse = _fwd_in_chunks(_fused_fp32_fwd, *args)
        elif fused:
            kl, ce, lse = ops.distill_fwd(
                student, teacher, labels, temperature=temperature, ignore_index=ignore_index
            )
        else:
            kl, ce, lse = _fwd_in_chunks(reference.distill_fwd, *args)
        # a tensor, so nothing syncs with the device
        denom = (labels != ignore_index).sum().clamp_min(1).to(torch.float64)
        kl_mean = (kl.sum(dtype=torch.float64) / denom).float()
        ce_mean = (ce.sum(dtype=torch.float64) / denom).float()
        loss = eta * kl_mean + (1.0 - eta) * ce_mean
        ctx.save_for_backward(student, teacher, labels, lse, denom)
        ctx.params = (eta, temperature, ignore_index, chunk, fused, mixed)
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, _g_kl: Tensor, _g_ce: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the gradient would be a constant to a second backward (the
            # kernels' backward is not differentiable), and a penalty built on it would add
            # nothing, silently (once_differentiable raises only where the incoming gradient
            # itself requires grad)
            raise RuntimeError(
                "cast_ext.cast.distill_loss: a double backward (create_graph=True) is not "
                "supported: its gradient is not differentiable"
            )
        student, teacher, labels, lse, denom = ctx.saved_tensors
        eta, t_, ignore_index, chunk, fused, mixed = ctx.params
        scale = (g_loss / denom).float().reshape(())
        if eta == 0.0:
            teacher = None  # its term has weight 0: skip reading it
        args = (student, teacher, labels, lse, scale, eta, t_, ignore_index, chunk)
        if mixed and teacher is not None:
            grad = _bwd_in_chunks(_fused_fp32_bwd, *args)
        elif fused:
            grad = ops.distill_bwd(
                student, teacher, labels, lse, scale, eta=eta, temperature=t_,
                ignore_index=ignore_index,
            )  # fmt: skip
        else:
            grad = _bwd_in_chunks(reference.distill_bwd, *args)
        return grad, None, None, None, None, None, None, None


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    eta: float = 1.0 / 3.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 512,
    return_parts: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """CAST's loss ``eta * T^2 * KL(P_teacher || P_student) + (1 - eta) * CE(student, labels)``.

    Shift convention: ``labels`` are **aligned** with the logits: ``labels[..., t]`` is the token
    that ``logits[..., t, :]`` predicts. For a causal LM fed ``input_ids`` pass
    :func:`shift_labels` ``(input_ids)``, which is the shift Hugging Face applies inside
    ``model(ids, labels=ids)``. Both terms are means over the same tokens: the positions whose
    label is not ``ignore_index`` (so the KL also skips the last position and padding). The KL
    uses ``softmax(logits / temperature)`` on both sides and is multiplied by ``temperature**2``
    (Hinton's convention; equal to 1 at the default temperature). CE always uses temperature 1.

    Kernels: on CPU and CUDA, float32/float16/bfloat16 logits go through the fused ops
    :func:`cast_ext.ops.distill_fwd` / :func:`~cast_ext.ops.distill_bwd`: the forward reads each
    row of both logits once and keeps three log-sum-exps per row, the backward rebuilds the
    softmaxes from them in one read and one write. Math in fp32 whatever the logits' dtype. The
    only ``[tokens, vocab]`` tensor created is the gradient of ``student_logits`` (in its dtype).
    The KL is a sum of terms that nearly cancel when the two distributions are close, and a high
    temperature flattens both: its relative error against float64 grows with ``temperature``
    (measured for a teacher near the student, 8 x 1000 logits: about 1.5e-5 at T = 1, 3e-5 at
    T = 4, 1.5e-3 at T = 32; the reference path's 1.5e-5, 6e-5, 5e-3).
    Masked vocabularies: a teacher entry of probability 0 in fp32 (a logit of -inf, a mask's
    ``finfo.min``, an underflow) adds nothing to the KL, whatever the student's logit there;
    teacher mass where the student's logit is -inf makes the KL +inf.
    Elsewhere (other devices, float64, ``impl="reference"``) the same terms come from
    :func:`cast_ext.reference.distill_fwd` in chunks of ``chunk_size`` tokens, so no fp32
    ``[tokens, vocab]`` temporary outlives its chunk. The teacher is treated as a constant; one
    of another dtype than the student's is not rounded to it (nor copied whole to fp32): such a
    pair runs in fp32, in chunks of ``chunk_size`` tokens. Nothing syncs with the device, except
    that on CUDA a label outside ``[0, vocab)`` is looked for (see
    :func:`cast_ext.set_cuda_value_checks`).

    Args:
        student_logits: ``[..., vocab]``, requires grad.
        teacher_logits: ``[..., vocab]``, same shape; may be None when ``eta == 0``.
        labels: ``[...]`` int64, aligned (see above).
        eta: weight of the KL term (paper: 1/3 for LLaMA).
        temperature: distillation temperature (paper: 1).
        ignore_index: label value that marks positions to skip.
        chunk_size: tokens per chunk of the reference path (and of a teacher and student of
            different dtypes).
        return_parts: also return the (detached) KL and CE means.
        impl: ``"auto"`` (the fused ops where they run) or ``"reference"``.

    Returns:
        The scalar loss (fp32), or ``(loss, kl, ce)`` with ``return_parts``. With no valid
        token, 0.

    Shape:
        ``student_logits``, ``teacher_logits``: ``[B, L, V]`` or ``[N, V]``; ``labels``:
        ``[B, L]`` or ``[N]``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"cast_ext.cast.distill_loss: eta must be in [0, 1], got {eta}")
    if temperature <= 0:
        raise ValueError(f"cast_ext.cast.distill_loss: temperature must be > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"cast_ext.cast.distill_loss: chunk_size must be an int >= 1, got {chunk_size!r}"
        )
    vocab = student_logits.shape[-1] if student_logits.dim() else 0
    if vocab == 0:
        raise ValueError(
            f"cast_ext.cast.distill_loss: student_logits of shape {list(student_logits.shape)} "
            "has no vocabulary (its last dim, the classes, must be >= 1)"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"cast_ext.cast.distill_loss: labels of shape {list(labels.shape)} do not match "
            f"student_logits of shape {list(student_logits.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"cast_ext.cast.distill_loss: labels have dtype {labels.dtype}; expected class "
            "indices of an integer dtype"
        )
    labels = labels.long()  # the kernels take int64 (a no-op for int64 labels)
    if teacher_logits is None:
        if eta != 0.0:
            raise ValueError("cast_ext.cast.distill_loss: teacher_logits is None but eta != 0")
        teacher = None
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"cast_ext.cast.distill_loss: teacher_logits of shape "
                f"{list(teacher_logits.shape)} differ from student_logits of shape "
                f"{list(student_logits.shape)}"
            )
        teacher = teacher_logits.detach().reshape(-1, vocab)
    if impl not in ("auto", "reference"):
        raise ValueError(
            f"cast_ext.cast.distill_loss: impl must be 'auto' or 'reference', got {impl!r}"
        )
    student = student_logits.reshape(-1, vocab)
    fused = _fused_distill(student, impl)
    loss, kl, ce = _DistillLoss.apply(
        student.contiguous() if fused else student,
        teacher.contiguous() if fused and teacher is not None else teacher,
        labels.reshape(-1).contiguous(),
        float(eta),
        float(temperature),
        int(ignore_index),
        int(chunk_size),
        impl,
    )
    return (loss, kl, ce) if return_parts else loss


# --------------------------------------------------------------------------------------------
# LR schedule and the decay-budget preflight (SPEC §6)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from ``start_factor * peak_lr`` to ``peak_lr``, then cosine to
    ``final_factor * peak_lr`` at ``total_steps``; constant after.

    ``decay_frac`` < 1 holds ``peak_lr`` after the warmup and runs the cosine over only the
    last ``decay_frac`` of the steps after it (warmup-stable-decay). For CAST that shape moves
    the pruned weights much further: a pruned weight travels about ``lr_t * alpha_t`` per step
    once the decay dominates (SPEC §6), and ``alpha_t = t / T`` is largest where a full-length
    cosine has already lowered the lr (:func:`decay_budget` quantifies it).

    ``sched(step)`` is the lr of step ``step`` (0-based); ``sched.factor(step)`` the multiplier
    of ``peak_lr`` (for ``torch.optim.lr_scheduler.LambdaLR``).
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 10
    start_factor: float = 0.1
    final_factor: float = 0.1
    decay_frac: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.decay_frac <= 1.0:  # NaN fails too
            raise ValueError(
                "cast_ext.cast.warmup_cosine: decay_frac must be in (0, 1], got "
                f"{self.decay_frac!r}"
            )

    def _phases(self) -> tuple[int, int, int]:
        """(warmup end, cosine start, cosine length in steps)."""
        w = min(self.warmup_steps, max(self.total_steps - 1, 0))
        after = max(self.total_steps - 1 - w, 1)
        span = max(round(self.decay_frac * after), 1)
        return w, w + after - span, span

    def factor(self, step: int) -> float:
        w, start, span = self._phases()
        if step < w:
            return self.start_factor + (1.0 - self.start_factor) * step / w
        progress = min(max(step - start, 0) / span, 1.0)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_factor + (1.0 - self.final_factor) * cos

    def __call__(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def values(self, steps: int) -> Tensor:
        """``[self(t) for t in range(steps)]`` as a float64 tensor, vectorized."""
        t = torch.arange(steps, dtype=torch.float64)
        w, start, span = self._phases()
        warm = self.start_factor + (1.0 - self.start_factor) * t / max(w, 1)
        progress = ((t - start).clamp(min=0) / span).clamp(max=1.0)
        cos = self.final_factor + (1.0 - self.final_factor) * 0.5 * (
            1.0 + torch.cos(math.pi * progress)
        )
        return self.peak_lr * torch.where(t < w, warm, cos)

    def with_total(self, total_steps: int) -> WarmupCosine:
        """The same shape stretched to another length (same warmup steps)."""
        return replace(self, total_steps=total_steps)


def warmup_cosine(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 10,
    *,
    start_factor: float = 0.1,
    final_factor: float = 0.1,
    decay_frac: float = 1.0,
) -> WarmupCosine:
    """The schedule SPEC §6 found healthy: 10-step warmup from lr/10, cosine to 10%.
    ``decay_frac`` < 1: the cosine over only the last part of the run (see
    :class:`WarmupCosine`)."""
    return WarmupCosine(peak_lr, total_steps, warmup_steps, start_factor, final_factor, decay_frac)


@dataclass
class DecayBudget:
    """What :func:`decay_budget` predicts. ``str()`` gives the plain-words verdict.

    Attributes:
        total_steps: planned steps ``T``.
        decay: AdamS's ``lam``.
        mean_pruned: mean ``|w|`` of the weights the current 2:4 masks prune.
        mean_kept: mean ``|w|`` of the kept weights.
        momentum: assumed size (rms) of a pruned weight's gradient momentum.
        momentum_source: where that came from ("gradients", "grad_rms argument", "default").
        takeover_step: first step at which ``alpha * lam`` exceeds that momentum (the decay
            dominates from then on), or None if it never does.
        travel: predicted total distance a pruned weight moves toward 0 over the run.
        predicted_ratio: predicted mean ``|pruned w|`` at the end / now.
        reach_zero: predicted share of pruned weights that reach 0.
        target_ratio: what counts as "near lossless".
        steps_needed: the fewest steps (within 2%) of the same schedule shape that reach
            ``target_ratio``, at most ``total_steps`` when the plan suffices (None when unknown:
            schedule not stretchable, or beyond max(64x the plan, 1M steps)).
        ok: ``predicted_ratio <= target_ratio``.
    """

    total_steps: int
    decay: float
    mean_pruned: float
    mean_kept: float
    momentum: float
    momentum_source: str
    takeover_step: int | None
    travel: float
    predicted_ratio: float
    reach_zero: float
    target_ratio: float
    steps_needed: int | None
    ok: bool

    def __str__(self) -> str:
        lines = [
            f"decay budget ({self.total_steps} steps, lam={self.decay:g}): pruned weights "
            f"average |w|={self.mean_pruned:.4g} (kept {self.mean_kept:.4g}).",
        ]
        if self.takeover_step is None:
            lines.append(
                f"  The decay never overtakes the gradient momentum (~{self.momentum:.2g}, from "
                f"{self.momentum_source}): lam * alpha stays below it, so pruned weights are "
                "pushed to 0 only weakly."
            )
        else:
            lines.append(
                f"  The decay overtakes the gradient momentum (~{self.momentum:.2g}, from "
                f"{self.momentum_source}) at step {self.takeover_step}; after that a pruned "
                "weight moves about lr per step toward 0."
            )
        lines.append(
            f"  Predicted travel {self.travel:.3g}: pruned weights end at about "
            f"{100 * self.predicted_ratio:.0f}% of their size ({100 * self.reach_zero:.0f}% "
            "of them reach 0)."
        )
        if self.ok:
            within = (
                f"; about {self.steps_needed} steps of this schedule shape would reach it"
                if self.steps_needed
                else ""
            )
            lines.append(
                "  OK: the final hard 2:4 prune should be close to lossless "
                f"(target <= {100 * self.target_ratio:.0f}%{within})."
            )
        else:
            need = (
                f" About {self.steps_needed} steps with this schedule shape would get them to "
                f"{100 * self.target_ratio:.0f}%."
                if self.steps_needed
                else " Raise lam, the lr or the step count."
            )
            lines.append(
                "  TOO SHORT: the final prune will cut weights that still carry "
                f"{100 * self.predicted_ratio:.0f}% of their magnitude, and the model will lose "
                f"quality at finalize.{need}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lr_values(lr_schedule: float | Callable[[int], float] | Sequence[float], total: int) -> Tensor:
    lrs = _lr_list(lr_schedule, total)
    bad = ~(torch.isfinite(lrs) & (lrs >= 0))
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        raise ValueError(
            f"cast_ext.cast.decay_budget: the lr of step {t} is {float(lrs[t])}; lrs must be "
            "finite and >= 0"
        )
    return lrs


def _lr_list(lr_schedule: float | Callable[[int], float] | Sequence[float], total: int) -> Tensor:
    if isinstance(lr_schedule, Tensor) and lr_schedule.dim() == 0:  # AdamS takes a tensor lr
        lr_schedule = float(lr_schedule)
    if isinstance(lr_schedule, (int, float)):
        return torch.full((total,), float(lr_schedule), dtype=torch.float64)
    if isinstance(lr_schedule, WarmupCosine):
        return lr_schedule.values(total)
    if callable(lr_schedule):
        return torch.tensor([float(lr_schedule(t)) for t in range(total)], dtype=torch.float64)
    vals = [float(v) for v in lr_schedule]
    if len(vals) < total:
        raise ValueError(
            f"cast_ext.cast.decay_budget: lr_schedule has {len(vals)} values for {total} steps"
        )
    return torch.tensor(vals[:total], dtype=torch.float64)


def _ema(x: Tensor, beta: float) -> Tensor:
    """``v_t = beta * v_{t-1} + (1 - beta) * x_t`` from ``v_{-1} = 0``, vectorized in chunks
    (within a chunk, a cumulative sum of ``x_i * beta^-i``; chunks short enough for float64)."""
    out = torch.empty_like(x)
    chunk = max(1, min(256, int(250 / max(-math.log10(beta), 1e-9)))) if beta > 0 else 1
    state = 0.0
    for s0 in range(0, x.numel(), chunk):
        xs = x[s0 : s0 + chunk]
        k = torch.arange(xs.numel(), dtype=x.dtype)
        pw = beta**k if beta > 0 else (k == 0).to(x.dtype)
        if beta > 0:
            seg = beta * pw * state + (1.0 - beta) * pw * torch.cumsum(xs / pw, 0)
        else:
            seg = xs.clone()
        out[s0 : s0 + chunk] = seg
        state = float(seg[-1])
    return out


def _travel(
    lrs: Tensor,
    total: int,
    decay: float,
    grad_rms: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[float, int | None]:
    """Expected distance a pruned weight moves toward 0, and the step the decay takes over.

    AdamS on a pruned weight, in expected values: the gradient is zero-mean noise of rms
    ``grad_rms``, so ``E[mu_t^2] = grad_rms^2 (1 - b1) / (1 + b1) (1 - b1^(2(t+1)))``;
    ``mu_eff = (1 - a) mu + a lam sign(w)`` has mean ``a lam`` toward 0 and second moment
    ``(a lam)^2 + (1 - a)^2 E[mu^2]``, which ``v`` averages (EMA, ``b2``). The expected move is
    ``lr_t * (a lam / bc1) / (sqrt(v / bc2) + eps)``: about ``lr_t`` (more early on, where
    ``bc1`` is small and ``v`` lags the growing ``a``) once the decay dominates, ``lr_t * a lam /
    rms(mu)`` before.
    """
    b1, b2 = betas
    n = lrs.numel()
    t = torch.arange(n, dtype=torch.float64)
    alpha = (t / total).clamp(max=1.0)
    push = alpha * decay
    mu_sq = grad_rms**2 * (1.0 - b1) / (1.0 + b1) * (1.0 - b1 ** (2.0 * (t + 1.0)))
    noise_sq = (1.0 - alpha) ** 2 * mu_sq
    v = _ema(push * push + noise_sq, b2)
    bc1 = 1.0 - b1 ** (t + 1.0)
    bc2 = 1.0 - b2 ** (t + 1.0)
    step = lrs * (push / bc1) / ((v / bc2).sqrt() + eps)
    over = torch.nonzero(push * push > noise_sq)
    return float(step.sum()), (int(over[0]) if over.numel() else None)


def decay_budget(
    model_or_params: nn.Module | Iterable[Tensor],
    lr_schedule: float | Callable[[int], float] | Sequence[float],
    total_steps: int,
    *,
    decay: float,
    grad_rms: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    target_ratio: float = 0.03,
    warn: bool = True,
    sample: int = 65536,
) -> DecayBudget:
    """Preflight: will the planned run shrink the pruned weights enough for a clean finalize?

    SPEC §6: a pruned weight's push toward 0 is ``alpha * lam`` inside Adam's normalisation.
    Once it exceeds the gradient momentum it moves about ``lr_t`` per step, whatever ``lam`` is;
    before that it moves ``lr_t * alpha * lam / rms(momentum)``. The expected move per step is
    computed by running AdamS's recursion in expected values (gradients modelled as zero-mean
    noise of the measured rms; bias corrections and the lag of ``v`` included) and summed over
    the schedule: the *travel*. A pruned weight of size ``|w|`` ends near ``max(|w| - travel,
    0)``. Mask changes during training and the random walk the gradient noise adds are
    ignored, so read the result as an estimate.

    Args:
        model_or_params: a prepared model (its sparse layers' stored weights are used) or the
            sparse ``[out, in]`` weights themselves. With FSDP2 (DTensor weights) call it on
            every rank: each weight (and its gradient) is gathered in turn, so every rank gets
            the verdict one process would.
        lr_schedule: a constant lr, a callable ``step -> lr`` (e.g. :func:`warmup_cosine`), or
            a sequence of per-step lrs. Not a torch LR scheduler (its lrs are known only by
            stepping it, which would change the optimizer's lr): pass the function it applies,
            e.g. ``lambda t: peak_lr * lr_lambda(t)`` for a ``LambdaLR(opt, lr_lambda)``.
        total_steps: AdamS's ``total_steps`` (``alpha = t / T``).
        decay: AdamS's ``lam``.
        grad_rms: rms of the gradients of the sparse weights. Default: measured from the
            ``.grad`` the weights hold (run one backward first), else (none, or all zero)
            1e-4 (SmolLM2's, SPEC §6).
        betas, eps: AdamS's.
        target_ratio: predicted end / start ratio of mean ``|pruned w|`` counted as near
            lossless. The default, 0.03, comes from the CPU demo on SmolLM2-135M: measured
            ratios of 0.73, 0.46 and 0.070 (predicted 0.75, 0.52, 0.098) cost the finalize
            6.8x, 3.5x and 1.27x in perplexity (2.6-3.5 nats per unit of ratio). Not a
            guarantee: with 128-token windows, 0.027 predicted (0.014 measured, 1,500 steps)
            still cost 1.11x, as the largest pruned weights are the last to go.
        warn: emit a ``UserWarning`` with the verdict when the run is too short.
        sample: positions sampled in the largest tensor; the others at the same rate, so every
            weight counts alike whatever its tensor's size (the prediction is a mean over the
            pruned weights; sampling keeps it fast).

    Returns:
        A :class:`DecayBudget`; print it for the verdict in plain words.

    Raises:
        ValueError: ``total_steps`` < 1, a model without prepared layers or no weights, an lr
            that is negative or not finite, or a setting outside AdamS's rules (``decay`` or
            ``eps`` < 0, a beta outside [0, 1), NaN).
        TypeError: ``lr_schedule`` is none of the above (a torch LR scheduler, say), or a
            setting is not a number.
    """
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ValueError(
            f"cast_ext.cast.decay_budget: total_steps must be an int >= 1, got {total_steps!r}"
        )
    accepted = (
        "a float, a callable step -> lr (a WarmupCosine from cast.warmup_cosine, say) or a "
        "sequence of per-step lrs"
    )
    if isinstance(lr_schedule, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(
            f"cast_ext.cast.decay_budget: lr_schedule is a torch LR scheduler "
            f"({type(lr_schedule).__name__}), whose lrs are known only by stepping it (which "
            f"would change the optimizer's lr); pass {accepted} instead: for "
            "LambdaLR(opt, lr_lambda), lambda t: peak_lr * lr_lambda(t); for "
            "LambdaLR(opt, sched.factor), sched itself"
        )
    if not (isinstance(lr_schedule, (int, float, Iterable)) or callable(lr_schedule)):
        raise TypeError(
            f"cast_ext.cast.decay_budget: lr_schedule must be {accepted}, got "
            f"{type(lr_schedule).__name__}"
        )
    fn = "cast_ext.cast.decay_budget"
    try:
        b1, b2 = (float(b) for b in betas)
        decay, eps, target_ratio = float(decay), float(eps), float(target_ratio)
        grad_rms = None if grad_rms is None else float(grad_rms)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{fn}: decay, betas (two), eps, target_ratio and grad_rms must be numbers ({e})"
        ) from e
    for what, val, ok, rule in (
        ("decay", decay, decay >= 0.0, ">= 0"),
        ("betas[0]", b1, 0.0 <= b1 < 1.0, "in [0, 1)"),
        ("betas[1]", b2, 0.0 <= b2 < 1.0, "in [0, 1)"),
        ("eps", eps, eps >= 0.0, ">= 0"),
        ("target_ratio", target_ratio, target_ratio > 0.0, "> 0"),
        ("grad_rms", grad_rms, grad_rms is None or grad_rms >= 0.0, ">= 0"),
    ):  # AdamS's own rules; a NaN fails every comparison
        if not (ok and (val is None or math.isfinite(val))):
            raise ValueError(f"{fn}: {what} must be finite and {rule}, got {val!r}")
    if isinstance(model_or_params, nn.Module):
        params = [layer.weight for layer in _one_per_weight(sparse_layers(model_or_params))]
        if not params:
            raise ValueError(f"{fn}: the model has no sparse layers; prepare() it first")
    else:
        params = list(model_or_params)
        if not params:
            raise ValueError(f"{fn}: no weights given (a prepared model's are its sparse layers')")
    gen = torch.Generator().manual_seed(0)
    rate = min(1.0, 2 * sample / max((p.numel() for p in params), default=1))
    pruned_parts: list[Tensor] = []
    kept_sum, kept_n, pruned_sum, pruned_n = 0.0, 0, 0.0, 0
    g_sq, g_n = 0.0, 0
    for p in params:
        # A DTensor (FSDP2) weight is gathered a layer at a time, as FSDP2's forward does: the
        # figures and the sampled magnitudes are then those of one process, on every rank.
        w, grad = _full(p.detach()), None if p.grad is None else _full(p.grad.detach())
        mask = ops.sparse24_mask(w)
        aw = w.abs().float()
        total = float(aw.sum())
        kept = float(aw.masked_fill_(~mask, 0.0).sum())  # aw now holds the kept magnitudes only
        kept_sum += kept
        pruned_sum += total - kept
        kept_n += int(mask.sum())
        pruned_n += w.numel() - int(mask.sum())
        # sample positions first, keep the pruned ones: no copy of all pruned magnitudes
        flat_w, flat_m = w.reshape(-1), mask.reshape(-1)
        if rate < 1.0:
            idx = torch.randint(w.numel(), (max(1, round(rate * w.numel())),), generator=gen)
        else:
            idx = torch.arange(w.numel())
        idx = idx.to(w.device)
        sel = ~flat_m[idx]
        pruned_parts.append(flat_w[idx][sel].abs().double().cpu())
        if grad is not None:
            gp = grad.float().masked_fill(mask, 0.0)
            g_sq += float((gp * gp).sum())
            g_n += w.numel() - int(mask.sum())
    mags = torch.cat(pruned_parts) if pruned_parts else torch.zeros(0, dtype=torch.float64)
    mags = mags.sort().values
    if grad_rms is not None:
        rms, source = float(grad_rms), "grad_rms argument"
    elif g_n and g_sq > 0.0:  # all-zero .grad (zero_grad(set_to_none=False)) is no measurement
        rms, source = math.sqrt(g_sq / g_n), "the current gradients"
    else:
        rms, source = 1e-4, "the default gradient rms 1e-4"
    momentum = rms * math.sqrt((1.0 - betas[0]) / (1.0 + betas[0]))
    mean0 = float(mags.mean()) if mags.numel() else 0.0
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), mags.cumsum(0)])

    def ratio_for(travel: float, lr_end: float) -> tuple[float, float]:
        # weights that reach 0 keep jittering around it by about the last lr (~lr/2 on average)
        if not mags.numel() or mean0 == 0.0:
            return 0.0, 1.0
        k = int(torch.searchsorted(mags, torch.tensor([travel], dtype=torch.float64)))
        remaining = float(csum[-1] - csum[k]) - travel * (mags.numel() - k) + 0.5 * lr_end * k
        return remaining / float(csum[-1]), k / mags.numel()

    def predict(sched: Any, steps: int) -> tuple[float, float, float, int | None]:
        lrs = _lr_values(sched, steps)
        travel, takeover = _travel(lrs, steps, decay, rms, betas, eps)
        r, reach = ratio_for(travel, float(lrs[-1]) if lrs.numel() else 0.0)
        return r, reach, travel, takeover

    ratio, reach, travel, takeover = predict(lr_schedule, total_steps)
    ok = ratio <= target_ratio

    steps_needed = None
    stretch = getattr(lr_schedule, "with_total", None)
    if callable(stretch):
        # the fewest steps (within 2%) of this schedule shape that reach the target: below the
        # plan where it suffices, else found by doubling it
        lo, hi = (0, total_steps) if ok else (total_steps, None)
        t = total_steps
        while hi is None and t < max(64 * total_steps, 1_000_000):
            t *= 2
            if predict(stretch(t), t)[0] <= target_ratio:
                hi = t
            else:
                lo = t
        if hi is not None:
            while hi - lo > max(1, hi // 50):
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if predict(stretch(mid), mid)[0] <= target_ratio else (mid, hi)
            steps_needed = hi
    result = DecayBudget(
        total_steps=total_steps,
        decay=decay,
        mean_pruned=pruned_sum / max(pruned_n, 1),
        mean_kept=kept_sum / max(kept_n, 1),
        momentum=momentum,
        momentum_source=source,
        takeover_step=takeover,
        travel=travel,
        predicted_ratio=ratio,
        reach_zero=reach,
        target_ratio=target_ratio,
        steps_needed=steps_needed,
        ok=ok,
    )
    if warn and not ok:
        warnings.warn(str(result), UserWarning, stacklevel=2)
    return result


# --------------------------------------------------------------------------------------------
# Masks, health metrics and finalize (SPEC §5)
# --------------------------------------------------------------------------------------------


def _optimizer_mask(optimizer: Any, w: Tensor) -> Tensor | None:
    """The optimizer's current bool mask for ``w``, or None if it has none (yet)."""
    if optimizer is None or not callable(getattr(optimizer, "mask", None)):
        return None
    try:
        mask = optimizer.mask(w)
    except (KeyError, RuntimeError, ValueError):
        return None
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != w.shape:
        raise ValueError(
            f"cast_ext.cast: optimizer.mask returned {mask.dtype} of shape {list(mask.shape)} "
            f"for a weight of shape {list(w.shape)}; expected a bool mask of the same shape"
        )
    return mask


def _layer_mask(layer: SparseLayer, optimizer: Any) -> tuple[Tensor, str]:
    w = layer.weight.detach()
    mask = _optimizer_mask(optimizer, layer.weight)
    if mask is not None:
        return mask.to(w.device), "optimizer"
    mask = ops.sparse24_mask(w)
    if isinstance(w, DTensor) and mask.placements != w.placements:
        # A weight of fewer rows than the mesh has ranks: the mask op's sharding rule made the
        # mask Replicate; laid out like the weight, the callers' local shards match.
        mask = mask.redistribute(w.device_mesh, w.placements)
    return mask, "magnitude"


def _warn_magnitude_fallback(
    fn: str, optimizer: Any, sources: list[tuple[str, str]], stacklevel: int
) -> None:
    """The warning of :func:`finalize` and :func:`export_state_dict` when ``optimizer`` was
    given but holds no mask for some layers, which then get fresh 2:4 magnitude masks.
    ``sources``: ``(layer name, mask source)`` per layer, as :func:`_layer_mask` gave them;
    ``stacklevel``: the caller's own, for the warning to point at the user's line."""
    fallback = [name for name, source in sources if source == "magnitude"]
    if optimizer is None or not fallback:
        return
    names = ", ".join(fallback[:3]) + (", ..." if len(fallback) > 3 else "")
    warnings.warn(
        f"cast_ext.cast.{fn}: the optimizer holds no mask for {len(fallback)} of "
        f"{len(sources)} layers ({names}): not sparse params of an AdamS that has stepped; "
        "they were pruned with fresh magnitude masks",
        stacklevel=stacklevel + 1,
    )


def _one_per_weight(layers: list[SparseLayer]) -> list[SparseLayer]:
    """``layers`` less those whose weight an earlier one holds (a weight shared by two layers
    counts once)."""
    seen: set[int] = set()
    out = []
    for layer in layers:
        if id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            out.append(layer)
    return out


def _full(t: Tensor) -> Tensor:
    """``t`` whole: a DTensor gathered (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def sparsity_health(
    model: nn.Module,
    optimizer: Any = None,
    previous: dict[str, Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """The health signals of SPEC §5 for a prepared model.

    Uses the optimizer's masks (``optimizer.mask(p)``) where it has them, else fresh 2:4
    magnitude masks.

    Args:
        model: a prepared model.
        optimizer: the AdamS optimizer, or None.
        previous: the packed masks this function returned last time, to count mask flips.

    Returns:
        ``(metrics, packed_masks)``. ``metrics``: ``pruned_kept_ratio`` (mean |pruned w| / mean
        |kept w|, all layers together), ``mean_pruned``, ``mean_kept``, ``mask_flips`` and
        ``flip_rate`` (groups whose kept pair changed since ``previous``, count and share; NaN
        without ``previous``), ``scale_min`` / ``scale_max`` (range of the learnable scales).
    """
    return _health(sparse_layers(model), optimizer, previous)


def _health(
    layers: list[SparseLayer], optimizer: Any, previous: dict[str, Tensor] | None
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """:func:`sparsity_health` of the prepared ``layers`` (:func:`train` lists them once)."""
    packed_all: dict[str, Tensor] = {}
    rows: list[Tensor] = []  # per layer, per shard: the figures below
    numel = groups = 0  # global counts: Python ints (no tensor per layer to sum)
    for layer in _one_per_weight(layers):
        mask, _ = _layer_mask(layer, optimizer)
        w = layer.weight.detach()
        # This rank's shard (the whole layer for a plain tensor); for a DTensor the per-rank
        # figures are gathered over the shards: reductions of a sharded tensor are not global.
        local_mask, aw = _local(mask), _local(w).abs().float()
        packed = ops.pack_mask(local_mask)
        packed_all[layer.name] = packed
        sc = _local(layer.scale.detach()).float()
        f64 = torch.float64
        figures = [
            aw.sum(dtype=f64),
            aw.masked_fill_(~local_mask, 0.0).sum(dtype=f64),
            local_mask.sum(dtype=f64),
        ]
        numel += w.numel()
        if previous is not None and layer.name in previous:
            figures.append(ops.mask_flips(previous[layer.name], packed).to(f64))
            groups += w.numel() // _M
        else:
            figures.append(aw.new_zeros((), dtype=f64))  # no flips to count (a fill, no copy)
        if sc.numel():
            figures += [-sc.min().to(f64), sc.max().to(f64)]
        else:
            figures += [torch.full((2,), -math.inf, dtype=f64, device=aw.device)]
        rows.append(_over_shards(torch.cat([f.view(-1) for f in figures]), w))
    # Every layer's figures in one tensor, read back once (one sync, not one per figure).
    home = rows[0].device if rows else torch.device("cpu")
    empty = torch.tensor([[0, 0, 0, 0, -math.inf, -math.inf]], dtype=torch.float64)
    table = torch.cat([empty.to(home), *(r.to(home) for r in rows)])
    sums, highs = table[:, :4].sum(0).tolist(), table[:, 4:].amax(0).tolist()
    total, kept_sum, kept_n, flips = sums
    pruned_sum, pruned_n = total - kept_sum, numel - kept_n
    s_min, s_max = -highs[0], highs[1]
    mean_pruned = pruned_sum / max(pruned_n, 1)
    mean_kept = kept_sum / max(kept_n, 1)
    metrics = {
        "pruned_kept_ratio": mean_pruned / mean_kept if mean_kept else math.nan,
        "mean_pruned": mean_pruned,
        "mean_kept": mean_kept,
        "mask_flips": float(flips) if groups else math.nan,
        "flip_rate": flips / groups if groups else math.nan,
        "scale_min": s_min,
        "scale_max": s_max,
    }
    return metrics, packed_all


@dataclass
class LayerReport:
    """Per-layer result of :func:`finalize`.

    Attributes:
        name: module name (an expert stack's name, ``<experts module>.gate_up_proj``).
        shape: the module's weight shape after finalize (``[in, out]`` for ``Conv1D``).
        exactly_24: every group of 4 along the input dim has at most 2 nonzeros.
        nonzero_share: nonzeros / elements (0.5 unless weights were already 0).
        pruned_magnitude_share: share of ``sum |A * W|`` that the prune removed.
        mask_source: ``"optimizer"`` (AdamS's current mask) or ``"magnitude"`` (fresh 2:4).
    """

    name: str
    shape: list[int]
    exactly_24: bool
    nonzero_share: float
    pruned_magnitude_share: float
    mask_source: str


def _scaled_weight(layer: SparseLayer) -> Tensor:
    """``A * W`` of a prepared layer, ``[out, in]``, a new tensor (call under no_grad)."""
    return layer._param()._scaled(layer.weight.detach())


def _as_stored(layer: SparseLayer, w: Tensor) -> Tensor:
    """An ``[out, in]`` (``[experts, out, in]``) weight in the module's own layout (the last
    two dims swapped for ``Conv1D`` and an ``is_transposed`` experts module)."""
    return w.transpose(-2, -1).contiguous() if layer.transposed else w.contiguous()


def _state_keys(name: str, param: str) -> tuple[str, str, str]:
    """A layer's state-dict keys under module name ``name``: its plain weight ``param``, and
    the prepared stored weight and scale that replace it."""
    prefix = f"{name}." if name else ""
    return (
        prefix + param,
        prefix + f"parametrizations.{param}.original",
        prefix + f"parametrizations.{param}.0.scale",
    )


def _named_layers(model: nn.Module) -> list[tuple[SparseLayer, str]]:
    """Each prepared layer under every module name it has, as ``state_dict`` lists it (a module
    shared by two parents has two)."""
    by_module: dict[int, list[SparseLayer]] = {}
    for layer in sparse_layers(model):
        by_module.setdefault(id(layer.module), []).append(layer)
    return [
        (layer, name)
        for name, m in model.named_modules(remove_duplicate=False)
        for layer in by_module.get(id(m), ())
    ]


def _require_prepared(fn: str, model: nn.Module) -> list[SparseLayer]:
    """``model``'s prepared layers; a ValueError where it has none (never prepared, or already
    finalized), which :func:`finalize` and :func:`export_state_dict` would pass over without a
    word (an AdamS over the plain model holds masks they would never apply)."""
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(
            f"cast_ext.cast.{fn}: the model has no prepared layers (cast.prepare was not called, "
            "or the model is already finalized). To prune a plain model trained with AdamS, "
            "multiply each sparse weight by optimizer.mask(weight)"
        )
    return layers


@torch.no_grad()
def export_state_dict(
    model: nn.Module, optimizer: Any = None, *, prune: bool = True
) -> dict[str, Tensor]:
    """The state dict of the plain model :func:`finalize` would leave now, without changing
    ``model``: a checkpoint to save mid-training that loads without cast_ext.

    Each prepared layer's ``parametrizations.weight.original`` and scale entries become one
    ``weight`` entry (an expert stack's, one ``gate_up_proj`` entry, say) in the module's own
    layout: ``A * W`` masked with the optimizer's current
    mask (as :func:`finalize` does; a fresh 2:4 magnitude mask without one), or with
    ``prune=False`` the dense ``A * W`` the model computes with now (the student before the final
    prune). Layers sharing one weight (and so one scale, see :func:`prepare`) export one tensor
    under all their names; every other entry is the model's own tensor, shared, not copied
    (tied weights stay tied). For a Hugging Face model::

        model.save_pretrained(path, state_dict=cast.export_state_dict(model, opt))
        # later, anywhere: AutoModelForCausalLM.from_pretrained(path), exactly 2:4

    Args:
        model: a prepared model; with FSDP2 (DTensor params) the exported weights are
            DTensors laid out like the params (``full_tensor()`` gathers each).
        optimizer: the AdamS optimizer training it, or None.
        prune: apply the 2:4 mask (default) or export the dense scaled weights.

    Returns:
        ``{name: tensor}`` with the keys of the model before :func:`prepare`.

    Warns:
        UserWarning: ``prune`` and an ``optimizer`` that has no mask for some layers (which then
            get magnitude masks), as :func:`finalize` warns.

    Raises:
        ValueError: ``model`` has no prepared layers.
    """
    _require_prepared("export_state_dict", model)
    renamed: dict[str, tuple[str, Tensor]] = {}
    dropped: set[str] = set()
    stored: dict[int, tuple[Tensor, str]] = {}  # per weight, once: the tensor, its mask's source
    # per layer (once, whatever its number of names)
    sources: dict[tuple[int, str], tuple[str, str]] = {}
    for layer, name in _named_layers(model):
        weight_key, original_key, scale_key = _state_keys(name, layer.param)
        if id(layer.weight) not in stored:
            w, source = _scaled_weight(layer), "dense"
            if prune:
                mask, source = _layer_mask(layer, optimizer)
                w.masked_fill_(~mask, 0.0)
            stored[id(layer.weight)] = (_as_stored(layer, w), source)
        exported, source = stored[id(layer.weight)]
        sources[(id(layer.module), layer.param)] = (layer.name, source)
        renamed[original_key] = (weight_key, exported)
        dropped.add(scale_key)
    # user -> torch.no_grad's wrapper -> here
    _warn_magnitude_fallback("export_state_dict", optimizer, list(sources.values()), 3)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in dropped:
            continue
        key, value = renamed.get(key, (key, value))
        out[key] = value
    return out


def prepared_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain checkpoint (the model's keys before :func:`prepare`, e.g. a Hugging Face one)
    re-keyed for the prepared ``model``: the start of a CAST run from pretrained weights when
    ``prepare`` had to come first.

    That is the large-model path: build on the meta device, ``prepare``, ``fully_shard``,
    ``to_empty``, then load. Each prepared layer's ``weight`` entry becomes
    ``parametrizations.weight.original`` (``[out, in]``: a GPT-2 ``Conv1D`` weight is
    transposed; an expert stack's entry, ``gate_up_proj`` say, likewise) and gets a
    ``parametrizations.weight.0.scale`` of ones (``A = 1``, as
    :func:`prepare` sets it; a DTensor laid out like the model's scale when the weight is a
    DTensor, as :func:`export_state_dict` gives them under FSDP2), so the model then computes
    exactly what the plain one did. Every other entry passes through unchanged (entries already
    in the prepared form too)::

        model.load_state_dict(cast.prepared_state_dict(model, dense_sd))
        # FSDP2 (DTensor params): every rank calls
        set_model_state_dict(model, cast.prepared_state_dict(model, full_sd),
                             options=StateDictOptions(full_state_dict=True,
                                                      broadcast_from_rank0=True))

    Args:
        model: a prepared model (only its layer names and shapes are read).
        state_dict: ``{name: tensor}`` of the plain model; not modified.

    Returns:
        A new dict; the tensors not re-laid out are the caller's, not copies.

    Raises:
        ValueError: a prepared layer's ``weight`` entry has the wrong shape.
    """
    out = dict(state_dict)
    for layer, name in _named_layers(model):
        weight_key, original_key, scale_key = _state_keys(name, layer.param)
        w = out.pop(weight_key, None)
        if w is None:
            continue
        out_in = [layer.out_features, layer.in_features]
        # the module holds [in, out] (Conv1D, an is_transposed experts module)
        want = ([layer.experts] if layer.experts else []) + (
            out_in[::-1] if layer.transposed else out_in
        )
        if list(w.shape) != want:
            raise ValueError(
                f"cast_ext.cast.prepared_state_dict: {weight_key} has shape {list(w.shape)}; "
                f"the prepared {type(layer.module).__name__} {layer.name!r} stores {want}"
            )
        out[original_key] = w.transpose(-2, -1).contiguous() if layer.transposed else w
        scale = layer.scale.detach()
        out[scale_key] = (
            torch.ones_like(scale)  # laid out like the model's (sharded) scale
            if isinstance(w, DTensor) and isinstance(scale, DTensor)
            else torch.ones(scale.shape, dtype=scale.dtype, device=w.device)
        )
    return out


def finalize(model: nn.Module, optimizer: Any = None) -> list[LayerReport]:
    """Hard 2:4 prune, fold the scales into the weights, and remove the parametrizations.

    ``W <- (A * W) * mask`` per prepared layer, with ``mask`` the optimizer's current mask
    (``optimizer.mask(p)``, the one AdamS decayed toward) or, without one, a fresh 2:4 magnitude
    mask of ``W``. Afterwards each layer is a plain ``nn.Linear`` / ``Conv1D`` (experts module,
    its stacks plain Parameters again, each expert pruned along its own input dim) whose weight
    follows that mask along the input dim: exactly 2:4 with AdamS's default ``n=2, m=4`` (or a
    magnitude mask); with another N:M (``n=4, m=8``, say) it is N:M but in general not 2:4, and
    a warning names the layers (their :class:`LayerReport` has ``exactly_24=False``). Layers
    that shared a weight (and its scale) get one new weight, still shared. The model's outputs
    equal those of the scaled model with the mask applied. The optimizer's references to the
    old weights are stale afterwards.

    Args:
        model: a prepared model, modified in place.
        optimizer: the AdamS optimizer used for training, or None.

    Returns:
        One :class:`LayerReport` per layer, in module order.

    Warns:
        UserWarning: ``optimizer`` was given but has no mask for some layers (which then get
            magnitude masks); some layers are not exactly 2:4 (the optimizer's masks are not).

    Raises:
        ValueError: ``model`` has no prepared layers (never prepared, or finalized already), a
            layer's weight is a DTensor, or a layer's mask cannot be taken (a NaN weight without
            an optimizer mask, say; the layer is named and nothing is changed).
    """
    layers = _require_prepared("finalize", model)
    for layer in layers:
        if isinstance(layer.weight, DTensor):
            raise ValueError(
                f"cast_ext.cast.finalize: layer {layer.name!r} has a sharded (DTensor) weight of "
                f"shape {list(layer.weight.shape)}: finalize swaps the weight for a new one, which "
                "FSDP2 or tensor parallel would not follow. Save cast.export_state_dict(model, "
                "optimizer) instead (DTensors laid out like the params; full_tensor() gathers "
                "each) and load it into the unsharded model"
            )
    # Per stored weight, every new weight is made before any layer changes, so that a refusal
    # (a NaN weight without an optimizer mask, an optimizer mask of the wrong shape) names its
    # layer and leaves the whole model unchanged: the old weight (kept alive, so that its id
    # stays its own), the new Parameter every layer holding it gets, and the report's figures.
    done: dict[int, tuple[Tensor, nn.Parameter, dict[str, Any]]] = {}
    for layer in _one_per_weight(layers):
        try:
            mask, source = _layer_mask(layer, optimizer)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as e:
            kind = ValueError if isinstance(e, ValueError) else RuntimeError
            raise kind(
                f"cast_ext.cast.finalize: layer {layer.name!r}: {e} (nothing was changed)"
            ) from e
        # the new weight may be trained on: never an inference tensor
        with torch.inference_mode(False), torch.no_grad():  # in this order: no grad
            final = _scaled_weight(layer)
            a = final.abs()
            total = float(a.sum())
            removed = float(a.masked_fill_(mask, 0.0).sum())
            final.masked_fill_(~mask, 0.0)
            nnz_per_group = (final != 0).reshape(-1, _M).sum(-1)
            figures = {
                "exactly_24": bool((nnz_per_group <= _N).all()),
                "nonzero_share": float(nnz_per_group.sum()) / max(final.numel(), 1),
                "pruned_magnitude_share": removed / total if total else 0.0,
                "mask_source": source,
            }
            del a, mask
            stored = _as_stored(layer, final)
        new = nn.Parameter(stored, requires_grad=layer.weight.requires_grad)
        done[id(layer.weight)] = (layer.weight, new, figures)
    reports = []
    for layer in layers:
        module = layer.module
        _, new, figures = done[id(layer.weight)]
        # parametrize keeps the weight's property on the module's generated class, which a
        # deepcopy of the model shares: removing it there would strip the copy (or the
        # original) of its weight. The module gets a class of its own first.
        cls = type(module)
        attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, attrs)
        parametrize.remove_parametrizations(module, layer.param, leave_parametrized=False)
        setattr(module, layer.param, new)  # one Parameter for all the layers that shared it
        if layer.experts and not parametrize.is_parametrized(module):
            _cache_hooks(module, on=False)
        reports.append(LayerReport(name=layer.name, shape=list(new.shape), **figures))
    _warn_magnitude_fallback("finalize", optimizer, [(r.name, r.mask_source) for r in reports], 2)
    not_24 = [r.name for r in reports if not r.exactly_24]
    if not_24:
        # the optimizer's (old) weights of those layers, to find their groups
        weights = {id(old) for old, _, figures in done.values() if not figures["exactly_24"]}
        patterns = sorted(
            {
                f"{g['n']}:{g['m']}"
                for g in _groups_holding(optimizer, weights)
                if "n" in g and "m" in g
            }
        )
        names = ", ".join(not_24[:3]) + (", ..." if len(not_24) > 3 else "")
        how = f"{' and '.join(patterns)} (its n:m)" if patterns else "not 2:4"
        warnings.warn(
            f"cast_ext.cast.finalize: {len(not_24)} of {len(reports)} layers ({names}) are not "
            f"exactly 2:4: they were pruned with the optimizer's masks, which are {how}. The 2:4 "
            "sparse kernels (cast_ext.nn.to_sparse) would prune them further, by magnitude; for "
            "a 2:4 model train with AdamS's n=2, m=4",
            stacklevel=2,
        )
    return reports


# --------------------------------------------------------------------------------------------
# Evaluation and the reference training loop
# --------------------------------------------------------------------------------------------


# glibc's mallopt parameters, and the values tune_cpu_malloc sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 1 << 30
MALLOC_TRIM_THRESHOLD = (1 << 31) - 1


def tune_cpu_malloc() -> bool:
    """Let the process keep the memory of freed large CPU tensors for the next ones (glibc).

    By default glibc's ``malloc`` maps each block of 128 KiB or more (a threshold that grows to
    at most 32 MiB as such blocks are freed) from the OS on its own and hands it back when
    freed, and gives memory at the top of its heap back once 2x that much is free. A training
    step on the CPU makes tensors of a weight's size (scaled weights, their gradients) and of
    the logits' (``[tokens, vocab]``), uses them once and frees them: each new one is fresh
    memory, which the OS zero-fills a page at a time on first write, in system time. Here (a
    2-core virtual machine, ``benchmarks/cpu_malloc.py``) a CAST step of SmolLM2-135M (256
    tokens) took 70,226 minor page faults and 0.30 s of system CPU time that way, 1 fault and
    0.02 s after this call: 3% less CPU time in all (user + system, 5.28 s to 5.11 s). Its wall
    time did not measurably change there (2619 ms both, where one process's median ranged over
    2.3-3.1 s; an earlier run of the same benchmark read 0.86x).

    This sets glibc's mmap threshold to ``MALLOC_MMAP_THRESHOLD`` (1 GiB) and its trim threshold
    to ``MALLOC_TRIM_THRESHOLD`` (2 GiB), for the whole process from now on: freed blocks stay
    in the process and the next allocations reuse them, so the resident memory stays at its
    peak instead of shrinking between steps. The same as starting Python with
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
    CUDA tensors do not go through ``malloc`` (torch's caching allocator keeps their memory).
    ``python -m cast_ext demo`` calls it for a CPU run.

    Returns:
        True where glibc took both settings; False where the C library is not glibc (macOS,
        Windows, musl: nothing changed) or glibc refused one.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: were the trim threshold refused after it, the setting that
    # matters (no fresh mapping per block) would still hold
    return (
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    )


def _logits(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def _no_cache(model: nn.Module) -> dict[str, Any]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (Hugging Face
    decoders, FSDP2-sharded ones too), else ``{}``. Training and perplexity never reuse the
    key/value cache, and a Hugging Face forward builds one by default: its upkeep in every
    attention layer was 10% of the host time of a no-grad forward of a 30-layer LLaMA here
    (4% of a forward + backward). A wrapper (DDP, a PEFT model) passes it on only where its
    own forward names it."""
    forward = getattr(model, "forward", None)
    try:
        names = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):  # no signature to read (a builtin)
        names = {}
    return {"use_cache": False} if "use_cache" in names else {}


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8) -> float:
    """Perplexity of a causal LM over token windows (each window predicts its own next tokens).

    Args:
        model: returns logits (or an output with ``.logits``) for ``input_ids``; called with
            ``use_cache=False`` where its forward takes ``use_cache``.
        windows: ``[N, L]`` int64 token ids.
        batch_size: windows per forward pass.

    Returns:
        ``exp(mean next-token cross-entropy)`` over the ``N * (L - 1)`` predictions; NaN when
        there are none (windows of one token, or no windows).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kw = _no_cache(model)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = _logits(model(ids, **kw))
        labels = shift_labels(ids)
        loss = distill_loss(logits, None, labels, eta=0.0)
        n = int((labels != -100).sum())
        total += float(loss) * n
        count += n
    model.train(was_training)
    return math.exp(total / count) if count else math.nan


class CudaGraphTeacher(nn.Module):
    """A frozen teacher whose forward is one CUDA graph replay per input shape.

    CAST runs the teacher once a step, without gradients, on batches of one shape: on a GPU
    that a model's host time sets the pace of (a 30-layer model launches thousands of
    kernels a forward), the graph turns those launches into one. The first call of a shape
    captures it (after two warm-up forwards on a side stream), replays it and compares the
    replay's logits with an eager forward's on the same ids: a capture that fails, or whose
    logits are not within ``rtol = atol = 1e-3`` of the eager ones, warns, and that shape stays
    eager. (Not bit for bit: under a capture a Hugging Face model builds an explicit causal
    mask where its eager forward, after a check that reads a value back, lets attention take
    ``is_causal``, which on a GPU may pick another attention kernel.) Eager too: CPU inputs,
    grad mode or autocast on, the teacher in train mode, and shapes past ``max_graphs``.

    The graph reads the teacher's weights where they are when it is captured: wrap the teacher
    after moving it to its device and dtype (weights changed in place are seen; weights moved
    are not). Each captured shape holds its own memory pool (the activations of one forward
    and its logits).

    Args:
        teacher: the model; called as ``teacher(input_ids)`` (with ``use_cache=False`` where
            its forward takes it), returning logits or an output with ``.logits``.
        max_graphs: shapes to capture at most.

    Shape:
        ``forward(input_ids)``: ``[B, L]`` int64 ids -> the logits (a new tensor each call).
    """

    def __init__(self, teacher: nn.Module, max_graphs: int = 4) -> None:
        super().__init__()
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 0:
            raise ValueError(
                f"cast_ext.cast.CudaGraphTeacher: max_graphs must be an int >= 0, got "
                f"{max_graphs!r}"
            )
        self.teacher = teacher
        self.max_graphs = max_graphs
        self._kw = _no_cache(teacher)
        # per (shape, dtype, device): (graph, static ids, static logits), or None (eager)
        self._graphs: dict[tuple[Any, ...], tuple[Any, Tensor, Tensor] | None] = {}

    def forward(self, input_ids: Tensor) -> Tensor:
        if not self._graphable(input_ids):
            return self._eager(input_ids)
        key = (tuple(input_ids.shape), input_ids.dtype, input_ids.device)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                return self._eager(input_ids)
            self._graphs[key] = self._capture(input_ids)
        entry = self._graphs[key]
        if entry is None:
            return self._eager(input_ids)
        graph, static_ids, static_logits = entry
        static_ids.copy_(input_ids)
        graph.replay()
        return static_logits.clone()  # the next replay overwrites the static logits

    def _eager(self, ids: Tensor) -> Tensor:
        return _logits(self.teacher(ids, **self._kw))

    def _graphable(self, ids: Tensor) -> bool:
        return (
            ids.is_cuda
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(ids.device.type)
            and not self.teacher.training
            and not torch.compiler.is_compiling()
        )

    def _capture(self, ids: Tensor) -> tuple[Any, Tensor, Tensor] | None:
        """Capture, replay once and check against an eager forward; None to stay eager."""
        device = ids.device
        static_ids = ids.clone()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (cuBLAS handles, workspaces) first
                    self._eager(static_ids)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_logits = self._eager(static_ids)
            graph.replay()
            got = static_logits.clone()
        except Exception as e:  # any failure to capture: this shape stays eager
            warnings.warn(
                f"cast_ext.cast.CudaGraphTeacher: capturing the teacher for input_ids of shape "
                f"{list(ids.shape)} failed ({type(e).__name__}: {str(e)[:200]}); that shape "
                "runs eagerly",
                stacklevel=3,
            )
            return None
        want = self._eager(ids)
        if not (got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3)):
            diff = (
                float((got.float() - want.float()).abs().nan_to_num(math.inf).max())
                if got.shape == want.shape
                else math.inf
            )
            warnings.warn(
                f"cast_ext.cast.CudaGraphTeacher: the captured teacher's logits for input_ids of "
                f"shape {list(ids.shape)} differ from an eager forward's (max |difference| "
                f"{diff:.3g}, beyond rtol = atol = 1e-3); that shape runs eagerly",
                stacklevel=3,
            )
            return None
        return graph, static_ids, static_logits


@dataclass
class TrainResult:
    """What :func:`train` returns: the JSON-able history of a run."""

    steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    health_time_s: float = 0.0  # the health records' (masks, flips, magnitudes)
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
        except ImportError:
            pass
    return None


def _data_parallel(model: nn.Module) -> tuple[bool, Any]:
    """Is ``model`` trained by ranks together, and over which process group: DDP's own (a
    subgroup for DDP over part of the world), or the default one for DTensor params (FSDP2, and
    tensor parallel within it: every rank of the world)?"""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False, None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True, model.process_group
    return any(isinstance(p, DTensor) for p in model.parameters()), None


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float in it replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm), also where the gradients live on different
    meshes or only some are DTensors (tensor parallel leaves embeddings, norms and the head
    plain; FSDP2 over it puts those on the data-parallel mesh alone), which torch's refuses: the
    norm of each such group, gathered, combined. Returns the total norm. A non-finite norm
    leaves the gradients as they are (torch's would scale them all to NaN or 0)."""
    groups: dict[Any, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(mesh, []).append(p.grad)
    if len(groups) <= 1:
        grads = [g for gs in groups.values() for g in gs]
        norm = torch.nn.utils.get_total_norm(grads)
        total = float(_full(norm))
        if math.isfinite(total) and math.isfinite(max_norm):  # inf: a multiply by 1, skipped
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return total
    norms = [float(_full(torch.nn.utils.get_total_norm(gs))) for gs in groups.values()]
    total = math.hypot(*norms)
    coef = max_norm / (total + 1e-6)
    if math.isfinite(total) and coef < 1.0:
        for gs in groups.values():
            torch._foreach_mul_(gs, coef)
    return total


def _groups_holding(optimizer: Any, weights: set[int]) -> list[dict[str, Any]]:
    """The param groups of ``optimizer`` (none for an object without them) holding any of the
    tensors whose ids are ``weights``."""
    return [
        g
        for g in getattr(optimizer, "param_groups", [])
        if any(id(p) in weights for p in g["params"])
    ]


def _alpha_total_steps(layers: list[SparseLayer], optimizer: Any, total_steps: int) -> int:
    """``T`` of the ``alpha`` that :func:`train` records: the ``total_steps`` of the optimizer's
    groups that hold the sparse ``layers``' weights (AdamS's ramp), else ``total_steps``."""
    weights = {id(layer.weight) for layer in layers}
    found = {
        g["total_steps"]
        for g in _groups_holding(optimizer, weights)
        if g.get("total_steps") is not None
    }
    if len(found) > 1:
        raise ValueError(
            f"cast_ext.cast.train: the optimizer's groups of sparse weights have different "
            f"total_steps {sorted(found)}, so their alphas differ and a health record has one: "
            "give them one total_steps, or pass health_every=0"
        )
    return found.pop() if found else total_steps


def _check_train_setup(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher: nn.Module | None,
    lr_lambda: Any,
    start_step: int,
    layers: list[SparseLayer],
) -> None:
    """:func:`train`'s refusals of a setup that would train something other than asked, each
    silent before: the student as its own teacher (a KL of 0), an optimizer that holds none of
    the model's params or misses its prepared weights and scales (one built before
    :func:`prepare` steps the replaced weights, and the scales never train), a schedule object
    of lrs where a multiplier is expected, and a resume (``start_step`` > 0) with an AdamS that
    has no state for the prepared weights (its state not loaded: the decay ramp would restart)."""
    fn = "cast_ext.cast.train"
    if teacher is not None and teacher in (model, getattr(model, "module", None)):
        raise ValueError(f"{fn}: teacher is the model itself; pass a frozen copy (copy.deepcopy)")
    if isinstance(lr_lambda, WarmupCosine) and lr_lambda.peak_lr != 1.0:
        raise ValueError(
            f"{fn}: lr_lambda is a multiplier of each group's lr; a WarmupCosine gives lrs: "
            "pass sched.factor"
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in held for p in model.parameters()):
        raise ValueError(f"{fn}: the optimizer holds none of the model's parameters")
    missing = [
        layer.name
        for layer in layers
        if any(t.requires_grad and id(t) not in held for t in (layer.weight, layer.scale))
    ]
    if missing:
        raise ValueError(
            f"{fn}: the optimizer lacks the weight or scale of {len(missing)} prepared layer(s) "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) that require grad: "
            "build it after cast.prepare, from cast.param_groups(model)"
        )
    if (
        start_step > 0
        and layers
        and isinstance(optimizer, AdamS)
        and not any(optimizer.state.get(layer.weight) for layer in layers)
    ):
        raise ValueError(
            f"{fn}: start_step={start_step}, but the AdamS holds no state for the prepared "
            "weights: load the optimizer state saved with the checkpoint first (a fresh one "
            "would restart the decay ramp)"
        )


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Tensor],
    *,
    total_steps: int,
    lr_lambda: Callable[[int], float] | None = None,
    teacher: nn.Module | None = None,
    eta: float = 1.0 / 3.0,
    temperature: float = 1.0,
    grad_clip: float | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    health_every: int = 10,
    after_step: Callable[[int], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    log_path: str | Path | None = None,
    run_name: str = "train",
    progress: bool = True,
    start_step: int = 0,
    stop_step: int | None = None,
    grad_accum: int = 1,
    start_tokens: int = 0,
    autocast: torch.dtype | None = None,
) -> TrainResult:
    """A reference CAST training loop; copy it and adapt.

    Per step, for each of ``grad_accum`` micro-batches: forward the student (dense, with its
    scales), the teacher under ``no_grad`` if given, :func:`distill_loss` (plain CE when
    ``teacher`` is None), backward of the loss / ``grad_accum``; then optional grad-norm
    clipping, ``optimizer.step()``, the lr schedule, ``after_step(step)``. Every
    ``health_every`` steps (and before the first step of a run, after the last of a call; once
    for a call that runs no step; a resumed call's first state is the stopped call's last
    record, so it is not recorded again) the SPEC §5 health signals (:func:`sparsity_health`,
    plus ``alpha`` and ``flips_since``, the step whose masks the flips are counted from: None
    in a run's first record) of a prepared model are recorded; every ``eval_every`` steps and at the
    end, ``eval_fn(model)``. Each record is also appended as one JSON line to ``log_path``.
    ``alpha`` is the weight AdamS's next step gives the decay, ``min(step / T, 1)`` with ``T``
    the ``total_steps`` of the optimizer's groups that hold the sparse weights (this
    function's ``total_steps`` for an optimizer without one).

    Args:
        model: the student (a causal LM taking ``input_ids``), already on its device. A
            forward that takes ``use_cache`` (a Hugging Face model's) gets ``use_cache=False``,
            the teacher's too.
        optimizer: e.g. ``cast_ext.AdamS(param_groups(model), ...)``.
        batches: yields ``[B, L]`` int64 ``input_ids``: ``grad_accum`` per step.
        total_steps: the run's length in optimizer steps (the lr schedule's ``T``; ``alpha``
            follows AdamS's own ``total_steps``).
        lr_lambda: multiplier of each group's initial lr per step (e.g. ``sched.factor``).
        teacher: the frozen dense model, or None for plain fine-tuning; it runs in eval mode
            (no dropout in the targets). Both models get their own modes back at the end. On
            a GPU, :class:`CudaGraphTeacher` ``(teacher)`` runs its forward as a CUDA graph.
        eta, temperature: see :func:`distill_loss`.
        grad_clip: max total grad norm, or None (default). Clipping rescales the gradients
            that AdamS's ``lam`` competes with, so a clipped run decays sooner than
            :func:`decay_budget` (which reads unclipped gradients) predicts.
        eval_fn: ``model -> {metric: value}`` (e.g. from :func:`perplexity`), called with the
            model in eval mode under ``no_grad``.
        eval_every: steps between evaluations (0: only at the end).
        health_every: steps between health records (0: never).
        after_step: called with the completed step count after each optimizer step (e.g. to
            re-apply a fixed mask), before the step's records.
        checkpoint: called with the completed step count once the step's records (train,
            health, eval) are written: save a checkpoint here, so that a run resumed from it
            (``start_step``) has every record up to it and repeats none (saved from
            ``after_step``, a kill before the records lost them).
        log_path: JSON-lines file to append to.
        run_name: written into every record.
        progress: show a tqdm bar (if tqdm is installed).
        start_step: steps already taken (a run resumed from a checkpoint of model and
            optimizer): the loop runs steps ``start_step .. total_steps - 1`` with the lr
            schedule advanced to ``start_step``, and records absolute step numbers;
            ``batches`` yields the batches from ``start_step`` on. The schedule's base is
            each group's ``initial_lr`` (LambdaLR's key, saved in the optimizer's state dict;
            with ``torch.distributed.checkpoint`` set it on the groups before loading, since
            ``dcp.load`` fills only keys the target has), else the group's ``lr``. A model
            with dropout resumes bit for bit only if the RNG state was saved with the
            checkpoint and restored (this function does neither).
        stop_step: end the loop after this step (default ``total_steps``), e.g. to fit a job's
            time limit; the schedule and ``alpha`` stay those of ``total_steps``.
        start_tokens: the tokens of the steps before ``start_step`` (a resumed run's records
            count on from them). Records' ``tokens`` are this process's input tokens.
        grad_accum: micro-batches per optimizer step (a larger batch than fits at once). Each
            micro-batch's loss is its own mean over its tokens, and the step's gradient and the
            record's loss, CE and KL are the mean of those over the micro-batches: the whole
            batch's token mean when they hold equally many tokens (a mean of means otherwise:
            a micro-batch of fewer tokens weighs more per token; give them equal shapes, or
            weigh each loss by its token count in a copy of this loop). Under DDP the gradients
            are all-reduced once per step (``no_sync`` for the others); FSDP2 reduce-scatters
            every micro-batch (its no-sync mode would keep whole unsharded gradients per rank).
        autocast: run the forwards and the loss under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``), the backward and the step outside it, as torch advises. (A
            call made inside an autocast block also works: each step clears autocast's cache
            of low-precision weight copies, which otherwise lives as long as the outermost
            block and would hide the step's updates to a plain weight, the head, from the
            next forwards.)

    Under DDP / FSDP2 (a ``DistributedDataParallel`` model, or DTensor params) each rank passes
    its own batches, and the loss, CE and KL recorded are their means over the ranks (DDP's
    process group; every rank for DTensor params): one all-reduce of three numbers per step,
    the global batch's loss when the ranks hold equally many tokens. The grad norm and the
    health signals are global too, so every rank records the same figures.

    Returns:
        A :class:`TrainResult`.

    Raises:
        FloatingPointError: a step's loss or gradient norm is not finite; raised before that
            step's ``optimizer.step()``, so the weights and the optimizer state are those of
            the step before (the gradients are left for inspection; the next call clears them).
        ValueError: bad step bounds or ``grad_accum``; ``batches`` ran out before ``stop_step``
            or yielded something other than ``[B, L]`` integer ids; health records asked for
            while the optimizer's groups of sparse weights have different ``total_steps`` (no
            one ``alpha`` to record); before anything changes, a setup that would train
            something else: ``teacher`` is the model, ``lr_lambda`` a :class:`WarmupCosine`
            of lrs (pass its ``factor``), an optimizer holding none of the model's params or
            missing prepared weights or scales that require grad, or a resume
            (``start_step`` > 0) with an AdamS holding no state for the prepared weights.
    """
    if grad_accum < 1:
        raise ValueError(f"cast_ext.cast.train: grad_accum must be >= 1, got {grad_accum}")
    stop = total_steps if stop_step is None else stop_step
    if not (0 <= start_step <= stop <= total_steps and total_steps >= 1):
        raise ValueError(
            f"cast_ext.cast.train: need 0 <= start_step <= stop_step <= total_steps, "
            f"total_steps >= 1, got "
            f"start_step={start_step}, stop_step={stop_step}, total_steps={total_steps}"
        )
    layers = sparse_layers(model)
    _check_train_setup(model, optimizer, teacher, lr_lambda, start_step, layers)
    device = next(model.parameters()).device
    sched = None
    if lr_lambda is not None:
        # Resuming, LambdaLR reads each group's "initial_lr" (in a state dict saved while a
        # LambdaLR ran; else the group's lr is the base) and sets the lr of step start_step.
        for group in optimizer.param_groups if start_step else ():
            group.setdefault("initial_lr", group["lr"])
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch=start_step - 1)
    prepared = bool(layers)
    ramp = (
        _alpha_total_steps(layers, optimizer, total_steps) if prepared and health_every > 0 else 1
    )
    log = open(log_path, "a") if log_path is not None else None  # noqa: SIM115
    result = TrainResult(steps=start_step, tokens=start_tokens)
    packed: dict[str, Tensor] | None = None
    packed_step: int | None = None  # the step of the masks in packed
    data_parallel, dp_group = _data_parallel(model)
    no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce on the last micro-batch only
    model_kw = _no_cache(model)
    teacher_kw = _no_cache(teacher) if teacher is not None else {}

    def forward_ctx() -> contextlib.AbstractContextManager[Any]:
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast)

    def record(kind: str, rec: dict[str, Any]) -> None:
        rec = {"run": run_name, "kind": kind, **rec}
        {"train": result.train, "eval": result.evals, "health": result.health}[kind].append(rec)
        if log is not None:  # strict JSON: a figure that is NaN or infinite is written null
            log.write(json.dumps(_json_safe(rec), allow_nan=False) + "\n")
            log.flush()

    def health(step: int, keep: bool = True) -> None:
        """Records the health signals (``keep``), and snapshots the masks the next record
        counts its flips from (its ``flips_since``)."""
        nonlocal packed, packed_step
        if not prepared or health_every <= 0:
            return
        t0 = time.perf_counter()
        metrics, packed = _health(layers, optimizer, packed)
        result.health_time_s += time.perf_counter() - t0
        if keep:
            rec = {"step": step, "alpha": min(step / ramp, 1.0), **metrics}
            record("health", {**rec, "flips_since": packed_step})
        packed_step = step

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            metrics = eval_fn(model)
        result.eval_time_s += time.perf_counter() - t0
        record("eval", {"step": step, "tokens": result.tokens, **metrics})

    bar = _progress(total_steps, run_name, progress)
    student_was_training = model.training
    teacher_was_training = teacher is not None and teacher.training
    if teacher is not None:
        teacher.eval()
    it: Iterator[Tensor] = iter(batches)
    model.zero_grad(set_to_none=True)  # nothing from before (a stopped run's) adds to step 1
    # A resumed run's first state is the stopped call's last record: not recorded twice.
    health(start_step, keep=start_step == 0 or stop == start_step)
    if bar is not None:
        bar.update(start_step)
    # Walking the model's ~1,000 modules (a 30-layer LLaMA with its parametrizations) took 1 ms
    # for parameters() and 2 ms for train() here: the params once, and train() again only
    # after code that may have changed the modes (an evaluation, the callbacks) ran.
    params = list(model.parameters())
    modes_unknown = True
    try:
        for step in range(start_step, stop):
            t0 = time.perf_counter()
            if modes_unknown:
                model.train()
                modes_unknown = after_step is not None
            parts = torch.zeros(3, device=device)  # sums of the loss, KL and CE
            for micro in range(grad_accum):
                ids = next(it, None)
                if ids is None:
                    raise ValueError(
                        f"cast_ext.cast.train: batches ran out at step {step} (micro-batch "
                        f"{micro}) of {stop}: it must yield grad_accum = {grad_accum} a step"
                    )
                if not (isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
                    what = (
                        f"{ids.dtype} of shape {list(ids.shape)}"
                        if isinstance(ids, Tensor)
                        else type(ids).__name__
                    )
                    raise ValueError(
                        f"cast_ext.cast.train: micro-batch {micro} of step {step} is {what}; "
                        "batches must yield [B, L] integer input_ids"
                    )
                ids = ids.to(device)
                # DDP decides in the forward whether the backward all-reduces: both inside.
                skip = no_sync is not None and micro < grad_accum - 1
                with no_sync() if skip else contextlib.nullcontext():
                    with forward_ctx():
                        logits = _logits(model(ids, **model_kw))
                        t_logits = None
                        if teacher is not None:
                            with torch.no_grad():
                                t_logits = _logits(teacher(ids, **teacher_kw))
                        loss, kl, ce = distill_loss(
                            logits,
                            t_logits,
                            shift_labels(ids),
                            eta=eta if teacher is not None else 0.0,
                            temperature=temperature,
                            return_parts=True,
                        )
                    del logits, t_logits
                    (loss / grad_accum).backward()  # exact for grad_accum = 1
                parts += torch.stack([loss.detach(), kl, ce])
                result.tokens += ids.numel()
            if data_parallel:  # the group's ranks step in lockstep: the mean over them
                torch.distributed.all_reduce(parts, group=dp_group)
                parts /= torch.distributed.get_world_size(dp_group)
            loss_f, kl_f, ce_f = (parts / grad_accum).tolist()  # one read-back for the three
            max_norm = grad_clip if grad_clip is not None else math.inf  # inf: measure only
            gnorm = _clip_grad_norm(params, max_norm)
            if not (math.isfinite(loss_f) and math.isfinite(gnorm)):
                # before the step: the weights and the optimizer state stay those of step - 1
                raise FloatingPointError(
                    f"{run_name}: loss {loss_f}, gradient norm {gnorm} at step {step}; not stepped"
                )
            lr = float(optimizer.param_groups[0]["lr"])  # a Tensor lr changes in place
            optimizer.step()
            # Autocast keeps its low-precision copies of the weights until the outermost
            # autocast block exits, one around this call included (even with enabled=False):
            # the next forwards would not see this step's updates to a plain weight (the head).
            torch.clear_autocast_cache()
            optimizer.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step(step + 1)
            result.train_time_s += time.perf_counter() - t0
            result.steps = step + 1
            rec = {"step": step + 1, "tokens": result.tokens, "loss": loss_f, "lr": lr}
            rec.update({"ce": ce_f, "grad_norm": gnorm})
            if teacher is not None:
                rec["kl"] = kl_f
            rec["time_s"] = result.train_time_s
            record("train", rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_f:.3f}")
            if health_every > 0 and (step + 1) % health_every == 0 and step + 1 < stop:
                health(step + 1)
            if eval_every > 0 and (step + 1) % eval_every == 0 and step + 1 < stop:
                evaluate(step + 1)
                modes_unknown = True
            if checkpoint is not None and step + 1 < stop:
                checkpoint(step + 1)
                modes_unknown = True
        if stop > start_step:  # else recorded before the (empty) loop
            health(stop)
        evaluate(stop)
        if checkpoint is not None and stop > start_step:
            checkpoint(stop)
    finally:
        model.train(student_was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return result
