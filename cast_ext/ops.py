"""Typed wrappers over ``torch.ops.cast_ext.*`` and their fake (meta) kernels.

The fakes give every op shape and dtype propagation without data, which is what
``torch.library.opcheck``, ``torch.compile`` (no graph breaks) and meta-device tracing use. The
semantics of each op are those of the function of the same name in :mod:`cast_ext.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "mask_flips",
    "nm_mask",
    "pack_mask",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_mask",
    "sparse24_prune",
    "unpack_mask",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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
    k = values.shape[-1] * 2
    torch._check(
        meta.dtype == torch.uint8 and list(meta.shape) == _packed_shape(values.shape, k),
        lambda: (
            f"cast_ext.sparse24_decompress: meta of shape {list(meta.shape)} does not match "
            f"values of shape {list(values.shape)}"
        ),
    )
    return values.new_empty([*values.shape[:-1], k])


@torch.library.register_fake("cast_ext::pack_mask")
def _(mask: Tensor) -> Tensor:
    torch._check(mask.dtype == torch.bool, lambda: "cast_ext.pack_mask: mask must be bool")
    return mask.new_empty(_packed_shape(mask.shape, mask.shape[-1]), dtype=torch.uint8)


@torch.library.register_fake("cast_ext::unpack_mask")
def _(packed: Tensor, last_dim: int) -> Tensor:
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
    return torch.ops.cast_ext.sparse24_prune(w)


def sparse24_compress(w: Tensor) -> tuple[Tensor, Tensor]:
    """Compress ``w`` to the packed 2:4 format.

    Returns:
        ``(values, meta)``: the 2 kept values of each group in ascending position, and the
        packed mask (4 bits per group; see :func:`pack_mask`).

    Shape:
        ``[..., k]`` -> ``([..., k/2], [..., ceil(k/8)])``.
    """
    values, meta = torch.ops.cast_ext.sparse24_compress(w)
    return values, meta


def sparse24_decompress(values: Tensor, meta: Tensor) -> Tensor:
    """Inverse of :func:`sparse24_compress` (zeros at the pruned positions)."""
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
