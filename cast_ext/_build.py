"""Build facts of the compiled extension (wraps ``cast_ext._C.build_info()``)."""

from __future__ import annotations

import functools
from typing import Any

from . import _C

__all__ = ["build_info", "cuda_kernels_available", "cusparselt_available"]


@functools.cache
def build_info() -> dict[str, Any]:
    """What the extension was built with: torch and CUDA versions, archs, optional parts.

    Returns:
        dict with keys ``torch_version``, ``with_cuda``, ``cuda_version``, ``cuda_archs``,
        ``with_cusparselt``, ``cusparselt_version``, ``compiler``, ``debug``.
    """
    return dict(_C.build_info())


def cuda_kernels_available() -> bool:
    """True if the CUDA kernels were compiled in (a GPU may still be absent)."""
    return bool(build_info()["with_cuda"])


def cusparselt_available() -> bool:
    """True if the cuSPARSELt-backed sparse GEMM was compiled in."""
    return bool(build_info()["with_cusparselt"])
