"""Which float16 cuSPARSELt calls fault the GPU (run on a CUDA machine; the GPU suite's core part).

On the H200 (sm_90, cuSPARSELt 0.8.0, 2026-11-30) an fp16 ``cslt_linear`` left an illegal
instruction in the CUDA context (during ``cusparseLtMatmulSearch``) where bf16 ran, so cast_ext
refuses fp16 there (csrc/cuda/cusparselt.cpp, ``fp16_refusal``). This probe runs each case in a
process of its own (a fault is sticky: it ends every CUDA call of its process) with
``CAST_EXT_CSLT_FP16=1``, and reports, per case: ok with the error against fp64 ``F.linear``, an
error message, a fault (the context broken after the call), or a crash. torch's own
``torch._cslt_sparse_mm`` on the same shapes is the second implementation. Writes
``cslt_fp16_probe.json`` to ``$OUT`` (or the current folder).

    python -m benchmarks.cslt_fp16_probe           # every case, 4 processes at a time
    python -m benchmarks.cslt_fp16_probe --case X  # one case, in this process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

__all__ = ["CASES", "main"]

ROOT = Path(__file__).resolve().parents[1]

# name: (implementation, dtype, (m, n, k), search). "each-alg" forces every algorithm id in turn.
# SMALL is the problem the faulting test ran (x [7, 64], which cast_ext pads to 8 rows); torch's
# raw _cslt_sparse_mm does not pad, so every case takes the 8 rows.
SMALL, LARGE = (8, 128, 64), (2048, 4096, 4096)
CASES: dict[str, tuple[str, str, tuple[int, int, int], bool]] = {
    "fp16-small-default": ("cast_ext", "float16", SMALL, False),
    "fp16-small-search": ("cast_ext", "float16", SMALL, True),
    "fp16-large-default": ("cast_ext", "float16", LARGE, False),
    "fp16-large-search": ("cast_ext", "float16", LARGE, True),
    "fp16-small-each-alg": ("each-alg", "float16", SMALL, False),
    "torch-fp16-small": ("torch", "float16", SMALL, False),
    "torch-fp16-large": ("torch", "float16", LARGE, False),
    "bf16-small-search": ("cast_ext", "bfloat16", SMALL, True),  # the controls: bf16 ran
    "torch-bf16-small": ("torch", "bfloat16", SMALL, False),
}
CASE_TIMEOUT_S = 25  # 9 cases, 4 at a time: within the suite stage's 90 s


def _run_case(name: str) -> dict:
    import torch
    import torch.nn.functional as F

    import cast_ext
    from cast_ext import ops

    impl, dtype_name, (m, n, k), _ = CASES[name]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    w = ops.sparse24_prune(torch.randn(n, k, device="cuda")).to(dtype)
    x = torch.randn(m, k, device="cuda").to(dtype)
    ref = F.linear(x.double(), w.double())
    scale = F.linear(x.double().abs(), w.double().abs()) + 1e-30
    out: dict = {"case": name}

    def err(y: torch.Tensor) -> float:
        return float(((y.double() - ref).abs() / scale).max())

    if impl == "torch":
        y = torch._cslt_sparse_mm(torch._cslt_compress(w), x.t()).t()
        out["max_rel_error"] = err(y)
    elif impl == "cast_ext":
        y = ops.cslt_linear(x, ops.cslt_compress(w), n, k)
        out["max_rel_error"] = err(y)
        out["cache"] = {
            key: cast_ext.nn.cslt_cache_info()[key]
            for key in ("searches", "search_failures", "rejected")
        }
    else:  # every algorithm id, forced through the table; stops at the first fault
        wc = ops.cslt_compress(w)
        major, minor = torch.cuda.get_device_capability(0)
        bucket = 1
        while bucket < -(-m // 8) * 8:  # M padded to 8 rows, then its power-of-two bucket
            bucket *= 2
        key = f"sm{major * 10 + minor}:fp16:m{bucket}:n{n}:k{k}:bias0:none"  # Problem::alg_key
        out["algs"] = {}
        alg, max_id = 0, 1
        while alg < max_id:
            cast_ext._C.cslt_cache_clear(True)
            cast_ext._C.cslt_set_algs({key: (alg, 1, 0)})
            print(f"alg {alg}", flush=True)  # the last one printed is the one that faulted
            y = ops.cslt_linear(x, wc, n, k)
            torch.cuda.synchronize()
            entry = cast_ext.nn.cslt_cache_info()["entries"][0]
            max_id = entry["max_alg_id"]
            out["algs"][alg] = err(y) if entry["alg_id"] == alg else "not buildable"
            alg += 1
    torch.cuda.synchronize()
    return out


def _child(name: str) -> dict:
    env = dict(os.environ, CAST_EXT_CSLT_FP16="1", CAST_EXT_CSLT_SEARCH=str(int(CASES[name][3])))
    cmd = [sys.executable, "-m", "benchmarks.cslt_fp16_probe", "--case", name]
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=CASE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"case": name, "result": f"timeout ({CASE_TIMEOUT_S} s)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "result": "ok"}
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    broken = "illegal instruction" in proc.stderr or "CUDA error" in proc.stderr
    last_alg = [ln for ln in proc.stdout.splitlines() if ln.startswith("alg ")]
    return {
        "case": name,
        "result": ("FAULT" if broken else "error") + f" (rc {proc.returncode})",
        "message": tail,
        **({"last_alg": last_alg[-1]} if last_alg else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(CASES))
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(args.case)), flush=True)
        return 0
    import torch

    import cast_ext

    if not (torch.cuda.is_available() and cast_ext.cusparselt_available()):
        print("cslt_fp16_probe: needs a CUDA GPU and a cast_ext built with cuSPARSELt; skipped")
        return 0
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "cusparselt": cast_ext._C.cslt_runtime_version(),
        "torch": torch.__version__,
        "results": [],
    }
    path = Path(os.environ.get("OUT", ".")) / "cslt_fp16_probe.json"
    with ThreadPoolExecutor(4) as pool:  # each row printed and written as it comes in
        for future in as_completed([pool.submit(_child, name) for name in CASES]):
            r = future.result()
            info["results"].append(r)
            detail = r.get("max_rel_error", r.get("algs", r.get("message", "")))
            print(f"{r['case']:22s} {r['result']:14s} {detail} {r.get('last_alg', '')}", flush=True)
            path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
