"""cast_ext.adams_step_ (the fused AdamS op) against cast_ext.reference.adams_step_.

Every param and state tensor is compared after every step: masks, prev_masks and steps exactly,
floats to fp32 rounding (the kernels use correctly rounded sqrt; torch's CPU sqrt is within
1 ulp, so the reference and the kernel may differ in the last bit).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ADAMS_HP,
    ADAMS_LIST_KEYS,
    CPU_ISAS,
    DEVICES,
    adams_args,
    assert_adams_state_close,
    capped_isa,
    clone_lists,
    requires_cuda,
)
from torch import Tensor

import cast_ext
from cast_ext import reference

HP = {
    **ADAMS_HP,
    "n": 2,
    "m": 4,
}


def make_lists(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: str,
    *,
    sparse: bool = True,
    master: bool = False,
    prev: bool = True,
) -> dict[str, list[Tensor]]:
    """Random params and state (as after a few steps), zero masks (t = 0 refreshes them)."""
    out: dict[str, list[Tensor]] = {k: [] for k in ADAMS_LIST_KEYS}
    for shape in shapes:
        w = torch.randn(shape, device=device) * 0.02
        out["params"].append(w.to(dtype))
        out["grads"].append((torch.randn(shape, device=device) * 1e-3).to(dtype))
        out["exp_avgs"].append(torch.randn(shape, device=device) * 1e-3)
        out["exp_avg_sqs"].append(torch.rand(shape, device=device) * 1e-6)
        out["steps"].append(torch.zeros((), device=device))
        if master:
            out["masters"].append(w.clone())
        if sparse:
            mshape = (*shape[:-1], (shape[-1] + 7) // 8)
            out["masks"].append(torch.zeros(mshape, dtype=torch.uint8, device=device))
            if prev:
                out["prev"].append(torch.full(mshape, 7, dtype=torch.uint8, device=device))
    return out


def call(fn, d: dict[str, list[Tensor]], **kw) -> None:
    fn(*adams_args(d), **{**HP, **kw})


CASES = {
    "fp32-2:4": ({"sparse": True}, torch.float32, {}),
    "fp32-dense": ({"sparse": False}, torch.float32, {}),
    "fp32-1:8": ({"sparse": True}, torch.float32, {"n": 1, "m": 8}),
    "fp32-4:8": ({"sparse": True}, torch.float32, {"n": 4, "m": 8}),
    "fp32-3:4": ({"sparse": True}, torch.float32, {"n": 3}),
    "bf16-master-2:4": ({"sparse": True, "master": True}, torch.bfloat16, {}),
    "fp16-master-dense": ({"sparse": False, "master": True}, torch.float16, {}),
    "fp32-master-2:4": ({"sparse": True, "master": True}, torch.float32, {}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(device: str, case: str) -> None:
    opts, dtype, kw = CASES[case]
    m = kw.get("m", 4)
    # Rows of length 4 mod 8 (a half-byte per row), a single row, several rows, wide rows.
    shapes = [(16, 96), (3, 8 * m), (1, 64)]
    if m == 4:
        shapes.append((5, 12))
    if not opts["sparse"]:
        shapes += [(7,), (), (3, 5)]
    a = make_lists(shapes, dtype, device, **opts)
    b = clone_lists(a)
    scale = torch.tensor([512.0], device=device)
    for it in range(12):  # refreshes at t = 0, 3, 6, 9; alpha reaches 1 at t = 7 and stays
        for ga, gb in zip(a["grads"], b["grads"], strict=True):
            ga.copy_((torch.randn(ga.shape, device=device) * 1e-3).to(dtype))
            gb.copy_(ga)
        extra = {"grad_scale": scale} if it % 4 == 1 else {}
        call(cast_ext.ops.adams_step_, a, **kw, **extra)
        call(reference.adams_step_, b, **kw, **extra)
        assert_adams_state_close(a, b)
    assert all(float(s) == 12.0 for s in a["steps"])


def isa_run() -> dict[str, Tensor]:
    """Every case of CASES, 12 steps from a fixed seed on the CPU, on shapes whose rows end
    inside a 16-lane vector and span several 256-element tiles; all resulting tensors."""
    torch.manual_seed(0)
    out: dict[str, Tensor] = {}
    for case, (opts, dtype, kw) in CASES.items():
        m = kw.get("m", 4)
        shapes = [(3, 8 * m), (2, 5 * 8 * m), (33, 264 if m == 4 else 272)]
        if m == 4:
            shapes.append((5, 12))
        if not opts["sparse"]:
            shapes += [(7,), (3, 5), (1001,)]
        d = make_lists(shapes, dtype, "cpu", **opts)
        for it in range(12):
            for g in d["grads"]:
                g.copy_((torch.randn(g.shape) * 1e-3).to(dtype))
            extra = {"grad_scale": torch.tensor([512.0])} if it % 4 == 1 else {}
            call(cast_ext.ops.adams_step_, d, **kw, **extra)
        for key, ts in d.items():
            out.update({f"{case}/{key}/{i}": t for i, t in enumerate(ts)})
    return out


def test_cpu_isa_versions_agree_bit_for_bit(tmp_path: Path) -> None:
    """The CPU kernel's AVX-512 (fp32: hand-written), AVX2 and baseline versions give the same
    bits. Each runs in a subprocess with CAST_EXT_CPU_ISA capping the version picked at load;
    the version that ran is read back, so a cap that is ignored fails the test."""
    want = isa_run()
    script = (
        "import sys, torch, cast_ext; sys.path.insert(0, sys.argv[2]); import test_adams; "
        "torch.save({'isa': cast_ext.build_info()['cpu_isa'], 'out': test_adams.isa_run()}, "
        "sys.argv[1])"
    )
    here = str(Path(__file__).parent)
    for isa in CPU_ISAS:
        path = tmp_path / f"{isa}.pt"
        env = {**os.environ, "CAST_EXT_CPU_ISA": isa}
        subprocess.run([sys.executable, "-c", script, str(path), here], env=env, check=True)
        got = torch.load(path, weights_only=True)
        assert got["isa"] == capped_isa(isa)
        assert got["out"].keys() == want.keys()
        for key, t in want.items():
            assert torch.equal(got["out"][key], t), (isa, key)


@pytest.mark.parametrize("device", DEVICES)
def test_refresh_only_at_interval(device: str) -> None:
    """The mask is ranked from the weights before the step, at t % mask_interval == 0 only."""
    d = make_lists([(8, 32)], torch.float32, device)
    w0 = d["params"][0].clone()
    d["masks"][0].fill_(0x5A)
    call(cast_ext.ops.adams_step_, d)  # t = 0: refresh
    want = cast_ext.pack_mask(cast_ext.nm_mask(w0.cpu(), 2, 4)).to(device)
    assert torch.equal(d["masks"][0], want)
    assert torch.equal(d["prev"][0], torch.full_like(want, 0x5A))  # the old mask, saved
    # Reverse the ranking: no refresh at t = 1 or 2, so the mask must stay.
    d["params"][0].copy_(torch.where(cast_ext.unpack_mask(want, 32), 1e-6, 1.0))
    for _ in range(2):
        call(cast_ext.ops.adams_step_, d)
        assert torch.equal(d["masks"][0], want)
    call(cast_ext.ops.adams_step_, d)  # t = 3: refresh, now the other two of each group
    assert torch.equal(d["masks"][0], want ^ 0xFF)
    assert torch.equal(d["prev"][0], want)


def test_scalar_arguments_are_checked_without_a_kernel() -> None:
    """Empty lists (no kernel runs: no device to dispatch to) and the meta device (the fake)
    check the scalars as the kernels do; the fake refuses a 0-d sparse param clearly."""
    kw = {**HP, "lr": -1.0}
    empty: list[Tensor] = []
    with pytest.raises(RuntimeError, match=r"adams_step_: lr must be finite and >= 0, got -1"):
        cast_ext.ops.adams_step_(*([empty] * 8), **kw)
    d = make_lists([(8, 32)], torch.float32, "meta")
    with pytest.raises(RuntimeError, match=r"adams_step_: lr must be finite and >= 0"):
        call(cast_ext.ops.adams_step_, d, lr=-1.0)
    z = torch.zeros((), device="meta")
    mask = torch.zeros(1, dtype=torch.uint8, device="meta")
    with pytest.raises(RuntimeError, match=r"params\[0\] is 0-d; a sparse param needs a last"):
        cast_ext.ops.adams_step_([z], [z], [z], [z], [mask], [z], [], [], **HP)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_found_inf_changes_nothing(device: str, impl: str) -> None:
    fn = cast_ext.ops.adams_step_ if impl == "kernel" else reference.adams_step_
    d = make_lists([(8, 32), (4, 12)], torch.bfloat16, device, master=True)
    before = clone_lists(d)
    call(fn, d, found_inf=torch.ones(1, device=device))
    for key in d:
        for x, y in zip(d[key], before[key], strict=True):
            assert torch.equal(x, y), key
    call(fn, d, found_inf=torch.zeros(1, device=device))
    assert float(d["steps"][0]) == 1.0
    assert not torch.equal(d["masters"][0], before["masters"][0])


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_unscales(device: str) -> None:
    a = make_lists([(8, 32)], torch.float32, device)
    b = clone_lists(a)
    b["grads"] = [g * 256 for g in b["grads"]]  # exact: a power of two
    call(cast_ext.ops.adams_step_, a)
    call(cast_ext.ops.adams_step_, b, grad_scale=torch.tensor([256.0], device=device))
    for key in ("params", "exp_avgs", "exp_avg_sqs", "masks"):
        assert torch.equal(a[key][0], b[key][0]), key


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors(device: str) -> None:
    """More tensors than one CUDA launch's table holds (36) and than one step launch (400)."""
    shapes = [(2, 8 * (1 + i % 3)) for i in range(405)]
    a = make_lists(shapes, torch.float32, device)
    b = clone_lists(a)
    for _ in range(2):
        call(cast_ext.ops.adams_step_, a)
        call(reference.adams_step_, b)
    assert_adams_state_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["sparse", "dense", "master"])
