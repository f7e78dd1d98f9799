"""2:4 sparse linear layers: :class:`SparseLinear`, model swaps and the sparse-vs-dense dispatch.

A :class:`SparseLinear` stores its weight in the portable packed 2:4 format (``values`` +
``metadata`` buffers, see :func:`cast_ext.sparse24_compress`), so its ``state_dict`` loads on any
device. Its forward runs one of

* ``"sparse"`` (CUDA): cuSPARSELt (:func:`cast_ext.ops.cslt_linear`) with the library's
  compressed buffer, kept as a non-persistent cache rebuilt after ``.to()``/``load_state_dict``;
* ``"packed"``: :func:`cast_ext.sparse24_gemm` on ``values``/``metadata`` (on CUDA the small-M
  kernels, for at most 16 tokens, which read 56% of a dense weight's bytes, on tensor cores for
  fp16/bf16 from 2 tokens; on the CPU the packed-format kernel, any token count);
* ``"dense"``: ``F.linear`` (cuBLAS, or the CPU BLAS) on the decompressed weight, cached,

whichever the dispatch picked for this shape. A MoE experts module becomes a
:class:`SparseExperts`: one :class:`SparseLinear` per expert and projection.

Dispatch (``mode="auto"``, CPU and CUDA): for each (device, dtype, bucket of M = next power of two
of the token count, N, K, bias) the candidate paths are timed and the fastest is used from then
on; a sparse path must beat dense by ``SPARSE_MARGIN`` to be picked, so a sparse path is kept
only where it measured faster (a layer that chose dense still pays the dispatch's lookup: on
the CPU runs in benchmarks/results, up to 1.17x dense's time at M = 16). The first calls of a
bucket (6 per path, from any layers of that shape) alternate the paths and are timed where they
run, inside the model:
with ``time.perf_counter`` on the CPU, with CUDA events on the GPU (no sync but one, when the
last sample is in). An isolated measurement keeps the weight in cache (the CPU's, or a GPU's
L2), which flatters dense when the model's weights do not fit. A layer drops the derived
weight (dense copy or cuSPARSELt buffer) that none of its decisions uses. The packed CUDA
kernel's check of the meta costs a sync, so a layer checks its meta once per weight (at its
first packed call after ``values`` or ``metadata`` change) and then runs the kernel unchecked. The
choice comes from timings, so two processes may choose differently for one shape, and the paths
round differently: for bitwise reproducible outputs force a path. ``mode="sparse"`` forces the
2:4 kernel (cuSPARSELt on CUDA, the packed kernel on the CPU, which then holds no dense copy
unless it trains through it), ``mode="dense"`` the dense one. :func:`dispatch_decisions` lists
what was chosen and the times behind it; threads may share a bucket's trial. Under
``torch.export`` the auto mode is dense, with the weight decompressed in the graph (one program
for every batch size). The backward (input and bias grads, for adapters such as LoRA on a
frozen 2:4 base) is a dense GEMM with the decompressed weight, kept after the first backward on
the CPU and rebuilt per backward on CUDA; ``values``/``metadata`` are buffers and get no
gradient on any path.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C, ops
from ._build import cuda_value_checks, cusparselt_available

__all__ = [
    "SPARSE_MARGIN",
    "DispatchDecision",
    "SparseExperts",
    "SparseLinear",
    "clear_dispatch_decisions",
    "cslt_cache_info",
    "dispatch_decisions",
    "load_cslt_algs",
    "save_cslt_algs",
    "to_dense",
    "to_sparse",
]

Mode = Literal["auto", "sparse", "dense"]
_MODES = ("auto", "sparse", "dense")

SPARSE_MARGIN = 0.98
"""Sparse is chosen only if ``sparse_time < SPARSE_MARGIN * dense_time`` (timing noise guard)."""


# ---- dispatch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchDecision:
    """One measured choice for a shape bucket: ``choice`` is ``"sparse"`` (cuSPARSELt),
    ``"packed"`` (:func:`cast_ext.sparse24_gemm`) or ``"dense"`` (``F.linear`` on the
    decompressed weight); a path's time is None where it was not a candidate."""

    device: str
    dtype: str
    m_bucket: int
    n: int
    k: int
    bias: bool
    choice: str
    sparse_us: float | None
    dense_us: float
    packed_us: float | None = None


_DECISIONS: dict[tuple[Any, ...], DispatchDecision] = {}
# (device, dtype, n, k, bias) -> True once a bucket of it is decided: a compiled call looks a
# bucket up only where one was (a lookup specialises the graph on M's bucket: a dynamic M would
# compile per bucket)
_DECIDED_LAYERS: dict[tuple[Any, ...], bool] = {}
# Guards the trial bookkeeping (_TRIALS and each _Trial) when threads share a shape bucket; the
# timed calls themselves run outside it. Bumped by clear_dispatch_decisions: layers then forget
# which paths the old decisions sent them down.
_LOCK = threading.Lock()
_GENERATION = [0]


# The paths that need each derived weight (SparseLinear._derived's keys).
_DERIVED_FOR = {"dense": ("dense", "backward"), "cslt": ("sparse",)}


def _round(us: float | None) -> float | None:
    return None if us is None else round(us, 2)


def _bucket(m: int) -> int:
    """The power of two at or above ``m`` (1 for m <= 1)."""
    return 1 << (max(m, 1) - 1).bit_length()


def dispatch_decisions() -> list[dict[str, Any]]:
    """The sparse-vs-dense choices made so far (one per shape bucket), as dicts."""
    with _LOCK:  # other threads' calls may be deciding buckets
        decided = list(_DECISIONS.values())
    return [asdict(d) for d in decided]


def clear_dispatch_decisions() -> None:
    """Forget every choice: the next call of each shape bucket measures again."""
    with _LOCK:
        _DECISIONS.clear()
        _DECIDED_LAYERS.clear()
        _TRIALS.clear()
        _GENERATION[0] += 1


@torch.compiler.assume_constant_result  # a pybind11 call: torch.compile takes its result as is
def _cslt_fp16_refusal(index: int) -> str:
    """Why cuSPARSELt float16 is refused on CUDA device ``index`` ("" where it runs): sm_90 with
    cuSPARSELt <= 0.8.0 faulted the GPU (csrc/cuda/cusparselt.cpp, fp16_refusal)."""
    return _C.cslt_fp16_refusal(index)


def _cslt_reason(n: int, k: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why cuSPARSELt cannot run an ``[n, k]`` layer of ``dtype`` on ``device`` (None if it can)."""
    if device.type != "cuda":
        return f"cuSPARSELt runs on CUDA devices, not {device.type}"
    if not cusparselt_available():
        return "this cast_ext was built without cuSPARSELt (CAST_EXT_CUSPARSELT)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"cuSPARSELt's 2:4 GEMM takes float16/bfloat16, not {dtype}"
    if dtype == torch.float16:
        why = _cslt_fp16_refusal(
            torch.cuda.current_device() if device.index is None else device.index
        )
        if why:
            return why
    if n % 16 or k % 16:
        return f"cuSPARSELt needs in/out features that are multiples of 16, got [{n}, {k}]"
    if n * k > 2**31 - 1:
        return f"a [{n}, {k}] weight exceeds cuSPARSELt's 2^31-1 elements per matrix"
    return None


# The packed small-M CUDA kernel's limits (csrc/cuda/kernels.h: kGemv24MaxM, K % 16 == 0).
_PACKED_MAX_M = 16


def _pick(us: dict[str, float]) -> str:
    """The fastest path, if it beats dense by SPARSE_MARGIN; else dense."""
    best = min(us, key=us.__getitem__)
    return best if us[best] < SPARSE_MARGIN * us["dense"] else "dense"


# Trials: the first calls of a shape bucket alternate the paths and are timed where they run, in
# the model, with its cache state. An isolated measurement keeps the weight in cache, which
# flatters the dense path: in SmolLM2-135M fp32 decoding on the test machine it chose dense for
# layers where the packed kernel ran 11% faster in the model.
_TRIAL_WARMUP = 1  # untimed calls per path (first-call costs: cuSPARSELt's plan and search)
_TRIAL_SAMPLES = 5  # timed calls per path; their median decides

# CUDA samples are device time: before a trial call the stream spins (torch.cuda._sleep) so that
# the host queues the whole call before the GPU reaches its start event. Without it the events
# also timed the host's Python between them: on an H200 (session 18) trial calls of an M = 1
# layer read 82-118 us where the kernels took 16-37 us, and the dispatch chose the packed kernel
# on host time, where it was 0.89x dense on the device. A sample whose start event had already
# passed when the call was queued timed the host too: it is not counted, and the spin doubles
# (up to _HOST_AHEAD_MAX cycles: about 8 ms at 2 GHz), for at most _TRIAL_MAX_UNCOVERED such
# calls per path (a call that syncs inside is uncovered however long the spin; its samples
# then count as they are).
_HOST_AHEAD = [1 << 17]  # GPU clock cycles; grows while samples come back uncovered
_HOST_AHEAD_MAX = 1 << 24
_TRIAL_MAX_UNCOVERED = 4

# A sample: microseconds (CPU), or the pair of CUDA events recorded around the call, read once
# all samples are in (reading one needs its work done: a sync).
_Sample = float | tuple[Any, Any]


def _sample_us(sample: _Sample) -> float:
    if isinstance(sample, float):
        return sample
    start, end = sample
    end.synchronize()
    return float(start.elapsed_time(end)) * 1e3


@dataclass
class _Trial:
    paths: tuple[str, ...]
    # _GENERATION when it opened: a clear since then voids its decision
    generation: int = field(default_factory=lambda: _GENERATION[0])
    calls: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[_Sample]] = field(default_factory=dict)
    uncovered: dict[str, int] = field(default_factory=dict)  # samples left out, per path

    def next_path(self) -> str:
        return min(self.paths, key=lambda p: self.calls.get(p, 0) - self.uncovered.get(p, 0))

    def add(self, path: str, sample: _Sample, covered: bool = True) -> bool:
        """Count a call of ``path``; True once every path has its samples. An uncovered sample
        (one that timed the host too) is left out, up to _TRIAL_MAX_UNCOVERED per path."""
        self.calls[path] = self.calls.get(path, 0) + 1
        if self.calls[path] > _TRIAL_WARMUP:
            if covered or self.uncovered.get(path, 0) >= _TRIAL_MAX_UNCOVERED:
                self.samples.setdefault(path, []).append(sample)
            else:
                self.uncovered[path] = self.uncovered.get(path, 0) + 1
        return all(len(self.samples.get(p, ())) >= _TRIAL_SAMPLES for p in self.paths)

    def medians(self) -> dict[str, float]:
        """The median time of each path, in microseconds."""
        us = {p: sorted(_sample_us(t) for t in ts) for p, ts in self.samples.items()}
        return {p: t[len(t) // 2] for p, t in us.items()}


_TRIALS: dict[tuple[Any, ...], _Trial] = {}


def _timed_on_device(
    device: torch.device, call: Callable[[], Tensor]
) -> tuple[Tensor, _Sample, bool]:
    """``call()``'s output, its sample (a pair of CUDA events on ``device``'s current stream,
    unread) and whether it is covered: whether the GPU was still spinning ahead of the start
    event once the call was queued (see _HOST_AHEAD), so that the events time the device only."""
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream()  # where x's kernels run
        torch.cuda._sleep(_HOST_AHEAD[0])
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        y = call()
        end.record(stream)
        covered = not start.query()
    return y, (start, end), covered


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (for a CUDA ``t``)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class _CsltFailed(RuntimeError):
    """A dispatch trial's cuSPARSELt call (its buffer, or its GEMM) raised: the cause."""


