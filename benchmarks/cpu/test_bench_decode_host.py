"""The host's share of a decode step through ``SparseLinear``: one token through a small model on
the CPU, same run.

A LLaMA with SmolLM2-135M's depth (30 layers, 210 projections) but a width of 64, one thread, one
token, no grad: the math is a few microseconds a layer, so the times are the host's, which is
what sets the pace of decoding on a GPU wherever a layer's kernel is shorter than the host's work
to launch it.

* ``dense``: the model's ``nn.Linear`` layers.
* ``sparselinear_auto``: ``cast_ext.nn.to_sparse`` of the same (2:4) weights in mode ``auto``,
  its buckets decided by the warm-up calls (the decisions are in ``extra_info``).
* ``sparselinear_packed``: mode ``sparse``, every projection through the packed kernel.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import run, tiny_smollm2_depth

import cast_ext

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pruned N layers to 2:4": the dense model gets them too
        auto = cast_ext.nn.to_sparse(tiny_smollm2_depth().eval())
    dense = cast_ext.nn.to_dense(copy.deepcopy(auto))
    packed = cast_ext.nn.to_sparse(copy.deepcopy(dense), mode="sparse")
    return {"dense": dense, "sparselinear_auto": auto, "sparselinear_packed": packed}


@pytest.mark.parametrize("impl", ["dense", "sparselinear_auto", "sparselinear_packed"])
def test_decode_step_host_time(benchmark, models, impl, one_thread):
    benchmark.group = "one-token forward, 30 x LLaMA layers, width 64, no grad, 1 thread"
    model = models[impl]
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def step() -> None:
        model(ids, use_cache=False)

    cast_ext.nn.clear_dispatch_decisions()
    for _ in range(20):  # the auto model's trial calls (6 per path and bucket) and warm-up
        step()
    run(benchmark, step, rounds=50)
    if impl == "sparselinear_auto":
        benchmark.extra_info["dispatch"] = cast_ext.nn.dispatch_decisions()
