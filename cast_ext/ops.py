"""Typed wrappers over ``torch.ops.cast_ext.*`` and their fake (meta) kernels.

The fakes give every op shape and dtype propagation without data, which is what
``torch.library.opcheck``, ``torch.compile`` (no graph breaks) and meta-device tracing use. The
semantics of each op are those of the function of the same name in :mod:`cast_ext.reference`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "adams_step_",
    "cslt_compress",
    "cslt_linear",
    "distill_bwd",
    "distill_fwd",
    "mask_flips",
    "nm_mask",
    "pack_mask",
    "scaled_linear",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_gemm",
    "sparse24_mask",
    "sparse24_prune",
    "unpack_mask",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _no_forward_ad(op: str, *tensors: Tensor | None) -> None:
    """Refuse forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``): torch hands
    a custom op a dual input and drops its tangent, a derivative of 0 without an error (the
    ops' autograd is reverse mode only). One attribute read outside forward-mode AD."""
    if fwAD._current_level < 0:
        return
    for t in tensors:
        if t is not None and fwAD.unpack_dual(t).tangent is not None:
            raise RuntimeError(
                f"cast_ext.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
                "is not supported: the op has a reverse-mode derivative only, and torch would "
                "give a tangent of 0; use .backward() or torch.autograd.grad"
            )


def _check_weight(op: str, w: Tensor, m: int) -> None:
    torch._check(w.dim() >= 1, lambda: f"cast_ext.{op}: w must have at least one dim")
    torch._check(
        w.dtype in _FLOATS,
        lambda: f"cast_ext.{op}: w has dtype {w.dtype}; expected float32, float16 or bfloat16",
    )
    torch._check(
        w.shape[-1] % m == 0,
        lambda: f"cast_ext.{op}: w of shape {list(w.shape)}: last dim must be a multiple of {m}",
    )


def _packed_shape(shape: torch.Size | list[int], k: int) -> list[int]:
    return [*shape[:-1], (k + 7) // 8]


def _same_device(op: str, ref: tuple[str, Tensor], *others: tuple[str, Tensor | None]) -> None:
    """The kernels' device rule in the fakes: the dispatcher sends inputs on the meta device
    mixed with real ones to the fake, which would return an uninitialised real tensor."""
    ref_name, r = ref
    for name, t in others:
        if t is not None and t.device != r.device:
            raise RuntimeError(
                f"cast_ext.{op}: {name} is on {t.device} but {ref_name} is on {r.device}"
            )


def _check_packed(op: str, name: str, packed: Tensor) -> None:
    torch._check(
        packed.dim() >= 1 and packed.dtype == torch.uint8,
        lambda: (
            f"cast_ext.{op}: {name} of shape {list(packed.shape)} and dtype {packed.dtype} must "
            "be a uint8 packed mask with at least one dim"
        ),
    )


def _check_values(op: str, values: Tensor) -> None:
    torch._check(
        values.dim() >= 1 and values.dtype in _FLOATS and values.shape[-1] % 2 == 0,
        lambda: (
            f"cast_ext.{op}: values of shape {list(values.shape)} and dtype {values.dtype}: "
            "need float32, float16 or bfloat16 with an even last dim (2 kept of every 4)"
        ),
    )


@torch.library.register_fake("cast_ext::sparse24_mask")
def _(w: Tensor) -> Tensor:
    _check_weight("sparse24_mask", w, 4)
    return torch.empty_like(w, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("cast_ext::nm_mask")
def _(w: Tensor, n: int, m: int) -> Tensor:
    torch._check(m in (4, 8), lambda: f"cast_ext.nm_mask: m must be 4 or 8, got {m}")
    torch._check(0 < n <= m, lambda: f"cast_ext.nm_mask: need 0 < n <= m, got n={n}, m={m}")
    _check_weight("nm_mask", w, m)
    return torch.empty_like(w, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("cast_ext::sparse24_prune")
def _(w: Tensor) -> Tensor:
    _check_weight("sparse24_prune", w, 4)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("cast_ext::sparse24_compress")
def _(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_weight("sparse24_compress", w, 4)
    k = w.shape[-1]
    values = w.new_empty([*w.shape[:-1], k // 2])
    meta = w.new_empty(_packed_shape(w.shape, k), dtype=torch.uint8)
    return values, meta


@torch.library.register_fake("cast_ext::sparse24_decompress")
def _(values: Tensor, meta: Tensor) -> Tensor:
    _check_values("sparse24_decompress", values)
    _check_packed("sparse24_decompress", "meta", meta)
    _same_device("sparse24_decompress", ("values", values), ("meta", meta))
    k = values.shape[-1] * 2
    torch._check(
        list(meta.shape) == _packed_shape(values.shape, k),
        lambda: (
            f"cast_ext.sparse24_decompress: meta of shape {list(meta.shape)} does not match "
            f"values of shape {list(values.shape)}"
        ),
    )
    return values.new_empty([*values.shape[:-1], k])


@torch.library.register_fake("cast_ext::pack_mask")
def _(mask: Tensor) -> Tensor:
    if mask.dim() < 1:
        raise RuntimeError("cast_ext.pack_mask: mask must have at least one dim, got a 0-d tensor")
    torch._check(mask.dtype == torch.bool, lambda: "cast_ext.pack_mask: mask must be bool")
    return mask.new_empty(_packed_shape(mask.shape, mask.shape[-1]), dtype=torch.uint8)


@torch.library.register_fake("cast_ext::unpack_mask")
def _(packed: Tensor, last_dim: int) -> Tensor:
    _check_packed("unpack_mask", "packed", packed)
    torch._check(
        packed.shape[-1] == (last_dim + 7) // 8,
        lambda: (
            f"cast_ext.unpack_mask: packed of shape {list(packed.shape)} cannot hold "
            f"{last_dim} elements per row"
        ),
    )
    return packed.new_empty([*packed.shape[:-1], last_dim], dtype=torch.bool)


@torch.library.register_fake("cast_ext::mask_flips")
def _(a: Tensor, b: Tensor, m: int = 4) -> Tensor:
    torch._check(m in (4, 8), lambda: f"cast_ext.mask_flips: m must be 4 or 8, got {m}")
    _check_packed("mask_flips", "a", a)
    _check_packed("mask_flips", "b", b)
    _same_device("mask_flips", ("a", a), ("b", b))
    torch._check(a.shape == b.shape, lambda: "cast_ext.mask_flips: a and b differ in shape")
    return a.new_empty((), dtype=torch.int64)


def sparse24_mask(w: Tensor) -> Tensor:
    """2:4 mask: True for the 2 largest ``|w|`` of every 4 along the last dim (ties: lower index).

    Args:
        w: float32/float16/bfloat16, last dim a multiple of 4, finite.

    Returns:
        bool tensor of ``w``'s shape.

    Shape:
        ``[..., k]`` -> ``[..., k]``.
    """
    return torch.ops.cast_ext.sparse24_mask(w)


def nm_mask(w: Tensor, n: int, m: int) -> Tensor:
    """N:M mask (``m`` in {4, 8}, ``0 < n <= m``); see :func:`sparse24_mask`."""
    return torch.ops.cast_ext.nm_mask(w, n, m)


def sparse24_prune(w: Tensor) -> Tensor:
    """``w * sparse24_mask(w)`` in one pass, without materialising the mask."""
    _no_forward_ad("sparse24_prune", w)
    return torch.ops.cast_ext.sparse24_prune(w)


def sparse24_compress(w: Tensor) -> tuple[Tensor, Tensor]:
    """Compress ``w`` to the packed 2:4 format.

    Returns:
        ``(values, meta)``: the 2 kept values of each group in ascending position, and the
        packed mask (4 bits per group; see :func:`pack_mask`).

    Shape:
        ``[..., k]`` -> ``([..., k/2], [..., ceil(k/8)])``.
    """
    _no_forward_ad("sparse24_compress", w)
    values, meta = torch.ops.cast_ext.sparse24_compress(w)
    return values, meta


def sparse24_decompress(values: Tensor, meta: Tensor) -> Tensor:
    """Inverse of :func:`sparse24_compress` (zeros at the pruned positions)."""
    _no_forward_ad("sparse24_decompress", values)
    return torch.ops.cast_ext.sparse24_decompress(values, meta)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask to 1 bit per element: ``[..., k]`` -> ``[..., ceil(k/8)]`` uint8.

    Bit ``j`` of byte ``b`` of a row is element ``8 * b + j``; rows are padded to a whole byte.
    A 2:4 group is one nibble, so this is also the metadata of :func:`sparse24_compress`.
    """
    return torch.ops.cast_ext.pack_mask(mask)


def unpack_mask(packed: Tensor, last_dim: int) -> Tensor:
    """Inverse of :func:`pack_mask`; ``last_dim`` is the unpacked row length ``k``."""
    return torch.ops.cast_ext.unpack_mask(packed, last_dim)


def mask_flips(a: Tensor, b: Tensor, m: int = 4) -> Tensor:
    """How many groups of ``m`` changed between two packed masks (0-d int64 tensor)."""
    return torch.ops.cast_ext.mask_flips(a, b, m)


# ---- gradients of the value-carrying mask ops ---------------------------------------------
# Each is linear in its float input once the mask is fixed (the mask is piecewise constant in
# w: its derivative is 0 almost everywhere), so each backward is the op's own adjoint, written
# with ops that are differentiable again (a double backward through sparse24_gemm, whose
# backward decompresses, needs decompress's gradient).


def _prune_setup(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _prune_backward(ctx: Any, grad: Tensor) -> Tensor:
    (w,) = ctx.saved_tensors
    # where, not a product: an inf or NaN upstream gradient at a pruned element gives 0 there
    return torch.where(torch.ops.cast_ext.sparse24_mask(w.detach()), grad, 0.0)


def _compress_setup(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[1])


def _compress_backward(ctx: Any, grad_values: Tensor, grad_meta: Tensor | None) -> Tensor:
    (meta,) = ctx.saved_tensors
    return torch.ops.cast_ext.sparse24_decompress(grad_values.contiguous(), meta)


def _decompress_setup(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    values, meta = inputs
    ctx.save_for_backward(meta)
    ctx.values_shape = values.shape


def _kept_index(meta: Tensor, k: int) -> Tensor:
    """Positions of the kept elements ``[..., k/2]`` (int64, ascending within each group) of a
    2:4 ``meta``, in elementwise ops: no data-dependent shapes, so it traces and compiles."""
    groups = k // 4
    b = torch.stack([meta & 15, meta >> 4], dim=-1).flatten(-2)[..., :groups].long()
    # a valid nibble has 2 bits: the lower one's index, the higher one's
    lo = (b & 1 == 0).long() + (b & 3 == 0).long() + (b & 7 == 0).long()
    hi = (b >= 2).long() + (b >= 4).long() + (b >= 8).long()
    base = 4 * torch.arange(groups, device=meta.device)
    return (torch.stack([lo, hi], dim=-1) + base.unsqueeze(-1)).flatten(-2)


def _decompress_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
    (meta,) = ctx.saved_tensors
    index = _kept_index(meta, grad.shape[-1])
    return grad.gather(-1, index).reshape(ctx.values_shape), None


torch.library.register_autograd(
    "cast_ext::sparse24_prune", _prune_backward, setup_context=_prune_setup
)
torch.library.register_autograd(
    "cast_ext::sparse24_compress", _compress_backward, setup_context=_compress_setup
)
torch.library.register_autograd(
    "cast_ext::sparse24_decompress", _decompress_backward, setup_context=_decompress_setup
)


# ---- DTensor (FSDP2, tensor parallel) sharding rules of the mask ops -----------------------
# Every mask op works on whole rows: an output row depends only on the same row of the inputs.
# So a DTensor sharded on any dim but the last runs the op on each rank's local shard, with no
# communication, and the output keeps the input's placements (mask_flips, a sum over all groups,
# gives a Partial sum; a strided shard, FSDP2's over tensor-parallel rows, is kept as well). A
# shard of the last dim (tensor parallel's RowwiseParallel) runs locally too when the split is
# even and keeps groups of m and mask bytes whole on every level: the last dim, in elements,
# divisible by lcm(8, m) times the mesh's size (the finest split any layout on the mesh could
# make). Any other layout of the last dim would cut groups: DTensor redistributes it to one of
# the layouts above first (an all-gather), so the result stays exact.
_ROWWISE_OPS = (
    "sparse24_mask",
    "nm_mask",
    "sparse24_prune",
    "sparse24_compress",
    "sparse24_decompress",
    "pack_mask",
    "unpack_mask",
    "mask_flips",
)


def _shard_unit(m: int, shards: int) -> int:
    """The multiple a last dim of N:M rows must be to split ``shards`` ways evenly into whole
    groups of ``m`` and whole bytes of the packed mask (8 elements a byte)."""
    return math.lcm(8, m) * shards


def _row_elements(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    """``(elements per row, m)`` for a mask op's inputs (a DTensor spec's global shape in place of
    each tensor); ``(0, 1)`` for ``unpack_mask``, which cannot run on a shard of the last dim (its
    ``last_dim`` argument is the whole row's)."""
    last = args[0].shape[-1]
    if name == "unpack_mask":
        return 0, 1
    if name == "nm_mask":
        return last, args[2] if len(args) > 2 else kwargs["m"]
    if name == "mask_flips":  # packed bit masks: 8 elements a byte
        return 8 * last, args[2] if len(args) > 2 else kwargs.get("m", 4)
    return (2 * last if name == "sparse24_decompress" else last), 4


def _register_sharding_rules() -> None:
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    def rule_for(name: str) -> None:
        op = getattr(torch.ops.cast_ext, name).default
        n_out = len(op._schema.returns)

        def rule(*args: Any, **kwargs: Any) -> list[tuple[list[Any], list[Any]]]:
            # args: the op's args, a DTensor's spec (with .ndim) in place of each tensor
            def inputs(placement: Any) -> list[Any]:
                return [placement if hasattr(a, "ndim") else None for a in args]

            ndim = args[0].ndim
            k, m = _row_elements(name, args, kwargs)
            whole = k > 0 and k % _shard_unit(m, args[0].mesh.size()) == 0
            shards = [Shard(d) for d in range(ndim if whole else ndim - 1)]
            # the input's own shards of leading dims too: strided ones (FSDP2 over TP's rows)
            shards += [
                pl
                for pl in args[0].placements
                if type(pl) is not Shard
                and isinstance(getattr(pl, "dim", None), int)
                and pl.dim % ndim < ndim - 1
            ]
            rules = [([Replicate()] * n_out, inputs(Replicate()))]
            for pl in shards:
                out = [Partial()] if name == "mask_flips" else [pl] * n_out
                rules.append((out, inputs(pl)))
            return rules

        register_sharding(op)(rule)

    for name in _ROWWISE_OPS:
        rule_for(name)


_register_sharding_rules()


# ---- 2:4 sparse GEMM ---------------------------------------------------------------
# sparse24_gemm: the portable packed format, any device (CPU kernel; CUDA: decompress + cuBLAS),
# with autograd for x, bias and values. cslt_*: cuSPARSELt on CUDA; no autograd of their own (the
# buffer is opaque): cast_ext.nn.SparseLinear supplies the backward from values + meta.

_CSLT_DTYPES = (torch.float16, torch.bfloat16)


def _check_gemm(op: str, x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> int:
    _same_device(op, ("x", x), ("values", values), ("meta", meta), ("bias", bias))
    torch._check(
        values.dim() == 2,
        lambda: f"cast_ext.{op}: values of shape {list(values.shape)} must be 2-D",
    )
    k = values.shape[1] * 2
    torch._check(
        x.dim() >= 1 and x.shape[-1] == k,
        lambda: f"cast_ext.{op}: x of shape {list(x.shape)}: last dim must be in_features = {k}",
    )
    torch._check(
        x.dtype == values.dtype and x.dtype in _FLOATS,
        lambda: (
            f"cast_ext.{op}: x ({x.dtype}) and values ({values.dtype}) must share a float dtype"
        ),
    )
    torch._check(
        meta.dtype == torch.uint8 and list(meta.shape) == [values.shape[0], (k + 7) // 8],
        lambda: f"cast_ext.{op}: meta of shape {list(meta.shape)} does not match values",
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == values.shape[0] and bias.dtype == x.dtype,
            lambda: f"cast_ext.{op}: bias of shape {list(bias.shape)} must be [out_features]",
        )
    return values.shape[0]


@torch.library.register_fake("cast_ext::sparse24_gemm")
def _(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None, *, check_meta: bool = True
) -> Tensor:
    n = _check_gemm("sparse24_gemm", x, values, meta, bias)
    return x.new_empty([*x.shape[:-1], n])


def _gemm_setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[Tensor | None, ...],
    keyword_only_inputs: dict[str, Any],
    output: Tensor,
) -> None:
    x, values, meta, bias = inputs
    needs = getattr(ctx, "needs_input_grad", (True, True, False, True))
    # values and meta only where a gradient uses them (x's or values'): a bias-only gradient
    # saves nothing (the layer's buffers may be inference tensors, which cannot be saved)
    weight = needs[0] or needs[1]
    ctx.save_for_backward(
        x if needs[1] else None, values if weight else None, meta if weight else None
    )
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None


def _gemm_backward(
    ctx: torch.autograd.function.FunctionCtx, grad: Tensor
) -> tuple[Tensor | None, Tensor | None, None, Tensor | None]:
    x, values, meta = ctx.saved_tensors
    n, k = grad.shape[-1], ctx.x_shape[-1]
    rows = math.prod(grad.shape[:-1])  # x's rows (not -1: n or k may be 0)
    g2 = grad.reshape(rows, n)
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.cast_ext.sparse24_decompress(values, meta)
        grad_x = (g2 @ w).reshape(ctx.x_shape)
    if ctx.needs_input_grad[1]:
        # dL/dW = grad^T x, restricted to the kept positions (the mask itself is fixed).
        gw = g2.t().float() @ x.reshape(rows, k).float()
        grad_values = gw.gather(-1, _kept_index(meta, k)).to(values.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g2.float().sum(0).to(grad.dtype)
    return grad_x, grad_values, None, grad_bias


torch.library.register_autograd(
    "cast_ext::sparse24_gemm", _gemm_backward, setup_context=_gemm_setup_context
)


def _cslt_numel(n: int, k: int, dtype: torch.dtype, device: torch.device) -> int:
    from . import _C

    fn = getattr(_C, "_cslt_compressed_size", None)
    if fn is None:
        raise RuntimeError(
            "cast_ext.cslt_compress: this cast_ext was built without cuSPARSELt "
            "(CAST_EXT_CUSPARSELT=0, or no CUDA); rebuild with CAST_EXT_CUSPARSELT=1"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(fn(n, k, str(dtype).removeprefix("torch."), index))


@torch.library.register_fake("cast_ext::cslt_compress")
def _(w: Tensor) -> Tensor:
    torch._check(
        w.dim() == 2 and w.dtype in _CSLT_DTYPES,
        lambda: f"cast_ext.cslt_compress: w must be a 2-D fp16/bf16 weight, got {w.dtype}",
    )
    # The buffer size is the library's (it pads); asked once per shape, no kernel runs.
    n, k = int(w.shape[0]), int(w.shape[1])  # the library's size is per concrete shape
    return w.new_empty([_cslt_numel(n, k, w.dtype, w.device)])


@torch.library.register_fake("cast_ext::cslt_linear")
def _(
    x: Tensor,
    w_compressed: Tensor,
    n: int,
    k: int,
    bias: Tensor | None = None,
    activation: str = "none",
) -> Tensor:
    torch._check(
        x.dim() >= 1 and x.shape[-1] == k and x.dtype in _CSLT_DTYPES,
        lambda: f"cast_ext.cslt_linear: x of shape {list(x.shape)} must be fp16/bf16 [..., {k}]",
    )
    torch._check(
        w_compressed.dtype == x.dtype,
        lambda: "cast_ext.cslt_linear: w_compressed must have x's dtype",
    )
    torch._check(
        activation in ("none", "relu"),
        lambda: f"cast_ext.cslt_linear: activation must be none or relu, got {activation}",
    )
    return x.new_empty([*x.shape[:-1], n])


def sparse24_gemm(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None, *, check_meta: bool = True
) -> Tensor:
    """``y = x @ W^T + bias`` with ``W = sparse24_decompress(values, meta)``, on the packed format.

    fp32 accumulation, one rounding to ``x``'s dtype. Differentiable in ``x``, ``bias`` and
    ``values`` (the mask in ``meta`` is fixed). CPU: with AVX-512 and at most 16 rows of ``x``,
    products straight from the packed format; else the weight expanded tile by tile, then dot
    products or torch's GEMM. CUDA: a packed small-M kernel for at most 16 rows and
    ``K % 16 == 0`` (fp16/bf16 from 2 rows with ``K % 32 == 0`` on tensor cores, sm80+; fp32
    accumulation there too), else decompress + cuBLAS (the fast CUDA path for large M is
    :func:`cslt_linear`). That cuBLAS call is ``F.linear``'s and follows its settings:
    ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` (and the fp16 one),
    on by default, let cuBLAS add split-K partial sums in 16 bits (H200, x [17, 1040] bf16:
    0.5 off the fp32-accumulated result, exact with the setting off). NaN/Inf in ``x``
    propagate as in ``F.linear`` on the decompressed weight (``0 * NaN`` included).

    Args:
        x: ``[..., K]``, float32/float16/bfloat16.
        values: ``[N, K/2]``, ``x``'s dtype (from :func:`sparse24_compress`).
        meta: ``[N, ceil(K/8)]`` uint8.
        bias: optional ``[N]``, ``x``'s dtype.
        check_meta: raise if ``meta`` is not a valid 2:4 mask. On CUDA the check reads a device
            flag back (a sync per call); pass False when ``meta`` was checked before (an invalid
            group then gives zeros instead of an error). The CPU kernel always checks, for free.

    Returns:
        ``y`` of shape ``[..., N]`` in ``x``'s dtype.

    Shape:
        ``[..., K] x [N, K/2] -> [..., N]``.
    """
    _no_forward_ad("sparse24_gemm", x, values, bias)
    return torch.ops.cast_ext.sparse24_gemm(x, values, meta, bias, check_meta=check_meta)


def scaled_linear(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None, blocks: int) -> Tensor:
    """``F.linear(x, A * W, bias)``: a layer under CAST's weight scaling (SPEC §3), the forward
    :func:`cast_ext.cast.prepare` gives an ``nn.Linear``, for your own modules.

    ``A * W`` scales row ``r``'s ``blocks`` contiguous blocks of ``in / blocks`` columns by
    ``A[r, b]``: in ``W``'s dtype for fp32/fp64, in fp32 rounded once for fp16/bf16 (``A``
    stays fp32). One op made of ATen ops (any device; autocast as for ``F.linear``) whose C++
    backward saves ``x``, ``W`` and ``A`` and forms ``A * W`` again, instead of keeping a copy
    of it. Reverse-mode autograd only (no forward-mode AD or ``torch.func`` transforms).

    Args:
        x: ``[..., in]``.
        w: ``[out, in]``.
        scale: ``A``, ``[out, blocks]``, floating point.
        bias: optional ``[out]``.
        blocks: the number of column blocks (``in % blocks == 0``).

    Returns:
        ``[..., out]``, as ``F.linear`` on the scaled weight.
    """
    _no_forward_ad("scaled_linear", x, w, scale, bias)
    return torch.ops.cast_ext.scaled_linear(x, w, scale, bias, blocks)


def cslt_compress(w: Tensor) -> Tensor:
    """Compress a 2:4 weight into cuSPARSELt's opaque buffer (CUDA, fp16/bf16).

    Args:
        w: ``[N, K]`` CUDA weight, exactly 2:4 along ``K`` (at most 2 nonzeros per group of 4),
            ``N`` and ``K`` multiples of 16.

    Returns:
        1-D buffer of ``w``'s dtype, only meaningful to :func:`cslt_linear` with the same
        ``N``, ``K`` and dtype on the same kind of GPU.
    """
    return torch.ops.cast_ext.cslt_compress(w)


def cslt_linear(
    x: Tensor,
    w_compressed: Tensor,
    n: int,
    k: int,
    bias: Tensor | None = None,
    activation: str = "none",
) -> Tensor:
    """``y = act(x @ W^T + bias)`` on the 2:4 sparse tensor cores (cuSPARSELt).

    Plans are cached per shape; the algorithm is searched on the first call of each bucket of
    ``M`` and kept only if it agrees with the default algorithm on a probe input (see
    ``cast_ext.nn.cslt_cache_info``). No autograd of its own (the buffer is opaque):
    use :class:`cast_ext.nn.SparseLinear` for training through it.

    Args:
        x: ``[..., K]`` CUDA, fp16/bf16.
        w_compressed: from :func:`cslt_compress` of a ``[n, k]`` weight of ``x``'s dtype.
        n: out_features.
        k: in_features.
        bias: optional ``[n]``, ``x``'s dtype (fused in the epilogue).
        activation: ``"none"`` or ``"relu"`` (fused in the epilogue; cuSPARSELt's GELU
            epilogue takes int8/fp8 inputs only).

    Returns:
        ``y`` of shape ``[..., n]``.
    """
    _no_forward_ad("cslt_linear", x, bias)
    return torch.ops.cast_ext.cslt_linear(x, w_compressed, n, k, bias, activation)


# ---- AdamS (reference: cast_ext.reference.adams_step_) ----------------------------------------


def _check_adams_scalars(h: dict[str, Any]) -> None:
    """csrc/adams.h's rules for the scalar arguments, for the calls that reach no kernel (the
    fake; empty lists, which give the dispatcher no device)."""
    op = "cast_ext.adams_step_: "
    rules = [
        (h["lr"] >= 0.0 and math.isfinite(h["lr"]), f"lr must be finite and >= 0, got {h['lr']}"),
        (0.0 <= h["beta1"] < 1.0, f"beta1 must be in [0, 1), got {h['beta1']}"),
        (0.0 <= h["beta2"] < 1.0, f"beta2 must be in [0, 1), got {h['beta2']}"),
    ]
    for key in ("eps", "weight_decay", "decay"):
        ok = h[key] >= 0.0 and math.isfinite(h[key])
        rules.append((ok, f"{key} must be finite and >= 0, got {h[key]}"))
    for key in ("total_steps", "mask_interval"):
        rules.append((h[key] >= 1, f"{key} must be >= 1, got {h[key]}"))
    rules.append((h["m"] in (4, 8), f"m must be 4 or 8, got {h['m']}"))
    rules.append((0 < h["n"] <= h["m"], f"need 0 < n <= m, got n={h['n']}, m={h['m']}"))
    for ok, msg in rules:
        if not ok:
            raise RuntimeError(op + msg)


def _check_adams_lists(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    masks: list[Tensor],
    steps: list[Tensor],
    master_params: list[Tensor],
    prev_masks: list[Tensor] | tuple[Tensor, ...],
) -> None:
    """csrc/adams.h's rules for the lists' lengths, for the fake and the reference."""
    k = len(params)
    torch._check(
        len(grads) == k and len(exp_avgs) == k and len(exp_avg_sqs) == k and len(steps) == k,
        lambda: (
            "cast_ext.adams_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have "
            "the same length"
        ),
    )
    torch._check(
        len(masks) in (0, k)
        and len(master_params) in (0, k)
        and len(prev_masks) in (0, len(masks)),
        lambda: (
            "cast_ext.adams_step_: masks, master_params and prev_masks must be empty or have "
            "one per param"
        ),
    )


@torch.library.register_fake("cast_ext::adams_step_")
def _(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    masks: list[Tensor],
    steps: list[Tensor],
    master_params: list[Tensor],
    prev_masks: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: float,
    total_steps: int,
    mask_interval: int,
    n: int,
    m: int,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    _check_adams_lists(
        params, grads, exp_avgs, exp_avg_sqs, masks, steps, master_params, prev_masks
    )
    _check_adams_scalars(dict(locals()))  # the keyword arguments, by name
    for i, mk in enumerate(masks):
        if params[i].dim() < 1:
            raise RuntimeError(
                f"cast_ext.adams_step_: params[{i}] is 0-d; a sparse param needs a last dim"
            )
        shape, mshape = list(params[i].shape), list(mk.shape)
        msg = (
            f"cast_ext.adams_step_: masks[{i}] of shape {mshape} does not match "
            f"params[{i}] of shape {shape}"
        )
        torch._check(mshape == _packed_shape(shape, shape[-1]), lambda msg=msg: msg)


def adams_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    masks: list[Tensor],
    steps: list[Tensor],
    master_params: list[Tensor],
    prev_masks: list[Tensor] | tuple[Tensor, ...] = (),
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decay: float = 0.0,
    total_steps: int = 1,
    mask_interval: int = 10,
    n: int = 2,
    m: int = 4,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused AdamS step (SPEC §2) over a list of same-device, same-dtype tensors, in place.

    Semantics, argument rules and operation order: :func:`cast_ext.reference.adams_step_`. One
    pass per tensor reads and writes every state once; at refresh steps
    (``steps[i] % mask_interval == 0``) the packed mask is re-ranked from the weights before the
    update: on CUDA inside that pass, on the CPU in a read that first checks the weights are
    finite (NaN/Inf raise there with nothing changed; CUDA does not check, to avoid a sync). On CUDA
    all tensors go in one launch per 36 tensors (plus one tiny step-count launch), and the steps,
    ``grad_scale`` and ``found_inf`` are read on the device (no host sync).

    Args:
        params: weights (float32; or float32/float16/bfloat16 with ``master_params``).
        grads: gradients, dtype and shape of ``params``.
        exp_avgs: float32 first moments.
        exp_avg_sqs: float32 second moments.
        masks: packed N:M masks (``uint8``, ``[*p.shape[:-1], ceil(k / 8)]``), or empty for
            plain Adam/AdamW.
        steps: float32 one-element tensors, completed steps per param; incremented. The CPU
            kernel refuses a step that is negative, fractional or >= 2^24; on CUDA steps are
            read on the device and not checked (that would cost a sync per step).
        master_params: float32 master weights, or empty.
        prev_masks: packed masks receiving the old mask at each refresh, or empty.
        lr, beta1, beta2, eps, weight_decay: Adam(W) hyperparameters.
        decay: the L1 decay ``lam`` of the pruned weights.
        total_steps: ``T`` of the ramp ``alpha = min(t / T, 1)``.
        mask_interval: refresh period of the masks.
        n, m: N:M pattern (``m`` in {4, 8}).
        grad_scale: optional one-element float32 tensor; gradients are divided by it.
        found_inf: optional one-element float32 tensor; nonzero skips the whole step.

    Shape:
        every list item its param's shape, except masks ``[*shape[:-1], ceil(shape[-1] / 8)]``
        and steps ``[]`` (or ``[1]``).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, masks, steps, master_params, prev_masks)
    if not any(lists) and grad_scale is None and found_inf is None:
        # nothing to step, and no tensor for the dispatcher to pick a device from: the
        # arguments are still checked (the keyword arguments, by name)
        _check_adams_scalars(dict(locals()))
        return
    torch.ops.cast_ext.adams_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        masks,
        steps,
        master_params,
        list(prev_masks),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decay=decay,
        total_steps=total_steps,
        mask_interval=mask_interval,
        n=n,
        m=m,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


# ---- distillation loss (reference: cast_ext.reference.distill_fwd / distill_bwd) -------------


def _check_distill(
    op: str, student: Tensor, teacher: Tensor | None, labels: Tensor, temperature: float
) -> None:
    """csrc/distill.h's rules, in the fakes."""
    _same_device(op, ("student", student), ("teacher", teacher), ("labels", labels))
    for name, t in (("student", student), ("teacher", teacher), ("labels", labels)):
        if t is not None and not t.is_contiguous():
            raise RuntimeError(f"cast_ext.{op}: {name} of shape {list(t.shape)} must be contiguous")
    torch._check(
        math.isfinite(temperature) and temperature > 0,
        lambda: f"cast_ext.{op}: temperature must be finite and > 0, got {temperature}",
    )
    torch._check(
        student.dim() == 2 and student.dtype in _FLOATS,
        lambda: (
            f"cast_ext.{op}: student of shape {list(student.shape)} and dtype {student.dtype} "
            "must be a 2-D [tokens, vocab] float32, float16 or bfloat16 tensor"
        ),
    )
    torch._check(
        labels.shape == student.shape[:1] and labels.dtype == torch.int64,
        lambda: (
            f"cast_ext.{op}: labels of shape {list(labels.shape)} and dtype {labels.dtype} must "
            f"be int64 of shape [{student.shape[0]}] (one per row of student)"
        ),
    )
    if teacher is not None:
        torch._check(
            teacher.shape == student.shape and teacher.dtype == student.dtype,
            lambda: (
                f"cast_ext.{op}: teacher of shape {list(teacher.shape)} and dtype "
                f"{teacher.dtype} must match student (shape {list(student.shape)}, dtype "
                f"{student.dtype})"
            ),
        )
    torch._check(
        student.shape[1] > 0,
        lambda: f"cast_ext.{op}: student of shape {list(student.shape)} has an empty vocab dim",
    )


@torch.library.register_fake("cast_ext::distill_fwd")
def _(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_distill("distill_fwd", student, teacher, labels, temperature)
    rows = student.shape[0]
    f32 = {"dtype": torch.float32}
    return (
        student.new_empty([rows], **f32),
        student.new_empty([rows], **f32),
        student.new_empty([rows, 3], **f32),
    )


@torch.library.register_fake("cast_ext::distill_bwd")
def _(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    grad_scale: Tensor,
    eta: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    op = "distill_bwd"
    _check_distill(op, student, teacher, labels, temperature)
    _same_device(op, ("student", student), ("lse", lse), ("grad_scale", grad_scale))
    torch._check(
        list(lse.shape) == [student.shape[0], 3]
        and lse.dtype == torch.float32
        and lse.is_contiguous(),
        lambda: (
            f"cast_ext.{op}: lse of shape {list(lse.shape)} and dtype {lse.dtype} must be a "
            f"contiguous float32 [{student.shape[0]}, 3] (distill_fwd's output)"
        ),
    )
    torch._check(
        grad_scale.numel() == 1 and grad_scale.dtype == torch.float32,
        lambda: f"cast_ext.{op}: grad_scale must be a one-element float32 tensor",
    )
    torch._check(0.0 <= eta <= 1.0, lambda: f"cast_ext.{op}: eta must be in [0, 1], got {eta}")
    torch._check(
        teacher is not None or eta == 0.0,
        lambda: f"cast_ext.{op}: teacher is None but eta = {eta} (the KL term needs the teacher)",
    )
    return torch.empty_like(student)


def distill_fwd(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL and CE terms of CAST's distillation loss, fused (one read of each row).

    See :func:`cast_ext.reference.distill_fwd` for the exact semantics; the loss built on it is
    :func:`cast_ext.cast.distill_loss`. A label outside ``[0, vocab)`` that is not
    ``ignore_index`` raises (on CUDA through a device flag read back after the kernel, skipped
    while a CUDA graph is captured and after ``set_cuda_value_checks(False)``; the row's CE is
    then NaN).

    Args:
        student: ``[N, V]`` logits, float32/float16/bfloat16, contiguous.
        teacher: ``[N, V]``, the student's dtype, or None (no KL term).
        labels: ``[N]`` int64, aligned with the rows.

    Returns:
        ``(kl [N], ce [N], lse [N, 3])`` in fp32.
    """
    _no_forward_ad("distill_fwd", student)
    return torch.ops.cast_ext.distill_fwd(student, teacher, labels, temperature, ignore_index)


def distill_bwd(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    grad_scale: Tensor,
    *,
    eta: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """The gradient of ``grad_scale * sum(eta * kl + (1 - eta) * ce)`` over the valid rows with
    respect to ``student`` (one read of each row, one write), from :func:`distill_fwd`'s ``lse``.

    See :func:`cast_ext.reference.distill_bwd`. ``grad_scale`` is a one-element fp32 tensor on
    the logits' device (read on the device on CUDA: no sync). The labels are those
    :func:`distill_fwd` checked: the CPU kernel checks them again, the CUDA kernel does not (an
    out-of-range label there adds no one-hot term).

    Returns:
        The gradient, ``student``'s shape and dtype.
    """
    _no_forward_ad("distill_bwd", student, lse, grad_scale)
    return torch.ops.cast_ext.distill_bwd(
        student, teacher, labels, lse, grad_scale, eta, temperature, ignore_index
    )
