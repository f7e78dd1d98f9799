"""One timing harness for the GPU benchmarks (CPU microbenchmarks use pytest-benchmark).

Every figure is measured beside its baseline in the same process and reported as a row:
``op, impl, device, dtype, shape, median_us, p20_us, p80_us, baseline, gbps, tflops, versions,
git sha, date`` and its ratios, named for their direction: ``time_vs_<baseline>`` is impl time /
baseline time (< 1 is faster), ``speedup_vs_<baseline>`` is baseline time / impl time (> 1 is
faster). Rows go to a JSON file under ``benchmarks/results/`` (or ``$OUT``).

CUDA timing: CUDA events around each call, median of many calls after warm-up, with inputs
rotated over several copies, or the L2 cache flushed before each call (outside the timed window),
so that the L2 cache (50 MB on an H100, 60 MB on an H200) does not flatter memory-bound kernels.
The flush reads, so it leaves the L2 holding clean lines: the timed call evicts them for free,
where a flush that writes would leave dirty lines for the timed call to write back to HBM.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cast_ext._version import git_sha

__all__ = [
    "Row",
    "cpu_time_us",
    "cuda_time_us",
    "env_info",
    "hbm_fraction",
    "l2_flusher",
    "measure_copy_gbps",
    "measure_mm_tflops",
    "quick",
    "write_rows",
]

ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, Any]


def quick() -> bool:
    """True when ``CAST_EXT_BENCH_QUICK=1``: small shapes, few repeats (CI smoke mode)."""
    return os.environ.get("CAST_EXT_BENCH_QUICK", "0") == "1"


def env_info() -> dict[str, Any]:
    """Versions and hardware, stored with every result file."""
    import cast_ext

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "cast_ext": cast_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "build": cast_ext.build_info(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["torch_cuda"] = torch.version.cuda
        info["cusparselt_torch"] = torch.backends.cusparselt.version()
    return info


# Spec-sheet HBM bandwidth (GB/s, SXM parts) by device-name substring, the most specific first:
# the hardware limit a memory-bound kernel's GB/s is reported as a fraction of (beside the
# measured copy, about 4.3 TB/s on an H200). Unknown GPUs get no fraction.
PEAK_HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def hbm_fraction(gbps: float | None) -> float | None:
    """``gbps`` as a fraction of this GPU's spec-sheet HBM bandwidth (None where unknown)."""
    name = torch.cuda.get_device_name()
    peak = next((v for key, v in PEAK_HBM_GBPS.items() if key in name), None)
    return None if gbps is None or peak is None else round(gbps / peak, 3)


def l2_flusher() -> Callable[[], Any]:
    """A function that evicts the GPU's L2 cache by reading a buffer of twice the L2's size.

    A read (a max-reduction into one element) rather than a write such as ``zero_``: lines a
    write leaves in the L2 are dirty, and evicting them inside the next timed call would charge
    it up to an L2's worth of HBM writes (about 14 us on an H200). The previous timed call's
    dirty output lines are written back during the flush instead, outside the timed window.
    """
    l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or 64 << 20
    buf = torch.zeros(2 * l2 // 4, dtype=torch.float32, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    return lambda: torch.amax(buf, dim=0, out=out)


def cuda_time_us(
    fn: Callable[[int], Any],
    n_inputs: int = 1,
    warmup: int = 10,
    reps: int = 100,
    flush: Callable[[], Any] | None = None,
    host_ahead_cycles: int = 200_000,
) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of ``fn(i)`` in microseconds on the current stream.

    Device time: before each call the stream first spins ``host_ahead_cycles`` GPU clocks
    (``torch.cuda._sleep``; 200k: about 0.1 ms at an H200's 1.98 GHz), outside the events, so
    the host has queued the call before the GPU reaches its start event. Without it a call
    whose host side (Python dispatch, a plan lookup) takes longer than the GPU's previous work
    (a 35 us L2 flush) would have the GPU idle inside its events, measuring the host.

    Args:
        fn: called with the index of the input copy to use (``i % n_inputs``), so callers can
            rotate over several copies of their inputs.
        n_inputs: number of input copies to rotate over.
        warmup: untimed calls first.
        reps: timed calls.
        flush: called before each timed call, outside its events (e.g. :func:`l2_flusher`'s
            function: every call then reads its operands from HBM, as a layer of a model
            larger than the L2 does).
    """
    return cuda_time_interleaved({"fn": fn}, n_inputs, warmup, reps, flush, host_ahead_cycles)["fn"]


def cuda_time_interleaved(
    fns: dict[str, Callable[[int], Any]],
    n_inputs: int = 1,
    warmup: int = 5,
    reps: int = 30,
    flush: Callable[[], Any] | None = None,
    host_ahead_cycles: int = 200_000,
) -> dict[str, tuple[float, float, float]]:
    """:func:`cuda_time_us` of several callables in one loop: each of ``reps`` rounds times every
    callable once, starting one further along the list each round. Whatever drifts during a
    run (clocks, temperature, another process) then falls on every callable alike, where timing
    them one after the other charged it to whichever ran at the time: on the H200, a
    ``SparseLinear`` that had chosen dense, the very cuBLAS call of the baseline, read 0.96x to
    1.01x of it. Calls rotate over the ``n_inputs`` copies one call at a time (round ``r``'s
    ``j``-th call takes copy ``(r * len(fns) + j) % n_inputs``), so that consecutive calls read
    different copies: with one copy per round, every callable after a round's first read its
    input from the L2 where the first had left it. Returns each name's (median, 20th, 80th
    percentile) in microseconds."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](i % n_inputs)
    torch.cuda.synchronize()
    pairs: dict[str, list[tuple[Any, Any]]] = {name: [] for name in names}
    for r in range(reps):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(host_ahead_cycles)
            if flush is not None:
                flush()
            start.record()
            fns[name]((r * len(names) + j) % n_inputs)
            end.record()
            pairs[name].append((start, end))
    torch.cuda.synchronize()
    return {
        name: _stats(sorted(s.elapsed_time(e) * 1e3 for s, e in ps)) for name, ps in pairs.items()
    }


def cpu_time_us(fn: Callable[[], Any], warmup: int = 2, reps: int = 10) -> tuple[float, ...]:
    """Median, 20th and 80th percentile wall time of ``fn()`` in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return _stats(sorted(times))


def _stats(times: Sequence[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def measure_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    med, _, _ = cuda_time_us(lambda i: dst.copy_(src), warmup=5, reps=30)
    return 2 * nbytes / (med * 1e-6) / 1e9


def measure_mm_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """TFLOP/s (2 n^3 per product) of one ``n x n x n`` ``torch.mm`` (cuBLAS) on random data: the
    device's measured matrix-product ceiling (about 790 at 8192 in bf16 on an H200; 1.1 TFLOP,
    about 1.4 ms per product there)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    med, _, _ = cuda_time_us(lambda i: torch.mm(a, b, out=out), warmup=3, reps=10)
    return 2 * n**3 / (med * 1e-6) / 1e12


def results_dir(out_dir: str | os.PathLike[str] | None = None) -> Path:
    """``out_dir``, else ``$OUT`` when set (the GPU machine), else ``benchmarks/results``;
    created if missing."""
    out = Path(out_dir or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_rows(name: str, rows: list[Row], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``rows`` with the environment to ``<results_dir(out_dir)>/<name>.json`` and return
    the path."""
    path = results_dir(out_dir) / f"{name}.json"
    # whole or not at all: a benchmark killed at its time limit mid-write keeps its last file
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"env": env_info(), "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return path
