"""AdamS, CAST's sparsity-aware optimizer, as a drop-in ``torch.optim.Optimizer``.

The update rule is SPEC §2 (paper Algorithm 1): Adam whose first moment, outside the N:M mask,
is blended toward ``decay * sign(w)`` with a weight ``alpha = min(t / total_steps, 1)``, inside
Adam's normalisation, so pruned weights slide to zero. Masks are refreshed from ``|w|`` every
``mask_interval`` steps (at ``t = 0, mask_interval, ...``, before the update). Groups with
``sparse=False``, and the params of shape-decided groups that are not 2:4-shaped, get plain
Adam/AdamW from the same fused op. The math is :func:`cast_ext.reference.adams_step_`; the
default ``impl="auto"`` runs the fused kernel (:func:`cast_ext.ops.adams_step_`), one call per
(device, dtype, sparse or not) bucket of each group.

Distributed (SPEC §5): under DDP the params are plain tensors and nothing changes. DTensor params
(FSDP2 ``fully_shard``, which shards dim 0; tensor parallel; both on a 2-D mesh) are stepped on
their local shards; their state tensors are DTensors with the param's mesh and placements (masks
``[*shape[:-1], ceil(k/8)]`` carry the same sharding), so ``torch.distributed.checkpoint`` saves
and reshards them like ``torch.optim.Adam``'s. A gradient laid out differently from its param
(tensor parallel leaves some as ``Partial`` sums) is redistributed to the param's layout first. A
sparse param whose placement would cut a group of ``m`` (a ``Shard`` of the last dim that does
not split it evenly into whole groups and mask bytes) or hold partial sums (``Partial``) is
refused: the masks would be wrong or silently missing, and a silent fallback to plain Adam is the
failure to guard against.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import ops, reference

try:  # torch.distributed is optional (some builds lack it)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover

    class DTensor:  # type: ignore[no-redef]
        """Placeholder: nothing is a DTensor without torch.distributed."""

    class Shard:  # type: ignore[no-redef]
        """Placeholder: nothing is sharded without torch.distributed."""


__all__ = ["AdamS"]

_IMPLS = ("auto", "reference")
# State entries kept in fp32 / uint8 whatever the param's dtype (torch's load_state_dict would
# cast them to the param's dtype).
_STATE_DTYPES = {
    "step": torch.float32,
    "exp_avg": torch.float32,
    "exp_avg_sq": torch.float32,
    "master": torch.float32,
    "mask": torch.uint8,
    "prev_mask": torch.uint8,
}


def _add_master(p: Tensor, state: dict[str, Any]) -> None:
    """Give ``state`` an fp32 master where ``p`` is not fp32 and it has none: started from ``p``
    (the model was cast, or a state dict saved with fp32 params loaded). fp32 params are their
    own masters: the master of one cast from bf16/fp16 (or loaded from such a run) is taken and
    dropped at its next step (:meth:`AdamS._sync_state`)."""
    if p.dtype != torch.float32 and "master" not in state:
        state["master"] = _state_like(p, _local(p).detach().float().contiguous(), list(p.shape))


def _merge_chunks(
    dst: Tensor, src: Tensor, merged: Callable[[Tensor, Tensor], Tensor], chunk: int = 1 << 18
) -> None:
    """``dst <- merged(dst, src)`` elementwise over the flat views of two contiguous tensors,
    a chunk at a time: no full-size temporaries. Compiled, in one piece (the compiler fuses it
    into one pass; chunks would put thousands of ops in the graph)."""
    d, s = dst.view(-1), src.view(-1)
    if torch.compiler.is_compiling():
        chunk = max(d.numel(), 1)
    for i in range(0, d.numel(), chunk):
        a = d[i : i + chunk]
        a.copy_(merged(a, s[i : i + chunk]))


def _take_written(master: Tensor, param: Tensor) -> None:
    """``master <- param`` where ``param`` is not ``master`` rounded to its dtype (both
    contiguous)."""
    _merge_chunks(master, param, lambda m, p: torch.where(m.to(p.dtype) == p, m, p.float()))


def _take_master(param: Tensor, master: Tensor) -> None:
    """``param <- master`` where the fp32 ``param`` is ``master`` rounded to bf16 or fp16 (the
    model was cast to fp32 since the last step: the master is the more precise weight)."""

    def merged(p: Tensor, m: Tensor) -> Tensor:
        rounded = (p == m.to(torch.bfloat16).float()) | (p == m.to(torch.float16).float())
        return torch.where(rounded, m, p)

    q = param if param.is_contiguous() else param.contiguous()
    _merge_chunks(q, master, merged)
    if q is not param:
        param.copy_(q)


def _behind(p: Tensor, state: dict[str, Any], sparse: bool) -> bool:
    """Whether :meth:`AdamS._sync_state` has anything to do for ``p``: it has a master (or is
    not fp32), or its masks do not match ``sparse`` (none where it is sparse, some where it is
    not)."""
    if p.dtype != torch.float32 or "master" in state:
        return True
    return "mask" not in state if sparse else ("mask" in state or "prev_mask" in state)


def _written(param: Tensor) -> tuple[int, int]:
    """What changes when ``param`` is written outside the step: its version counter (in-place
    writes through autograd) and its storage (``p.data = ...`` bumps no version)."""
    return param._version, param.data_ptr()


# Options of torch.optim.Adam(W) that change its update; AdamS has none of them.
_TORCH_ONLY = ("amsgrad", "maximize", "capturable", "differentiable")


def _is_int(x: Any) -> bool:
    """An integer (a NumPy one included), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _err(msg: str) -> ValueError:
    return ValueError(f"cast_ext.AdamS: {msg}")


def _eligible(p: Tensor, m: int) -> bool:
    return p.dim() == 2 and p.shape[-1] % m == 0


