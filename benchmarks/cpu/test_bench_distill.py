"""CPU microbenchmark of CAST's distillation loss, forward + backward (pytest-benchmark, group
"distill_loss").

``cast.distill_loss`` on the fused ops against the same loss on ``impl="reference"`` (the
chunked torch-ops path it replaced), against the CE-only loss a plain fine-tune pays
(``F.cross_entropy``, torch's fused kernel), and against ``clone()`` of the student logits, in
the same run. The fused pair moves 5 logits-sized tensors (forward reads s and t, backward reads
them again and writes the gradient), a clone 2 (reads and writes one): at the clone's bandwidth
the fused pair takes 2.5x the clone's time. Shape: the demo's SmolLM2 vocabulary (49152) over
256 tokens, fp32 (``CAST_EXT_BENCH_QUICK=1``: 64 tokens x 8192).

Run: ``pytest benchmarks/cpu --benchmark-enable`` (ratios: compare the rows of the group).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, run

from cast_ext import cast

TOKENS, VOCAB = (64, 8192) if QUICK else (256, 49152)


@pytest.fixture(scope="module")
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(TOKENS, VOCAB, generator=gen) * 3).requires_grad_()
    t = torch.randn(TOKENS, VOCAB, generator=gen) * 3
    y = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    return s, t, y


@pytest.mark.benchmark(group="distill_loss")
@pytest.mark.parametrize("impl", ["fused", "reference", "ce_only_torch", "clone"])
def test_distill_loss(benchmark, logits, impl):
    s, t, y = logits

    def step() -> None:
        if impl == "clone":
            with torch.no_grad():
                s.clone()
            return
        if impl == "ce_only_torch":
            loss = F.cross_entropy(s, y)
        else:
            loss = cast.distill_loss(s, t, y, impl="auto" if impl == "fused" else "reference")
        loss.backward()
        s.grad = None

    run(benchmark, step, rounds=3 if impl == "reference" else 10)
