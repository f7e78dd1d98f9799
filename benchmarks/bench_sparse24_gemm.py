"""2:4 sparse GEMM on the GPU: cast_ext's cuSPARSELt wrapper vs dense cuBLAS vs torch's cuSPARSELt.

For every linear-layer weight of LLaMA-2-7B, LLaMA-2-13B and LLaMA-3-8B (bf16, no bias) and
token counts M in {1, 16, 128, 1024, 4096, 16384}, one run times

* ``dense``: ``F.linear(x, W)`` (cuBLAS), the baseline of every ratio;
* ``cast_ext_cslt``: ``cast_ext.ops.cslt_linear`` (cached plan, searched algorithm);
* ``torch_cslt``: ``torch._cslt_sparse_mm(torch._cslt_compress(W), x.t(), transpose_result=True)``
  with its default algorithm, x padded to 8 rows as torch's semi-structured tensor does;
* ``torch_cslt_searched``: the same with the algorithm, split-K and split-K mode from
  ``torch._C._cusparselt.mm_search`` (when this torch has it);
* ``packed`` (M <= 16): ``cast_ext.sparse24_gemm`` on the portable packed format, i.e. the
  packed small-M kernels (SIMT at M = 1, tensor cores from M = 2 on sm80+), which read 56% of
  the dense weight's bytes;
* ``sparse_linear``: ``cast_ext.nn.SparseLinear`` with ``mode="auto"`` (the dispatched layer).

``packed`` runs with ``check_meta=False``: the meta check reads a device flag back, a host sync
per call, which a ``SparseLinear`` makes once per weight (cuBLAS and cuSPARSELt check nothing).

Every timed call, and every trial call of the dispatch, starts with the L2 cache flushed (outside
the timed window): in a model larger than the L2 each layer reads its weight from HBM, and a
weight that stays in the H200's 60 MB L2 from call to call would flatter the small-M rows.
Search, compression and the dispatch's trial calls happen before timing and are not counted.
The implementations of one (weight, M) are timed in rounds, each round calling every one of them
once (``_harness.cuda_time_interleaved``), so that drift during the run falls on all alike.
Each output is checked against the dense one first. Rows: ``speedup_vs_dense`` = dense time /
impl time (> 1 is faster than dense), ``speedup_vs_torch_cslt`` = torch_cslt time / impl time;
TFLOP/s counting the dense 2*M*N*K, its fraction of the TFLOP/s of one 8192^3 bf16 ``torch.mm``
timed in the same run (``fraction_of_measured_mm``: the measured dense ceiling; the 2:4 paths
may exceed 1, their tensor cores' bound being up to twice dense) and, where the GPU's spec-sheet
bf16 tensor-core peak is known (``PEAK_BF16_TFLOPS``: dense, doubled for the 2:4 paths), its
fraction of that peak (``fraction_of_peak``); GB/s of the bytes the impl must move (its weight
as stored, x, y) and its fraction of a device copy's GB/s measured in the same run (the bound of
the memory-bound small-M rows). A PNG plot of the
speedup over M is written beside the JSON (if matplotlib is importable).

Run: ``python -m benchmarks.bench_sparse24_gemm`` (CAST_EXT_BENCH_QUICK=1: 2 shapes, 3 M).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cast_ext
from cast_ext import ops
from cast_ext.nn import SparseLinear, dispatch_decisions

from . import _harness
from ._harness import (
    Row,
    cuda_time_interleaved,
    cuda_time_us,
    l2_flusher,
    measure_copy_gbps,
    measure_mm_tflops,
    quick,
    write_rows,
)

__all__ = ["MODELS", "TOKENS", "main", "run"]

# (out_features N, in_features K) of each model's linear layers.
MODELS: dict[str, list[tuple[int, int]]] = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama2-13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
DTYPE = torch.bfloat16

# Spec-sheet dense bf16 tensor-core peaks (TFLOP/s, without sparsity), by device-name substring;
# 2:4 sparse runs at twice these. SXM parts; unknown GPUs get no fraction.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "A100": 312.0}

# Which paths run on the 2:4 sparse tensor cores (their peak is twice dense).
_SPARSE_TC = {"cast_ext_cslt", "torch_cslt", "torch_cslt_searched", "sparse"}


def peak_tflops(device: str, impl: str) -> float | None:
    """The tensor-core peak that bounds ``impl`` on ``device`` (None: unknown GPU, or the packed
    kernels, bounded by memory bandwidth at the M <= 16 they serve)."""
    dense = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in device), None)
    if dense is None or impl == "packed":
        return None
    return 2 * dense if impl in _SPARSE_TC else dense


def moved_bytes(impl: str, m: int, n: int, k: int, weight_bytes: dict[str, int]) -> int:
    """Bytes ``impl`` must move at least: its weight as stored, x read and y written (bf16)."""
    return weight_bytes[impl] + 2 * m * k + 2 * m * n


# torch's algorithm choice: (alg_id, split_k, split_k_mode); (0, 1, -1) is its default.
TorchAlg = tuple[int, int, int]


def _torch_cslt_fn(wc: torch.Tensor, x: torch.Tensor, alg: TorchAlg) -> Callable[[], torch.Tensor]:
    m = x.shape[0]
    pad = (-m) % 8
    alg_id, split_k, split_k_mode = alg

    def fn() -> torch.Tensor:
        xp = F.pad(x, (0, 0, 0, pad)) if pad else x
        y = torch._cslt_sparse_mm(
            wc,
            xp.t(),
            transpose_result=True,
            alg_id=alg_id,
            split_k=split_k,
            split_k_mode=split_k_mode,
        )
        return y[:m] if pad else y

    return fn


def _torch_search(wc: torch.Tensor, x: torch.Tensor) -> TorchAlg | None:
    """torch's searched (alg_id, split_k, split_k_mode), or None where this torch has no search."""
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is None:
        return None
    xp = F.pad(x, (0, 0, 0, (-x.shape[0]) % 8))
    try:
        found = search(wc, xp.t(), None, None, None, True)
        return int(found[0]), int(found[1]), int(found[2])
    except (RuntimeError, TypeError, IndexError, ValueError):
        return None