def _param_is_sparse(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` is stepped as a sparse param: its group's ``sparse`` flag, or, where that is
    None (not given), its global shape (2-D, last dim a multiple of ``m``)."""
    flag = group["sparse"]
    return _eligible(p, group["m"]) if flag is None else bool(flag)


def _local(t: Tensor) -> Tensor:
    """The tensor the kernel updates in place: a DTensor's local shard (a view), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _grad_like(p: Tensor) -> Tensor:
    """``p.grad`` laid out like ``p``: a DTensor gradient with other placements (tensor parallel
    leaves a replicated param's gradient as ``Partial`` sums) is redistributed (a collective)."""
    g = p.grad
    if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
        return g.redistribute(p.device_mesh, p.placements)
    return g


def _over_shards(local: Tensor, like: Tensor) -> Tensor:
    """Per-rank figures ``local`` (1-D) stacked over the shards of ``like``'s DTensor layout,
    ``[shards, k]`` (replicas of a shard once; a collective); ``local[None]`` for a plain
    ``like``."""
    if not isinstance(like, DTensor):
        return local.unsqueeze(0)
    # one row per shard, whichever dim of ``like`` the shards cut (FSDP2: rows; TP: columns too)
    placements = [Shard(0) if _shard_dim(pl) is not None else pl for pl in like.placements]
    return DTensor.from_local(local.unsqueeze(0), like.device_mesh, placements).full_tensor()


def _shard_dim(placement: Any) -> int | None:
    """The tensor dim a DTensor placement shards (plain or strided: torch 2.14's
    ``_StridedShard`` is no ``Shard``), or None."""
    dim = getattr(placement, "dim", None)
    return dim if isinstance(dim, int) else None


def _describe(p: Tensor, where: str) -> str:
    desc = f"param {where}of shape {list(p.shape)}"
    if isinstance(p, DTensor):
        desc += f" (DTensor, placements {tuple(p.placements)})"
    return desc


def _check_placements(p: Tensor, sparse: bool, m: int, where: str = "") -> None:
    """Refuse a DTensor layout the step cannot run shard-locally (no-op for plain tensors).

    Every param: no ``Partial`` placement (local values are not the param's values) and no
    placement type other than ``Replicate`` / ``Shard`` (incl. strided shards of a dim). Sparse
    params additionally keep every group of ``m`` and every byte of the packed mask on one rank:
    their last dim is either not sharded (FSDP2 shards dim 0; tensor parallel's
    ColwiseParallel too) or sharded plainly and evenly in whole groups and bytes (tensor
    parallel's RowwiseParallel): divisible by ``lcm(8, m)`` times its number of shards.
    """
    if not isinstance(p, DTensor):
        return
    last_shards = 1
    for mesh_dim, pl in enumerate(p.placements):
        if pl.is_replicate():
            continue
        if pl.is_partial():
            raise _err(
                f"{_describe(p, where)} has a Partial placement: its local values are partial "
                "sums, not the weights; redistribute to Shard/Replicate before stepping"
            )
        dim = getattr(pl, "dim", None)
        if not isinstance(dim, int):
            raise _err(f"{_describe(p, where)} has an unsupported placement {pl!r}")
        if sparse and dim % p.dim() == p.dim() - 1:
            if type(pl) is not Shard:
                raise _err(
                    f"{_describe(p, where)} is sparse and its last dim has a strided shard "
                    f"{pl!r}: N:M groups of m={m} must stay whole on one rank"
                )
            last_shards *= p.device_mesh.size(mesh_dim)
    unit = ops._shard_unit(m, last_shards)
    if sparse and last_shards > 1 and p.shape[-1] % unit != 0:
        raise _err(
            f"{_describe(p, where)} is sparse and its last dim {p.shape[-1]} is sharded "
            f"{last_shards} ways: that cuts N:M groups of m={m} or packed mask bytes. A sharded "
            f"last dim must divide into whole groups and bytes (a multiple of "
            f"lcm(8, m) * shards = {unit}); shard dim 0 instead, or make the param dense with "
            "sparse=False"
        )


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one gap-free range of its storage, each once (contiguous in
    some dim order: a transpose, channels_last)."""
    size = 1
    for stride, n in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1):
        if stride != size:
            return False
        size *= n
    return True


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a view's first to its last, both included (non-empty views)."""
    return sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) + 1


@functools.lru_cache(maxsize=1024)
def _self_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a (non-empty) view of this shape and stride has two elements at one address."""
    reach = 0  # the furthest offset the dims of smaller strides reach
    for st, n in sorted((st, n) for n, st in zip(shape, stride, strict=True) if n != 1):
        if st <= reach:  # not nested (a zero stride, or a dim inside another's steps): count
            marker = torch.zeros(_extent(shape, stride), dtype=torch.bool)
            marker.as_strided(shape, stride).fill_(True)
            return int(marker.sum()) < math.prod(shape)
        reach += (n - 1) * st
    return False  # each stride passes all that the smaller ones reach: one address each


@functools.lru_cache(maxsize=4096)
def _share_elements(
    a: tuple[int, tuple[int, ...], tuple[int, ...]], b: tuple[int, tuple[int, ...], tuple[int, ...]]
) -> bool:
    """Whether two views of one storage and dtype, ``(offset, shape, stride)`` in elements, have
    an element in common (a bool per element of their span: no index tensors)."""
    lo = min(a[0], b[0])
    marker = torch.zeros(max(v[0] + _extent(v[1], v[2]) for v in (a, b)) - lo, dtype=torch.bool)
    marker.as_strided(a[1], a[2], a[0] - lo).fill_(True)
    return bool(marker.as_strided(b[1], b[2], b[0] - lo).any())


_PLAIN = (Tensor, torch.nn.Parameter)


def _apart(params: list[tuple[Tensor, int, int]]) -> bool:
    """Whether every param is a plain contiguous tensor and no two of their byte ranges meet,
    so that none shares memory with another: the common case, decided from one address and
    size per param. Otherwise (a view, a DTensor, ranges that meet) the check looks closer."""
    spans = []
    for p, _, _ in params:
        if type(p) not in _PLAIN or not p.is_contiguous():
            return False
        start = p.data_ptr()
        spans.append((start, start + p.numel() * p.element_size()))
    spans.sort()
    reach = 0  # the furthest byte a range seen so far covers
    for start, end in spans:
        if start < reach:
            return False
        reach = max(reach, end)
    return True


def _check_param_memory(params: list[tuple[Tensor, int, int]]) -> None:
    """Refuse, before anything is written, a param the step cannot update in place: one whose
    elements overlap (an ``expand()`` ed or zero-stride view), or two that share elements. The
    kernel refuses contiguous tensors that share memory within its call, but it steps a
    non-contiguous param through a contiguous copy, and each (device, dtype) bucket is its own
    call. ``params``: (the param, its group's index, its index there) for every param to be
    stepped. Layouts only (shapes, strides, offsets; results cached): no data is read."""

    if _apart(params):
        return

    def describe(p: Tensor, gi: int, pi: int) -> str:
        return _describe(p, f"{pi} of group {gi} ")

    by_storage: dict[tuple[torch.device, int], list[tuple[int, int, Tensor, Tensor, int, int]]] = (
        defaultdict(list)
    )
    for p, gi, pi in params:
        t = _local(p)
        if t.numel() == 0 or t.device.type == "meta" or isinstance(t, FakeTensor):
            continue  # no memory
        contiguous = t.is_contiguous()
        if not contiguous and _self_overlapping(tuple(t.shape), t.stride()):
            raise RuntimeError(
                f"cast_ext.AdamS: {describe(p, gi, pi)} has elements that share memory (an "
                "expand()ed or zero-stride view): an in-place step would write one element "
                "several times; nothing was stepped"
            )
        n = t.element_size()
        begin = t.storage_offset() * n
        end = begin + (t.numel() if contiguous else _extent(tuple(t.shape), t.stride())) * n
        key = (t.device, t.data_ptr() - begin)  # the storage's address
        by_storage[key].append((begin, end, p, t, gi, pi))
    for spans in by_storage.values():
        if len(spans) < 2:
            continue
        spans.sort(key=lambda s: s[0])
        active: list[tuple[int, int, Tensor, Tensor, int, int]] = []
        for begin, end, p, t, gi, pi in spans:
            active = [a for a in active if a[1] > begin]
            for _, _, q, u, qgi, qpi in active:
                # The byte ranges meet. Dense tensors fill theirs, so they share memory;
                # otherwise (gaps: views interleaved) their elements are compared.
                shared = t.dtype != u.dtype or (_dense(t) and _dense(u))
                if not shared:
                    shared = _share_elements(
                        (t.storage_offset(), tuple(t.shape), t.stride()),
                        (u.storage_offset(), tuple(u.shape), u.stride()),
                    )
                if shared:
                    raise RuntimeError(
                        f"cast_ext.AdamS: {describe(p, gi, pi)} shares memory with "
                        f"{describe(q, qgi, qpi)}: each param the step writes must have memory "
                        "of its own; nothing was stepped"
                    )
            active.append((begin, end, p, t, gi, pi))


def _check_sparse(sparse: Any, params: Sequence[Tensor], m: int, gi: int) -> None:
    """Refuse group ``gi``'s ``sparse`` flag where it is neither None nor a bool, and, where it
    is True, a param with fewer than 2 dims or whose last dim is not a multiple of ``m``."""
    if sparse is None:
        return
    if not isinstance(sparse, bool):
        raise _err(f"group {gi}: a group's sparse must be a bool, got {sparse!r}")
    for pi, p in enumerate(params if sparse else ()):
        where = f"{pi} of group {gi} "
        if p.dim() < 2:
            raise _err(
                f"{_describe(p, where)} is in a sparse group but has fewer than 2 dims: N:M "
                "sparsity applies to [out, in] weight matrices (or stacks of them, such as "
                "[experts, out, in])"
            )
        if p.shape[-1] % m != 0:
            raise _err(
                f"{_describe(p, where)} is in a sparse group: its last dim must be a multiple "
                f"of m={m}"
            )


def _state_like(p: Tensor, local: Tensor, shape: list[int]) -> Tensor:
    """``local`` (built on ``p``'s local shard) as a DTensor laid out like ``p``, else itself.

    ``shape`` is the global shape; ``p``'s placements only shard dims the state shares with it
    (masks differ from ``p`` in the last dim only, which a sparse DTensor shards, if at all, in
    whole mask bytes: see :func:`_check_placements`).
    """
    if not isinstance(p, DTensor):
        return local
    return _assemble(local, p.device_mesh, p.placements, shape)


def _assemble(local: Tensor, mesh: Any, placements: Any, shape: Sequence[int]) -> DTensor:
    """The DTensor of global ``shape`` (contiguous) whose shard on this rank is ``local``; no
    communication, so it works on the meta device too."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def _expected_shape(key: str, p: Tensor) -> list[int] | None:
    if key in ("exp_avg", "exp_avg_sq", "master"):
        return list(p.shape)
    if key in ("mask", "prev_mask"):
        return [*p.shape[:-1], (p.shape[-1] + 7) // 8] if p.dim() >= 1 else None
    return None


class AdamS(torch.optim.Optimizer):
    """AdamS (CAST): Adam with an adaptive L1 decay pushing the weights outside an N:M mask to 0.

    Per param group ``sparse`` selects AdamS (True) or plain Adam/AdamW (False) for all of its
    params. Without it (``sparse=None``) each param of the group is sparse by its shape: the 2-D
    ones whose last dim is a multiple of ``m`` step as AdamS, the others (norms, biases, scales,
    odd shapes, and 3-D or higher: a stack of weight matrices such as MoE experts
    ``[experts, out, in]`` is sparse in a ``sparse=True`` group, its groups of ``m`` along the
    last dim) as Adam/AdamW. Groups stay the ones given, one for one (LR schedulers with
    per-group values and ``ZeroRedundancyOptimizer`` rely on that).

    State per param (names as in ``torch.optim.Adam``): ``step`` (fp32 0-d tensor, completed
    steps), ``exp_avg``, ``exp_avg_sq`` (fp32); for sparse params ``mask`` (packed N:M mask,
    ``uint8 [rows, ceil(k / 8)]``, 1 bit per element, LSB first) and ``prev_mask`` (the mask
    before the last refresh, written by the kernel at each refresh, so mask flips are counted
    without a host sync); for fp16/bf16 params ``master`` (fp32 master weights: the decay,
    ``4e-7`` in the paper, is below bf16 resolution). A fresh state's mask is computed from the
    weights at its first step (``t = 0`` is a refresh).

    Each param counts its own steps, as in ``torch.optim.Adam``: a param without a gradient at a
    step is skipped (state and count unchanged), so its ``alpha`` and its mask refreshes follow
    the steps it took. A param with a gradient at every step, as an LLM's weights have, follows
    SPEC's global ``t`` exactly; one added later by ``add_param_group`` starts its own ramp.

    Writes to fp16/bf16 params outside the step (through autograd, or ``p.data = ...``) are
    taken into their fp32 masters at the next step; after writes that autograd cannot see
    (``p.data.copy_(...)``, a NumPy view), call :meth:`sync_masters`.

    Works with ``torch.amp.GradScaler`` like ``torch.optim.Adam(fused=True)``: the scaler sets
    ``grad_scale`` / ``found_inf`` on the optimizer and the kernel unscales the gradients and
    skips the whole step (params, state, step counts) on an inf.

    ``step`` runs under ``torch.compile``. The fused op takes the hyperparameters as Python
    numbers, which Dynamo specializes on: an lr that changes every step (a scheduler) recompiles
    the step each time until Dynamo's cache limit, after which it runs eager (the same results;
    the compile buys nothing there: the step is one fused kernel call per group either way).
    Compiled, a step also compares each fp16/bf16 param with its fp32 master (writes between
    steps cannot be seen there otherwise): one more pass over both.

    Args:
        params: iterable of tensors or of param-group dicts.
        lr: learning rate.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator.
        weight_decay: decoupled (AdamW) weight decay.
        decay: the L1 decay ``lam`` of the pruned weights (paper: 4e-7 for LLaMA-2).
        total_steps: ``T`` of the ramp ``alpha = t / T`` (planned length of the run; stepping
            past it keeps ``alpha`` at 1). Required.
        mask_interval: refresh period of the masks (paper: 10).
        n: elements kept per group of ``m``.
        m: group size, 4 or 8.
        impl: ``"auto"`` (the fused cast_ext kernel of the params' device) or ``"reference"``
            (:func:`cast_ext.reference.adams_step_`, plain torch ops, for debugging).

    Raises:
        ValueError: at construction, for hyperparameters out of range, a missing
            ``total_steps``, or a sparse param with fewer than 2 dims or whose last dim is not a
            multiple of ``m`` (the message names the param by group, index and shape, and the
            rule); a DTensor param with a ``Partial`` placement, or a sparse one whose last dim
            is sharded into parts that cut groups of ``m`` or mask bytes. At a step, the same
            for a group whose settings were changed since (a value construction refuses):
            nothing is stepped.

    DTensor params (FSDP2, tensor parallel) are stepped on their local shards; their state
    entries are DTensors laid out like the param (``step`` stays a plain 0-d tensor), so
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` and ``torch.distributed.checkpoint`` save and load them.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decay: float = 4e-7,
        total_steps: int | None = None,
        mask_interval: int = 10,
        n: int = 2,
        m: int = 4,
        impl: str = "auto",
    ) -> None:
        if impl not in _IMPLS:
            raise _err(f"impl must be one of {_IMPLS}, got {impl!r}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decay": decay,
            "total_steps": total_steps,
            "mask_interval": mask_interval,
            "n": n,
            "m": m,
        }
        self._check_hparams(defaults, whole=False)  # total_steps may come with each group
        self.impl = impl
        # id(param) -> its (version, storage) after the step last wrote it (params with masters)
        self._versions: dict[int, tuple[int, int]] = {}
        super().__init__(params, defaults)
        # GradScaler hands grad_scale / found_inf to optimizers that declare this (like fused Adam).
        self._step_supports_amp_scaling = True

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles defaults, state and groups only (deepcopy, torch.save).
        return {**super().__getstate__(), "impl": self.impl}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        # load_state_dict ends here too, with state and groups only: the impl stays
        impl = state.pop("impl", getattr(self, "impl", "auto"))
        super().__setstate__(state)
        self.impl = impl
        self._versions = {}
        self._step_supports_amp_scaling = True

    # ---- construction ------------------------------------------------------------------------

    @staticmethod
    def _check_hparams(g: dict[str, Any], whole: bool = True, where: str = "") -> None:
        """Check a group's settings (``whole``: a group's, merged with the defaults; else the
        defaults alone, where ``total_steps`` may be left to the groups). ``where`` starts the
        message (``"group 1: "``)."""
        lr = float(g["lr"])
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise _err(f"{where}lr must be finite and >= 0, got {lr}")
        betas = g["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise _err(f"{where}betas must be two values in [0, 1), got {betas}")
        for key in ("eps", "weight_decay", "decay"):
            val = float(g[key])
            if not (val >= 0.0 and math.isfinite(val)):
                raise _err(f"{where}{key} must be finite and >= 0, got {g[key]}")
        ts = g["total_steps"]
        if ts is None and whole:
            raise _err(f"{where}total_steps is required (the planned length T of the alpha ramp)")
        if ts is not None and (not _is_int(ts) or ts < 1):
            raise _err(f"{where}total_steps must be an int >= 1, got {ts!r}")
        mi = g["mask_interval"]
        if not _is_int(mi) or mi < 1:
            raise _err(f"{where}mask_interval must be an int >= 1, got {mi!r}")
        n, m = g["n"], g["m"]
        if m not in (4, 8) or not (_is_int(n) and 0 < n <= m):
            raise _err(f"{where}need m in (4, 8) and 0 < n <= m, got n={n}, m={m}")
        # Dynamo's tracing of an optimizer step shows every group with capturable=True
        traced = ("capturable",) if torch.compiler.is_compiling() else ()
        unsupported = [key for key in _TORCH_ONLY if g.get(key) and key not in traced]
        if unsupported:
            raise _err(
                f"{where}a group sets {unsupported}: options of torch's Adam that AdamS does not "
                "have (it would ignore them)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; without ``sparse`` (or with None) its params are sparse by shape."""
        entries = param_group["params"]
        if isinstance(entries, (set, frozenset)):  # as torch's optimizers refuse them
            raise TypeError(
                "cast_ext.AdamS: a group's params must be an ordered collection; a set's order "
                "changes from run to run (and a state dict matches params by position): use a list"
            )
        entries = [entries] if isinstance(entries, Tensor) else list(entries)
        # (name, param) pairs, as named_parameters() gives (torch's optimizers take them too)
        params = [e[1] if isinstance(e, tuple) else e for e in entries]
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"cast_ext.AdamS: params must be Tensors, got {type(p).__name__}")
        merged = {**self.defaults, **param_group, "params": params}
        gi = len(self.param_groups)  # the group's index once added
        self._check_hparams(merged, where=f"group {gi}: ")
        for i, p in enumerate(params):
            if any(q is p for q in params[:i]):
                raise _err(
                    f"param of shape {list(p.shape)} appears twice in a group (positions "
                    f"{next(j for j, q in enumerate(params) if q is p)} and {i}): list it once"
                )
        for p in params:
            if isinstance(p, Tensor) and p.dtype not in ops._FLOATS:
                raise _err(
                    f"param of shape {list(p.shape)} has dtype {p.dtype}; "
                    "expected float32, float16 or bfloat16"
                )
        sparse = param_group.get("sparse")  # None: each param by its shape
        _check_sparse(sparse, params, merged["m"], gi)
        group = {**param_group, "params": entries, "sparse": sparse}
        # Shape-decided sparsity uses the global shape: a DTensor's layout never makes a param
        # dense (a bad layout is refused instead). Named by the group's future index.
        merged["sparse"] = sparse
        for i, p in enumerate(params):
            _check_placements(p, _param_is_sparse(p, merged), merged["m"], f"{i} of group {gi} ")
        super().add_param_group(group)

    # ---- state ---------------------------------------------------------------------------------

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Fresh state; for a DTensor ``p``, DTensors laid out like ``p`` (``step`` stays plain,
        as in ``torch.optim.Adam``), each wrapping a contiguous local tensor the kernel updates."""
        state = self.state[p]
        lp = _local(p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=lp.device)

        def like(local: Tensor, shape: list[int]) -> Tensor:
            return _state_like(p, local, shape)

        zeros = torch.zeros(lp.shape, dtype=torch.float32, device=lp.device)
        state["exp_avg"] = like(zeros, list(p.shape))
        state["exp_avg_sq"] = like(torch.zeros_like(zeros), list(p.shape))
        if p.dtype != torch.float32:
            state["master"] = like(lp.detach().float().contiguous(), list(p.shape))
        if _param_is_sparse(p, group):
            shape = [*p.shape[:-1], (p.shape[-1] + 7) // 8]
            lshape = [*lp.shape[:-1], (lp.shape[-1] + 7) // 8]
            # Filled at the first step: t = 0 is a refresh.
            state["mask"] = like(torch.zeros(lshape, dtype=torch.uint8, device=lp.device), shape)
            state["prev_mask"] = like(
                torch.zeros(lshape, dtype=torch.uint8, device=lp.device), shape
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping fp32 state/masters and uint8 masks in their own dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
        param's dtype (which would round bf16 params' fp32 moments and masters) and the masks to
        a float dtype; this override restores them from ``state_dict`` exactly. Masters saved
        for bf16/fp16 params and loaded for fp32 ones stay until the params' next step, which
        gives each param its master's value where it holds that value rounded, as after casting
        the live model to fp32 (the run goes on bit for bit either way). Hooks run as
        torch's do: the pre-hooks first (a dict one returns is the one loaded, and checked), the
        post-hooks last (their changes stay). A group saved without ``sparse`` (an edited or
        foreign dict) keeps this optimizer's setting.

        As with torch's optimizers, each group takes the saved settings (``lr``,
        ``total_steps``, ``mask_interval``, ``decay``, ...), not the ones this optimizer was
        built with: to lengthen a resumed run, set ``group["total_steps"]`` after loading.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = [
            {"sparse": groups[i]["sparse"], **old} if i < len(groups) else old
            for i, old in enumerate(state_dict["param_groups"])
        ]
        state_dict = {**state_dict, "param_groups": saved_groups}
        saved_state = state_dict["state"]
        self._check_loadable(saved_groups, saved_state)
        # torch's load runs the hooks itself: here they run once, around this whole load
        pre, post = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        id_map = {
            old_id: p
            for old_group, group in zip(saved_groups, self.param_groups, strict=True)
            for old_id, p in zip(old_group["params"], group["params"], strict=True)
        }
        for old_id, st in saved_state.items():
            if old_id not in id_map:
                continue
            p = id_map[old_id]
            if st and not isinstance(st["step"], Tensor):  # a number, as older torch saved it
                st = {**st, "step": torch.tensor(float(st["step"]))}
            state = {
                key: (
                    val.detach().to(
                        device=p.device, dtype=_STATE_DTYPES.get(key, val.dtype), copy=True
                    )
                    if isinstance(val, Tensor)
                    else val
                )
                for key, val in st.items()
            }
            _add_master(p, state)  # a run saved with fp32 params
            self.state[p] = state
        for hook in post.values():
            hook(self)

    def _check_loadable(self, saved_groups: list[dict[str, Any]], saved_state: dict) -> None:
        """Refuse, before anything changes, a state dict made for other params (another model).

        Checks the group structure, that every state tensor has the shape the param needs, that
        masks exist exactly for sparse groups, and that DTensor params get DTensor state.
        """
        if len(saved_groups) != len(self.param_groups):
            raise _err(
                f"load_state_dict: the state dict has {len(saved_groups)} param groups, this "
                f"optimizer {len(self.param_groups)} (build both optimizers the same way)"
            )
        for gi, (old, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            missing = [
                key for key in ("decay", "total_steps", "mask_interval", "n", "m") if key not in old
            ]
            if missing:
                raise _err(
                    f"load_state_dict: group {gi} of the state dict lacks AdamS's {missing}: "
                    "a state dict of another optimizer (e.g. AdamW)? Its moments do not carry "
                    "masks or the alpha ramp; start AdamS fresh from the loaded weights"
                )
            if len(old["params"]) != len(group["params"]):
                raise _err(
                    f"load_state_dict: group {gi} has {len(old['params'])} params in the state "
                    f"dict but {len(group['params'])} here"
                )
            if "sparse" in old and old["sparse"] != group["sparse"]:
                # Loading would overwrite the flag: a sparse param silently stepped as plain Adam.
                raise _err(
                    f"load_state_dict: group {gi} has sparse={group['sparse']} here but "
                    f"sparse={old['sparse']} in the state dict"
                )
            for pi, (old_id, p) in enumerate(zip(old["params"], group["params"], strict=True)):
                st = saved_state.get(old_id)
                if not st:
                    continue
                where = f"{pi} of group {gi} "
                sparse = _param_is_sparse(p, group)
                if sparse != ("mask" in st):
                    raise _err(
                        f"load_state_dict: {_describe(p, where)}: the saved state "
                        f"{'lacks' if sparse else 'has'} a mask but the param is "
                        f"{'sparse' if sparse else 'dense'} here"
                    )
                needed = ["exp_avg", "exp_avg_sq"] + (["mask", "prev_mask"] if sparse else [])
                bad = [key for key in needed if not isinstance(st.get(key), Tensor)]
                step = st.get("step")
                if not isinstance(step, Tensor) and not (
                    isinstance(step, (int, float)) and not isinstance(step, bool)
                ):
                    bad.insert(0, "step")
                if bad:
                    raise _err(
                        f"load_state_dict: {_describe(p, where)}: the saved state lacks {bad} "
                        "(or holds them as non-tensors): not a state dict of this optimizer?"
                    )
                for key, val in st.items():
                    if not isinstance(val, Tensor):
                        continue
                    want = _expected_shape(key, p)
                    if key == "step" and val.numel() != 1:
                        want = []
                    if want is not None and list(val.shape) != want:
                        raise _err(
                            f"load_state_dict: {_describe(p, where)}: saved state {key!r} has "
                            f"shape {list(val.shape)}, expected {want} (a state dict of "
                            "another model?)"
                        )
                    if key != "step" and isinstance(p, DTensor) != isinstance(val, DTensor):
                        raise _err(
                            f"load_state_dict: {_describe(p, where)}: saved state {key!r} is "
                            f"{'a DTensor' if isinstance(val, DTensor) else 'a plain tensor'}; "
                            "state must be laid out like its param (for FSDP2 load through "
                            "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict)"
                        )

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step over every param that has a gradient.

        Args:
            closure: optional, re-evaluates the model and returns the loss.

        Returns:
            the closure's loss, or None.

        Raises:
            ValueError: a group with gradients holds settings the constructor refuses (changed
                since it was added); nothing is stepped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._step()
        except BaseException:
            # GradScaler deletes grad_scale / found_inf only after a step that returns: left
            # here, the next step would unscale by their product with the next scale.
            for name in ("grad_scale", "found_inf"):
                if hasattr(self, name):
                    delattr(self, name)
            raise
        return loss

    def _step(self) -> None:
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            # GradScaler's sum over no grads at all: the int 0
            found_inf = torch.tensor(float(found_inf))
        per_device: dict[tuple[str, torch.device], Tensor] = {}

        def on(name: str, t: Tensor | None, device: torch.device) -> Tensor | None:
            if t is None:
                return None
            key = (name, device)
            if key not in per_device:
                per_device[key] = t.to(device=device, dtype=torch.float32, non_blocking=True)
            return per_device[key]

        fn = reference.adams_step_ if self.impl == "reference" else ops.adams_step_
        # Every param is checked before any is stepped: a bad one leaves all unchanged.
        work: list[tuple[dict[str, Any], torch.device, bool, list[Tensor]]] = []
        stepped: list[tuple[Tensor, int, int]] = []  # (param, group, index) for the memory check
        for gi, group in enumerate(self.param_groups):
            if all(p.grad is None for p in group["params"]):
                continue
            # A group's settings may have changed since add_param_group checked them (a
            # scheduler's, a user's edit): checked again as there, before anything is stepped
            # (its params without gradients too, as there).
            self._check_hparams(group, where=f"group {gi}: ")
            _check_sparse(group["sparse"], group["params"], group["m"], gi)
            buckets: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = defaultdict(list)
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("cast_ext.AdamS does not support sparse gradients")
                if p.dtype not in ops._FLOATS:  # cast since add_param_group checked it
                    raise _err(
                        f"{_describe(p, f'{pi} of group {gi} ')} has dtype {p.dtype}; expected "
                        "float32, float16 or bfloat16; nothing was stepped"
                    )
                sparse = _param_is_sparse(p, group)
                if isinstance(p, DTensor):
                    _check_placements(p, sparse, group["m"], f"{pi} of group {gi} ")
                buckets[(p.device, p.dtype, sparse)].append(p)
                stepped.append((p, gi, pi))
            work += [(group, device, sparse, ps) for (device, _, sparse), ps in buckets.items()]
        if not torch.compiler.is_compiling():  # addresses: none while tracing
            _check_param_memory(stepped)
        # A kernel call refuses (all its tensors unchanged) a sparse param whose weight has a
        # NaN or Inf at a mask refresh; the calls before it would have stepped. So the sparse
        # buckets go first, and those after the first are checked before any call.
        work.sort(key=lambda w: not w[2])
        # Params without a state get one (masters made from the params) at their first step.
        # Existing states catch up with the params first, so the check below reads the weights
        # the step would use (a NaN written into a bf16 param since the last step included).
        fresh: set[int] = set()
        for group, _, sparse, ps in work:
            for p in ps:
                state = self.state.get(p)
                if not state:
                    fresh.add(id(p))
                elif _behind(p, state, sparse):
                    self._sync_state(p, group, sparse)
        self._check_refresh_weights(work[1:], found_inf)
        for group, device, sparse, ps in work:
            for p in ps:
                if id(p) in fresh:
                    self._init_state(p, group)
            states = [self.state[p] for p in ps]
            # DTensors step on their local shards: the placements were checked to keep every
            # group whole, and the state is laid out like the param. A bucket of plain tensors
            # (the state made like its params) passes its tensors as they are.
            shards = any(isinstance(p, DTensor) or isinstance(p.grad, DTensor) for p in ps)

            def each(key: str, states: list = states, shards: bool = shards) -> list[Tensor]:
                return [_local(s[key]) for s in states] if shards else [s[key] for s in states]

            # A non-contiguous param (channels_last, a transposed view) steps as a contiguous
            # copy, copied back.
            params = [_local(p) for p in ps] if shards else ps
            flat = [lp if lp.is_contiguous() else lp.contiguous() for lp in params]
            if shards:
                grads = [_local(_grad_like(p)).contiguous() for p in ps]
            else:
                grads = [p.grad.contiguous() for p in ps]
            masters = each("master") if "master" in states[0] else []
            track = not torch.compiler.is_compiling() and len(masters) > 0
            beta1, beta2 = group["betas"]
            fn(
                flat,
                grads,
                each("exp_avg"),
                each("exp_avg_sq"),
                each("mask") if sparse else [],
                each("step"),
                masters,
                each("prev_mask") if sparse else [],
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decay=float(group["decay"]),
                total_steps=int(group["total_steps"]),
                mask_interval=int(group["mask_interval"]),
                n=int(group["n"]),
                m=int(group["m"]),
                grad_scale=on("grad_scale", grad_scale, device),
                found_inf=on("found_inf", found_inf, device),
            )
            for p, lp, fl in zip(ps, params, flat, strict=True):
                if fl is not lp:
                    lp.copy_(fl)
                if p is not lp and not torch.compiler.is_compiling():
                    # a DTensor: the op moved its local tensor's version, autograd reads its own
                    torch.autograd.graph.increment_version(p)
                if track:
                    self._versions[id(p)] = _written(lp)

    def _sync_state(self, p: Tensor, group: dict[str, Any], sparse: bool) -> None:
        """Bring the existing state of ``p`` up to date before a step: an fp32 master exactly
        for a non-fp32 param (the model was cast since the last step; a param cast to fp32, or
        loaded into an fp32 model with a bf16/fp16 run's state, takes its master's value where
        it holds that value rounded); masks exactly for a sparse param (a group made sparse
        after some steps gets the N:M mask of its current weights, as a refresh would); and the
        master takes a param written outside the step since the last one (a mask applied in
        place, weights loaded, ``p.data = ...``; at the first step since construction or
        load_state_dict, whether or not it was written) where the param is not its master
        rounded: there the param, not its stale fp32 master, is the weight to go on from;
        elsewhere the master keeps the precision the param lacks (a write of the same values,
        such as loading the model's own state dict, loses nothing, and a fresh process that
        loaded both goes on bit for bit). (Compiled, where versions cannot be traced, every step
        compares.)"""
        state = self.state[p]
        if "master" in state and p.dtype == torch.float32:
            _take_master(_local(p), _local(state.pop("master")))
        _add_master(p, state)
        if "master" in state:
            lp = _local(p)
            # Compiled: versions cannot be traced, so every step compares (a pass over the param
            # and its master; where nothing was written, the master stays as it is).
            if torch.compiler.is_compiling() or self._versions.get(id(p)) != _written(lp):
                _take_written(_local(state["master"]), lp.contiguous())
        if not sparse:
            state.pop("mask", None)  # stepped dense now: no mask to save or refresh
            state.pop("prev_mask", None)
        elif "mask" not in state:  # from the master that took the writes since the last step
            w = _local(state.get("master", p)).detach()
            packed = ops.pack_mask(ops.nm_mask(w, int(group["n"]), int(group["m"])))
            shape = [*p.shape[:-1], (p.shape[-1] + 7) // 8]
            state["mask"] = _state_like(p, packed, shape)
            state["prev_mask"] = _state_like(p, packed.clone(), shape)

    def sync_masters(self) -> None:
        """Take the fp16/bf16 params' current values into their fp32 masters, where a param is
        not its master rounded to its dtype.

        Writes through autograd (``p.copy_(...)`` under ``torch.no_grad()``, a
        ``load_state_dict`` into the model) and ``p.data = ...`` are seen at the next step
        without this call. Writes that bypass the version counter (``p.data.copy_(...)``, a
        NumPy view of the param) are not: call this after them, before the next step.
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                # an fp32 param's master (cast or loaded since the last step) is its next
                # step's to take
                if state and "master" in state and p.dtype != torch.float32:
                    _take_written(_local(state["master"]), _local(p).contiguous())

    def _check_refresh_weights(self, work: list[Any], found_inf: Tensor | None) -> None:
        """Raise for a sparse param in ``work`` whose weight (master, else param) has a NaN or
        Inf at a step that refreshes its mask. Host-side params only: a CUDA kernel does not
        check its weights (that would sync), nor is a CUDA step count read here; nor under
        torch.compile (data-dependent: each call still checks its own tensors)."""
        if torch.compiler.is_compiling():
            return
        if found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf != 0):
            return  # the step changes nothing
        for group, device, sparse, ps in work:
            if not sparse or device.type != "cpu":
                continue
            for p in ps:
                state = self.state.get(p)
                t = int(state["step"]) if state else 0
                w = _local(state.get("master", p) if state else p)
                if (
                    t % group["mask_interval"] == 0
                    and w.numel() > 0
                    and not torch.isfinite(torch.linalg.vector_norm(w.detach(), math.inf))
                ):
                    gi = next(i for i, g in enumerate(self.param_groups) if g is group)
                    pi = next(i for i, q in enumerate(group["params"]) if q is p)
                    raise RuntimeError(
                        f"cast_ext.AdamS: param {pi} of group {gi} of shape {list(p.shape)} "
                        "contains NaN or Inf "
                        f"at a mask refresh (step {t}): a mask of non-finite weights is "
                        "undefined; nothing was stepped"
                    )

    # ---- introspection -------------------------------------------------------------------------

    def _group_of(self, p: Tensor) -> dict[str, Any] | None:
        """The param group holding ``p`` (None if none does): at the (group, index) where the
        last search saw it, if it is still there (the groups may have been edited since), else
        found by a search that indexes every param (a scan per call was 0.5 ms of a health
        record of 210 layers)."""
        groups = self.param_groups
        at = getattr(self, "_param_at", {}).get(id(p))
        if at is not None:
            gi, pi = at
            if gi < len(groups) and pi < len(ps := groups[gi]["params"]) and ps[pi] is p:
                return groups[gi]
        # (ids of live params: the one found under id(p) is p)
        self._param_at = {
            id(q): (gi, pi) for gi, g in enumerate(groups) for pi, q in enumerate(g["params"])
        }
        at = self._param_at.get(id(p))
        return None if at is None else groups[at[0]]

    def _sparse_group(self, p: Tensor) -> dict[str, Any]:
        group = self._group_of(p)
        if group is None:
            raise _err(f"param of shape {list(p.shape)} is not managed by this optimizer")
        if not _param_is_sparse(p, group):
            how = (
                "its group has sparse=False"
                if group["sparse"] is not None
                else f"not 2-D with a last dim that is a multiple of m={group['m']}"
            )
            raise _err(f"param of shape {list(p.shape)} is not stepped as sparse ({how})")
        return group

    def mask(self, p: Tensor) -> Tensor:
        """The current N:M mask of sparse param ``p`` (bool, ``p``'s shape; True = kept).

        For a DTensor ``p`` (FSDP2): a bool DTensor laid out like ``p`` (this rank holds its
        local shard's mask; ``full_tensor()`` gathers the whole mask).

        Raises:
            ValueError: ``p`` is not a sparse param of this optimizer.
            RuntimeError: ``p`` has not been stepped yet (its mask is computed at its first step).
        """
        self._sparse_group(p)
        state = self.state.get(p)
        # a first step that was skipped (GradScaler's inf) or refused made a state, no mask
        if not state or "mask" not in state or float(state["step"]) == 0:
            raise RuntimeError(
                f"cast_ext.AdamS: param of shape {list(p.shape)} has no mask yet; it is "
                "computed from the weights at the param's first step"
            )
        local = ops.unpack_mask(_local(state["mask"]), _local(p).shape[-1])
        return _state_like(p, local, list(p.shape))

    def sparsity_stats(self) -> dict[Tensor, dict[str, float | int | None]]:
        """Health signals of every stepped sparse param (SPEC §5), keyed by the param.

        Returns:
            per param a dict: ``pruned_over_kept`` (mean |pruned w| / mean |kept w|, on the fp32
            weights), ``mask_flips`` (groups whose kept set changed at the last refresh; None
            before the second refresh, while ``prev_mask`` holds no mask: all its bits are 0,
            where a mask keeps ``n`` of every group; so also None for a param with no groups),
            ``flip_rate`` (``mask_flips`` / groups), ``alpha`` (the ramp weight the next step
            applies, ``min(step / total_steps, 1)``) and ``step``.
            For DTensor params the figures are the whole param's, summed over its shards: then
            the call is a collective (every rank calls it, as for ``full_tensor()``). One
            read-back for all params.
        """
        params: list[tuple[Tensor, dict[str, Any]]] = []
        rows: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not _param_is_sparse(p, group) or not state or "mask" not in state:
                    continue
                w = _local(state.get("master", p)).detach().float().abs()
                mask = _local(state["mask"])
                kept = ops.unpack_mask(mask, w.shape[-1])
                flips = ops.mask_flips(_local(state["prev_mask"]), mask, group["m"])
                total = w.sum(dtype=torch.float64)
                kept_sum = w.masked_fill_(~kept, 0.0).sum(dtype=torch.float64)
                n_kept = kept.sum(dtype=torch.float64)
                figures = [kept_sum, n_kept, total - kept_sum, w.numel() - n_kept, flips]
                # prev_mask has a bit set once a refresh saved a mask there (the second
                # refresh), whatever mask_interval is now and through a state dict
                figures += [w.numel() // group["m"], _local(state["prev_mask"]).any()]
                local = torch.stack([torch.as_tensor(f).to(total) for f in figures])
                row = _over_shards(local, p).sum(0)  # a DTensor's shards (collective)
                rows.append(torch.cat([row, state["step"].to(total).view(1)]))
                params.append((p, group))
        home = rows[0].device if rows else torch.device("cpu")
        table = torch.stack([r.to(home) for r in rows]).tolist() if rows else []
        out: dict[Tensor, dict[str, float | int | None]] = {}
        for (p, group), row in zip(params, table, strict=True):
            kept_sum, n_kept, pruned_sum, n_pruned, flips, groups, has_prev, step = row
            t = int(step)
            if t == 0:  # no mask yet (a skipped or refused first step made the state)
                continue
            kept_mean = kept_sum / n_kept if n_kept else math.nan
            pruned_mean = pruned_sum / n_pruned if n_pruned else math.nan
            n_flips = int(flips) if has_prev else None
            out[p] = {
                "pruned_over_kept": pruned_mean / kept_mean if kept_mean else math.nan,
                "mask_flips": n_flips,
                "flip_rate": None if n_flips is None else n_flips / max(int(groups), 1),
                "alpha": min(t / group["total_steps"], 1.0),
                "step": t,
            }
        return out
