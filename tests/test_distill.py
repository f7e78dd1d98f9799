"""The fused distillation loss ops (``cast_ext.ops.distill_fwd`` / ``distill_bwd``) against
``cast_ext.reference`` on every device built, and ``cast.distill_loss`` through them.

The kernels sum in another order than torch's ``logsumexp`` (and the CPU one uses a polynomial
exp), so floats are compared to fp32 rounding; ignored rows, flags and errors exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    DEVICES,
    DTYPES,
    distill_inf_inputs,
    distill_inputs,
    distill_peaked_inputs,
    dtype_id,
    requires_cuda,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import cast_ext
from cast_ext import cast, ops, reference

# one element; shorter than a vector; odd lengths; longer than the CUDA block's pass (2048)
SHAPES = [(1, 1), (3, 7), (5, 33), (17, 1000), (4, 4099)]
GRAD_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_fwd_close(got: tuple[Tensor, ...], want: tuple[Tensor, ...], what: str) -> None:
    for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, f"{what} {name}"
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"{what} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("teacher", [True, False], ids=["kl+ce", "ce"])
def test_matches_reference(device: str, dtype: torch.dtype, temp: float, teacher: bool) -> None:
    eta = 0.3 if teacher else 0.0
    for rows, vocab in SHAPES:
        s, t, y = distill_inputs(rows, vocab, dtype, device, seed=rows)
        t = t if teacher else None
        what = f"[{rows}x{vocab}] {device}"
        got = ops.distill_fwd(s, t, y, temperature=temp)
        want = reference.distill_fwd(s, t, y, temp)
        assert_fwd_close(got, want, what)
        scale = torch.tensor(0.7, device=device)
        g = ops.distill_bwd(s, t, y, got[2], scale, eta=eta, temperature=temp)
        w = reference.distill_bwd(s, t, y, want[2], scale, eta, temp)
        assert g.dtype == dtype and g.shape == s.shape
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=what)
        if rows > 2:  # the ignored row: zeros everywhere
            assert not bool(got[0][1] or got[1][1] or got[2][1].any() or g[1].any())


@pytest.mark.parametrize("device", DEVICES)
def test_extremes(device: str) -> None:
    """Logits in the hundreds (a softmax of one-hots) stay finite and match; a teacher equal to
    the student gives a KL of exactly 0; a NaN makes its own row NaN and no other."""
    s, t, y = distill_inputs(6, 500, torch.float32, device, seed=3, scale=300.0)
    assert_fwd_close(ops.distill_fwd(s, t, y), reference.distill_fwd(s, t, y), "large")
    kl, _, _ = ops.distill_fwd(s, s.clone(), y, temperature=1.7)
    assert bool((kl == 0).all()), kl
    s[4, 17] = float("nan")
    kl, ce, _ = ops.distill_fwd(s, t, y)
    assert math.isnan(float(kl[4])) and math.isnan(float(ce[4]))
    others = [0, 2, 3, 5]
    assert bool(kl[others].isfinite().all() and ce[others].isfinite().all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_infinite_logits(device: str, temp: float) -> None:
    """A +inf logit makes its row's log-sum-exps +inf, so its CE +inf (NaN where the label's own
    logit is +inf), as torch.logsumexp and the reference give; the kernels' sums are NaN there
    (exp(inf - inf)). Forward and backward match the reference NaN for NaN; other rows stay
    finite."""
    s, t, y = distill_inf_inputs(device)
    scale = torch.tensor(0.7, device=device)
    for teacher, eta in ((t, 0.3), (None, 0.0)):
        got = ops.distill_fwd(s, teacher, y, temperature=temp)
        want = reference.distill_fwd(s, teacher, y, temp)
        for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, equal_nan=True, msg=name)
        assert float(got[1][0]) == math.inf and math.isnan(float(got[1][2]))
        assert bool(got[2][[0, 2, 4]][:, [0, 2]].eq(math.inf).all())
        assert bool(got[1][5].isfinite() and got[0][5].isfinite())
        g = ops.distill_bwd(s, teacher, y, got[2], scale, eta=eta, temperature=temp)
        w = reference.distill_bwd(s, teacher, y, want[2], scale, eta, temp)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, equal_nan=True)
        assert bool(g[5].isfinite().all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_top_k_teacher_masked_with_finfo_min(device: str, dtype: torch.dtype) -> None:
    """A top-k teacher (50 of 100 logits kept, the rest finfo.min; the student unmasked) and a
    teacher masked from column 60: the terms and gradient of the same masks with -inf. On CUDA
    a thread that met masked teacher logits alone summed two overflowing terms, and the
    rescale when a real logit came made the KL NaN (found in the CPU emulation of the kernel)."""
    s, t, y = distill_inputs(6, 100, dtype, device, seed=21)
    gen = torch.Generator().manual_seed(4)
    top = torch.rand(6, 100, generator=gen).argsort(dim=-1)[:, :50].to(device)
    masked = torch.ones(6, 100, dtype=torch.bool, device=device).scatter(1, top, False)
    masked[5] = torch.arange(100, device=device) >= 60
    low = torch.finfo(dtype).min
    t_min, t_inf = t.masked_fill(masked, low), t.masked_fill(masked, float("-inf"))
    got = ops.distill_fwd(s, t_min, y)
    want = reference.distill_fwd(s, t_inf, y)
    assert_fwd_close(got, want, "finfo.min vs -inf")
    scale = torch.tensor(0.5, device=device)
    g = ops.distill_bwd(s, t_min, y, got[2], scale, eta=0.5)
    want_g = reference.distill_bwd(s, t_inf, y, want[2], scale, 0.5)
    torch.testing.assert_close(g, want_g, atol=GRAD_TOL[dtype], rtol=GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_student_minus_inf_where_the_teacher_has_probability_0(
    device: str, dtype: torch.dtype
) -> None:
    """A student logit of -inf where the teacher's probability is 0 (the other convention's
    finfo.min mask, columns 55:, or a finite logit whose probability underflows, columns 50:55
    at 200 below the row's max) adds nothing: the terms of the columns cut out. It was
    0 * inf = NaN on the CPU and in the reference, and on CUDA NaN or finite by the order in
    which a thread met the logits. Teacher mass where the student is -inf still makes the KL
    infinite (NaN for a student row all -inf), as in the reference."""
    s, t, y = distill_inputs(5, 70, dtype, device, seed=17)
    y = torch.where(y == -100, y, y % 50)
    t[:, 55:] = torch.finfo(dtype).min
    t[:, 50:55] = (t[:, :50].float().amax(-1, keepdim=True) - 200).to(dtype)
    s[:, 50:] = float("-inf")
    got = ops.distill_fwd(s, t, y)
    want = reference.distill_fwd(s[:, :50].contiguous(), t[:, :50].contiguous(), y)
    assert_fwd_close(got, want, "kernel vs cut")
    assert_fwd_close(reference.distill_fwd(s, t, y), want, "reference vs cut")
    assert bool(got[0][[0, 2, 3, 4]].isfinite().all())
    s[:, 3] = float("-inf")
    s[4] = float("-inf")
    got, want = ops.distill_fwd(s, t, y), reference.distill_fwd(s, t, y)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert bool(got[0][[0, 2, 3]].eq(math.inf).all() and got[0][4].isnan())


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_minus_inf(device: str) -> None:
    """A row all -inf (the student's, the teacher's, both): its log-sum-exp is -inf, as
    torch.logsumexp and the reference give (the kernels' sum is 0 there), NaN for NaN in the
    rest, forward and backward; the other rows stay finite."""
    s, t, y = distill_inputs(5, 40, torch.float32, device, seed=5)  # row 1 is ignored
    s[0] = t[2] = float("-inf")
    s[3] = t[3] = float("-inf")
    scale = torch.tensor(0.7, device=device)
    got = ops.distill_fwd(s, t, y)
    want = reference.distill_fwd(s, t, y)
    for name, g, w in zip(("kl", "ce", "lse"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, equal_nan=True, msg=name)
    assert float(got[2][0, 0]) == -math.inf and float(got[2][2, 1]) == -math.inf
    assert bool(got[2][3].eq(-math.inf).all())
    assert bool(got[0][4].isfinite() and got[1][4].isfinite())
    g = ops.distill_bwd(s, t, y, got[2], scale, eta=0.5)
    w = reference.distill_bwd(s, t, y, want[2], scale, 0.5)
    torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_masked_vocabulary(device: str, temp: float) -> None:
    """Logits of -inf in both models (padded vocabulary entries, probability 0) change nothing:
    the terms and the gradient equal those of the unmasked columns alone."""
    s, t, y = distill_inputs(5, 70, torch.float32, device, seed=12)
    y = torch.where(y == -100, y, y % 60)
    s[:, 60:] = float("-inf")
    t[:, 60:] = float("-inf")
    s_, t_ = s[:, :60].contiguous(), t[:, :60].contiguous()
    got = ops.distill_fwd(s, t, y, temperature=temp)
    assert_fwd_close(got, reference.distill_fwd(s_, t_, y, temp), "masked vs cut")
    assert_fwd_close(reference.distill_fwd(s, t, y, temp), got, "reference, masked")
    scale = torch.tensor(0.5, device=device)
    g = ops.distill_bwd(s, t, y, got[2], scale, eta=0.5, temperature=temp)
    want = reference.distill_bwd(s_, t_, y, got[2], scale, 0.5, temp)
    torch.testing.assert_close(g[:, :60], want, atol=1e-6, rtol=1e-6)
    assert bool((g[:, 60:].abs() < 1e-30).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_vocabulary_masked_with_finfo_min(device: str, dtype: torch.dtype, temp: float) -> None:
    """Logits masked with ``finfo(dtype).min`` (masked_fill's other convention) mean what -inf
    means: the teacher's (columns 60:) and the student's (65:) give the terms and gradient of
    the same masks with -inf, also at T < 1, where the masked logit over T overflows to -inf
    (the CPU KL was -5.5 per masked teacher entry, and -inf or NaN at T < 1)."""
    s, t, y = distill_inputs(5, 70, dtype, device, seed=13)
    y = torch.where(y == -100, y, y % 60)
    low = torch.finfo(dtype).min
    s[:, 65:] = low
    t[:, 60:] = low
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 65:] = t_inf[:, 60:] = float("-inf")
    got = ops.distill_fwd(s, t, y, temperature=temp)
    want = reference.distill_fwd(s_inf, t_inf, y, temp)
    assert_fwd_close(got, want, "finfo.min vs -inf")
    assert bool(got[0].ge(0).all())
    scale = torch.tensor(0.5, device=device)
    g = ops.distill_bwd(s, t, y, got[2], scale, eta=0.5, temperature=temp)
    want_g = reference.distill_bwd(s_inf, t_inf, y, want[2], scale, 0.5, temp)
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(g, want_g, atol=tol, rtol=tol)
    assert bool((g[:, 65:] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 30.0, 300.0])
def test_small_kl_of_large_logits_is_accurate(device: str, offset: float) -> None:
    """A small KL (teacher = student + 1e-2 noise: about 5e-5) of logits near ``offset`` within
    1e-6 of the fp64 KL, and positive: the log-sum-exps' maxima cancel before they meet the logs
    (an error of ulp(offset): 3e-5 at 300 before). (With 1e-3 noise the KL, 5e-7, was below the
    bound: a KL of 0 passed.)"""
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(64, 4096, generator=gen) + offset
    t = s + 1e-2 * torch.randn(64, 4096, generator=gen)
    y = torch.randint(0, 4096, (64,), generator=gen)
    pt = torch.log_softmax(t.double(), -1)
    exact = (pt.exp() * (pt - torch.log_softmax(s.double(), -1))).sum(-1)
    kl = ops.distill_fwd(s.to(device), t.to(device), y.to(device))[0].cpu()
    assert float(exact.min()) > 2e-5  # a KL of 0 would be 20x the bound away
    torch.testing.assert_close(kl.double(), exact, atol=1e-6, rtol=0)
    assert float(kl.min()) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temp", [0.7, 3.0])  # 1 / T inexact
def test_gradient_of_peaked_rows_at_a_temperature(device: str, temp: float) -> None:
    """T != 1: the CPU backward's s / T went into its exponent exact (an FMA on the AVX2 and
    AVX-512 paths) where the forward's log-sum-exp had it rounded, so a row's largest softmax
    entries were off by up to |s / T| 2^-24: a 1-token vocabulary's gradient, exactly 0, came
    out 3e-4 at s = 1e4; peaked rows of logits near 1e3 were 3e-5 from the reference."""
    one = torch.tensor([[12345.678]], device=device)
    label = torch.tensor([0], device=device)
    scale = torch.tensor(1.0, device=device)
    lse = ops.distill_fwd(one, -2 * one, label, temperature=temp)[2]
    grad = ops.distill_bwd(one, -2 * one, label, lse, scale, eta=0.5, temperature=temp)
    assert float(grad.abs().max()) == 0.0
    s, t, y = distill_peaked_inputs()
    args = (s.to(device), t.to(device), y.to(device))
    lse = ops.distill_fwd(*args, temperature=temp)[2]
    got = ops.distill_bwd(*args, lse, scale, eta=0.5, temperature=temp)
    lse = reference.distill_fwd(s, t, y, temp)[2]
    want = reference.distill_bwd(s, t, y, lse, scale.cpu(), 0.5, temp)
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rows_of_huge_logits(device: str, dtype: torch.dtype) -> None:
    """Rows whose logits are all huge and equal or nearly so: a teacher all finfo.min (a uniform
    teacher, as the reference computes it), a teacher all -1e4 / -1e30, a student all -1e30,
    both models offset by 1e4. The KL summed e (t - s) on the raw logits and added the maxima'
    difference: -inf or 0 for those rows (all lost below ulp(max)). The logits enter as
    differences from their row's max now."""
    s, t, y = distill_inputs(6, 40, dtype, device, seed=23)
    y = torch.where(y == -100, 0, y)
    big = 1e4 if dtype == torch.float16 else 1e30
    t[0] = torch.finfo(dtype).min
    t[1] = -big
    s[2] = -big
    t[3] = -big + t[3].float().div(1e3).to(dtype)  # equal up to the dtype's rounding
    offset = 1e4 if dtype != torch.float16 else 1e3
    s[4], t[4] = (s[4].float() + offset).to(dtype), (t[4].float() + offset).to(dtype)
    got = ops.distill_fwd(s, t, y)
    want = reference.distill_fwd(s, t, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    assert bool(got[0].isfinite().all() and got[0].ge(0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_and_empty(device: str) -> None:
    s, t, y = distill_inputs(5, 40, torch.float32, device, seed=4)
    y[1], y[3] = 2, -1  # with ignore_index=-1, -100 would be a bad label
    got = ops.distill_fwd(s, t, y, ignore_index=-1)
    want = reference.distill_fwd(s, t, y, 1.0, -1)
    assert_fwd_close(got, want, "ignore_index=-1")
    assert float(got[1][3]) == 0.0 and float(got[1][1]) != 0.0
    empty = torch.empty(0, 40, device=device)
    kl, _, lse = ops.distill_fwd(empty, empty, torch.empty(0, dtype=torch.long, device=device))
    assert kl.shape == (0,) and lse.shape == (0, 3)
    no_labels = torch.empty(0, dtype=torch.long, device=device)
    loss = cast.distill_loss(empty.requires_grad_(), empty, no_labels)
    assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_bad_labels_raise(device: str) -> None:
    s, t, y = distill_inputs(4, 30, torch.float32, device, seed=5)
    y[2] = 30
    with pytest.raises(RuntimeError, match=r"cast_ext\.distill_fwd: labels of shape \[4\] hold a "
                       r"value outside \[0, 30\) that is not ignore_index \(-100\)"):  # fmt: skip
        ops.distill_fwd(s, t, y)
    y[2] = -5
    with pytest.raises(RuntimeError, match="outside"):
        ops.distill_fwd(s, t, y)
    with pytest.raises(ValueError, match=r"labels\[2\] = -5 is outside \[0, 30\)"):
        reference.distill_fwd(s, t, y)


@requires_cuda
def test_cuda_label_check_off() -> None:
    """With the CUDA value checks off nothing syncs: a bad label gives a NaN CE on its row."""
    s, t, y = distill_inputs(4, 30, torch.float32, "cuda", seed=6)
    y[2] = 31
    cast_ext.set_cuda_value_checks(False)
    try:
        _, ce, _ = ops.distill_fwd(s, t, y)
    finally:
        cast_ext.set_cuda_value_checks(True)
    assert math.isnan(float(ce[2])) and bool(ce[[0, 1, 3]].isfinite().all())


def _bad_calls(device: str) -> list[tuple[str, object]]:
    s, t, y = distill_inputs(4, 8, torch.float32, device, seed=7)
    lse = ops.distill_fwd(s, t, y)[2]
    one = torch.tensor(1.0, device=device)
    fwd, bwd = ops.distill_fwd, ops.distill_bwd
    return [
        ("must be 2-D", lambda: fwd(s[None], t[None], y)),
        ("has dtype Long", lambda: fwd(s.long(), None, y)),
        ("has an empty vocab dim", lambda: fwd(s[:, :0], None, y)),
        ("student of shape \\[4, 4\\] must be contiguous", lambda: fwd(s[:, ::2], None, y)),
        ("teacher of shape \\[4, 7\\]", lambda: fwd(s, t[:, :7].contiguous(), y)),
        ("teacher of shape \\[4, 8\\] and dtype Half", lambda: fwd(s, t.half(), y)),
        ("labels of shape \\[3\\]", lambda: fwd(s, t, y[:3])),
        ("labels of shape \\[4\\] and dtype Int", lambda: fwd(s, t, y.int())),
        ("temperature must be finite and > 0, got 0", lambda: fwd(s, t, y, temperature=0.0)),
        ("lse of shape \\[4, 2\\]", lambda: bwd(s, t, y, lse[:, :2], one, eta=0.5)),
        ("grad_scale of shape \\[2\\]", lambda: bwd(s, t, y, lse, one.repeat(2), eta=0.5)),
        (
            "grad_scale of shape \\[\\] and dtype Double",
            lambda: bwd(s, t, y, lse, one.double(), eta=0.5),
        ),
        ("eta must be in \\[0, 1\\], got 1.5", lambda: bwd(s, t, y, lse, one, eta=1.5)),
        ("teacher is None but eta = 0.5", lambda: bwd(s, None, y, lse, one, eta=0.5)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clearly(device: str) -> None:
    for pattern, call in _bad_calls(device):
        with pytest.raises(RuntimeError, match=rf"cast_ext\.distill_(fwd|bwd): .*{pattern}"):
            call()  # type: ignore[operator]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device: str) -> None:
    s, t, y = distill_inputs(33, 3001, torch.float32, device, seed=8)
    a = ops.distill_fwd(s, t, y)
    b = ops.distill_fwd(s, t, y)
    for x, z in zip(a, b, strict=True):
        assert torch.equal(x, z)
    scale = torch.tensor(0.01, device=device)
    g1 = ops.distill_bwd(s, t, y, a[2], scale, eta=0.4)
    g2 = ops.distill_bwd(s, t, y, a[2], scale, eta=0.4)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    s, t, y = distill_inputs(5, 24, dtype, device, seed=9)
    torch.library.opcheck(torch.ops.cast_ext.distill_fwd.default, (s, t, y, 2.0, -100))
    torch.library.opcheck(torch.ops.cast_ext.distill_fwd.default, (s, None, y))
    lse = ops.distill_fwd(s, t, y)[2]
    scale = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.cast_ext.distill_bwd.default, (s, t, y, lse, scale, 0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_distill_loss_fused_equals_reference_path(device: str, dtype: torch.dtype) -> None:
    """``distill_loss`` on the fused ops and on ``impl="reference"``: same loss, parts and
    gradient (3-D logits, ignored positions, a teacher in another dtype)."""
    s, t, _ = distill_inputs(2 * 37, 301, dtype, device, seed=10)
    s, t = s.view(2, 37, 301), t.view(2, 37, 301).float()
    y = torch.randint(0, 301, (2, 37), device=device)
    y[:, -1] = -100
    out = {}
    for impl in ("auto", "reference"):
        x = s.detach().clone().requires_grad_()
        loss, kl, ce = cast.distill_loss(
            x, t, y, eta=0.4, temperature=1.5, impl=impl, chunk_size=16, return_parts=True
        )
        (3.0 * loss).backward()
        out[impl] = (loss, kl, ce, x.grad)
    for a, b in zip(out["auto"][:3], out["reference"][:3], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(out["auto"][3], out["reference"][3], atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_an_fp32_teacher_is_not_rounded_to_a_16_bit_student(device: str, dtype: torch.dtype):
    """distill_loss cast the teacher to the student's dtype: near convergence (student =
    teacher + small noise) the bf16-rounded teacher made the KL 12% too high. The pair runs in
    fp32 chunks now: the KL within 1e-7 of the fp64 one, the gradient to the student's
    rounding."""
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(96, 1000, generator=gen) * 3
    s = (t + 0.03 * torch.randn(96, 1000, generator=gen)).to(dtype)
    y = torch.randint(0, 1000, (96,), generator=gen)
    x = s.to(device, copy=True).requires_grad_()
    loss, kl, _ = cast.distill_loss(
        x, t.to(device), y.to(device), eta=0.5, chunk_size=40, return_parts=True
    )
    loss.backward()
    sd = s.double().requires_grad_()
    pt, ps = torch.log_softmax(t.double(), -1), torch.log_softmax(sd, -1)
    exact_kl = (pt.exp() * (pt - ps)).sum(-1).mean()
    (0.5 * exact_kl + 0.5 * torch.nn.functional.cross_entropy(sd, y)).backward()
    assert abs(float(kl) - float(exact_kl.detach())) < 1e-7 < float(exact_kl.detach()) / 100
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(x.grad.cpu().double(), sd.grad, atol=tol / 100, rtol=tol)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_kernel_agrees_with_cpu_kernel(dtype: torch.dtype) -> None:
    s, t, y = distill_inputs(40, 5003, dtype, "cpu", seed=11)
    cpu = ops.distill_fwd(s, t, y, temperature=1.3)
    gpu = ops.distill_fwd(s.cuda(), t.cuda(), y.cuda(), temperature=1.3)
    assert_fwd_close(tuple(x.cpu() for x in gpu), cpu, "cuda vs cpu")
    scale = torch.tensor(0.2)
    gc = ops.distill_bwd(s, t, y, cpu[2], scale, eta=0.6, temperature=1.3)
    gg = ops.distill_bwd(s.cuda(), t.cuda(), y.cuda(), gpu[2], scale.cuda(), eta=0.6,
                         temperature=1.3)  # fmt: skip
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(gg.cpu(), gc, atol=tol, rtol=tol)


def numpy_distill(
    s: np.ndarray, t: np.ndarray | None, y: np.ndarray, temp: float, eta: float, scale: float
) -> tuple[np.ndarray, ...]:
    """(kl, ce, grad) in float64 with numpy: an implementation that shares no code with torch."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    s = s.astype(np.float64)
    valid = y != -100
    rows = np.arange(len(y))
    ls1 = log_softmax(s)
    ce = np.where(valid, -ls1[rows, np.where(valid, y, 0)], 0.0)
    onehot = np.zeros_like(s)
    onehot[rows[valid], y[valid]] = 1.0
    grad = (1.0 - eta) * (np.exp(ls1) - onehot)
    kl = np.zeros(len(y))
    if t is not None:
        lt = log_softmax(t.astype(np.float64) / temp)
        ls = log_softmax(s / temp)
        kl = np.where(valid, (np.exp(lt) * (lt - ls)).sum(-1) * temp * temp, 0.0)
        grad += eta * temp * (np.exp(ls) - np.exp(lt))
    return kl, ce, np.where(valid[:, None], grad * scale, 0.0)


@pytest.mark.cuda  # every device in DEVICES, CUDA included where present
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 70),
    temp=st.sampled_from([0.5, 1.0, 2.5]),
    teacher=st.booleans(),
    levels=st.integers(1, 40),
    data=st.data(),
)
def test_property_matches_numpy(rows, vocab, temp, teacher, levels, data):
    """Logits on a coarse grid (ties, equal rows, one-element vocabularies), ignored rows, with
    and without a teacher: the fused ops against a float64 numpy implementation."""
    n = rows * vocab
    ints = st.lists(st.integers(-levels, levels), min_size=n, max_size=n)
    s = np.array(data.draw(ints), dtype=np.float32).reshape(rows, vocab) / 4
    t = np.array(data.draw(ints), dtype=np.float32).reshape(rows, vocab) / 4 if teacher else None
    y = np.array(data.draw(st.lists(st.integers(-1, vocab - 1), min_size=rows, max_size=rows)))
    y[y < 0] = -100
    eta = 0.4 if teacher else 0.0
    kl, ce, grad = numpy_distill(s, t, y, temp, eta, 0.3)
    for device in DEVICES:
        st_, yt = torch.from_numpy(s).to(device), torch.from_numpy(y).to(device)
        tt = None if t is None else torch.from_numpy(t).to(device)
        got_kl, got_ce, lse = ops.distill_fwd(st_, tt, yt, temperature=temp)
        np.testing.assert_allclose(got_kl.cpu().numpy(), kl, rtol=1e-5, atol=5e-5)
        np.testing.assert_allclose(got_ce.cpu().numpy(), ce, rtol=1e-5, atol=5e-5)
        scale = torch.tensor(0.3, device=device)
        g = ops.distill_bwd(st_, tt, yt, lse, scale, eta=eta, temperature=temp)
        np.testing.assert_allclose(g.cpu().numpy(), grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_distill_loss_double_backward_raises_rather_than_lie(impl: str) -> None:
    """A Hessian-vector product through distill_loss came out wrong (the reference path's graph
    held the log-sum-exps constant) or None with a warning (the fused path): the backward is
    once-differentiable, so a double backward is an error."""
    s, t, y = distill_inputs(4, 16, torch.float32, "cpu", seed=5)
    s.requires_grad_()
    loss = cast_ext.cast.distill_loss(s, t, y, impl=impl)
    # create_graph=True raises at once: a gradient penalty built on it (loss + |g|^2) would
    # otherwise add nothing, silently (its g was a constant; only g alone raised later)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)
    (g,) = torch.autograd.grad(cast_ext.cast.distill_loss(s, t, y, impl=impl), s)
    assert not g.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_kl_of_finite_maxima_whose_difference_overflows(device: str) -> None:
    """Finite row maxima of opposite signs whose difference overflows fp32 took kl_of's
    infinite-maxima path and gave KL = -inf; a teacher's finfo.min entry below a teacher max of
    1e32 gave NaN (finfo.min - max overflowed to -inf, times e = 0). The reference and float64
    give 0, 0 and log(3)."""
    f = torch.finfo(torch.float32)
    cases = [
        ([[3e38]], [[-3e38]]),
        ([[3e38, 0.0]], [[-1e38, -2e38]]),
        ([[0.0, 0.0, 0.0]], [[1e32, 0.0, f.min]]),
    ]
    y = torch.tensor([0], device=device)
    for s, t in cases:
        s, t = torch.tensor(s, device=device), torch.tensor(t, device=device)
        got = ops.distill_fwd(s, t, y)[0]
        want = reference.distill_fwd(s, t, y)[0]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
