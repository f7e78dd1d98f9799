"""``python -m cast_ext {info,demo,bench}``.

* ``info``: the build and runtime facts a bug report needs.
* ``demo``: the CAST demo on a real pretrained LLM (see ``python -m cast_ext demo --help``).
* ``bench``: the microbenchmarks (CPU: pytest-benchmark; GPU: the CUDA benchmarks), run from a
  source checkout (``benchmarks/`` is not installed with the package).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import cast_ext

__all__ = ["info_lines", "main"]


def _cslt_runtime() -> str:
    """The cuSPARSELt the process runs (torch's copy when torch loaded one first: one soname),
    which need not be the header version the kernels were built against."""
    fn = getattr(cast_ext._C, "cslt_runtime_version", None)
    if fn is None:
        return "unknown"
    try:
        return str(fn())
    except RuntimeError as e:
        return f"unknown ({e})"


def info_lines() -> list[str]:
    """The lines ``python -m cast_ext info`` prints."""
    b = cast_ext.build_info()
    package = Path(cast_ext.__file__).parent
    kernels = Path(cast_ext._C.__file__)
    lines = [
        f"cast_ext {cast_ext.__version__} ({package})",
        f"kernels: {kernels}"
        + (
            ""
            if kernels.parent.resolve() == package.resolve()
            else " (NOT this package's folder: built from another tree?)"
        ),
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), threads {torch.get_num_threads()}",
        f"CPU kernels: {b['cpu_isa']} (cap with CAST_EXT_CPU_ISA=avx512_bf16|avx512|avx2|default)",
        f"built against torch {b['torch_version']} with {b['compiler']}"
        + (" [debug]" if b["debug"] else ""),
        f"with_cuda: {b['with_cuda']}"
        + (f" (CUDA {b['cuda_version']}, archs {b['cuda_archs']})" if b["with_cuda"] else ""),
        f"with_cusparselt: {b['with_cusparselt']}"
        + (
            f" (built against cuSPARSELt {b['cusparselt_version']}, loaded {_cslt_runtime()})"
            if b["with_cusparselt"]
            else ""
        ),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"gpu {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
            )
        if torch.backends.cusparselt.is_available():
            lines.append(f"torch's cuSPARSELt: {torch.backends.cusparselt.version()}")
    else:
        lines.append("gpu: none visible (CUDA kernels, if built, are unused)")
    ops = sorted(
        n.split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("cast_ext::")
    )
    lines.append(f"ops ({len(ops)}): {', '.join(ops)}")
    return lines


def _bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir():
        print("cast_ext bench: run it from a source checkout (benchmarks/ is not installed)")
        return 2
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if args.quick:
        env["CAST_EXT_BENCH_QUICK"] = "1"
    if args.device == "cpu":
        cmd = [sys.executable, "-m", "pytest", str(root / "benchmarks" / "cpu"), "-q"]
        cmd += ["--benchmark-enable", "-p", "no:cacheprovider"]
        # the caller's directory, not the checkout the benchmarks run in; quick shapes never
        # replace the committed full-size results
        if args.json or not args.quick:
            out = Path(args.json).resolve() if args.json else root / "benchmarks/results/cpu.json"
            cmd.append(f"--benchmark-json={out}")
        return subprocess.call(cmd, cwd=root, env=env)
    rc = 0
    for name in sorted(p.stem for p in (root / "benchmarks").glob("bench_*.py")):
        print(f"== benchmarks.{name}", flush=True)
        rc |= subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=root, env=env)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cast_ext", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="build and runtime facts")
    sub.add_parser("demo", help="the CAST demo (options: python -m cast_ext demo --help)")
    bench = sub.add_parser("bench", help="microbenchmarks")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument("--quick", action="store_true", help="small shapes (CI smoke mode)")
    bench.add_argument(
        "--json",
        help="CPU results file (default: benchmarks/results/cpu.json; none with --quick)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo parses its own options (and its own --help)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "info":
        print("\n".join(info_lines()))
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("bench --device cuda: no CUDA GPU is visible")
    if args.device == "cuda" and args.json:
        parser.error("bench --json: the CPU benchmarks' file (the GPU ones write their own)")
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
