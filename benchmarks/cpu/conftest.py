"""CPU microbenchmarks (pytest-benchmark). Each op sits in a group beside its baselines, measured
in the same run; ``python -m benchmarks.summarize <json>`` prints the ratios.

``CAST_EXT_BENCH_QUICK=1`` shrinks every shape (CI smoke mode).
"""

from __future__ import annotations

import os

import pytest

QUICK = os.environ.get("CAST_EXT_BENCH_QUICK", "0") == "1"


def run(benchmark, fn, rounds: int = 5):
    """Time ``fn`` with a fixed number of rounds (the slow references make auto-calibration
    take minutes)."""
    return benchmark.pedantic(fn, rounds=2 if QUICK else rounds, iterations=1, warmup_rounds=1)


@pytest.fixture
def quick() -> bool:
    return QUICK
