"""sparse24_gemm on the CPU (the packed format) against dense ``F.linear`` on the same 2:4 weight
and the pure-torch reference, same run: a LLaMA-2-7B attention weight (4096 x 4096, bf16) at a
decode-sized, three small and two prefill-sized token counts (1, 4, 16, 32, 128, 512: the bf16
kernels change at 9 rows of x, from the permute kernel to the pairs kernel). Beside them, a
``SparseLinear`` in
``mode="auto"``, whose dispatch (its first calls, made before the timed rounds) picks the
packed kernel or dense per token count: it should track the faster of the two.

No speed target for the CPU kernel in the issue (it is for correctness); measured so that CPU
users know what a SparseLinear costs them against the dense layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, run

import cast_ext
from cast_ext import reference as ref

N, K = (512, 1024) if QUICK else (4096, 4096)


@pytest.fixture(scope="module")
def weight() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = cast_ext.sparse24_prune(torch.randn(N, K).bfloat16())
    values, meta = cast_ext.sparse24_compress(w)
    return w, values, meta


@pytest.fixture(scope="module")
def layer(weight) -> cast_ext.nn.SparseLinear:
    _, values, meta = weight
    out = cast_ext.nn.SparseLinear(K, N, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        out.values.copy_(values)
        out.metadata.copy_(meta)
    return out


@pytest.mark.parametrize("m", [1, 4, 16, 32, 128, 512])
@pytest.mark.parametrize("impl", ["cast_ext", "dense", "reference", "sparselinear_auto"])
def test_sparse24_gemm(benchmark, weight, layer, impl, m):
    benchmark.group = f"sparse24_gemm bf16 M={m}"
    w, values, meta = weight
    x = torch.randn(m, K).bfloat16()
    fn = {
        "cast_ext": lambda: cast_ext.sparse24_gemm(x, values, meta),
        "dense": lambda: F.linear(x, w),
        "reference": lambda: ref.sparse24_gemm(x, values, meta),
        "sparselinear_auto": torch.no_grad()(lambda: layer(x)),
    }[impl]
    if impl == "sparselinear_auto":
        while not _decision(m):  # the dispatch's timed first calls, before the timed rounds
            fn()
    run(benchmark, fn, rounds=3 if impl == "reference" else 10)
    if impl == "sparselinear_auto":
        benchmark.extra_info["dispatch"] = _decision(m)


def _decision(m: int) -> dict | None:
    """The dispatch decision for this weight at m tokens, if made."""
    found = [
        d
        for d in cast_ext.nn.dispatch_decisions()
        if (d["n"], d["k"], d["m_bucket"], d["dtype"]) == (N, K, m, "bfloat16")
    ]
    return found[0] if found else None
