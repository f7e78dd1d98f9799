"""sparse24_mask / sparse24_prune on a LLaMA-2-7B MLP weight (4096 x 11008, fp32) against the
pure-torch reference and against ``w.clone()`` (the copy bandwidth bound), same run.

Targets (issue 3): >= 10x faster than the reference, within 2x of a clone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUICK, run

import cast_ext
from cast_ext import reference as ref

SHAPE = (512, 1024) if QUICK else (4096, 11008)


@pytest.fixture(scope="module")
def w() -> torch.Tensor:
    return torch.randn(SHAPE)


@pytest.mark.benchmark(group="sparse24_mask")
@pytest.mark.parametrize("impl", ["cast_ext", "reference", "clone"])
def test_sparse24_mask(benchmark, w, impl):
    fn = {
        "cast_ext": lambda: cast_ext.sparse24_mask(w),
        "reference": lambda: ref.sparse24_mask(w),
        "clone": lambda: w.clone(),
    }[impl]
    run(benchmark, fn, rounds=3 if impl == "reference" else 10)


@pytest.mark.benchmark(group="sparse24_prune")
@pytest.mark.parametrize("impl", ["cast_ext", "reference", "clone"])
def test_sparse24_prune(benchmark, w, impl):
    fn = {
        "cast_ext": lambda: cast_ext.sparse24_prune(w),
        "reference": lambda: ref.sparse24_prune(w),
        "clone": lambda: w.clone(),
    }[impl]
    run(benchmark, fn, rounds=3 if impl == "reference" else 10)


@pytest.mark.benchmark(group="sparse24_compress")
@pytest.mark.parametrize("impl", ["cast_ext", "reference", "clone"])
def test_sparse24_compress(benchmark, w, impl):
    fn = {
        "cast_ext": lambda: cast_ext.sparse24_compress(w),
        "reference": lambda: ref.sparse24_compress(w),
        "clone": lambda: w.clone(),
    }[impl]
    run(benchmark, fn, rounds=3 if impl == "reference" else 10)
