"""GPU benchmark of the fused AdamS step: ``python -m benchmarks.bench_adams``.

About 1B fp32 params shaped like 5 LLaMA-2-7B decoder layers (q, k, v, o 4096 x 4096; gate, up
11008 x 4096; down 4096 x 11008), all sparse 2:4, one op call for all 35 tensors. Measured in the
same run: ``torch.optim.AdamW(fused=True)`` on the same params and grads, and the device's copy
bandwidth (``measure_copy_gbps``). Rows: time per step, achieved GB/s at 28 B/param + 1/8 B of
packed mask (read; a refresh also writes mask and prev_mask), fraction of copy bandwidth, and
time ratio to AdamW (``time_vs_baseline``), AdamW timed first. Targets (issue 4): >= 90% of copy
bandwidth, <= 1.0x AdamW's time.

With a mask refresh every 10 steps, two rows: "(refresh every 10)" is the median of single steps,
of which 1 in 10 refreshes, so it is the time of a step without a refresh; "(refresh every 10,
amortized)" times samples of 10 consecutive steps (exactly one refresh each) and reports the
median per step: the refresh's cost spread over its period, the figure to hold against AdamW.
``timing`` in each row says which. The JSON is written after each measurement, so a run stopped
by a time limit keeps what it finished.
``CAST_EXT_BENCH_QUICK=1``: one layer at 1/4 width.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import cast_ext
from benchmarks import _harness
from benchmarks._harness import Row, cuda_time_us, measure_copy_gbps, quick, write_rows

__all__ = ["main"]

HP = {
    "lr": 1e-5,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "decay": 4e-7,
    "total_steps": 1000,
    "n": 2,
    "m": 4,
}


def layer_shapes() -> list[tuple[int, int]]:
    h, f = (1024, 2752) if quick() else (4096, 11008)
    per_layer = [(h, h)] * 4 + [(f, h), (f, h), (h, f)]
    return per_layer * (1 if quick() else 5)


REFRESH = 10  # the mask refresh period of the headline rows

ADAMW = "torch.optim.AdamW(fused=True)"


def main() -> list[Row]:
    """Run the benchmark, print a table, write ``adams.json`` and return the rows."""
    if not (torch.cuda.is_available() and cast_ext.cuda_kernels_available()):
        print("bench_adams: needs a CUDA GPU and the CUDA kernels; skipped")
        return []
    dev = torch.device("cuda")
    shapes = layer_shapes()
    numel = sum(r * c for r, c in shapes)
    gen = torch.Generator(device=dev).manual_seed(0)
    ps = [torch.randn(s, device=dev, generator=gen) * 0.02 for s in shapes]
    gs = [torch.randn(s, device=dev, generator=gen) * 1e-4 for s in shapes]
    mus = [torch.zeros(s, device=dev) for s in shapes]
    vs = [torch.zeros(s, device=dev) for s in shapes]
    masks = [torch.zeros(r, (c + 7) // 8, dtype=torch.uint8, device=dev) for r, c in shapes]
    prevs = [torch.zeros_like(mk) for mk in masks]
    steps = [torch.zeros((), device=dev) for _ in shapes]

    def adams(interval: int, calls: int = 1) -> Callable[[int], None]:
        def run(_: int) -> None:
            for _ in range(calls):
                cast_ext.ops.adams_step_(
                    ps, gs, mus, vs, masks, steps, [], prevs, mask_interval=interval, **HP
                )

        return run

    copy_gbps = measure_copy_gbps()
    shape = f"{len(shapes)} tensors, {numel / 1e9:.3f}B params (LLaMA-2-7B layers)"
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s; {shape}", flush=True)
    bytes_step = numel * (28 + 0.125)
    bytes_refresh = numel * (28 + 0.375)
    rows: list[Row] = []
    base_us = 0.0

    def record(impl: str, t: tuple[float, float, float], nbytes: float, timing: str) -> Path:
        nonlocal base_us
        med, p20, p80 = t
        base_us = base_us or med  # the first row is AdamW's
        gbps = nbytes / (med * 1e-6) / 1e9
        rows.append(
            {
                "op": "adams_step_",
                "impl": impl,
                "device": torch.cuda.get_device_name(),
                "dtype": "float32",
                "shape": shape,
                "median_us": med,
                "p20_us": p20,
                "p80_us": p80,
                "baseline": ADAMW,
                "time_vs_baseline": med / base_us,
                "gbps": gbps,
                "copy_gbps": copy_gbps,
                "frac_of_copy": gbps / copy_gbps,
                "fraction_of_hbm_peak": _harness.hbm_fraction(gbps),
                "tflops": None,
                "timing": timing,
            }
        )
        r = rows[-1]
        print(
            f"{impl:55s} {med / 1e3:8.3f} ms  {gbps:7.0f} GB/s "
            f"({100 * r['frac_of_copy']:5.1f}% of copy)  {r['time_vs_baseline']:5.2f}x AdamW",
            flush=True,
        )
        return write_rows("adams", rows)  # after each row: a run stopped by a limit keeps these

    # The baseline first, so that every row written has its ratio. AdamW(fused) and the op
    # update the same parameter tensors in place; the values do not change the time.
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs, strict=True):
        p.grad = g
    adamw = torch.optim.AdamW(params, lr=HP["lr"], betas=(0.9, 0.95), fused=True)
    record(
        ADAMW,
        cuda_time_us(lambda _: adamw.step(), warmup=3, reps=20),
        numel * 28.0,
        "median of single steps",
    )
    record(
        f"cast_ext.adams_step_ (refresh every {REFRESH})",
        cuda_time_us(adams(REFRESH), warmup=3, reps=20),
        bytes_step,
        f"median of single steps: 1 in {REFRESH} refreshes, so a step without a refresh",
    )
    # Samples of REFRESH consecutive steps: each holds exactly one refresh (steps % interval).
    med, p20, p80 = cuda_time_us(adams(REFRESH, calls=REFRESH), warmup=1, reps=10)
    record(
        f"cast_ext.adams_step_ (refresh every {REFRESH}, amortized)",
        (med / REFRESH, p20 / REFRESH, p80 / REFRESH),
        ((REFRESH - 1) * bytes_step + bytes_refresh) / REFRESH,
        f"median of samples of {REFRESH} consecutive steps (one refresh each), per step",
    )
    path = record(
        "cast_ext.adams_step_ (refresh every step)",
        cuda_time_us(adams(1), warmup=2, reps=10),
        bytes_refresh,
        "median of single steps, each a refresh",
    )
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