def _cslt_call(call: Callable[[], Tensor]) -> Tensor:
    """``call()``, a cuSPARSELt step of a trial call, its RuntimeError raised as
    :class:`_CsltFailed` (apart from errors of the timing around it)."""
    try:
        return call()
    except RuntimeError as e:
        raise _CsltFailed(str(e)) from e


def _save_frozen(ctx: Any, values: Tensor, meta: Tensor) -> None:
    """Save the layer's buffers where the backward uses the weight (a gradient for x), so that
    writing them in place before it raises, as a Linear's weight does. Inference tensors (a
    layer built under ``torch.inference_mode``) cannot be saved, nor written in place outside
    it: not saved."""
    if ctx.needs_input_grad[0] and not (values.is_inference() or meta.is_inference()):
        ctx.save_for_backward(values, meta)


def _frozen_weight_backward(
    ctx: Any, grad: Tensor, inputs: int, bias_at: int
) -> tuple[Tensor | None, ...]:
    """The backward of a linear layer whose weight (``ctx.weight()``, dense) is frozen: grads for
    x (input 0) and the bias (input ``bias_at``) of the autograd Functions below, none for the
    rest. The layer's ``values``/``metadata`` were saved by the forward (``_save_frozen``):
    written in place since, they raise autograd's error here, as a Linear's weight does
    (``ctx.weight()`` would be built from the new ones)."""
    _ = ctx.saved_tensors
    grad_x = grad @ ctx.weight() if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.has_bias and ctx.needs_input_grad[bias_at]:
        grad_b = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(grad.dtype)
    out: list[Tensor | None] = [None] * inputs
    out[0], out[bias_at] = grad_x, grad_b
    return tuple(out)


class _CsltLinearFn(torch.autograd.Function):
    """cuSPARSELt forward; dense backward for x and bias (values/metadata are frozen buffers)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w_compressed: Tensor,
        values: Tensor,
        meta: Tensor,
        weight: Callable[[], Tensor],
        bias: Tensor | None,
        n: int,
        k: int,
    ) -> Tensor:
        ctx.weight = weight
        ctx.has_bias = bias is not None
        _save_frozen(ctx, values, meta)
        return ops.cslt_linear(x, w_compressed, n, k, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _frozen_weight_backward(ctx, grad, inputs=8, bias_at=5)


class _PackedLinearFn(torch.autograd.Function):
    """The packed kernel's forward; dense backward for x and bias with the layer's cached dense
    weight (:meth:`SparseLinear._backward_weight`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        values: Tensor,
        meta: Tensor,
        bias: Tensor | None,
        check: bool,
        layer: SparseLinear,
    ) -> Tensor:
        ctx.weight = layer._backward_weight
        ctx.has_bias = bias is not None
        _save_frozen(ctx, values, meta)
        return torch.ops.cast_ext.sparse24_gemm(x, values, meta, bias, check_meta=check)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _frozen_weight_backward(ctx, grad, inputs=6, bias_at=3)