def test_opcheck(device: str, case: str) -> None:
    opts = {
        "sparse": ({"sparse": True}, torch.float32),
        "dense": ({"sparse": False}, torch.float32),
        "master": ({"sparse": True, "master": True}, torch.bfloat16),
    }[case]
    d = make_lists([(4, 16), (2, 8)], opts[1], device, **opts[0])
    torch.library.opcheck(torch.ops.cast_ext.adams_step_.default, adams_args(d), dict(HP))


def _bad_cases() -> dict[str, tuple]:
    """name -> (mutate(d, kw) in place, substring of the error)."""

    def setitem(key: str, i: int, value: Tensor):
        def f(d, kw):
            d[key][i] = value

        return f

    def kwset(**over):
        def f(d, kw):
            kw.update(over)

        return f

    def drop(key: str):
        def f(d, kw):
            d[key] = d[key][:1]

        return f

    def nan_weight(d, kw):
        d["params"][1][0, 1] = float("nan")

    return {
        "grads-length": (drop("grads"), "same length"),
        "masks-length": (drop("masks"), "masks must be empty"),
        "prev-length": (drop("prev"), "prev_masks"),
        "grad-dtype": (setitem("grads", 1, torch.zeros(4, 12, dtype=torch.float64)), "grads[1]"),
        "exp_avg-dtype": (
            setitem("exp_avgs", 0, torch.zeros(8, 32, dtype=torch.bfloat16)),
            "exp_avgs[0]",
        ),
        "exp_avg_sq-shape": (setitem("exp_avg_sqs", 1, torch.zeros(4, 13)), "exp_avg_sqs[1]"),
        "mask-shape": (setitem("masks", 0, torch.zeros(8, 5, dtype=torch.uint8)), "masks[0]"),
        "mask-dtype": (setitem("masks", 1, torch.zeros(4, 2, dtype=torch.int32)), "masks[1]"),
        "param-noncontiguous": (
            setitem("params", 0, torch.zeros(32, 8).t()),
            "must be contiguous",
        ),
        "step-dtype": (setitem("steps", 0, torch.zeros((), dtype=torch.float64)), "steps[0]"),
        "step-fraction": (setitem("steps", 1, torch.tensor(1.5)), "whole number"),
        "step-negative": (setitem("steps", 1, torch.tensor(-1.0)), "whole number"),
        "bf16-without-master": (
            setitem("params", 0, torch.zeros(8, 32, dtype=torch.bfloat16)),
            "params[0]",
        ),
        "k-not-multiple-of-m": (kwset(m=8, n=2), "multiple of m=8"),
        "bad-m": (kwset(m=6), "m must be 4 or 8"),
        "bad-n": (kwset(n=5), "0 < n <= m"),
        "lr-negative": (kwset(lr=-1.0), "lr"),
        "beta1-one": (kwset(beta1=1.0), "beta1"),
        "beta2-negative": (kwset(beta2=-0.1), "beta2"),
        "eps-nan": (kwset(eps=float("nan")), "eps"),
        "weight_decay-negative": (kwset(weight_decay=-0.1), "weight_decay"),
        "decay-negative": (kwset(decay=-1e-3), "decay"),
        "total_steps-zero": (kwset(total_steps=0), "total_steps"),
        "mask_interval-zero": (kwset(mask_interval=0), "mask_interval"),
        "grad_scale-dtype": (
            kwset(grad_scale=torch.ones(1, dtype=torch.float64)),
            "grad_scale",
        ),
        "found_inf-two-elements": (kwset(found_inf=torch.zeros(2)), "found_inf"),
        "nan-weight-at-refresh": (nan_weight, "NaN or Inf"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_changes_nothing(case: str, impl: str) -> None:
    """The kernel and the reference (AdamS(impl="reference")) refuse the same inputs; the
    reference took fractional or negative steps and fp64 scales before."""
    fn = cast_ext.ops.adams_step_ if impl == "kernel" else reference.adams_step_
    mutate, needle = BAD[case]
    d = make_lists([(8, 32), (4, 12)], torch.float32, "cpu")
    kw: dict = {}
    mutate(d, kw)
    before = clone_lists(d)
    with pytest.raises(RuntimeError, match=r"cast_ext\.adams_step_") as info:
        call(fn, d, **kw)
    assert needle in str(info.value), str(info.value)
    for key in d:
        for x, y in zip(d[key], before[key], strict=True):
            bits = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (x, y)]
            assert torch.equal(*bits), key  # bitwise: NaNs included


@requires_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_and_cuda_agree(case: str) -> None:
    opts, dtype, kw = CASES[case]
    m = kw.get("m", 4)
    shapes = [(64, 128), (3, 8 * m), (1, 4096)] + ([(5, 12)] if m == 4 else [])
    a = make_lists(shapes, dtype, "cpu", **opts)
    b = {k: [t.cuda() for t in v] for k, v in a.items()}
    for _ in range(8):
        for ga, gb in zip(a["grads"], b["grads"], strict=True):
            ga.copy_((torch.randn(ga.shape) * 1e-3).to(dtype))
            gb.copy_(ga)
        call(cast_ext.ops.adams_step_, a, **kw)
        call(cast_ext.ops.adams_step_, b, **kw)
        assert_adams_state_close({k: [t.cpu() for t in v] for k, v in b.items()}, a)


@requires_cuda
def test_cuda_device_mismatch() -> None:
    d = make_lists([(8, 32)], torch.float32, "cuda")
    d["exp_avgs"][0] = d["exp_avgs"][0].cpu()
    with pytest.raises(RuntimeError, match="exp_avgs"):
        call(cast_ext.ops.adams_step_, d)


def test_reference_refuses_bad_tensors_before_any_work() -> None:
    """reference.adams_step_ (AdamS(impl="reference"), and what the kernels are held to) met a
    bad second tensor after stepping the first; it checks every tensor first now."""
    p = [torch.randn(4, 16), torch.randn(4, 16)]
    d = {
        "grads": [torch.randn(4, 16), torch.randn(4, 12)],
        "exp_avgs": [torch.zeros(4, 16), torch.zeros(4, 16)],
        "exp_avg_sqs": [torch.zeros(4, 16), torch.zeros(4, 16)],
        "masks": [torch.zeros(4, 2, dtype=torch.uint8) for _ in range(2)],
        "steps": [torch.zeros(()), torch.zeros(())],
    }
    before = [t.clone() for t in (*p, *[t for v in d.values() for t in v])]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is torch.float32 \[4, 12\]"):
        reference.adams_step_(p, **d, master_params=[], lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    after = (*p, *[t for v in d.values() for t in v])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with pytest.raises(RuntimeError, match="m must be 4 or 8, got 16"):
        reference.adams_step_(
            p, **d, master_params=[], lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, m=16
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [True, False])
def test_low_precision_params_are_their_masters_rounded_to_nearest(
    dtype: torch.dtype, sparse: bool
) -> None:
    """After every step a bf16/fp16 param holds exactly its fp32 master rounded to nearest even
    (test_matches_reference compares 16-bit params only to their dtype's tolerance, which a
    write-back that truncates, or rounds the other way at a tie, passes)."""
    torch.manual_seed(1)
    # Rows ending inside a 16-lane vector and spanning tiles; a half-byte row for 2:4.
    d = make_lists([(3, 264), (5, 12), (2, 40)], dtype, "cpu", sparse=sparse, master=True)
    for it in range(6):
        for g in d["grads"]:
            g.copy_((torch.randn(g.shape) * 1e-3).to(dtype))
        extra = {"grad_scale": torch.tensor([512.0])} if it % 2 else {}
        call(cast_ext.ops.adams_step_, d, **extra)
        for i, (p, w) in enumerate(zip(d["params"], d["masters"], strict=True)):
            assert torch.equal(p, w.to(dtype)), (it, i)


def test_decay_sign_comes_from_the_fp32_master() -> None:
    """SPEC §2's sign(w) is the master's: an fp16 param whose pruned weights are below fp16
    resolution (the param holds 0, the master +-1e-9) is still pushed by decay * sign(master).
    (A sign read from the 16-bit param gives 0 there, and the pruned weights stop moving.)"""
    shape = (4, 32)
    torch.manual_seed(2)
    big = torch.rand(shape) + 0.5
    signs = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    pos = torch.arange(shape[1]) % 4
    w = torch.where(pos < 2, big, 1e-9) * signs  # kept: the first two of each group
    a: dict[str, list[Tensor]] = {
        "params": [w.to(torch.float16)],
        "grads": [torch.zeros(shape, dtype=torch.float16)],
        "exp_avgs": [torch.zeros(shape)],
        "exp_avg_sqs": [torch.zeros(shape)],
        "masks": [torch.zeros((4, 4), dtype=torch.uint8)],
        "steps": [torch.tensor(9.0)],  # a refresh (interval 3), alpha = 1 (T = 7)
        "masters": [w.clone()],
        "prev": [torch.zeros((4, 4), dtype=torch.uint8)],
    }
    assert torch.equal(a["params"][0][:, 2::4], torch.zeros(4, 8, dtype=torch.float16))
    b = clone_lists(a)
    call(cast_ext.ops.adams_step_, a, weight_decay=0.0)
    call(reference.adams_step_, b, weight_decay=0.0)
    assert_adams_state_close(a, b)
    pruned = a["masters"][0][:, 2::4]
    # alpha = 1: mu_eff = decay * sign(w), so each pruned weight moves by about lr against its sign
    assert bool((pruned * signs[:, 2::4] < -0.5e-3).all())
