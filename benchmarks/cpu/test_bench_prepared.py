"""The host's share of a CAST step: forward + backward of a prepared model on the CPU, same run.

A LLaMA with SmolLM2-135M's depth (30 layers, 210 projections prepared) but a width of 64, one
thread, 8 tokens: the math is a few microseconds a layer, so the times are the host's, which is
what sets the pace of a small model's step on a GPU too (the H200's CAST step of SmolLM2-135M
was host-paced: ``benchmarks/results/gpu-20261130``).

* ``dense``: the model before ``cast.prepare`` (F.linear per projection).
* ``prepared``: after it, each projection's ``F.linear(x, A * W, bias)`` one op
  (``cast_ext::scaled_linear``) with a C++ backward.
* ``prepared_parametrized``: the same model with ``nn.Linear.forward`` back on the prepared
  classes, so each projection reads its weight through torch's parametrization property: the
  product ``A * W`` as separate torch calls and autograd nodes.

Each call is a forward + CE + backward; the gradients accumulate (set to None once per round).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run, tiny_smollm2_depth

from benchmarks.bench_cast_step import prepare_parametrized
from cast_ext import cast

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    dense = tiny_smollm2_depth()
    prepared = copy.deepcopy(dense)
    cast.prepare(prepared)
    parametrized = prepare_parametrized(copy.deepcopy(dense))
    assert all(
        type(layer.module).forward is cast._scaled_linear_forward
        for layer in cast.sparse_layers(prepared)
    )
    return {"dense": dense, "prepared": prepared, "prepared_parametrized": parametrized}


@pytest.mark.parametrize("impl", ["dense", "prepared", "prepared_parametrized"])
def test_fwd_bwd_host_time(benchmark, models, impl, one_thread):
    benchmark.group = "prepared model fwd+bwd, 30 x LLaMA layers, width 64, 8 tokens, 1 thread"
    model = models[impl]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids, use_cache=False).loss.backward()

    try:
        for _ in range(3):
            step()
        run(benchmark, step, rounds=30)
    finally:
        model.zero_grad(set_to_none=True)