def _unrecorded(x: Tensor, bias: Tensor | None) -> bool:
    """Whether an eager call on ``x`` and ``bias`` (besides the layer's frozen buffers) is one
    autograd records nothing for: grad mode off, or no input that requires grad. Never under a
    torch.func transform: there ``x.requires_grad`` is the wrapper's (False under vmap), not
    the tensor's that autograd records for."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._functorch.maybe_current_level() is None
        and (
            not torch.is_grad_enabled()
            or not (x.requires_grad or (bias is not None and bias.requires_grad))
        )
    )


# ---- the layer -------------------------------------------------------------------------------


class _BufTag:
    """The state of a layer's ``values``/``metadata`` that a derived weight (or a passed meta
    check) belongs to: the tensors themselves, held weakly (a new tensor at a freed one's
    address starts a fresh version counter, so address and version alone could match it: as
    ``torch.func.functional_call`` swapping the buffers per call did), their addresses and their
    versions (in-place writes; inference tensors have none)."""

    __slots__ = ("key", "refs")

    def __init__(self, values: Tensor, metadata: Tensor) -> None:
        self.refs = (weakref.ref(values), weakref.ref(metadata))
        self.key = _BufTag._key(values, metadata)

    @staticmethod
    def _key(values: Tensor, metadata: Tensor) -> tuple[Any, ...]:
        versions = (
            (None, None)
            if values.is_inference() or metadata.is_inference()
            else (values._version, metadata._version)
        )
        return (values.device, values.dtype, values.data_ptr(), metadata.data_ptr(), *versions)

    def holds(self, values: Tensor, metadata: Tensor) -> bool:
        """Whether the tag is of these very tensors (identities only, which Dynamo can guard
        where addresses and versions cannot be traced)."""
        refs = self.refs
        return refs[0]() is values and refs[1]() is metadata

    def matches(self, values: Tensor, metadata: Tensor) -> bool:
        """Whether ``values``/``metadata`` are these tensors in the state tagged (addresses,
        versions), without building a tag: the per-call check of the derived weights."""
        refs, key = self.refs, self.key
        if refs[0]() is not values or refs[1]() is not metadata:
            return False
        if key[4] is None:  # tagged as inference tensors: no versions to compare
            return key == _BufTag._key(values, metadata)
        # (the per-call check: the items likeliest to change first, no tuple built)
        return (
            values._version == key[4]
            and metadata._version == key[5]
            and values.data_ptr() == key[2]
            and metadata.data_ptr() == key[3]
            and values.dtype == key[1]
            and values.device == key[0]
        )


def _default_meta(out_features: int, in_features: int, device: Any) -> Tensor:
    keep = torch.zeros(out_features, in_features, dtype=torch.bool, device=device)
    keep.view(out_features, -1, 4)[..., :2] = True  # a valid 2:4 pattern for an empty layer
    return ops.pack_mask(keep)


class SparseLinear(nn.Module):
    """``y = x @ W^T + bias`` with ``W`` 2:4 sparse along ``in_features`` (a frozen weight).

    Args:
        in_features: ``K``, a multiple of 4.
        out_features: ``N``.
        bias: whether the layer has a (trainable) bias.
        mode: ``"auto"`` (measure the 2:4 paths against dense per shape bucket),
            ``"sparse"`` (forced: cuSPARSELt on CUDA, the packed kernel on the CPU) or
            ``"dense"`` (forced).
        device: where the buffers live.
        dtype: dtype of ``values`` and ``bias``.

    Shape:
        ``[..., K] -> [..., N]``.

    Buffers ``values`` ``[N, K/2]`` and ``metadata`` ``[N, ceil(K/8)]`` uint8 hold the weight; use
    :meth:`from_dense` to build one from an ``nn.Linear``.
    """

    values: Tensor
    metadata: Tensor
    # Set by from_dense / to_sparse (class defaults for layers built directly and for pickles of
    # earlier revisions): the Hugging Face Conv1D class a layer was made from, which
    # nn.to_dense gives back (a transformers checkpoint of GPT-2 stores Conv1D's [in, out]
    # weights), and whether the dense weight was trainable.
    _conv1d_cls: type[nn.Module] | None = None
    _weight_requires_grad: bool = True
    # Whether a derived weight was built since _use last released the unused ones.
    _derived_new: bool = False
    # The decided buckets' paths this layer has taken, {(device, dtype, bucket, bias): path}:
    # the per-call lookup of forward (see _route). Emptied with _uses; None in pickles of
    # earlier revisions.
    _routes: dict[tuple[torch.device, torch.dtype, int, bool], str] | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        mode: Mode = "auto",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % 4 != 0 or in_features <= 0:
            raise ValueError(
                f"cast_ext.nn.SparseLinear: in_features={in_features} must be a positive multiple "
                "of 4 (2:4 groups run along the input dim)"
            )
        if out_features <= 0:
            raise ValueError(
                f"cast_ext.nn.SparseLinear: out_features={out_features} must be positive"
            )
        if mode not in _MODES:
            raise ValueError(f"cast_ext.nn.SparseLinear: mode must be in {_MODES}, got {mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode: Mode = mode
        dtype = dtype or torch.get_default_dtype()
        if dtype not in ops._FLOATS:
            raise TypeError(
                f"cast_ext.nn.SparseLinear: dtype {dtype} is not supported; expected float32, "
                "float16 or bfloat16"
            )
        self.register_buffer(
            "values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device)
        )
        self.register_buffer("metadata", _default_meta(out_features, in_features, device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )
        # Derived weights, never saved: {"dense"|"cslt": (tag, tensor)}; the tag is the state of
        # `values` they were built from, so in-place loads and moves invalidate them.
        self._derived: dict[str, tuple[_BufTag, Tensor]] = {}
        # Paths ("sparse"/"dense") that a dispatch decision has sent this layer's inputs down, and
        # "backward" once a backward needed the dense weight; a measurement builds both weights,
        # then the one nothing uses is released. Reset when the decisions are cleared
        # (_uses_generation) or the layer moves.
        self._uses: set[str] = set()
        self._uses_generation = _GENERATION[0]
        self._routes = {}
        # The _tag() of the values/metadata whose meta a checked packed CUDA call has passed.
        self._meta_checked: _BufTag | None = None

    # -- construction and conversion --

    @classmethod
    def from_dense(
        cls, linear: nn.Module, *, mode: Mode = "auto", warn: bool = True
    ) -> SparseLinear:
        """Build from an ``nn.Linear``, pruning its weight to 2:4 by magnitude if it is not already.

        Args:
            linear: the dense layer (``in_features % 4 == 0``): an ``nn.Linear``, or a Hugging
                Face GPT-2 ``Conv1D`` (weight ``[in, out]``: the same map); left unchanged.
            mode: see :class:`SparseLinear`.
            warn: warn when the weight had to be pruned (it then changes the layer's output).

        Returns:
            A :class:`SparseLinear` on ``linear``'s device and dtype.
        """
        layer, dense_groups = cls._build(linear, mode)
        if dense_groups and warn:
            out_f, in_f = layer.out_features, layer.in_features
            warnings.warn(
                f"cast_ext.nn.SparseLinear.from_dense: weight of shape {[out_f, in_f]} is not 2:4 "
                f"sparse ({dense_groups} of {out_f * in_f // 4} groups of 4 have more than 2 "
                "nonzeros); pruned to 2:4 by magnitude with cast_ext.sparse24_prune",
                stacklevel=2,
            )
        return layer

    @classmethod
    def _build(cls, linear: nn.Module, mode: Mode) -> tuple[SparseLinear, int]:
        """:meth:`from_dense` without the warning: the layer, and how many groups of 4 had more
        than 2 nonzeros (pruned by magnitude; 0 on the meta device, which has no values)."""
        if not isinstance(linear, nn.Linear) and not _is_conv1d(linear):
            raise TypeError(
                f"cast_ext.nn.SparseLinear.from_dense: expected an nn.Linear or a Hugging Face "
                f"Conv1D, got {type(linear).__name__}"
            )
        w = linear.weight.detach()
        if _is_conv1d(linear):
            w = w.t()  # [out, in]: the 2:4 groups run along in, as for a Linear
        layer, dense_groups = cls._from_weight(w, linear.bias, mode)
        layer._weight_requires_grad = bool(linear.weight.requires_grad)
        layer._conv1d_cls = _conv1d_class(linear)
        layer.train(linear.training)
        return layer, dense_groups

    @classmethod
    def _from_weight(cls, w: Tensor, bias: Tensor | None, mode: Mode) -> tuple[SparseLinear, int]:
        """A layer holding ``w`` ``[out, in]`` (pruned to 2:4 by magnitude where it is not) and a
        copy of ``bias``, and how many groups of 4 had more than 2 nonzeros."""
        layer = cls(
            w.shape[1], w.shape[0], bias is not None, mode=mode, device=w.device, dtype=w.dtype
        )
        dense_groups = 0 if w.is_meta else int((w != 0).reshape(-1, 4).sum(-1).gt(2).sum())
        if dense_groups:
            w = ops.sparse24_prune(w)
        values, meta = ops.sparse24_compress(w)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.metadata.copy_(meta)
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        if layer.bias is not None and bias is not None:
            layer.bias.requires_grad_(bias.requires_grad)
        return layer, dense_groups

    def dense_weight(self) -> Tensor:
        """The 2:4 weight ``[N, K]`` as a dense tensor (zeros at the pruned positions)."""
        return ops.sparse24_decompress(self.values, self.metadata)

    @property
    def qweight(self) -> Tensor:
        """``values``, under the name PEFT gives a packed weight (GPTQ's ``qweight``): PEFT finds
        a layer's device and dtype there when a LoRA adapter (:mod:`cast_ext.peft`) wraps a layer
        with no ``.weight`` (without a bias, nothing else would tell it), and its LoRA layer
        answers ``.weight`` with it, as for GPTQ."""
        return self.values

    def to_dense(self) -> nn.Linear:
        """An equivalent ``nn.Linear`` (same device and dtype) holding the 2:4 weight (trainable
        if the layer :meth:`from_dense` converted was)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        lin.weight.requires_grad_(self._weight_requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        lin.train(self.training)
        return lin

    # -- derived weights --

    def _bias(self) -> Tensor | None:
        """``self.bias`` without ``nn.Module.__getattr__`` on the per-call path (a parametrized
        bias is a property: read as such)."""
        b = self._parameters.get("bias")
        return b if b is not None else self.bias

    def _tag(self) -> _BufTag:
        b = self._buffers  # not self.values: nn.Module.__getattr__ is slow on a per-call path
        v, mt = b["values"], b["metadata"]
        assert v is not None and mt is not None
        return _BufTag(v, mt)

    def _is_tagged(self, tag: _BufTag) -> bool:
        """Whether the buffers are in the state ``tag`` recorded; compiled, whether they are
        the tensors it recorded (see :meth:`_current`)."""
        b = self._buffers
        v, mt = b["values"], b["metadata"]
        assert v is not None and mt is not None
        return tag.holds(v, mt) if torch.compiler.is_compiling() else tag.matches(v, mt)

    def _current(self, name: str) -> Tensor | None:
        """The cached derived weight ``name`` if it was built from the current buffers.

        Under torch.compile data pointers and versions cannot be traced: the weight the last
        eager call built is used if the buffers are the tensors it was built from (buffers
        assigned since, or swapped in by ``torch.func.functional_call``, are not: the weight is
        derived in the graph then). ``load_state_dict`` drops the derived weights; after
        writing ``values``/``metadata`` in place otherwise, call the layer once eagerly before a
        compiled call. Writes that bypass the tensors' version counter
        (through ``.data`` or a NumPy view), and in-place writes to buffers that are inference
        tensors (a layer built under ``torch.inference_mode``: they have no version counter),
        are not seen at all: follow them with ``load_state_dict`` or a ``.to()``.
        ``torch.export`` never uses the cache: the exported program derives the weight from its
        ``values``/``metadata`` (a cached tensor would be baked in as a constant that a later
        ``load_state_dict`` does not reach)."""
        if torch.compiler.is_exporting():
            return None
        hit = self._derived.get(name)
        if hit is None:
            return None
        return hit[1] if self._is_tagged(hit[0]) else None

    def _get(self, name: str, build: Callable[[], Tensor]) -> Tensor:
        t = self._current(name)
        if torch.compiler.is_compiling():
            # inside the graph (or an export); nothing is cached from a trace
            return t if t is not None else build()
        capturing = _capturing(self._buffers["values"])  # type: ignore[arg-type]
        if t is not None:
            if capturing:
                # A CUDA graph captured now reads this tensor at every replay: kept for the
                # layer's life, though a decision may drop it from the cache.
                self.__dict__.setdefault("_graph_held", {})[id(t)] = t
            return t
        if capturing:
            # Derived inside the graph (in its memory, at every replay): a tensor made during a
            # capture holds nothing until the first replay, so it is not cached.
            return build()
        # A normal tensor even when this call runs under torch.inference_mode: an inference
        # tensor in the cache would break every later call that autograd records (adapters
        # trained on the layer, after an evaluation under inference_mode).
        with torch.inference_mode(False), torch.no_grad():
            t = build()
        self._derived[name] = (self._tag(), t)
        self._derived_new = True  # for _use: perhaps one no decision uses
        return t

    def _dense_cached(self) -> Tensor:
        return self._get("dense", self.dense_weight)

    def _cslt_buffer(self) -> Tensor:
        return self._get("cslt", lambda: ops.cslt_compress(self.dense_weight()))

    def _release_unused(self) -> None:
        """Drop the derived weight of a path no decision uses (the 2:4 weight stays in ``values``
        and ``metadata``): a layer dispatched one way holds one extra copy, not two."""
        for name in [d for d in self._derived if self._uses.isdisjoint(_DERIVED_FOR[d])]:
            del self._derived[name]  # "packed" needs neither

    def derived_bytes(self) -> int:
        """Bytes held by the derived weights (dense copy, cuSPARSELt buffer) besides the buffers."""
        return sum(t.numel() * t.element_size() for _, t in self._derived.values())

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        self._derived.clear()  # rebuilt lazily on the new device/dtype
        self._uses.clear()  # the decisions for the new device/dtype will say
        self._routes = {}
        # The buffers are converted in place where torch converts Parameters in place (the
        # same tensor type; not e.g. to the meta device): layers that share them (to_sparse of
        # tied Linears) stay tied (nn.Module._apply would give each its own copy). The second
        # holder's fn then finds them converted already. nn.Module._apply is not handed these
        # two again (fn applied twice would, for example, scale them twice).
        converted = []
        for key in ("values", "metadata"):
            buf = self._buffers.get(key)
            if buf is not None:
                new = fn(buf)
                if new is not buf and torch._has_compatible_shallow_copy_type(buf, new):
                    buf.data = new
                    new = buf
                self._buffers[key] = new
                converted.append(new)
        return super()._apply(lambda t: t if any(t is c for c in converted) else fn(t), recurse)

    def __getstate__(self) -> dict[str, Any]:
        # pickle, torch.save(module) and deepcopy: the derived weights are rebuilt on use, so they
        # are not carried (a dense copy would add 16/9 of the buffers' bytes).
        state = super().__getstate__()
        state.update(_derived={}, _uses=set(), _routes={}, _meta_checked=None, _derived_new=False)
        state.pop("_graph_held", None)
        return state

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Earlier revisions named the metadata buffer "meta", which torch.export's GraphModule
        # shadows (GraphModule.meta); such state dicts still load.
        legacy = prefix + "meta"
        if legacy in state_dict and prefix + "metadata" not in state_dict:
            state_dict[prefix + "metadata"] = state_dict.pop(legacy)
        # New values/metadata: the derived weights go (a compiled call cannot see that they are
        # stale, an eager one could), and the metadata is checked again.
        self._derived.clear()
        self._meta_checked = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- forward --

    def _use(self, path: str) -> None:
        """Record that a decision sends this layer's inputs down ``path``; drop a derived weight
        no decision uses, such as the dense copy a CPU trial call built (eager calls only)."""
        if torch.compiler.is_compiling():
            return
        if self._uses_generation != _GENERATION[0]:  # the decisions were cleared since
            self._uses.clear()
            self._routes = {}
            self._uses_generation = _GENERATION[0]
        elif path in self._uses and not self._derived_new:
            return  # the per-call case: nothing built since the last release, nothing to add
        self._uses.add(path)
        if self._derived:
            self._release_unused()
        self._derived_new = False

    def _choose(self, x: Tensor) -> tuple[str, tuple[Any, ...] | None]:
        """The path for input ``x``: 'sparse', 'packed' or 'dense', and the key of the trial this
        call belongs to (None once the bucket is decided, or where nothing is measured)."""
        n, k = self.out_features, self.in_features
        cuda = x.is_cuda
        if self.mode == "dense":
            return "dense", None
        if (self.mode == "sparse" and not cuda) or not (cuda or x.is_cpu):
            return "packed", None  # on meta: shapes only, nothing to measure or record
        if self.mode == "sparse":
            reason = _cslt_reason(n, k, x.dtype, x.device)
            if reason is not None:
                raise RuntimeError(f"cast_ext.nn.SparseLinear: mode='sparse' but {reason}")
            return "sparse", None
        layer = (str(x.device), x.dtype, n, k, self._bias() is not None)
        if torch.compiler.is_exporting() or (
            torch.compiler.is_compiling() and _DECIDED_LAYERS.get(layer) is None
        ):
            # One graph for every M (a bucket would specialise a dynamic batch dim: a graph per
            # power of two): dense (exported: derived in the graph from values/metadata, see
            # _current). Compiled after eager calls decided buckets of this layer's shape: a
            # graph per bucket, each taking its decision.
            return "dense", None
        m = x.numel() // k
        key = (*layer[:2], _bucket(m), *layer[2:])
        generation = _GENERATION[0]
        hit = _DECISIONS.get(key)
        if hit is not None:  # nothing below runs once a bucket is decided
            self._use(hit.choice)
            if not torch.compiler.is_compiling():
                with _LOCK:  # not a decision that a clear in another thread voided meanwhile
                    if _GENERATION[0] == generation == self._uses_generation:
                        if self._routes is None:
                            self._routes = {}
                        self._routes[(x.device, x.dtype, key[2], key[5])] = hit.choice
            return hit.choice, None
        trial = _TRIALS.get(key)
        if trial is None:
            paths = ["dense"]
            if _cslt_reason(n, k, x.dtype, x.device) is None:
                paths.append("sparse")
            # The CPU kernel takes any M; the CUDA one is the small-M kernel (kernels.h).
            if (m >= 1) if not cuda else (1 <= m <= _PACKED_MAX_M and k % 16 == 0):
                paths.append("packed")
            if len(paths) == 1:
                return "dense", None  # dense is the only path: nothing to decide or record
            trial = _Trial(tuple(paths))
        capturing = _capturing(x)
        if m == 0 or torch.compiler.is_compiling() or capturing:
            return "dense", None  # cannot measure here; nothing recorded: a later eager call will
        with _LOCK:  # another thread may have opened this bucket's trial meanwhile
            trial = _TRIALS.setdefault(key, trial)
            return trial.next_path(), key

    def _route(self, x: Tensor) -> str | None:
        """The path of a bucket this layer has taken since the decisions and its derived
        weights last changed (the per-call case), without the work of :meth:`_choose`; None
        otherwise (then ``_choose`` decides, and records the path here once decided). Eager
        calls of mode 'auto' only."""
        if torch.compiler.is_compiling():  # first: no guards on the eager bookkeeping below
            return None
        routes = self._routes
        if (
            not routes
            or self._derived_new  # a weight no decision may use: _use releases it
            or self._uses_generation != _GENERATION[0]
            or self.mode != "auto"
        ):
            return None
        m = x.numel() // self.in_features
        return routes.get((x.device, x.dtype, _bucket(m), self._bias() is not None))

    def _decide(self, key: tuple[Any, ...], trial: _Trial) -> None:
        us = trial.medians()  # reads CUDA events: outside the lock
        choice = _pick(us)
        decision = DispatchDecision(
            key[0], str(key[1]).removeprefix("torch."), key[2], key[3], key[4], key[5], choice,
            _round(us.get("sparse")), round(us["dense"], 2), _round(us.get("packed")),
        )  # fmt: skip
        with _LOCK:
            if trial.generation != _GENERATION[0]:
                return  # cleared while it was measured: the next call measures again
            _DECISIONS[key] = decision
            # the key less its bucket; a flag, not a count: a compiled graph's guard on it holds
            # while more buckets are decided
            _DECIDED_LAYERS[key[:2] + key[3:]] = True
        self._use(choice)

    def _run(self, path: str, x: Tensor) -> Tensor:
        if path == "dense":
            return F.linear(x, self._dense_cached(), self._bias())
        if path == "packed":
            return self._packed(x)
        bias, n, k = self._bias(), self.out_features, self.in_features
        if _unrecorded(x, bias):  # no autograd.Function around it
            return ops.cslt_linear(x, self._cslt_buffer(), n, k, bias)
        return _CsltLinearFn.apply(
            x, self._cslt_buffer(), self.values.detach(), self.metadata, self._backward_weight,
            bias, n, k,
        )  # fmt: skip

    def _meta_unchecked(self, x: Tensor) -> bool:
        """Whether a packed call on ``x`` must check ``metadata``: on CUDA once per weight (the
        check is a sync), until a checked call of the current buffers succeeded; on the CPU always
        (it is free)."""
        if not x.is_cuda:
            return True
        if torch.compiler.is_compiling():
            return self._meta_checked is None
        return self._meta_checked is None or not self._is_tagged(self._meta_checked)

    def _packed(self, x: Tensor) -> Tensor:
        check = self._meta_unchecked(x)
        b = self._buffers
        values, meta = b["values"], b["metadata"]
        assert values is not None and meta is not None
        bias = self._bias()
        if _unrecorded(x, bias):
            # Below autograd's kernel: with nothing to record, the op's Python autograd layer
            # cost 3.4 us of a 64 x 64 layer's 8.8 us call at M = 1 (CPU).
            ops._no_forward_ad("nn.SparseLinear", x, bias)
            with torch._C._AutoDispatchBelowADInplaceOrView():
                y = torch.ops.cast_ext.sparse24_gemm(x, values, meta, bias, check_meta=check)
        elif torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
            # The op's own backward would decompress the weight in every step. (values: a
            # frozen buffer, no gradient on any path.)
            y = _PackedLinearFn.apply(x, values.detach(), meta, bias, check, self)
        else:  # a gradient for the bias only, traced by torch.compile, or under torch.func
            ops._no_forward_ad("nn.SparseLinear", x, bias)
            y = torch.ops.cast_ext.sparse24_gemm(x, values.detach(), meta, bias, check_meta=check)
        self._meta_passed(x, check)
        return y

    def _meta_passed(self, x: Tensor, checked: bool) -> None:
        """After a packed call on ``x`` returned: if it checked the meta on CUDA, the current
        buffers need no further check (see :meth:`_meta_unchecked`). A call that asked for the
        check while the kernels skip it (value checks off, a CUDA graph captured) checked
        nothing: the next call asks again."""
        if (
            checked
            and x.is_cuda
            and not torch.compiler.is_compiling()
            and cuda_value_checks()
            and not _capturing(x)
        ):
            self._meta_checked = self._tag()

    def forward(self, x: Tensor) -> Tensor:
        values = self._buffers["values"]
        assert values is not None
        if values.dtype not in ops._FLOATS:  # e.g. after model.double()
            raise TypeError(
                f"cast_ext.nn.SparseLinear: the layer is {values.dtype}; expected float32, "
                "float16 or bfloat16 (convert it with .float(), .half() or .bfloat16())"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise RuntimeError(
                f"cast_ext.nn.SparseLinear: input of shape {list(x.shape)}: last dim must be "
                f"in_features = {self.in_features}"
            )
        device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
        autocast = device_type is not None and torch.is_autocast_enabled(device_type)
        if autocast and x.is_floating_point():
            # As nn.Linear under autocast: computed, and returned, in the autocast dtype.
            dt = torch.get_autocast_dtype(x.device.type)
            if values.dtype != dt:
                with torch.autocast(x.device.type, enabled=False):
                    b = None if self.bias is None else self.bias.to(dt)
                    if self.mode != "sparse":
                        # As nn.Linear does: the (cached) dense weight cast for the call; nothing
                        # measured the packed kernel in this dtype against it.
                        self._use("dense")
                        return F.linear(x.to(dt), self._dense_cached().to(dt), b)
                    check = self._meta_unchecked(x)  # forced: the packed kernel, values cast
                    v = values.detach().to(dt)
                    y = ops.sparse24_gemm(x.to(dt), v, self.metadata, b, check_meta=check)
                self._meta_passed(x, check)
                return y
            x = x.to(dt)
        if x.dtype != values.dtype:
            raise TypeError(
                f"cast_ext.nn.SparseLinear: input has dtype {x.dtype} but the layer is "
                f"{values.dtype}; cast one of them"
            )
        if x.device != values.device:
            raise RuntimeError(
                f"cast_ext.nn.SparseLinear: input is on {x.device} but the layer is on "
                f"{values.device}"
            )
        path = self._route(x)
        if path is not None:
            return self._run(path, x)
        path, trial_key = self._choose(x)
        trial = None if trial_key is None else _TRIALS.get(trial_key)
        if trial is None:  # decided (possibly by another thread since _choose)
            return self._run(path, x)
        # A trial call: the derived weight is built outside the timed call.
        sample: _Sample

        def run() -> Tensor:
            if path == "sparse":
                return _cslt_call(lambda: self._run(path, x))
            return self._run(path, x)

        try:
            if path == "dense":
                self._dense_cached()
            elif path == "sparse":
                _cslt_call(self._cslt_buffer)
            elif x.device.type == "cuda" and self._meta_unchecked(x):
                # This weight's meta check (a sync) on one row of x, outside the timed call.
                self._packed(x.reshape(-1, self.in_features)[:1])
            covered = True
            if x.device.type == "cuda":
                y, sample, covered = _timed_on_device(x.device, run)
            else:
                t0 = time.perf_counter()
                y = run()
                sample = (time.perf_counter() - t0) * 1e6
        except _CsltFailed as e:
            # cuSPARSELt refused this problem: the bucket goes on with the other paths. (An
            # error of the timing itself, or of another path, is raised as it is.)
            warnings.warn(
                f"cast_ext.nn.SparseLinear: cuSPARSELt failed for [{self.out_features}, "
                f"{self.in_features}] with {x.numel() // self.in_features} tokens of {x.dtype}; "
                f"this shape is measured without it: {e.__cause__}",
                stacklevel=2,
            )
            with _LOCK:
                trial.paths = tuple(q for q in trial.paths if q != "sparse")
                trial.samples.pop("sparse", None)
            self._derived.pop("cslt", None)
            return self.forward(x)  # not self(x): the module's hooks have run for this call
        with _LOCK:  # the thread whose sample completes the trial decides, once
            done = trial.add(path, sample, covered) and _TRIALS.pop(trial_key, None) is trial
            if not covered and trial.calls[path] > _TRIAL_WARMUP:  # (a warm-up call may search)
                _HOST_AHEAD[0] = min(2 * _HOST_AHEAD[0], _HOST_AHEAD_MAX)
        if done:
            self._decide(trial_key, trial)
        return y

    def _backward_weight(self) -> Tensor:
        """The dense weight for a backward (input grads: adapters trained on a frozen 2:4 base).

        On the CPU it is cached, as the dense path's, for the layer's life: decompressing it in
        every step cost more than the packed forward saved (a 2048 x 2048 fp32 layer at 4
        tokens: forward + backward 14.5 ms, against 3.7 ms dense). On CUDA it is rebuilt per
        backward (one memory-bound pass) unless the layer holds one anyway: a frozen 2:4 base
        that kept a dense copy too would need more memory than the dense model."""
        if self._buffers["values"].device.type == "cuda":  # type: ignore[union-attr]
            t = self._current("dense")
            return t if t is not None else self.dense_weight()
        self._use("backward")
        return self._dense_cached()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}"
        )


# ---- model swaps -----------------------------------------------------------------------------


def _class_named(module: nn.Module, name: str) -> type | None:
    """The class called ``name`` in ``module``'s MRO, if any: a library's class found without
    importing the library (a parametrized module's class is a generated subclass)."""
    return next((c for c in type(module).__mro__ if c.__name__ == name), None)


def _conv1d_class(module: nn.Module) -> type[nn.Module] | None:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` class if ``module`` is one."""
    cls = _class_named(module, "Conv1D")
    return cls if hasattr(module, "nf") and hasattr(module, "weight") else None


def _is_conv1d(module: nn.Module) -> bool:
    return _conv1d_class(module) is not None


def _param_holders(model: nn.Module) -> dict[int, dict[int, tuple[str, nn.Module]]]:
    """id of each Parameter of ``model`` -> the modules holding it: their id -> (qualified name
    of the Parameter under that module, the module). A tied weight has several holders."""
    holders: dict[int, dict[int, tuple[str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                key = f"{mname}.{pname}".lstrip(".")
                holders.setdefault(id(p), {}).setdefault(id(mod), (key, mod))
    return holders


def _excluded_weights(model: nn.Module) -> set[int]:
    """ids of weights that must stay dense: embeddings and the output head (tied or not). The
    head is ``get_output_embeddings()``; a Hugging Face model without one (a sequence or token
    classifier, question answering) has its task head outside ``base_model``: all of it."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_base = getattr(model, "get_base_model", None)  # a PEFT wrapper: the model it wraps
    if callable(get_base) and isinstance(inner := get_base(), nn.Module):
        model = inner
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and getattr(head, "weight", None) is not None:
        ids.add(id(head.weight))
    base = getattr(model, "base_model", None)
    if head is None and callable(get_out) and isinstance(base, nn.Module) and base is not model:
        inside = {id(p) for p in base.parameters()}
        ids.update(id(p) for p in model.parameters() if id(p) not in inside)
    return ids


def _adapter_modules(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of the modules of PEFT adapters (inside a PEFT tuner layer, a ``BaseTunerLayer``
    found by class name: peft is not imported), outside its ``base_layer`` (LoRA's
    ``lora_A``/``lora_B``: trained, not part of the frozen base), and ids of the base layers
    themselves (PEFT reads their ``.weight``: merges, DoRA)."""
    ids: set[int] = set()
    bases: set[int] = set()
    for mod in model.modules():
        if _class_named(mod, "BaseTunerLayer") is not None:
            base = mod._modules.get("base_layer")
            keep = {id(q) for q in base.modules()} if base is not None else set()
            ids.update(id(q) for q in mod.modules() if q is not mod and id(q) not in keep)
            if base is not None:
                bases.add(id(base))
    return ids, bases


# class -> {child name -> reads .<child>.weight}; weak: parametrize and torch.fx make classes
# at run time, which a plain dict would keep alive
_READS_WEIGHT: weakref.WeakKeyDictionary[type, dict[str, bool]] = weakref.WeakKeyDictionary()


def _reads_child_weight(cls: type, child: str) -> bool:
    """Whether the source of ``cls`` (or of a base class below ``nn.Module``) reads
    ``.<child>.weight``: T5's MLP reads ``self.wo.weight.dtype``, ``nn.MultiheadAttention``
    hands ``self.out_proj.weight`` to its functional form; a :class:`SparseLinear` there has no
    ``weight``. Classes without source (built-ins, made at run time) are taken as not reading."""
    known = _READS_WEIGHT.setdefault(cls, {})
    if child not in known:
        pattern = re.compile(rf"\.{re.escape(child)}\.weight\b")
        found = False
        for c in cls.__mro__:
            if c is nn.Module or c is object:
                break
            try:
                source = inspect.getsource(c)
            except (OSError, TypeError):
                continue
            if pattern.search(source):
                found = True
                break
        known[child] = found
    return known[child]


def _weight_readers(model: nn.Module) -> dict[int, str]:
    """id of each submodule whose owner's code reads its ``.weight`` -> ``"Owner reads
    .child.weight"`` (see :func:`_reads_child_weight`)."""
    readers: dict[int, str] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None and _reads_child_weight(type(parent), child_name):
                readers.setdefault(id(child), f"{type(parent).__name__} reads .{child_name}.weight")
    return readers


def _swap(
    model: nn.Module,
    pick: Callable[[str, nn.Module], nn.Module | None],
    check: Callable[[set[int]], None] | None = None,
) -> nn.Module:
    """Replaces each submodule ``m`` for which ``pick(first qualified name, m)`` gives a new one,
    in every slot that holds it: a module used twice (by one parent or two) gets one replacement,
    shared like the original (named_children lists a module once per parent, which converted
    the first slot alone; a module per slot would have untied them). Every replacement is built,
    and ``check(ids of the modules replaced)`` called, before the first is put in place, so a
    ``pick`` or ``check`` that raises leaves ``model`` unchanged.
    Returns ``model``, or the root's replacement where ``pick`` replaces the root itself."""
    # id -> (the module, kept alive so that its id is not reused, and its replacement)
    seen: dict[int, tuple[nn.Module, nn.Module | None]] = {}
    root = pick("", model)
    if root is not None:
        return root
    slots: list[tuple[nn.Module, str, nn.Module]] = []
    for name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in seen:
                full = f"{name}.{child_name}" if name else child_name
                seen[id(child)] = (child, pick(full, child))
            replacement = seen[id(child)][1]
            if replacement is not None:
                slots.append((parent, child_name, replacement))
    if check is not None:
        check({i for i, (_, new) in seen.items() if new is not None})
    for parent, child_name, replacement in slots:
        setattr(parent, child_name, replacement)
    return model


def to_sparse(
    model: nn.Module,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    *,
    mode: Mode = "auto",
    experts: bool = False,
) -> nn.Module:
    """Replace every eligible linear layer of ``model`` (in place) by a :class:`SparseLinear`.

    Eligible: ``nn.Linear`` layers and Hugging Face GPT-2 ``Conv1D`` ones with an input dim
    divisible by 4; by default not the output head (a classifier's whole task head, outside
    ``base_model``) or a weight shared with an embedding (the layers
    :func:`cast_ext.cast.prepare` leaves dense: a 2:4 head would change the logits, and a tied
    one would come untied), and, with a warning naming them, not the layers a
    :class:`SparseLinear` (no ``.weight``; ``x W^T + b``) may not stand in for: a subclass of
    ``nn.Linear`` (an adapter's own forward would be lost) and a layer whose owner's code reads
    its ``.weight`` (T5's ``wo``, ``nn.MultiheadAttention``'s ``out_proj``,
    ``nn.TransformerEncoderLayer``'s ``linear1``: found in the owner's source), and the
    layers of a PEFT adapter (LoRA's ``lora_A``/``lora_B``, and its ``base_layer``, whose
    ``.weight`` PEFT reads to merge and for DoRA). An uninitialized lazy layer is left alone
    (chosen by ``filter_fn``: an error). With
    ``filter_fn``, the layers for which ``filter_fn(qualified_name, module)`` is true instead
    (a chosen layer whose input dim is not a multiple of 4 is an error, as in
    ``cast.prepare``; a chosen one of the kinds above is converted, with a warning).
    Weights that are not already 2:4 are pruned by magnitude, with one warning listing how many
    layers were.

    MoE experts (transformers 5's experts modules: 3-D stacks) stay dense unless ``experts``
    is True (a warning says how many there are): then each becomes a :class:`SparseExperts`
    where every stack's input dim is a multiple of 4, and ``filter_fn`` (if given) sees the
    experts module, not its stacks. Its experts run one by one (no grouped 2:4 GEMM), each call
    dispatched on its own, so the 2:4 experts take 56% of the memory but are not measured
    against transformers' grouped forward: time them (``benchmarks/bench_experts.py``). An
    experts module whose forward :class:`SparseExperts` does not know (no ``has_gate``,
    ``has_bias``, ...; other stacks than ``gate_up_proj``/``up_proj`` and ``down_proj``) stays
    dense with a warning, and is refused when ``filter_fn`` chooses it.

    Args:
        model: the model to convert.
        filter_fn: optional predicate on (qualified name, layer), replacing the default rule.
        mode: the :class:`SparseLinear` mode of every new layer.
        experts: also convert MoE experts modules (see above).

    Linears that share one weight (``b.weight = a.weight``) get layers that share one
    ``values``/``metadata`` pair (and a shared bias stays one Parameter), and :func:`to_dense`
    ties them again. A layer that cannot be
    converted (e.g. a float64 weight) raises an error naming it, before anything is replaced;
    so does one whose weight or bias a module that stays is tied to (an embedding, a layer
    the rule or ``filter_fn`` leaves out): converting it would silently untie the two.

    Returns:
        ``model`` itself (converted in place), or its replacement if ``model`` is an eligible
        linear layer itself.
    """
    from .cast import _expert_stacks, sparse_layers  # here: cast_ext.cast imports this module

    scaled = [layer.name or "(the model)" for layer in sparse_layers(model)]
    if scaled:
        raise ValueError(
            f"cast_ext.nn.to_sparse: {len(scaled)} layer(s) ({', '.join(map(repr, scaled[:3]))}"
            f"{', ...' if len(scaled) > 3 else ''}) carry CAST's weight scaling (cast.prepare): "
            "call cast.finalize(model, optimizer) first, which prunes them with the optimizer's "
            "masks and folds the scales in (nothing was replaced)"
        )
    pruned: list[str] = []
    excluded = _excluded_weights(model) if filter_fn is None else set()
    readers = _weight_readers(model)
    adapters, adapted = _adapter_modules(model)
    left_dense: list[str] = []  # by the default rule: a subclass, or its owner reads .weight
    experts_dense: list[str] = []  # experts modules whose forward SparseExperts does not know
    experts_kept: list[str] = []  # experts modules left dense because experts=False
    risky: list[str] = []  # chosen by filter_fn all the same
    by_weight: dict[int, tuple[Tensor, SparseLinear]] = {}  # weight id -> (weight, its layer)
    chosen: dict[int, tuple[str, dict[str, Tensor]]] = {}  # id of a layer converted -> name, params
    by_bias: dict[int, tuple[Tensor, SparseLinear]] = {}  # bias id -> (bias, its layer)

    def pick_experts(
        name: str, m: nn.Module, stacks: list[tuple[str, int, int, int]]
    ) -> nn.Module | None:
        if filter_fn is not None and not filter_fn(name, m):
            return None
        why = _experts_refusal(m, stacks)
        short = [f"{p} (input dim {in_f})" for p, _, _, in_f in stacks if in_f % 4]
        if why is None and short:
            why = f"2:4 sparsity needs input dims that are multiples of 4: {short}"
        if why is not None:
            if filter_fn is not None:
                raise ValueError(
                    f"cast_ext.nn.to_sparse: experts module {name or '(the model)'!r} cannot be "
                    f"converted: {why} (nothing was replaced)"
                )
            if not short:
                experts_dense.append(f"{name} ({why})")
            return None
        try:
            new, stacks_pruned = _sparse_experts(m, stacks, mode)
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(
                f"cast_ext.nn.to_sparse: experts module {name or '(the model)'!r}: {e}"
            ) from e
        pruned.extend(f"{name}.{p}" if name else p for p in stacks_pruned)
        chosen[id(m)] = (name, {p: m._parameters[p] for p, *_ in stacks})  # type: ignore[misc]
        return new

    def pick(name: str, m: nn.Module) -> nn.Module | None:
        stacks = [] if isinstance(m, SparseExperts) else _expert_stacks(m)
        if stacks and not experts:
            experts_kept.append(name)
            return None
        if stacks:
            return pick_experts(name, m, stacks)
        conv1d = _is_conv1d(m)
        if not isinstance(m, nn.Linear) and not conv1d:
            return None
        if nn.parameter.is_lazy(m.weight):  # no shape yet (an uninitialized LazyLinear)
            if filter_fn is not None and filter_fn(name, m):
                raise ValueError(
                    f"cast_ext.nn.to_sparse: layer {name or '(the model)'!r} is uninitialized "
                    "(a lazy module): run a forward pass first (nothing was replaced)"
                )
            return None
        in_features = m.weight.shape[0 if conv1d else 1]  # Conv1D stores [in, out]
        # A subclass's own forward is not kept (an adapter's would be lost); code of the owner
        # that reads the layer's .weight finds none.
        why = []
        if not conv1d and type(m) is not nn.Linear:
            why.append(f"a {type(m).__name__}, whose own forward is not kept")
        if id(m) in readers:
            why.append(readers[id(m)])
        if id(m) in adapters:
            why.append("a PEFT adapter's layer, trained, not part of the frozen base")
        if id(m) in adapted:
            why.append("the base layer of a PEFT adapter, which reads its .weight (merges, DoRA)")
        if filter_fn is not None:
            if not filter_fn(name, m):
                return None
            if in_features % 4 != 0:  # chosen by name: refused, as cast.prepare does
                raise ValueError(
                    f"cast_ext.nn.to_sparse: layer {name or '(the model)'!r} has input dim "
                    f"{in_features} (weight {list(m.weight.shape)}); 2:4 sparsity needs a "
                    "multiple of 4 (nothing was replaced)"
                )
            if why:
                risky.append(f"{name} ({'; '.join(why)})")
        elif in_features % 4 != 0 or id(m.weight) in excluded:
            return None
        elif why:
            left_dense.append(f"{name} ({'; '.join(why)})")
            return None
        try:
            layer, dense_groups = SparseLinear._build(m, mode)
        except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: NaN/Inf weights
            raise type(e)(f"cast_ext.nn.to_sparse: layer {name or '(the model)'!r}: {e}") from e
        shared = by_weight.get(id(m.weight))
        if shared is not None:  # one weight, one pair of buffers (built by the first layer)
            layer._buffers["values"] = shared[1].values
            layer._buffers["metadata"] = shared[1].metadata
        else:
            by_weight[id(m.weight)] = (m.weight, layer)
            if dense_groups:
                pruned.append(name)
        if m.bias is not None:  # a shared bias stays one Parameter
            shared_bias = by_bias.setdefault(id(m.bias), (m.bias, layer))[1]
            layer.bias = shared_bias.bias
        chosen[id(m)] = (name, {"weight": m.weight, "bias": m.bias})
        return layer

    def keep_ties(replaced: set[int]) -> None:
        holders = _param_holders(model)
        for name, tensors in chosen.values():
            for what, t in tensors.items():
                # .get: a weight that is not a Parameter (torch.nn.utils.prune's) has no holder
                held = holders.get(id(t), {})
                staying = [k for i, (k, _) in held.items() if i not in replaced]
                if staying:
                    raise ValueError(
                        f"cast_ext.nn.to_sparse: layer {name!r}: its {what} is tied to "
                        f"{', '.join(staying)}, which stays as it is: converting the layer "
                        f"would untie them; untie the {what} or leave the layer out with "
                        "filter_fn (nothing was changed)"
                    )

    model = _swap(model, pick, keep_ties)
    if left_dense:
        warnings.warn(
            f"cast_ext.nn.to_sparse: {len(left_dense)} linear layer(s) stay dense (a "
            f"SparseLinear has no .weight and computes x W^T + b): {left_dense[:3]}; choose "
            "them with filter_fn where that is safe",
            stacklevel=2,
        )
    if experts_kept:
        warnings.warn(
            f"cast_ext.nn.to_sparse: {len(experts_kept)} MoE experts module(s) stay dense "
            f"({experts_kept[:3]}): pass experts=True to run their 2:4 weights as SparseExperts "
            "(56% of the memory; its experts run one by one, not in one grouped GEMM)",
            stacklevel=2,
        )
    if experts_dense:
        warnings.warn(
            f"cast_ext.nn.to_sparse: {len(experts_dense)} MoE experts module(s) stay dense: "
            f"{experts_dense[:3]}",
            stacklevel=2,
        )
    if risky:
        warnings.warn(
            f"cast_ext.nn.to_sparse: filter_fn chose {len(risky)} layer(s) that a SparseLinear "
            f"(no .weight; x W^T + b) may not stand in for: {risky[:3]}",
            stacklevel=2,
        )
    if pruned:
        warnings.warn(
            f"cast_ext.nn.to_sparse: {len(pruned)} layer(s) were not 2:4 sparse and were pruned to "
            f"2:4 by magnitude (first: {pruned[:3]})",
            stacklevel=2,
        )
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every :class:`SparseLinear` of ``model`` (in place) by an equal ``nn.Linear``
    (one made from a GPT-2 ``Conv1D`` comes back as a ``Conv1D``, its weight ``[in, out]``
    again, so that ``save_pretrained`` writes a checkpoint ``transformers`` loads), and every
    :class:`SparseExperts` by its experts class with 3-D stacks (the 2:4 weights, in the layout
    and parameter order it had).
    Layers that share their ``values`` buffer share one weight Parameter again (and a shared
    bias stays one Parameter). Returns
    ``model``, or its replacement if ``model`` is a :class:`SparseLinear` itself."""
    by_values: dict[int, tuple[Tensor, nn.Module]] = {}  # values id -> (values, its Linear)
    by_bias: dict[int, tuple[Tensor, nn.Module]] = {}  # bias id -> (bias, its Linear)

    def pick(_: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, SparseExperts):
            return _dense_experts(m)
        if not isinstance(m, SparseLinear):
            return None
        shared = by_values.get(id(m.values))
        lin: nn.Module = m.to_dense()
        if m._conv1d_cls is not None:
            lin = _as_conv1d(m._conv1d_cls, lin)  # type: ignore[arg-type]
        if shared is not None:
            lin.weight = shared[1].weight
        else:
            by_values[id(m.values)] = (m.values, lin)
        if m.bias is not None:
            lin.bias = by_bias.setdefault(id(m.bias), (m.bias, lin))[1].bias
        return lin

    return _swap(model, pick)


def _as_conv1d(cls: type[nn.Module], lin: nn.Linear) -> nn.Module:
    """A Hugging Face ``Conv1D`` of class ``cls`` computing what ``lin`` does (its weight
    ``[in, out]``): built on the meta device, then given ``lin``'s tensors."""
    with torch.device("meta"):
        conv = cls(lin.out_features, lin.in_features)  # Conv1D(nf=out, nx=in)
    weight = lin.weight.detach().t().contiguous()
    conv.weight = nn.Parameter(weight, requires_grad=lin.weight.requires_grad)
    conv.bias = lin.bias
    conv.train(lin.training)
    return conv


# ---- MoE experts -----------------------------------------------------------------------------

# What transformers 5's use_experts_implementation decorator gives an experts module; the forward
# below follows them as transformers' own experts forwards do. has_post_expert_norm came later
# (transformers 5.17, the GPU machine's, has none: no norm there); where set it must be a bool.
_EXPERTS_FLAGS = ("is_transposed", "has_gate", "has_bias")
_EXPERTS_LATER_FLAGS = ("has_post_expert_norm",)
_SPARSE_EXPERTS_CLASSES: dict[type, type] = {}


class SparseExperts(nn.Module):
    """A transformers 5 MoE experts module whose stacked expert weights run as 2:4
    :class:`SparseLinear` layers, one per expert and projection.

    :func:`to_sparse` makes one from an experts module (Mixtral, Qwen3-MoE, gpt-oss, ...: one
    3-D Parameter per projection, ``gate_up_proj`` or ``up_proj``, and ``down_proj``, in the
    layout its ``is_transposed`` says). The module keeps its class (this one is mixed in before
    it), its attributes, its biases and its activation or gate; each stack becomes an
    ``nn.ModuleList`` of :class:`SparseLinear` under the stack's name, so the state dict holds
    ``<stack>.<expert>.values`` / ``.metadata``. :func:`to_dense` gives back the original class
    with the 3-D Parameters (the 2:4 weights).

    The forward groups the ``[tokens, k]`` routed (token, expert) pairs by expert (one read-back
    of the per-expert counts), runs each expert that got tokens through its layers (each layer's
    dispatch picks the 2:4 or the dense kernel for that token count, shared by the experts of
    one shape) and the biases, gate or activation and norm once over all routed rows, applies
    the routing weights and sums a token's ``k`` outputs, as transformers' grouped forward
    does. Experts with no tokens launch nothing. Expert ids at or past the number of experts
    (expert parallel's sentinels) contribute zero. Each expert hit costs two GEMM calls: there
    is no grouped 2:4 GEMM. The read-back of the counts is data-dependent: ``torch.compile``
    breaks its graph there, and ``torch.export`` cannot trace the module (export the dense
    experts instead: :func:`to_dense`).
    """

    _dense_cls: type[nn.Module]
    _signature: inspect.Signature
    _param_order: tuple[str, ...]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # The class is made per experts class: pickles name that class instead.
        return (_new_sparse_experts, (self._dense_cls,), self.__getstate__())

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if len(args) == 3 and not kwargs:  # as transformers' MoE blocks call it
            hidden, index, weights = args
        else:
            bound = self._signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            hidden, index, weights = list(bound.arguments.values())[1:4]
        if not (isinstance(hidden, Tensor) and hidden.dim() == 2):
            raise RuntimeError(
                f"cast_ext.nn.SparseExperts: hidden_states must be [tokens, hidden], got "
                f"{list(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}"
            )
        if not (
            isinstance(index, Tensor)
            and isinstance(weights, Tensor)
            and index.dim() == 2
            and index.shape == weights.shape
            and index.shape[0] == hidden.shape[0]
            and not index.is_floating_point()
        ):
            raise RuntimeError(
                "cast_ext.nn.SparseExperts: the routing must be integer expert ids and weights, "
                f"both [tokens, k] with tokens = {hidden.shape[0]}; got "
                f"{[list(t.shape) if isinstance(t, Tensor) else t for t in (index, weights)]}"
            )
        up_name, down_name = _stack_names(self)
        up, down = self._modules[up_name], self._modules[down_name]
        assert isinstance(up, nn.ModuleList) and isinstance(down, nn.ModuleList)
        tokens, k = index.shape
        experts = len(up)
        ids = index.reshape(-1)
        order = torch.argsort(ids, stable=True)  # by expert; sentinels (>= experts) last
        counts = torch.bincount(ids, minlength=experts)[:experts].tolist()
        # (expert, first row, end row) of each expert that got tokens, in the sorted order
        hits = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                hits.append((e, start, start + count))
                start += count
        if not hits:
            return hidden.new_zeros(hidden.shape)
        routed = order[:start]
        x = hidden[routed // k].to(_values_dtype(up))  # as grouped_mm: in the weights' dtype
        # The GEMMs per expert; the rest once over all routed rows, as the grouped forward does
        h = torch.cat([up[e](x[a:b]) for e, a, b in hits])
        if self.has_bias:
            expert_of_row = ids[routed]
            h = h + getattr(self, f"{up_name}_bias")[expert_of_row]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = torch.cat([down[e](h[a:b]) for e, a, b in hits])
        if self.has_bias:
            y = y + self.down_proj_bias[expert_of_row]
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        y = y * weights.reshape(-1)[routed].unsqueeze(-1)
        out = y.new_zeros(tokens * k, y.shape[-1]).index_copy(0, routed, y)
        return out.view(tokens, k, y.shape[-1]).sum(1).to(hidden.dtype)


def _stack_names(module: nn.Module) -> tuple[str, str]:
    """The up and down stacks of a transformers experts module, by its ``has_gate``."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def _values_dtype(layers: nn.ModuleList) -> torch.dtype:
    """The dtype of the first :class:`SparseLinear` in ``layers`` (one an adapter wraps too)."""
    first = layers[0]
    if not isinstance(first, SparseLinear):
        first = next(m for m in first.modules() if isinstance(m, SparseLinear))
    return first._buffers["values"].dtype  # type: ignore[union-attr]


def _sparse_experts_class(dense_cls: type[nn.Module]) -> type[SparseExperts]:
    """The class of a :class:`SparseExperts` made from a ``dense_cls`` module (one per class)."""
    cls = _SPARSE_EXPERTS_CLASSES.get(dense_cls)
    if cls is None:
        attrs = {
            "_dense_cls": dense_cls,
            # transformers' decorator wraps the forward (functools.wraps): the model's own
            # parameter names, which callers may pass by keyword
            "_signature": inspect.signature(dense_cls.forward),
            "__module__": __name__,
        }
        made = type(f"Sparse{dense_cls.__name__}", (SparseExperts, dense_cls), attrs)
        with _LOCK:
            cls = _SPARSE_EXPERTS_CLASSES.setdefault(dense_cls, made)
    return cls  # type: ignore[return-value]


def _new_sparse_experts(dense_cls: type[nn.Module]) -> SparseExperts:
    """An empty :class:`SparseExperts` of ``dense_cls`` for pickle and deepcopy to fill."""
    cls = _sparse_experts_class(dense_cls)
    return cls.__new__(cls)


def _clone_as(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of class ``cls`` holding what ``module`` holds, in containers of its own (its
    parameters, submodules, buffers, hooks), so that changing them leaves ``module`` as it is."""
    new = cls.__new__(cls)
    new.__dict__.update(
        {k: v.copy() if isinstance(v, (dict, set, list)) else v for k, v in module.__dict__.items()}
    )
    return new


def _experts_refusal(module: nn.Module, stacks: list[tuple[str, int, int, int]]) -> str | None:
    """Why :class:`SparseExperts` cannot run the experts module ``module`` (None if it can)."""
    missing = [f for f in _EXPERTS_FLAGS if not isinstance(getattr(module, f, None), bool)]
    missing += [f for f in _EXPERTS_LATER_FLAGS if not isinstance(getattr(module, f, False), bool)]
    if missing:
        return (
            f"it lacks {missing} (set by transformers' use_experts_implementation): its forward "
            "is not known"
        )
    names = sorted(name for name, *_ in stacks)
    if names != sorted(_stack_names(module)):
        return f"its stacks are {names}, not {' and '.join(_stack_names(module))}"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "a stack has a parametrization"
    return None


def _sparse_experts(
    module: nn.Module, stacks: list[tuple[str, int, int, int]], mode: Mode
) -> tuple[SparseExperts, list[str]]:
    """A :class:`SparseExperts` made from ``module`` (left unchanged), and the stacks whose
    weights had to be pruned to 2:4."""
    new = _clone_as(module, _sparse_experts_class(type(module)))
    assert isinstance(new, SparseExperts)
    new._param_order = tuple(module._parameters)
    pruned = []
    for name, *_ in stacks:
        p = new._parameters.pop(name)
        assert p is not None
        w = p.detach()
        if module.is_transposed:
            w = w.transpose(1, 2)  # [experts, out, in]: 2:4 along each expert's input dim
        layers = nn.ModuleList()
        dense_groups = 0
        for e in range(w.shape[0]):
            layer, groups = SparseLinear._from_weight(w[e].contiguous(), None, mode)
            layer._weight_requires_grad = p.requires_grad
            layers.append(layer)
            dense_groups += groups
        new._modules[name] = layers.train(module.training)
        if dense_groups:
            pruned.append(name)
    return new, pruned


def _dense_experts(module: SparseExperts) -> nn.Module:
    """The experts module of :class:`SparseExperts` ``module``'s original class, each stack a 3-D
    Parameter again (the 2:4 weights), in the layout and parameter order it had."""
    new = _clone_as(module, module._dense_cls)
    stacks = {}
    for name in _stack_names(module):
        layers = new._modules.pop(name)
        assert isinstance(layers, nn.ModuleList)
        w = torch.stack([layer.dense_weight() for layer in layers])
        if module.is_transposed:
            w = w.transpose(1, 2).contiguous()
        stacks[name] = nn.Parameter(w, requires_grad=layers[0]._weight_requires_grad)
    params = {**new._parameters, **stacks}
    new._parameters.clear()
    new._parameters.update((name, params[name]) for name in module._param_order)
    del new.__dict__["_param_order"]
    return new


# ---- cuSPARSELt plan cache and algorithm table -----------------------------------------------


def cslt_cache_info() -> dict[str, Any]:
    """cuSPARSELt plan-cache statistics: plans, hits, misses, searches, ``rejected`` (searched
    algorithms that disagreed with the default one on a probe input and were not kept),
    ``search_failures``, and one entry per plan.

    Returns ``{"available": False}`` in builds without cuSPARSELt.
    """
    if not hasattr(_C, "cslt_cache_info"):
        return {"available": False}
    return {"available": True, **dict(_C.cslt_cache_info())}


def _algs_file(path: str | os.PathLike[str] | None) -> Path:
    if path is not None:
        return Path(path)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "cast_ext" / "cusparselt_algs.json"


def _algs_section() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    return f"{gpu} | cuSPARSELt {_C.cslt_runtime_version()}"


def save_cslt_algs(path: str | os.PathLike[str] | None = None) -> Path:
    """Persist the searched cuSPARSELt algorithms, keyed by GPU name and cuSPARSELt version.

    Args:
        path: JSON file; default ``~/.cache/cast_ext/cusparselt_algs.json``.

    Returns:
        The file written (other GPUs'/versions' sections in it are kept).
    """
    if not hasattr(_C, "cslt_get_algs"):
        raise RuntimeError("cast_ext.nn.save_cslt_algs: built without cuSPARSELt")
    file = _algs_file(path)
    data = json.loads(file.read_text()) if file.exists() else {}
    section = data.setdefault(_algs_section(), {})
    section.update({k: list(v) for k, v in dict(_C.cslt_get_algs()).items()})
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=1, sort_keys=True))
    return file


def load_cslt_algs(path: str | os.PathLike[str] | None = None) -> int:
    """Load algorithms saved by :func:`save_cslt_algs` for this GPU and cuSPARSELt version.

    Later plans of those shapes skip the search. Returns how many entries were loaded (0 if the
    file or this GPU's section is missing).
    """
    if not hasattr(_C, "cslt_set_algs"):
        raise RuntimeError("cast_ext.nn.load_cslt_algs: built without cuSPARSELt")
    file = _algs_file(path)
    if not file.exists():
        return 0
    section = json.loads(file.read_text()).get(_algs_section(), {})
    _C.cslt_set_algs({k: tuple(int(x) for x in v) for k, v in section.items()})
    return len(section)
