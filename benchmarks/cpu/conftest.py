"""CPU microbenchmarks (pytest-benchmark). Each op sits in a group beside its baselines, measured
in the same run; ``python -m benchmarks.summarize <json>`` prints the ratios.

``CAST_EXT_BENCH_QUICK=1`` shrinks every shape (CI smoke mode).
"""

from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("CAST_EXT_BENCH_QUICK", "0") == "1"
# Caps on the instruction sets of cast_ext's kernels and of torch's own (ATen's vectorised ops,
# oneDNN, MKL): set together, they run a machine as a lesser CPU would (an AVX2 one, say).
ISA_CAPS = (
    "CAST_EXT_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """The kernels' instruction sets in the results file: cast_ext's version, torch's CPU
    capability and whichever caps were set."""
    import cast_ext

    machine_info["cast_ext_cpu_isa"] = cast_ext.build_info()["cpu_isa"]
    machine_info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["isa_caps"] = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}


def run(benchmark, fn, rounds: int = 5):
    """Time ``fn`` with a fixed number of rounds (the slow references make auto-calibration
    take minutes)."""
    return benchmark.pedantic(fn, rounds=2 if QUICK else rounds, iterations=1, warmup_rounds=1)


@pytest.fixture
def quick() -> bool:
    return QUICK


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the host-time benchmarks); the count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_smollm2_depth() -> torch.nn.Module:
    """A LLaMA with SmolLM2-135M's depth (30 layers; 2 with QUICK) at a width of 64 and a
    vocabulary of 256, random weights from seed 0: each layer's math is a few microseconds, so
    the benchmarks that run it time the host."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2 if QUICK else 30,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)
