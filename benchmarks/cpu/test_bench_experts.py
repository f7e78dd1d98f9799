"""A MoE experts module on the CPU: transformers' dense experts (its grouped_mm forward) against
the same 2:4 experts after ``nn.to_sparse`` (a ``SparseExperts``: one ``SparseLinear`` per expert
and projection, each dispatched between the packed kernel and dense per token count), same run,
bf16, both built and the routing drawn as ``benchmarks/bench_experts.py`` does on the GPU. The
shapes are Qwen3-30B-A3B's (hidden 2048, expert MLP 768, 8 of the experts routed per token) with
16 experts instead of 128, at a decode-sized, a small and a prefill-sized batch.

No speed target on the CPU: measured so that CPU users know what the swap costs or saves them.
Beside them, the memory ceiling of the same run: ``copy_hit_weights`` copies a bf16 tensor as
large as the dense weights of the experts the batch hits into one allocated beforehand (twice
the bytes the dense module reads; a clone would time the fresh pages' faults too). The rows'
``extra_info`` holds those bytes and the experts hit, for GB/s (the 2:4 ``values`` and
``metadata`` are 9/16 of the dense bytes).
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUICK, run

from benchmarks.bench_experts import experts_pair, routing, weight_bytes

pytest.importorskip("transformers")

HIDDEN, INTER, EXPERTS, TOP_K = (256, 128, 4, 2) if QUICK else (2048, 768, 16, 8)


@pytest.fixture(scope="module")
def modules() -> dict[str, torch.nn.Module]:
    dense, sparse = experts_pair(EXPERTS, HIDDEN, INTER, TOP_K, "cpu")
    return {"dense_grouped_mm": dense, "sparse_experts_auto": sparse}


@pytest.mark.parametrize("tokens", [1, 16, 128])
@pytest.mark.parametrize("impl", ["dense_grouped_mm", "sparse_experts_auto", "copy_hit_weights"])
def test_experts(benchmark, modules, impl, tokens):
    benchmark.group = f"MoE experts bf16 {EXPERTS}x[{HIDDEN}, {INTER}] top-{TOP_K} T={tokens}"
    h, index, weights = routing(tokens, EXPERTS, TOP_K, HIDDEN, "cpu")
    hit = int(index.unique().numel())
    dense_bytes = weight_bytes(hit, HIDDEN, INTER)
    benchmark.extra_info.update(experts_hit=hit, dense_weight_bytes=dense_bytes)
    if impl == "copy_hit_weights":
        src = torch.randn(dense_bytes // 2).bfloat16()
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        fn = torch.no_grad()(lambda: modules[impl](h, index, weights))
    for _ in range(12):  # the dispatch's timed first calls (6 per path), before the timed rounds
        fn()
    run(benchmark, fn, rounds=10)
