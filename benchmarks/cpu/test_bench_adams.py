"""CPU microbenchmark of one AdamS step (pytest-benchmark, group "adams").

One step over 32 Mi fp32 params shaped like two LLaMA-2-7B attention projections (q_proj and
k_proj, 4096 x 4096 each), all sparse 2:4, against ``torch.optim.AdamW(fused=True)`` on the same
params and the reference AdamS (plain torch ops), in the same run. The fused op runs 20 rounds
from step 1, so 2 of them are mask refreshes (every 10 steps), as in training.
``CAST_EXT_BENCH_QUICK=1`` shrinks the params to 2 x 256 x 512 for CI.

Run: ``pytest benchmarks/cpu --benchmark-enable`` (ratios: compare the rows of group "adams").
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import cast_ext
from cast_ext import reference

QUICK = os.environ.get("CAST_EXT_BENCH_QUICK", "0") == "1"
SHAPES = [(256, 512)] * 2 if QUICK else [(4096, 4096)] * 2
NUMEL = sum(r * c for r, c in SHAPES)
HP = {
    "lr": 1e-4,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "decay": 4e-7,
    "total_steps": 1000,
    "mask_interval": 10,
    "n": 2,
    "m": 4,
}
# fp32 p, g, mu, v read; p, mu, v written; + packed mask read (1/8 B per param).
BYTES_PER_PARAM = 28 + 0.125


def _lists() -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[torch.Tensor]] = {"p": [], "g": [], "mu": [], "v": [], "mask": [], "t": []}
    for r, c in SHAPES:
        out["p"].append(torch.randn(r, c, generator=gen) * 0.02)
        out["g"].append(torch.randn(r, c, generator=gen) * 1e-3)
        out["mu"].append(torch.zeros(r, c))
        out["v"].append(torch.zeros(r, c))
        out["mask"].append(torch.zeros(r, (c + 7) // 8, dtype=torch.uint8))
        out["t"].append(torch.zeros(()))
    return out


def _adams_fn(fn: Callable[..., None], d: dict[str, list[torch.Tensor]]) -> Callable[[], None]:
    def step() -> None:
        fn(d["p"], d["g"], d["mu"], d["v"], d["mask"], d["t"], [], **HP)

    return step


def _info(benchmark, impl: str) -> None:
    benchmark.extra_info.update(
        {"impl": impl, "params": NUMEL, "shapes": SHAPES, "bytes_per_param": BYTES_PER_PARAM}
    )


@pytest.mark.benchmark(group="adams")
def test_adams_fused_op(benchmark) -> None:
    d = _lists()
    step = _adams_fn(cast_ext.ops.adams_step_, d)
    step()  # t = 0: first refresh, page faults
    _info(benchmark, "cast_ext.adams_step_")
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=0)
    assert all(float(t) == 21.0 for t in d["t"])


@pytest.mark.benchmark(group="adams")
def test_adamw_fused_torch(benchmark) -> None:
    d = _lists()
    params = [torch.nn.Parameter(p) for p in d["p"]]
    for p, g in zip(params, d["g"], strict=True):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=HP["lr"], betas=(0.9, 0.95), fused=True)
    opt.step()
    _info(benchmark, "torch.optim.AdamW(fused=True)")
    benchmark.pedantic(opt.step, rounds=20, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="adams")
def test_adams_reference(benchmark) -> None:
    d = _lists()
    step = _adams_fn(reference.adams_step_, d)
    step()
    _info(benchmark, "cast_ext.reference.adams_step_")
    benchmark.pedantic(step, rounds=3 if not QUICK else 10, iterations=1, warmup_rounds=0)
