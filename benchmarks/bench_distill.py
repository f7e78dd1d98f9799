"""CAST's distillation loss on the GPU: the fused ops against the paths they replace, one run.

Per (tokens, vocab) and dtype: ``ops.distill_fwd`` and ``ops.distill_bwd`` alone, with achieved
GB/s (forward reads the student and teacher logits: 2 tensors; backward reads both and writes
the gradient: 3) as a fraction of the device copy ceiling measured in the same run; and the
whole loss, forward + backward, through ``cast.distill_loss`` on the fused ops, on
``impl="reference"`` (the chunked torch-ops path), and the CE-only loss of a plain fine-tune
(``F.cross_entropy``, torch's fused kernel) as ratios of the fused time. Shapes: the demo's
SmolLM2 vocabulary (49152) at 2k and 8k tokens, LLaMA-3's (128256) at 4k.

Run: ``python -m benchmarks.bench_distill`` (writes ``distill.json`` after every shape, so a run
stopped by a time limit keeps the shapes it finished). Needs a CUDA GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import cast_ext
from benchmarks import _harness
from benchmarks._harness import Row, cuda_time_us, measure_copy_gbps, quick, write_rows
from cast_ext import cast, ops

SHAPES = {"smollm2 2k": (2048, 49152), "smollm2 8k": (8192, 49152), "llama3 4k": (4096, 128256)}


def _rows_for(
    name: str, tokens: int, vocab: int, dtype: torch.dtype, copy_gbps: float
) -> list[Row]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(tokens, vocab, device="cuda", dtype=dtype, generator=gen) * 3
    t = torch.randn(tokens, vocab, device="cuda", dtype=dtype, generator=gen) * 3
    y = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    lse = ops.distill_fwd(s, t, y)[2]
    scale = torch.tensor(1.0 / tokens, device="cuda")
    leaf = s.detach().requires_grad_()

    def loss_step(impl: str) -> None:
        if impl == "ce_only_torch":
            loss = F.cross_entropy(leaf, y)
        else:
            loss = cast.distill_loss(leaf, t, y, impl=impl)
        loss.backward()
        leaf.grad = None

    nbytes = s.numel() * s.element_size()
    times = {
        "distill_fwd": (cuda_time_us(lambda i: ops.distill_fwd(s, t, y), reps=30), 2 * nbytes),
        "distill_bwd": (
            cuda_time_us(lambda i: ops.distill_bwd(s, t, y, lse, scale, eta=1 / 3), reps=30),
            3 * nbytes,
        ),
        "loss_fused": (cuda_time_us(lambda i: loss_step("auto"), reps=20), None),
        "loss_reference": (cuda_time_us(lambda i: loss_step("reference"), warmup=3, reps=5), None),
        "loss_ce_only_torch": (cuda_time_us(lambda i: loss_step("ce_only_torch"), reps=20), None),
    }
    fused_us = times["loss_fused"][0][0]
    rows: list[Row] = []
    for op, ((med, p20, p80), moved) in times.items():
        gbps = None if moved is None else moved / (med * 1e-6) / 1e9
        rows.append(
            {
                "op": op,
                "impl": "cast_ext" if op.startswith("distill") or op == "loss_fused" else op,
                "device": "cuda",
                "dtype": str(dtype).removeprefix("torch."),
                "shape": f"{name} {tokens}x{vocab}",
                "median_us": round(med, 2),
                "p20_us": round(p20, 2),
                "p80_us": round(p80, 2),
                "baseline": "loss_fused",
                "time_vs_fused_loss": round(med / fused_us, 3),
                "gbps": None if gbps is None else round(gbps, 1),
                "fraction_of_copy_ceiling": None if gbps is None else round(gbps / copy_gbps, 3),
                "fraction_of_hbm_peak": _harness.hbm_fraction(gbps),
            }
        )
    return rows


def main() -> None:
    if not (torch.cuda.is_available() and cast_ext.cuda_kernels_available()):
        print("bench_distill: needs a CUDA GPU and the CUDA kernels; skipped")
        return
    copy_gbps = measure_copy_gbps()
    print(f"device copy ceiling: {copy_gbps:.0f} GB/s")
    shapes = dict(list(SHAPES.items())[:1]) if quick() else SHAPES
    rows: list[Row] = []
    path = None
    for dtype in (torch.bfloat16, torch.float32):
        for name, (tokens, vocab) in shapes.items():
            new = _rows_for(name, tokens, vocab, dtype, copy_gbps)
            torch.cuda.empty_cache()
            for r in new:
                frac = r["fraction_of_copy_ceiling"]
                print(
                    f"{r['shape']:<24} {r['dtype']:<9} {r['op']:<20} {r['median_us']:10.1f} us  "
                    f"{r['time_vs_fused_loss']:6.2f}x fused loss"
                    + ("" if frac is None else f"  {r['gbps']:6.0f} GB/s  {frac:5.2f} of copy"),
                    flush=True,
                )
            rows += new
            path = write_rows("distill", rows)  # so far: a killed run keeps these
    print(path)


if __name__ == "__main__":
    main()
