"""GPU: 2:4 mask, prune and compress against a clone of the same tensor (the copy bandwidth
bound) and against torch's own 2:4 kernels, all in one run.

Per LLaMA weight shape, bf16: achieved GB/s (bytes read + written) and its fraction of the
clone's GB/s, with and without the value check (one sync per call); time against
``torch._sparse_semi_structured_tile`` (xFormers' one-pass sparsifier, which writes W and W^T
compressed; with its ``largest_abs_values_greedy`` rule, keeping the largest |w| as ours does)
and ``torch._cslt_compress`` (cuSPARSELt's compressor; needs a pruned input), both against
``sparse24_compress``, the op that also writes a compressed weight. All of one shape are timed in
rounds (each round calls every op once), so that drift falls on the clone and the ops alike.
Target (issue 3): >= 80% of the clone's bandwidth.

Run: ``python -m benchmarks.bench_sparse24_mask`` (writes ``sparse24_mask.json`` after every
shape, so a run stopped by a time limit keeps the shapes it finished).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import cast_ext
from benchmarks import _harness
from benchmarks._harness import (
    Row,
    cuda_time_interleaved,
    measure_copy_gbps,
    quick,
    write_rows,
)

# torch's tile sparsifier ranking |w| (LargestValuesGreedy<AbsOp>), as cast_ext's 2:4 rule does.
TILE_ALGORITHM = "largest_abs_values_greedy"

SHAPES = {
    "llama2-7b.q": (4096, 4096),
    "llama2-7b.up": (11008, 4096),
    "llama2-7b.down": (4096, 11008),
    "llama2-13b.up": (13824, 5120),
    "llama3-8b.up": (14336, 4096),
}


def _unchecked(fn: Callable[[int], Any]) -> Callable[[int], Any]:
    """``fn`` with the CUDA value checks off for the call (host work, outside the timing)."""

    def call(i: int) -> Any:
        cast_ext.set_cuda_value_checks(False)
        try:
            return fn(i)
        finally:
            cast_ext.set_cuda_value_checks(True)

    return call


def _rows_for(name: str, shape: tuple[int, int], dtype: torch.dtype, copy_gbps: float) -> list[Row]:
    n_inputs = 4  # rotate: 4 copies of 32-235 MB each, more than the 60 MB L2
    ws = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(n_inputs)]
    numel, esize = ws[0].numel(), ws[0].element_size()
    out_bytes = {
        "clone": numel * esize,
        "sparse24_mask": numel,  # bool
        "sparse24_prune": numel * esize,
        "sparse24_compress": numel * esize // 2 + numel // 8,
    }
    fns = {
        "clone": lambda i: ws[i].clone(),
        "sparse24_mask": lambda i: cast_ext.sparse24_mask(ws[i]),
        "sparse24_prune": lambda i: cast_ext.sparse24_prune(ws[i]),
        "sparse24_compress": lambda i: cast_ext.sparse24_compress(ws[i]),
    }
    timed: dict[str, Callable[[int], Any]] = dict(fns)
    for op, fn in fns.items():
        if op != "clone":
            timed[f"{op}[no-check]"] = _unchecked(fn)
    baselines: set[str] = set()
    if dtype in (torch.float16, torch.bfloat16):  # torch's 2:4 paths are 16-bit only
        pruned = [cast_ext.sparse24_prune(w) for w in ws]
        candidates = {
            # "" would be LargestValuesGreedy<IdentityOp>, the largest signed values
            # (ATen/native/sparse/cuda/ComputeSparseTile.h, named_algorithms)
            "torch._sparse_semi_structured_tile": lambda i: torch._sparse_semi_structured_tile(
                ws[i], TILE_ALGORITHM, True
            ),
            "torch._cslt_compress": lambda i: torch._cslt_compress(pruned[i]),
        }
        for name_, fn in candidates.items():
            try:  # a baseline this torch build lacks or refuses must not cost the other rows
                fn(0)
            except (RuntimeError, AttributeError, NotImplementedError) as e:
                print(f"{name_}: not measured ({type(e).__name__}: {str(e)[:200]})")
                continue
            timed[name_] = fn
            baselines.add(name_)
    # one loop of rounds, each timing every op once: drift falls on the clone and the ops alike
    times = cuda_time_interleaved(timed, n_inputs=n_inputs, reps=50)
    clone_us = times["clone"][0]
    rows = []
    for key, (med, p20, p80) in times.items():
        op = key.split("[")[0]
        moved = numel * esize + out_bytes.get(op, 0)
        gbps = moved / (med * 1e-6) / 1e9 if op in out_bytes else None
        impl = key if key in baselines else ("cast_ext" + key[len(op) :])
        rows.append(
            {
                "op": op,
                "impl": "torch" if op == "clone" else impl,
                "device": "cuda",
                "dtype": str(dtype).removeprefix("torch."),
                "shape": f"{name} {shape[0]}x{shape[1]}",
                "median_us": round(med, 2),
                "p20_us": round(p20, 2),
                "p80_us": round(p80, 2),
                "baseline": "clone",
                "time_vs_clone": round(med / clone_us, 3),
                "gbps": None if gbps is None else round(gbps, 1),
                "fraction_of_clone_gbps": None
                if gbps is None
                else round(gbps / (2 * numel * esize / (clone_us * 1e-6) / 1e9), 3),
                "fraction_of_copy_ceiling": None if gbps is None else round(gbps / copy_gbps, 3),
                "fraction_of_hbm_peak": _harness.hbm_fraction(gbps),
            }
        )
        # torch's 2:4 ops' time / ours, on the comparable op only: both torch ops write a
        # compressed weight (values + metadata), as sparse24_compress does; sparse24_mask writes
        # a bool mask and sparse24_prune a dense pruned copy, which neither torch op makes.
        if op == "sparse24_compress" and rows[-1]["impl"].startswith("cast_ext"):
            rows[-1]["speedup_vs"] = {b: round(times[b][0] / med, 3) for b in sorted(baselines)}
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(
            f"{r['shape']:<28} {r['dtype']:<9} {r['impl']:<36} {r['op']:<18} "
            f"{r['median_us']:9.1f} us  {r['time_vs_clone']:6.2f}x clone time  "
            f"{_fmt(r['gbps'], '7.0f'):>7} GB/s  "
            f"{_fmt(r['fraction_of_clone_gbps'], '5.2f'):>5} of clone",
            flush=True,
        )


def main() -> None:
    if not (torch.cuda.is_available() and cast_ext.cuda_kernels_available()):
        print("bench_sparse24_mask: needs a CUDA GPU and the CUDA kernels; skipped")
        return
    copy_gbps = measure_copy_gbps()
    print(f"device copy ceiling: {copy_gbps:.0f} GB/s")
    shapes = dict(list(SHAPES.items())[:1]) if quick() else SHAPES
    rows: list[Row] = []
    path = None
    for dtype in (torch.bfloat16, torch.float32):
        for name, shape in shapes.items():
            new = _rows_for(name, shape, dtype, copy_gbps)
            _print_rows(new)
            rows += new
            path = write_rows("sparse24_mask", rows)  # so far: a killed run keeps these
    print(path)


if __name__ == "__main__":
    main()
