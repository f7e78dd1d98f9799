"""Build facts of the compiled extension (wraps ``cast_ext._C.build_info()``)."""

from __future__ import annotations

from typing import Any

from . import _C

__all__ = [
    "build_info",
    "cuda_kernels_available",
    "cuda_value_checks",
    "cusparselt_available",
    "set_cuda_value_checks",
]


# Read once at import: a plain dict, so code that asks (SparseLinear's forward) also traces
# under torch.compile, which cannot call into the extension's pybind11 functions.
_BUILD_INFO: dict[str, Any] = dict(_C.build_info())


def build_info() -> dict[str, Any]:
    """What the extension was built with: torch and CUDA versions, archs, optional parts.

    Returns:
        dict with keys ``torch_version``, ``with_cuda``, ``cuda_version``, ``cuda_archs``,
        ``with_cusparselt``, ``cusparselt_version``, ``compiler``, ``debug``, and ``cpu_isa``:
        the vector instruction set the CPU kernels picked at load (``"avx512_bf16"``: AVX-512
        with the bf16 GEMM's vdpbf16ps path, ``"avx512"``, ``"avx2"`` or ``"default"``; the
        environment variable ``CAST_EXT_CPU_ISA`` caps it).
    """
    return dict(_BUILD_INFO)


def cuda_kernels_available() -> bool:
    """True if the CUDA kernels were compiled in (a GPU may still be absent)."""
    return bool(_BUILD_INFO["with_cuda"])


def cusparselt_available() -> bool:
    """True if the cuSPARSELt-backed sparse GEMM was compiled in."""
    return bool(_BUILD_INFO["with_cusparselt"])


def set_cuda_value_checks(enabled: bool) -> None:
    """Turn the CUDA ops' value checks on (default) or off.

    The mask ops refuse NaN/Inf weights and invalid 2:4 metadata. On the CPU that check is free
    (same pass); on CUDA it costs one device-to-host sync per call, which a hot loop whose
    inputs are known to be finite can skip. With the checks off such inputs give an
    unspecified (but deterministic) result instead of an error.
    """
    _C.set_cuda_value_checks(bool(enabled))


def cuda_value_checks() -> bool:
    """Whether the CUDA ops' value checks are on (see :func:`set_cuda_value_checks`)."""
    return bool(_C.cuda_value_checks())
