"""A MoE layer's experts: transformers' dense experts module (its ``grouped_mm`` forward: one
grouped GEMM per projection) against the same 2:4 weights after ``cast_ext.nn.to_sparse`` (an
``nn.SparseExperts``: a loop over the experts that got tokens, each projection a ``SparseLinear``
dispatched per token count), bf16, in one run.

Shapes: Qwen3-30B-A3B's experts (128 experts of hidden 2048 and expert MLP 768, 8 routed per
token) and Mixtral-8x7B's (8 experts of 4096 and 14336, 2 routed per token), at 1 to 4096 tokens,
each token routed to ``top_k`` distinct experts drawn at random (a balanced router).

Two times per row, both medians over interleaved rounds: ``median_us``, wall time per call of a
burst of calls (the host's launches included: the loop launches a few kernels per expert hit,
where the grouped forward launches a few per layer), and ``device_us``, CUDA events with the host
queued ahead and the L2 flushed before each call (the kernels alone, the weights read from HBM).
``speedup_vs_dense`` is the dense module's time over the sparse one's (> 1: the 2:4 experts are
faster). ``gbps`` counts the weight bytes of the experts hit (bf16 dense, or the 2:4 ``values`` +
``metadata``: 9/16 of them), and ``tflops`` the products' dense FLOPs, per device time;
``fraction_of_hbm_peak`` is that GB/s over the GPU's spec-sheet bandwidth (the limit where a few
tokens make the layer memory-bound). ``correct``: the two outputs agree within 2% of the largest
(bf16, different summation orders).

    python -m benchmarks.bench_experts [--device cuda]

Rows go to ``benchmarks/results/experts.json`` (or ``$OUT``), written after each shape.
``CAST_EXT_BENCH_QUICK=1``: small shapes, few repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import cast_ext

from ._harness import Row, cuda_time_interleaved, hbm_fraction, l2_flusher, quick, write_rows

# name -> (experts, hidden, expert MLP width, experts routed per token)
SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}
QUICK_SHAPES = {"tiny": (8, 256, 128, 2)}
TOKENS = [1, 16, 128, 1024, 4096]
QUICK_TOKENS = [1, 16, 64]


def experts_pair(
    experts: int, hidden: int, inter: int, top_k: int, device: str
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dense experts module (grouped_mm) and its SparseExperts, on the same 2:4 weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=4,
    )  # fmt: skip
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        dense = Qwen3MoeExperts(cfg)
    dense = dense.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.02, generator=gen)
    with warnings.catch_warnings():  # random weights: pruned to 2:4 by magnitude
        warnings.simplefilter("ignore")
        sparse = cast_ext.nn.to_sparse(copy.deepcopy(dense).requires_grad_(False), experts=True)
    if not isinstance(sparse, cast_ext.nn.SparseExperts):  # left dense: nothing to compare
        raise RuntimeError(f"bench_experts: to_sparse left the experts dense ({type(sparse)})")
    dense = cast_ext.nn.to_dense(copy.deepcopy(sparse))  # the same 2:4 weights, stacked
    return dense, sparse


def weight_bytes(hit: int, hidden: int, inter: int) -> int:
    """The bf16 bytes of ``hit`` experts' dense weights (``gate_up`` ``[2 inter, hidden]`` and
    ``down`` ``[hidden, inter]``)."""
    return hit * 3 * inter * hidden * 2


def routing(
    tokens: int, experts: int, top_k: int, hidden: int, device: str
) -> tuple[torch.Tensor, ...]:
    """Hidden states and a balanced router's choices: each token's ``top_k`` distinct experts
    drawn at random, with softmax weights (seeded by ``tokens``)."""
    gen = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    index = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1)
    return h, index.to(device), weights.to(device, torch.bfloat16)


def wall_us(fns: dict[str, Callable[[], Any]], rounds: int, burst: int, sync: Callable) -> dict:
    """Median wall time per call of ``burst`` back-to-back calls, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            sync()
            t0 = time.perf_counter()
            for _ in range(burst):
                fns[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / burst * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = QUICK_SHAPES if quick() else SHAPES
    tokens_list = QUICK_TOKENS if quick() else TOKENS
    rounds, burst = (3, 2) if quick() else (15, 10)
    flush = l2_flusher() if cuda else None
    rows: list[Row] = []
    for name, (experts, hidden, inter, top_k) in shapes.items():
        dense, sparse = experts_pair(experts, hidden, inter, top_k, args.device)
        for tokens in tokens_list:
            inputs = routing(tokens, experts, top_k, hidden, args.device)
            fns = {
                "dense_grouped_mm": torch.no_grad()(lambda m=dense, a=inputs: m(*a)),
                "sparse_experts": torch.no_grad()(lambda m=sparse, a=inputs: m(*a)),
            }
            index = inputs[1]
            for _ in range(16):  # the SparseLinear dispatch's trials (6 calls per path)
                fns["sparse_experts"]()
            want, got = (fns[k]().float() for k in ("dense_grouped_mm", "sparse_experts"))
            correct = bool((got - want).abs().max() <= 0.02 * want.abs().max() + 1e-3)
            wall = wall_us(fns, rounds, burst, sync)
            # the weights read from HBM, as in a model whose other layers evict them from the L2
            device = (
                cuda_time_interleaved(
                    {k: (lambda i, f=f: f()) for k, f in fns.items()}, flush=flush
                )
                if cuda
                else {}
            )
            hit = int(index.unique().numel())
            dense_bytes = weight_bytes(hit, hidden, inter)
            flops = 2 * tokens * top_k * (2 * inter * hidden + hidden * inter)
            for impl, wall_t in wall.items():
                dev_t = device[impl][0] if cuda else None
                nbytes = dense_bytes if impl.startswith("dense") else dense_bytes * 9 // 16
                gbps = nbytes / (dev_t * 1e-6) / 1e9 if dev_t else None
                rows.append({
                    "op": "moe_experts", "impl": impl, "shape": name, "experts": experts,
                    "hidden": hidden, "inter": inter, "top_k": top_k, "tokens": tokens,
                    "experts_hit": hit, "dtype": "bfloat16", "correct": correct,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "median_us": round(wall_t, 2),
                    "device_us": None if dev_t is None else round(dev_t, 2),
                    "baseline": "dense_grouped_mm",
                    "speedup_vs_dense": round(wall["dense_grouped_mm"] / wall_t, 3),
                    "device_speedup_vs_dense": (
                        round(device["dense_grouped_mm"][0] / dev_t, 3) if dev_t else None
                    ),
                    "gbps": None if gbps is None else round(gbps, 1),
                    "fraction_of_hbm_peak": hbm_fraction(gbps) if cuda else None,
                    "tflops": None if dev_t is None else round(flops / (dev_t * 1e-6) / 1e12, 2),
                })  # fmt: skip
                print(
                    f"{name:>14} T={tokens:<5} {impl:<17} {wall_t:10.1f} us wall"
                    + (f" {dev_t:10.1f} us device" if dev_t else "")
                    + f"  speedup vs dense {rows[-1]['speedup_vs_dense']:.2f}x"
                )
            write_rows("experts", rows)
        del dense, sparse
        if cuda:
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
