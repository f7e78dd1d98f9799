"""Shared test configuration: devices, per-dtype tolerances, seeding.

Tolerances are written once here. Masks are discrete and compared exactly; tolerances apply to
floating results (optimizer states, GEMM outputs), never by skipping an assertion.
"""

from __future__ import annotations

import os

import pytest
import torch

import cast_ext

CUDA_OK = torch.cuda.is_available() and cast_ext.cuda_kernels_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])
if os.environ.get("CAST_EXT_TEST_DEVICE"):
    DEVICES = [os.environ["CAST_EXT_TEST_DEVICE"]]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) per dtype, for results computed in that dtype.
TOL = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


requires_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA kernels")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- cuSPARSELt tests ---------------------------------------------------------------
CUSPARSELT_OK = CUDA_OK and cast_ext.cusparselt_available()
requires_cusparselt = pytest.mark.skipif(
    not CUSPARSELT_OK, reason="needs a CUDA GPU and a cast_ext built with cuSPARSELt"
)


def gemm_tol(dtype: torch.dtype, k: int) -> float:
    """Error bound of a GEMM with fp32 accumulation over k terms, relative to sum |x_i w_i|.

    The output rounding of ``dtype`` (its TOL rtol) plus fp32 accumulation (k * 2^-24).
    """
    return TOL[dtype][0] + 2.0 * k * 2.0**-24
