"""The host's time in an optimizer step: AdamS against torch's AdamW on a small model, same run.

A LLaMA with SmolLM2-135M's depth (30 layers, 210 projections) but a width of 64, prepared by
``cast.prepare``, with the demo's param groups (embeddings and norms frozen: 210 sparse
weights, 210 scales and the head), one thread: each tensor's update is a few microseconds, so
the times are the host's, which is what an optimizer step costs on a GPU wherever its kernels
are shorter than the host's work to launch them (the H200 took 6.5 ms for an AdamS step of
SmolLM2-135M where ``torch.optim.AdamW(fused=True)`` took 1.49 ms:
``benchmarks/results/gpu-20261130``).

* ``adams``: ``cast_ext.AdamS.step`` (checks, state bookkeeping, one fused op call per bucket).
* ``adams_op``: those op calls alone (``cast_ext.ops.adams_step_``, the lists built once):
  ``adams`` minus this is AdamS's Python.
* ``adamw_fused`` / ``adamw_foreach``: ``torch.optim.AdamW`` on the same trained params.

Every step has the same gradients (random, set once).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import run, tiny_smollm2_depth

import cast_ext
from cast_ext import cast

transformers = pytest.importorskip("transformers")


def _trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def _adams(model: torch.nn.Module) -> cast_ext.AdamS:
    groups = cast.param_groups(model, freeze_embeddings=True, freeze_norms=True)
    return cast_ext.AdamS(groups, lr=3e-4, decay=1e-3, total_steps=10**6)


def _op_calls(opt: cast_ext.AdamS) -> Callable[[], None]:
    """The fused op calls of ``opt``'s step, their lists built once (plain tensors, one bucket
    per group)."""
    calls = []
    for group in opt.param_groups:
        ps = [p for p in group["params"] if p.grad is not None]
        states = [opt.state[p] for p in ps]
        sparse = "mask" in states[0]
        lists = [
            ps,
            [p.grad for p in ps],
            *([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq")),
            [s["mask"] for s in states] if sparse else [],
            [s["step"] for s in states],
            [],
            [s["prev_mask"] for s in states] if sparse else [],
        ]
        beta1, beta2 = group["betas"]
        hp = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
              "weight_decay": group["weight_decay"], "decay": group["decay"],
              "total_steps": group["total_steps"], "mask_interval": group["mask_interval"],
              "n": group["n"], "m": group["m"]}  # fmt: skip
        calls.append((lists, hp))

    @torch.no_grad()
    def step() -> None:
        for lists, hp in calls:
            cast_ext.ops.adams_step_(*lists, **hp)

    return step


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = tiny_smollm2_depth()
    cast.prepare(m)
    return m


@pytest.mark.parametrize("impl", ["adams", "adams_op", "adamw_fused", "adamw_foreach"])
def test_optimizer_step_host_time(benchmark, model, impl, one_thread):
    benchmark.group = "optimizer step, 30 x LLaMA layers prepared, width 64, 1 thread"
    params = _trained(model)
    if impl.startswith("adams"):
        opt = _adams(model)
        opt.step()  # the states (and masks) made
        step = opt.step if impl == "adams" else _op_calls(opt)
    else:
        kind = impl.removeprefix("adamw_")
        step = torch.optim.AdamW(params, lr=3e-4, **{kind: True}).step
    for _ in range(3):
        step()
    run(benchmark, step, rounds=50)
    benchmark.extra_info["tensors"] = len(params)
