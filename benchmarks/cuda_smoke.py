"""Every CUDA op once, on small awkward shapes, checked against ``cast_ext.reference``.

Meant to run under ``compute-sanitizer --tool memcheck`` (``benchmarks/gpu_suite.sh`` does), so
out-of-bounds or misaligned accesses at row ends (k = 4 mod 8), in 1-row tensors, in views with a
storage offset and in the multi-tensor AdamS launch are caught as well as wrong values. Small
shapes keep it fast under the sanitizer. Exits 1 on the first mismatch.

Run: ``python -m benchmarks.cuda_smoke``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import torch

import cast_ext
from cast_ext import ops, reference

__all__ = ["fp32_reductions", "main"]

DEV = "cuda"  # --device cpu runs the same checks on the CPU kernels (to test this script)
SHAPES = [(1, 4), (3, 12), (5, 36), (2, 8), (7, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) of an AdamS param against the reference: fp32 to a few ulp; a 16-bit param
# (rounded from its fp32 master) may land one unit the other way.
PARAM_TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def _same(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or not torch.equal(got.cpu(), want.cpu()):
        print(f"MISMATCH {name}: got {got.cpu()} want {want.cpu()}")
        sys.exit(1)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    got, want = got.cpu().float(), want.float()
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        print(f"MISMATCH {name}: max error {(got - want).abs().max()}")
        sys.exit(1)


def _masks() -> None:
    for rows, k in SHAPES:
        for dt in DTYPES:
            w = torch.randn(rows, k, dtype=dt)
            wd = w.to(DEV)
            tag = f"[{rows}x{k} {dt}]"
            _same("sparse24_mask" + tag, ops.sparse24_mask(wd), reference.sparse24_mask(w))
            _same("sparse24_prune" + tag, ops.sparse24_prune(wd), reference.sparse24_prune(w))
            for n, m in [(1, 4), (4, 8)]:
                if k % m == 0:
                    _same(
                        f"nm_mask{n}:{m}" + tag, ops.nm_mask(wd, n, m), reference.nm_mask(w, n, m)
                    )
            values, meta = ops.sparse24_compress(wd)
            rv, rm = reference.sparse24_compress(w)
            _same("sparse24_compress.values" + tag, values, rv)
            _same("sparse24_compress.meta" + tag, meta, rm)
            back = ops.sparse24_decompress(values, meta)
            _same("sparse24_decompress" + tag, back, reference.sparse24_decompress(rv, rm))
            mask = reference.sparse24_mask(w)
            packed = ops.pack_mask(mask.to(DEV))
            _same("pack_mask" + tag, packed, reference.pack_mask(mask))
            _same("unpack_mask" + tag, ops.unpack_mask(packed, k), mask)
            other = reference.pack_mask(reference.sparse24_mask(torch.randn(rows, k)))
            flips = ops.mask_flips(packed, other.to(DEV)).reshape(())
            want = reference.mask_flips(reference.pack_mask(mask), other).reshape(())
            _same("mask_flips" + tag, flips, want)
    # A view with a storage offset of 8 bytes (not 16-byte aligned, so the kernels' 16-byte
    # loads cannot take it as it is): must be refused or handled, never read out of bounds.
    base = torch.randn(1, 2 + 8 * 16, device=DEV)
    view = base[:, 2:]
    assert view.data_ptr() % 16 != 0 or DEV == "cpu"
    try:
        got = ops.sparse24_mask(view)
        _same("sparse24_mask(offset view)", got, reference.sparse24_mask(view.cpu()))
    except (RuntimeError, ValueError) as e:
        print(f"offset view refused: {e}")
    print("masks ok")


def _adams() -> None:
    shapes = [(3, 12), (1, 4), (4, 16), (2, 20)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, decay=1e-3)
    for dt in DTYPES:
        for sparse in (True, False):
            ps = [torch.randn(s, dtype=dt) for s in shapes]
            state = {
                "masters": [p.float() for p in ps] if dt != torch.float32 else [],
                "mu": [torch.zeros(s) for s in shapes],
                "v": [torch.zeros(s) for s in shapes],
                "steps": [torch.zeros(()) for _ in shapes],
            }
            src = state["masters"] or ps
            packed = [reference.pack_mask(reference.sparse24_mask(w)) for w in src]
            state["masks"] = packed if sparse else []
            state["prev"] = [torch.zeros_like(mk) for mk in state["masks"]]
            dev = {key: [t.to(DEV) for t in ts] for key, ts in state.items()}
            dps = [p.to(DEV) for p in ps]
            kw = dict(hyper, total_steps=8, mask_interval=10)
            keys = ("mu", "v", "masks", "steps", "masters", "prev")
            for _ in range(12):  # crosses a refresh (mask_interval 10) and total_steps
                gs = [torch.randn(s, dtype=dt) for s in shapes]
                reference.adams_step_(ps, gs, *(state[key] for key in keys), **kw)
                ops.adams_step_(dps, [g.to(DEV) for g in gs], *(dev[key] for key in keys), **kw)
            tag = f"[{dt} sparse={sparse}]"
            for key in ("masks", "prev", "steps"):
                for i, (a, b) in enumerate(zip(dev[key], state[key], strict=True)):
                    _same(f"adams {key}[{i}]" + tag, a, b)
            for i, (a, b) in enumerate(zip(dev["masters"], state["masters"], strict=True)):
                _close(f"adams master[{i}]{tag}", a, b, *PARAM_TOL[torch.float32])
            for i, (a, b) in enumerate(zip(dps, ps, strict=True)):
                _close(f"adams param[{i}]{tag}", a, b, *PARAM_TOL[dt])
    print("adams ok")


@contextlib.contextmanager
def fp32_reductions() -> Iterator[None]:
    """torch's reduced-precision reductions off for the block: cuBLAS (F.linear, and
    sparse24_gemm's path for more than 16 rows on CUDA) then adds split-K partial sums in fp32."""
    matmul = torch.backends.cuda.matmul
    kept = (
        matmul.allow_bf16_reduced_precision_reduction,
        matmul.allow_fp16_reduced_precision_reduction,
    )
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = kept[0]
        matmul.allow_fp16_reduced_precision_reduction = kept[1]


