"""A CAST step and a dense AdamW step on the CPU, with and without ``cast.tune_cpu_malloc()``.

glibc's ``malloc`` settings hold for a whole process, so each measurement is a fresh process:
pairs of them, alternating (plain, tuned, plain, tuned, ...), so that the machine's drift falls
on both. Each child builds ``bench_cast_step.Steps`` (SmolLM2-135M's shapes, random weights),
takes two untimed steps of each kind (the first ones grow the heap, tuned or not), then times
``--steps`` steps of each, alternating, and counts the minor page faults and the user and
system CPU time each step took (``getrusage``; a fault is memory the OS fills on first write,
in system time: what the tuning removes). The report: per setting the medians over all its
steps of all its processes, each process's median time, and tuned / plain.

    python -m benchmarks.cpu_malloc [--pairs 4] [--steps 4] [--batch 1] [--seq 256] [--threads 2]

Rows go to ``benchmarks/results/cpu_malloc.json`` (or ``$OUT``).
``CAST_EXT_BENCH_QUICK=1``: a 2-layer model, 1 pair of 3 steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from cast_ext import cast

from ._harness import Row, quick, write_rows
from .bench_cast_step import Steps

STEPS = ("dense_adamw", "cast")


def child(tuned: bool, layers: int, batch: int, seq: int, steps: int, threads: int) -> dict:
    """One process's measurements: per step kind, each step's seconds, minor page faults and
    user and system CPU seconds."""
    if tuned and not cast.tune_cpu_malloc():
        raise SystemExit("cpu_malloc: glibc refused the settings (or this is not glibc)")
    torch.set_num_threads(threads)
    st = Steps(torch.device("cpu"), layers, batch, seq)
    fns = {"dense_adamw": st.dense_step, "cast": st.cast_step}
    keys = ("s", "faults", "user_s", "sys_s")
    out: dict[str, dict[str, list[float]]] = {k: {key: [] for key in keys} for k in STEPS}
    for i in range(2):
        for fn in fns.values():
            fn(i)
    for i in range(steps):
        for name, fn in fns.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn(i + 2)
            t = time.perf_counter() - t0
            r = resource.getrusage(resource.RUSAGE_SELF)
            got = (
                t,
                r.ru_minflt - r0.ru_minflt,
                r.ru_utime - r0.ru_utime,
                r.ru_stime - r0.ru_stime,
            )
            for key, v in zip(keys, got, strict=True):
                out[name][key].append(v)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--child", choices=("plain", "tuned"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    layers, pairs, steps = (2, 1, 3) if quick() else (30, args.pairs, args.steps)
    shape = (layers, args.batch, args.seq)
    if args.child:
        got = child(args.child == "tuned", *shape, steps, args.threads)
        print(json.dumps(got))
        return
    runs: dict[str, list[dict]] = {"plain": [], "tuned": []}
    for _ in range(pairs):
        for setting in runs:
            cmd = [sys.executable, "-m", "benchmarks.cpu_malloc", "--child", setting,
                   "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.splitlines()[-1]))
    base = {"device": "cpu", "dtype": "float32", "threads": args.threads,
            "shape": f"smollm2-135m-shapes L={layers} tokens={args.batch * args.seq}",
            "processes": pairs, "steps_per_process": steps}  # fmt: skip
    rows: list[Row] = []
    print(f"{base['shape']}, {args.threads} threads, {pairs} pairs of processes:")

    def median(name: str, setting: str, key: str) -> float:
        return statistics.median(v for r in runs[setting] for v in r[name][key])

    for name in STEPS:
        for setting, got in runs.items():
            sec = median(name, setting, "s")
            ratio = sec / median(name, "plain", "s")
            row = {"op": "train_step", "impl": f"{name} malloc={setting}", "median_us": sec * 1e6,
                   "minor_faults_per_step": median(name, setting, "faults"),
                   "user_cpu_s_per_step": median(name, setting, "user_s"),
                   "sys_cpu_s_per_step": median(name, setting, "sys_s"),
                   "median_us_per_process": [statistics.median(r[name]["s"]) * 1e6 for r in got],
                   "baseline": f"{name} malloc=plain", "time_vs_baseline": ratio}  # fmt: skip
            rows.append({**base, **row})
            per = " ".join(f"{t / 1e3:.0f}" for t in row["median_us_per_process"])
            print(f"  {name:<12} malloc={setting:<6} {sec * 1e3:8.1f} ms  {ratio:6.3f}x  "
                  f"{row['minor_faults_per_step']:7.0f} faults  "
                  f"user {row['user_cpu_s_per_step']:.2f} s sys {row['sys_cpu_s_per_step']:.2f} s"
                  f"  per process: {per} ms")  # fmt: skip
    print(f"  wrote {write_rows('cpu_malloc', rows)}")


if __name__ == "__main__":
    main()