def _settle(layer: SparseLinear, xs: list[torch.Tensor], flush: Callable[[], Any]) -> str:
    """Call ``layer`` (L2 flushed before each call, as in the timing) until the dispatch has
    decided its bucket; return the choice."""
    decided = len(dispatch_decisions())
    for i in range(100):
        if len(dispatch_decisions()) > decided:
            return str(dispatch_decisions()[-1]["choice"])
        flush()
        layer(xs[i % len(xs)])
    raise RuntimeError(f"bench_sparse24_gemm: no dispatch decision after 100 calls of {layer}")


def _failed(rows: list[Row], row: Row, e: Exception) -> None:
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    print(f"{row['shape']} {row['impl']}: {row['error']}", flush=True)


def _ok(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return y.shape == ref.shape and bool(
        ((y.float() - ref.float()).abs() <= 2e-2 * ref.float().abs() + 5e-2).all()
    )


def _impls(
    xs: list[torch.Tensor],
    w: torch.Tensor,
    wc: torch.Tensor,
    wc_torch: torch.Tensor,
    layer: SparseLinear,
) -> dict[str, Callable[[int], Any]]:
    """The timed callables, each taking the index of the input copy."""
    n, k = w.shape
    torch_fns = [_torch_cslt_fn(wc_torch, x, (0, 1, -1)) for x in xs]
    impls: dict[str, Callable[[int], Any]] = {
        "dense": lambda i: F.linear(xs[i], w),
        "cast_ext_cslt": lambda i: ops.cslt_linear(xs[i], wc, n, k),
        "torch_cslt": lambda i: torch_fns[i](),
        "sparse_linear": lambda i: layer(xs[i]),
    }
    if xs[0].shape[0] <= 16:
        impls["packed"] = lambda i: cast_ext.sparse24_gemm(
            xs[i], layer.values, layer.metadata, check_meta=False
        )
    alg = _torch_search(wc_torch, xs[0])
    if alg is not None:
        searched = [_torch_cslt_fn(wc_torch, x, alg) for x in xs]
        impls["torch_cslt_searched"] = lambda i: searched[i]()
    return impls


def _setup(n: int, k: int) -> tuple[torch.Tensor, dict[str, Any], dict[str, int]]:
    """The pruned weight, its compressed forms and SparseLinear (None where building one
    failed, which is printed; the implementations using it then record the error in their
    rows), and the bytes each path reads for the weight."""
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=DTYPE)
    w = ops.sparse24_prune(lin.weight.detach())
    with torch.no_grad():
        lin.weight.copy_(w)
    built: dict[str, Any] = {}
    for name, make in (
        ("wc", lambda: ops.cslt_compress(w)),
        ("wc_torch", lambda: torch._cslt_compress(w)),
        ("layer", lambda: SparseLinear.from_dense(lin, mode="auto", warn=False)),
    ):
        try:
            built[name] = make()
        except Exception as e:  # first contact with the GPU: say so, time the others
            built[name] = None
            print(f"N={n} K={k}: {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    half = w.numel()  # bytes of a 2:4 bf16 weight's kept values
    weight_bytes = {
        "dense": w.numel() * 2,
        "cast_ext_cslt": built["wc"].numel() * 2 if built["wc"] is not None else half,
        "torch_cslt": built["wc_torch"].numel() * 2 if built["wc_torch"] is not None else half,
        "packed": half + w.numel() // 8,
    }
    weight_bytes["torch_cslt_searched"] = weight_bytes["torch_cslt"]
    weight_bytes["sparse"] = weight_bytes["cast_ext_cslt"]
    return w, built, weight_bytes


def run(rows: list[Row], reps: int = 30) -> None:
    """Time every (weight, M), appending the rows to ``rows`` and writing them after every M
    (a run stopped by a time limit keeps what it measured). An implementation that raises (this
    is the wrapper's first contact with a GPU) gets a row with its error; the others go on."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for model, layers in MODELS.items():
        for nk in layers:
            shapes.setdefault(nk, []).append(model)
    tokens = TOKENS
    if quick():
        shapes = dict(list(shapes.items())[:2])
        tokens = [1, 128, 4096]
    device = torch.cuda.get_device_name()
    flush = l2_flusher()
    copy_gbps = measure_copy_gbps()
    mm_tflops = measure_mm_tflops()  # the measured dense ceiling, a few ms
    print(
        f"{device}: device copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s", flush=True
    )
    for (n, k), models in shapes.items():
        w, built, weight_bytes = _setup(n, k)
        wc, wc_torch, layer = built["wc"], built["wc_torch"], built["layer"]
        for m in tokens:
            xs = [torch.randn(m, k, device="cuda", dtype=DTYPE) for _ in range(2)]
            ref = F.linear(xs[0], w)
            impls = _impls(xs, w, wc, wc_torch, layer)
            first = len(rows)
            with torch.no_grad():
                ready: dict[str, tuple[Row, str, bool]] = {}  # name -> (row, path, correct)
                for name, fn in impls.items():
                    row: Row = {
                        "op": "sparse24_gemm",
                        "impl": name,
                        "device": device,
                        "dtype": "bfloat16",
                        "shape": f"x[{m},{k}] @ W[{n},{k}]^T",
                        "m": m,
                        "n": n,
                        "k": k,
                        "models": models,
                    }
                    try:
                        path = _settle(layer, xs, flush) if name == "sparse_linear" else name
                        # after the dispatch settled: the path timed is the one checked
                        ready[name] = (row, path, _ok(fn(0), ref))  # also: plan, search
                    except Exception as e:
                        _failed(rows, row, e)
                try:
                    stats = cuda_time_interleaved(
                        {name: impls[name] for name in ready}, n_inputs=2, reps=reps, flush=flush
                    )
                except Exception:  # one of them failed while timed: time each alone
                    stats = {}
                    for name, (row, _, _) in ready.items():
                        try:
                            stats[name] = cuda_time_us(
                                impls[name], n_inputs=2, warmup=5, reps=reps, flush=flush
                            )
                        except Exception as e:
                            _failed(rows, row, e)
                times = {name: t[0] for name, t in stats.items()}
                for name, (med, p20, p80) in stats.items():
                    row, path, correct = ready[name]
                    tflops = 2 * m * n * k / (med * 1e-6) / 1e12
                    peak = peak_tflops(device, path)
                    gbps = moved_bytes(path, m, n, k, weight_bytes) / (med * 1e-6) / 1e9
                    row.update(
                        {
                            "path": path,
                            "median_us": round(med, 2),
                            "p20_us": round(p20, 2),
                            "p80_us": round(p80, 2),
                            "correct": correct,
                            "l2": "flushed before each call",
                            "tflops": round(tflops, 2),
                            "peak_tflops": peak,
                            "fraction_of_peak": None if peak is None else round(tflops / peak, 3),
                            "measured_mm_tflops": round(mm_tflops, 1),
                            "fraction_of_measured_mm": round(tflops / mm_tflops, 3),
                            "gbps": round(gbps, 1),
                            "fraction_of_copy_gbps": round(gbps / copy_gbps, 3),
                            "fraction_of_hbm_peak": _harness.hbm_fraction(gbps),
                        }
                    )
                    rows.append(row)
            timed = [r for r in rows[first:] if "median_us" in r]
            for row in timed:
                row["baseline"] = "dense F.linear (cuBLAS)"
                for base in ("dense", "torch_cslt"):
                    if base in times:
                        row[f"speedup_vs_{base}"] = round(times[base] / row["median_us"], 3)
            summary = (
                f"{r['impl']}={r['median_us']:.1f}us/{r.get('speedup_vs_dense', math.nan):.2f}x"
                for r in timed
            )
            print(f"N={n:5d} K={k:5d} M={m:5d}  " + "  ".join(summary), flush=True)
            write_rows("sparse24_gemm", rows)
        del w, wc, wc_torch, layer, built
        torch.cuda.empty_cache()


def _plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written")
        return
    shapes = sorted({(r["n"], r["k"]) for r in rows})
    cols = 3
    fig, axes = plt.subplots(
        (len(shapes) + cols - 1) // cols, cols, figsize=(15, 4 * ((len(shapes) + 2) // 3))
    )
    for ax, (n, k) in zip(getattr(axes, "flat", [axes]), shapes, strict=False):
        impls = ("cast_ext_cslt", "packed", "torch_cslt", "torch_cslt_searched", "sparse_linear")
        for impl in impls:
            pts = sorted(
                (r["m"], r["speedup_vs_dense"])
                for r in rows
                if (r["n"], r["k"], r["impl"]) == (n, k, impl) and "speedup_vs_dense" in r
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"W [{n}, {k}]")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=7)
    fig.suptitle(f"2:4 sparse GEMM, bf16, {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main() -> None:
    """Run, print a summary, write JSON rows and the plot."""
    if not torch.cuda.is_available() or not cast_ext.cusparselt_available():
        print("bench_sparse24_gemm: needs a CUDA GPU and cast_ext built with cuSPARSELt; skipped")
        return
    rows: list[Row] = []
    try:
        run(rows, reps=10 if quick() else 30)
    finally:  # also when stopped (SIGINT at the suite's time limit): what was measured stays
        path = write_rows("sparse24_gemm", rows)
        print(f"rows: {path}")
        _plot(rows, path.with_suffix(".png"))
    print("dispatch decisions:", dispatch_decisions())
    info = cast_ext.nn.cslt_cache_info()
    print(f"cuSPARSELt plan cache: plans={info['plans']} hits={info['hits']} "
          f"misses={info['misses']} searches={info['searches']}")  # fmt: skip
    if os.environ.get("CAST_EXT_CSLT_SAVE_ALGS") == "1":
        print("algorithms saved to", cast_ext.nn.save_cslt_algs())


if __name__ == "__main__":
    main()