def _packed_gemm() -> None:
    """sparse24_gemm: M <= 16 takes the packed small-M kernels on CUDA (fp16/bf16 at M = 5 and
    16 with K = 64 or 1024 the tensor-core one on sm80+, 20 rows a partial 16-row tile), M = 17
    the fallback; each with the meta check and without (no flag: the kernels get nullptr). The
    fallback is F.linear's cuBLAS call: with torch's default reduced-precision reductions it was
    0.5 off the fp32-accumulated reference (H200, [17, 1040] bf16), so they are off here."""
    with fp32_reductions():
        _packed_gemm_checks()


def _packed_gemm_checks() -> None:
    for dt in DTYPES:
        for n, k in ((24, 64), (12, 1040), (20, 1024)):
            w = reference.sparse24_prune(torch.randn(n, k, dtype=dt))
            bias = torch.randn(n, dtype=dt)
            values, meta = reference.sparse24_compress(w)
            dv, dm = values.to(DEV), meta.to(DEV)
            for m in (1, 5, 16, 17):
                x = torch.randn(m, k, dtype=dt)
                want = reference.sparse24_gemm(x, values, meta, bias)
                for check in (True, False):
                    got = ops.sparse24_gemm(x.to(DEV), dv, dm, bias.to(DEV), check_meta=check)
                    _close(f"sparse24_gemm m={m} [{n}x{k}] {dt} {check}", got, want, 2e-2, 5e-2)
    print("packed gemm ok")


def _distill() -> None:
    """The fused loss on rows of odd lengths (row ends, the block's second pass), an ignored row
    and a 1-row input, with and without a teacher."""
    for dt in DTYPES:
        for rows, vocab in ((1, 3), (4, 2051), (3, 77)):
            s = torch.randn(rows, vocab, dtype=dt)
            t = torch.randn(rows, vocab, dtype=dt)
            y = torch.randint(0, vocab, (rows,))
            y[-1] = -100 if rows > 1 else y[-1]
            scale = torch.tensor(0.5)
            for teacher, eta in ((t, 0.3), (None, 0.0)):
                tag = f" [{rows}x{vocab}] {dt} teacher={teacher is not None}"
                td = None if teacher is None else teacher.to(DEV)
                got = ops.distill_fwd(s.to(DEV), td, y.to(DEV), temperature=1.5)
                want = reference.distill_fwd(s, teacher, y, 1.5)
                for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
                    _close("distill_fwd " + name + tag, g, w, 1e-5, 2e-5)
                g = ops.distill_bwd(s.to(DEV), td, y.to(DEV), got[2], scale.to(DEV), eta=eta,
                                    temperature=1.5)  # fmt: skip
                w = reference.distill_bwd(s, teacher, y, want[2], scale, eta, 1.5)
                _close("distill_bwd" + tag, g, w, 1e-2, 1e-2 if dt != torch.float32 else 1e-6)
    print("distill ok")


def _gemm() -> None:
    if not cast_ext.cusparselt_available():
        print("cuSPARSELt not built: gemm skipped")
        return
    for dt in (torch.float16, torch.bfloat16):
        why = cast_ext._C.cslt_fp16_refusal(0) if dt == torch.float16 else ""
        if why:  # sm_90 with cuSPARSELt <= 0.8.0: the fp16 GEMM faulted the H200
            print(f"cslt fp16 skipped: {why}")
            continue
        w = reference.sparse24_prune(torch.randn(32, 64, dtype=dt))
        bias = torch.randn(32, dtype=dt)
        wc = ops.cslt_compress(w.to(DEV))
        for m in (1, 3, 17):
            x = torch.randn(m, 64, dtype=dt)
            want = (x.double() @ w.double().t() + bias.double()).to(dt)
            got = ops.cslt_linear(x.to(DEV), wc, 32, 64, bias.to(DEV))
            _close(f"cslt_linear m={m} {dt}", got, want, 2e-2, 5e-2)
    print("gemm ok")


def main(argv: list[str] | None = None) -> None:
    """Run every check; exit 1 on the first mismatch."""
    global DEV
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--part",
        default="all",
        choices=["all", "kernels", "cslt"],
        help="kernels: cast_ext's own; cslt: the cuSPARSELt GEMM (slow under memcheck: the "
        "GPU suite runs it as a stage of its own, last)",
    )
    args = p.parse_args(argv)
    DEV = args.device
    if DEV == "cuda" and not (torch.cuda.is_available() and cast_ext.cuda_kernels_available()):
        print("cuda_smoke: needs a CUDA GPU and the CUDA kernels; skipped")
        return
    torch.manual_seed(0)
    if args.part != "cslt":
        _masks()
        _adams()
        _packed_gemm()
        _distill()
    if DEV == "cuda" and args.part != "kernels":
        _gemm()
    if DEV == "cuda":
        torch.cuda.synchronize()
    print("cuda_smoke: all ok")


if __name__ == "__main__":
    main()
