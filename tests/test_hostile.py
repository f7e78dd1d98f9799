"""Hostile inputs: one table over the fused AdamS op, the AdamS optimizer and the 2:4 GEMM.

A case is refused (an error naming the op, the tensor and the rule, every tensor of the call
bitwise unchanged afterwards) or accepted (and then its result is checked). Complements the
per-op argument tests in test_adams.py, test_optim.py and test_sparse24_gemm.py, which this does
not repeat: aliasing and overlapping tensors, empty tensors, non-contiguous and wrongly typed
list items the other tests do not touch, NaN/Inf in master weights, mixed devices, a state dict
of another model, and the GEMM's non-finite and empty operands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import clone_lists, requires_cuda
from test_adams import call, make_lists
from torch import Tensor, nn

import cast_ext
from cast_ext import AdamS, ops, reference

Made = tuple[Callable[[], Any], list[Tensor]]


@dataclass(frozen=True)
class Case:
    """``make()`` -> (the call, every tensor it could touch). ``error``: regex of the message
    (refused, nothing may change); None: accepted, then ``check(result)`` must hold."""

    make: Callable[[], Made]
    error: str | None = None
    exc: type[Exception] = RuntimeError
    check: Callable[[Any], None] | None = None
    cuda: bool = False


def bits(t: Tensor) -> Tensor:
    """The raw bytes of ``t`` (NaN-proof bitwise comparison)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


# ---- the fused op -----------------------------------------------------------------------------


def adams(d: dict[str, list[Tensor]], **kw: Any) -> Made:
    return (lambda: call(cast_ext.ops.adams_step_, d, **kw)), [t for v in d.values() for t in v]


def lists(shapes=((8, 32), (4, 12)), dtype=torch.float32, device="cpu", **kw) -> dict:
    return make_lists(list(shapes), dtype, device, **kw)


def op_alias(
    key: str, i: int, src_key: str, j: int, shapes=((8, 32), (4, 12)), device: str = "cpu"
) -> Callable[[], Made]:
    """The tensor ``d[src_key][j]`` passed again as ``d[key][i]``."""

    def make() -> Made:
        d = lists(shapes, device=device)
        d[key][i] = d[src_key][j]
        return adams(d)

    return make


def op_overlapping_moments() -> Made:
    d = lists()
    buf = torch.zeros(12, 32)
    d["exp_avgs"][0], d["exp_avg_sqs"][0] = buf[:8], buf[4:]  # rows 4..7 shared
    return adams(d)


def op_overlapping_params() -> Made:
    d = lists([(8, 32), (8, 32)])
    buf = torch.randn(12, 32) * 0.02
    d["params"][0], d["params"][1] = buf[:8], buf[4:]
    return adams(d)


def op_grad_in_param() -> Made:
    d = lists()
    buf = torch.randn(16, 32) * 0.02
    d["params"][0], d["grads"][0] = buf[:8], buf[7:15]  # one row shared
    return adams(d)


def op_set(key: str, i: int, make_value: Callable[[dict], Tensor], **kw: Any) -> Callable:
    def make() -> Made:
        d = lists(**kw)
        d[key][i] = make_value(d)
        return adams(d)

    return make


def op_drop(key: str, **kw: Any) -> Callable[[], Made]:
    def make() -> Made:
        d = lists(**kw)
        d[key] = d[key][:1]
        return adams(d)

    return make


def op_nonfinite(key: str, value: float, **kw: Any) -> Callable[[], Made]:
    def make() -> Made:
        d = lists(**kw)
        d[key][0][3, 5] = value
        return adams(d)

    return make


def op_last_dim_6() -> Made:
    d = lists([(4, 6)])
    return adams(d)


def op_cuda(key: str) -> Callable[[], Made]:
    def make() -> Made:
        d = lists(device="cuda", master=True)
        d[key][0] = d[key][0].cpu()
        return adams(d)

    return make


# Accepted: disjoint views of one buffer (flat-parameter layouts), empty tensors and lists.


def op_disjoint_views() -> Made:
    d = lists([(4, 32), (4, 32)])
    want = clone_lists(d)
    call(reference.adams_step_, want)
    params, moments = torch.cat(d["params"]), torch.cat(d["exp_avgs"])
    d["params"] = [params[:4], params[4:]]
    d["exp_avgs"] = [moments[:4], moments[4:]]

    def run() -> tuple[dict, dict]:
        call(cast_ext.ops.adams_step_, d)
        return d, want

    return run, []


def check_same_as(result: tuple[dict, dict]) -> None:
    got, want = result
    for key in want:
        for i, (x, y) in enumerate(zip(got[key], want[key], strict=True)):
            if key in ("masks", "prev", "steps"):
                assert torch.equal(x, y), f"{key}[{i}]"
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-8, msg=f"{key}[{i}]")


def op_empty_tensors() -> Made:
    d = lists([(8, 32), (0, 32), (4, 0)])
    want = {k: v[:1] for k, v in clone_lists(d).items()}
    call(reference.adams_step_, want)

    def run() -> tuple[dict, dict]:
        call(cast_ext.ops.adams_step_, d)
        assert [float(s) for s in d["steps"]] == [1.0, 1.0, 1.0]
        return {k: v[:1] for k, v in d.items()}, want

    return run, []


def op_empty_lists() -> Made:
    d = {k: [] for k in lists()}
    return (lambda: call(cast_ext.ops.adams_step_, d)), []


# ---- the optimizer ----------------------------------------------------------------------------


def stepped(model: nn.Module, steps: int = 1) -> AdamS:
    opt = AdamS(model.parameters(), lr=1e-2, decay=1e-3, total_steps=10, mask_interval=2)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    return opt


def opt_tensors(model: nn.Module, opt: AdamS) -> list[Tensor]:
    return [*model.parameters(), *(v for st in opt.state.values() for v in st.values())]


def optim_other_model_state() -> Made:
    a, b = nn.Linear(16, 8), nn.Linear(32, 8)  # same structure, other shapes
    opt_a, opt_b = stepped(a), stepped(b)
    sd = opt_b.state_dict()
    lr = opt_a.param_groups[0]["lr"] = 3e-3
    opt_b.param_groups[0]["lr"] = 7e-3

    def run() -> None:
        try:
            opt_a.load_state_dict(sd)
        finally:
            assert opt_a.param_groups[0]["lr"] == lr  # groups untouched too

    return run, opt_tensors(a, opt_a)


def optim_other_group_count() -> Made:
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    opt_a = stepped(a)  # one group
    opt_b = AdamS([{"params": [b.weight]}, {"params": [b.bias]}], lr=1e-2, total_steps=10)
    for p in b.parameters():
        p.grad = torch.randn_like(p)
    opt_b.step()
    return (lambda: opt_a.load_state_dict(opt_b.state_dict())), opt_tensors(a, opt_a)


def optim_dense_state_into_sparse_group() -> Made:
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    opt_a = stepped(a)
    # b's weight stepped as plain Adam: loading that group would silently make a's dense.
    opt_b = AdamS([{"params": list(b.parameters()), "sparse": False}], lr=1e-2, total_steps=10)
    for p in b.parameters():
        p.grad = torch.randn_like(p)
    opt_b.step()
    return (lambda: opt_a.load_state_dict(opt_b.state_dict())), opt_tensors(a, opt_a)


def optim_nan_weight_at_refresh() -> Made:
    model = nn.Linear(16, 8)
    opt = stepped(model, steps=2)  # the next step (t = 2) refreshes the masks
    with torch.no_grad():
        model.weight[1, 3] = float("nan")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return opt.step, opt_tensors(model, opt)


def stepped_like_twins(ps: list[nn.Parameter], twins: list[nn.Parameter]) -> list[AdamS]:
    """Three AdamS steps of ``ps`` and of ``twins`` (their contiguous copies) on the same
    gradients; then the two must be equal bit for bit. Returns the two optimizers."""
    opts = [AdamS(x, lr=1e-2, decay=1e-2, total_steps=10) for x in (ps, twins)]
    for a, b in zip(ps, twins, strict=True):
        a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.dim()))
        b.grad = a.grad.clone()
    for _ in range(3):
        for o in opts:
            o.step()
    for a, b in zip(ps, twins, strict=True):
        assert torch.equal(a, b)
    return opts


def optim_noncontiguous_param() -> Made:
    """A column-major sparse param and a channels_last conv weight step as their contiguous
    twins do (a contiguous copy stepped and copied back), bit for bit."""
    w = torch.randn(16, 8).t()  # [8, 16], column-major
    conv = torch.randn(4, 3, 2, 2)
    ps = [nn.Parameter(w.clone()), nn.Parameter(conv.to(memory_format=torch.channels_last))]
    twins = [nn.Parameter(w.contiguous()), nn.Parameter(conv.clone())]
    assert not ps[0].is_contiguous() and not ps[1].is_contiguous()

    def run() -> None:
        opts = stepped_like_twins(ps, twins)
        assert ps[1].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(opts[0].mask(ps[0]), opts[1].mask(twins[0]))

    return run, []


def optim_sparse_grad_in_group_1() -> Made:
    """Group 0 is fine, group 1's gradient is sparse: refused before group 0 steps."""
    p, q = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 16))
    opt = AdamS([{"params": [p]}, {"params": [q]}], lr=1e-2, total_steps=10)
    p.grad, q.grad = torch.randn(8, 16), torch.randn(8, 16).to_sparse()
    return opt.step, [p, q, p.grad]


def optim_overlapping_params() -> Made:
    buf = torch.randn(12, 16)
    p, q = nn.Parameter(buf[:8]), nn.Parameter(buf[4:])
    opt = AdamS([p, q], lr=1e-2, total_steps=10)
    p.grad, q.grad = torch.randn(8, 16), torch.randn(8, 16)
    return opt.step, [p, q, p.grad, q.grad]


def optim_interleaved_params() -> Made:
    """Two params interleaved in one buffer (even and odd columns) share no element: they step
    as their contiguous twins do, bit for bit."""
    buf = torch.randn(8, 32)
    ps = [nn.Parameter(buf[:, 0::2]), nn.Parameter(buf[:, 1::2])]
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    return lambda: stepped_like_twins(ps, twins), []


def optim_noncontiguous_grad() -> Made:
    models = [nn.Linear(16, 8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [AdamS(m.parameters(), lr=1e-2, total_steps=10) for m in models]
    g = torch.randn(16, 8)
    models[0].weight.grad = g.t()  # non-contiguous: the optimizer copies it
    models[1].weight.grad = g.t().contiguous()
    for m in models:
        m.bias.grad = torch.ones(8)

    def run() -> None:
        for o in opts:
            o.step()
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(p, q)

    return run, []


# ---- the GEMM ---------------------------------------------------------------------------------


def gemm(x: Tensor, w: Tensor, bias: Tensor | None = None, **over: Tensor) -> Made:
    values, meta = ops.sparse24_compress(w)
    args = {"x": x, "values": values, "meta": meta, "bias": bias, **over}

    def run() -> tuple[Tensor, Tensor]:
        y = cast_ext.sparse24_gemm(args["x"], args["values"], args["meta"], args["bias"])
        dense = ops.sparse24_decompress(args["values"], args["meta"])
        return y, nn.functional.linear(args["x"], dense, args["bias"])

    return run, [t for t in args.values() if t is not None]


def check_like_linear(result: tuple[Tensor, Tensor]) -> None:
    y, want = result
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def gemm_x_nan() -> Made:
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    return gemm(x, torch.randn(8, 16))


def gemm_values_inf() -> Made:
    values, meta = ops.sparse24_compress(torch.randn(8, 16))
    values[2, 1], values[5, 0] = float("inf"), float("-inf")
    return gemm(torch.randn(3, 16), torch.randn(8, 16), values=values, meta=meta)


def gemm_noncontiguous() -> Made:
    values, meta = ops.sparse24_compress(torch.randn(8, 16))
    v = torch.zeros(8, 16)[:, ::2].copy_(values)
    m = torch.zeros(8, 4, dtype=torch.uint8)[:, ::2].copy_(meta)
    return gemm(torch.randn(16, 3).t(), torch.randn(8, 16), values=v, meta=m)


# ---- the table --------------------------------------------------------------------------------

SHARES = r"shares memory with {}; every tensor the op writes must have memory of its own"
OP = r"cast_ext\.adams_step_: "
CASES: dict[str, Case] = {
    # fused op: aliasing and overlap
    "op-exp_avg-is-param": Case(
        op_alias("exp_avgs", 0, "params", 0), OP + r"exp_avgs\[0\] " + SHARES.format(r"params\[0\]")
    ),
    "op-param-twice": Case(
        op_alias("params", 1, "params", 0, shapes=[(8, 32)] * 2),
        OP + r"params\[1\] " + SHARES.format(r"params\[0\]"),
    ),
    "op-mask-is-prev_mask": Case(
        op_alias("prev", 0, "masks", 0), OP + r"(prev_masks\[0\]|masks\[0\]) shares memory"
    ),
    "op-moments-overlap": Case(op_overlapping_moments, OP + r"exp_avg_sqs\[0\] shares memory"),
    "op-params-overlap": Case(op_overlapping_params, OP + r"params\[1\] shares memory"),
    "op-grad-overlaps-param": Case(op_grad_in_param, OP + r"grads\[0\] shares memory"),
    "op-step-is-a-moment-element": Case(
        op_set("steps", 0, lambda d: d["exp_avgs"][1].view(-1)[5]),
        OP + r"steps\[0\] shares memory with exp_avgs\[1\]",
    ),
    # fused op: dtypes, contiguity, lengths, shapes not covered in test_adams
    "op-master-fp16": Case(
        op_set("masters", 0, lambda d: d["masters"][0].half(), dtype=torch.bfloat16, master=True),
        OP + r"master_params\[0\] of shape \[8, 32\] has dtype Half; expected Float",
    ),
    "op-prev_mask-bool": Case(
        op_set("prev", 1, lambda d: d["prev"][1].bool()),
        OP + r"prev_masks\[1\] of shape \[4, 2\] has dtype Bool; expected Byte",
    ),
    "op-param-float64": Case(
        op_set("params", 0, lambda d: d["params"][0].double()),
        OP + r"params\[0\] of shape \[8, 32\] has dtype Double",
    ),
    "op-grad-noncontiguous": Case(
        op_set("grads", 1, lambda d: torch.zeros(12, 4).t()),
        OP + r"grads\[1\] of shape \[4, 12\] must be contiguous",
    ),
    "op-exp_avg_sq-noncontiguous": Case(
        op_set("exp_avg_sqs", 0, lambda d: torch.zeros(8, 64)[:, ::2]),
        OP + r"exp_avg_sqs\[0\] of shape \[8, 32\] must be contiguous",
    ),
    "op-mask-noncontiguous": Case(
        op_set("masks", 0, lambda d: torch.zeros(8, 8, dtype=torch.uint8)[:, ::2]),
        OP + r"masks\[0\] of shape \[8, 4\] must be contiguous",
    ),
    "op-steps-short": Case(op_drop("steps"), OP + r"params, grads, .* same length"),
    "op-exp_avg_sqs-short": Case(op_drop("exp_avg_sqs"), OP + r"params, .* same length"),
    "op-master_params-short": Case(
        op_drop("masters", dtype=torch.bfloat16, master=True),
        OP + r"master_params must be empty or have one per param",
    ),
    "op-last-dim-6": Case(op_last_dim_6, OP + r"params\[0\] of shape \[4, 6\]: last dim .* m=4"),
    # fused op: non-finite weights at a refresh (t = 0)
    "op-param-neg-inf": Case(
        op_nonfinite("params", float("-inf")),
        OP + r"params\[0\] of shape \[8, 32\] contains NaN or Inf",
    ),
    "op-master-inf": Case(
        op_nonfinite("masters", float("inf"), dtype=torch.bfloat16, master=True),
        OP + r"master_params\[0\] of shape \[8, 32\] contains NaN or Inf",
    ),
    "op-master-nan": Case(
        op_nonfinite("masters", float("nan"), dtype=torch.float16, master=True),
        OP + r"master_params\[0\] .* NaN or Inf",
    ),
    # fused op: mixed devices
    "op-cuda-grad-on-cpu": Case(
        op_cuda("grads"), OP + r"grads\[0\] is on cpu but params\[0\] is on cuda", cuda=True
    ),
    "op-cuda-mask-on-cpu": Case(
        op_cuda("masks"), OP + r"masks\[0\] is on cpu but params\[0\] is on cuda", cuda=True
    ),
    "op-cuda-step-on-cpu": Case(
        op_cuda("steps"), OP + r"steps\[0\] is on cpu but params\[0\] is on cuda", cuda=True
    ),
    "op-cuda-master-on-cpu": Case(
        op_cuda("masters"), OP + r"master_params\[0\] is on cpu but params", cuda=True
    ),
    "op-cuda-exp_avg-is-param": Case(
        op_alias("exp_avgs", 0, "params", 0, device="cuda"),
        OP + r"exp_avgs\[0\] shares memory with params\[0\]",
        cuda=True,
    ),
    # fused op: accepted
    "op-disjoint-views-ok": Case(op_disjoint_views, check=check_same_as),
    "op-empty-tensors-ok": Case(op_empty_tensors, check=check_same_as),
    "op-empty-lists-ok": Case(op_empty_lists),
    # optimizer
    "optim-state-of-other-model": Case(
        optim_other_model_state,
        r"cast_ext\.AdamS: load_state_dict: param 0 of group 0 of shape \[8, 16\]: saved state "
        r"'exp_avg' has shape \[8, 32\], expected \[8, 16\]",
        exc=ValueError,
    ),
    "optim-state-group-count": Case(
        optim_other_group_count,
        r"cast_ext\.AdamS: load_state_dict: the state dict has 2 param groups, this optimizer 1",
        exc=ValueError,
    ),
    "optim-state-of-dense-group": Case(
        optim_dense_state_into_sparse_group,
        r"cast_ext\.AdamS: load_state_dict: group 0 has sparse=None here but sparse=False in "
        r"the state dict",
        exc=ValueError,
    ),
    "optim-nan-weight-at-refresh": Case(
        optim_nan_weight_at_refresh, OP + r"params\[0\] of shape \[8, 16\] contains NaN or Inf"
    ),
    "optim-noncontiguous-param-ok": Case(optim_noncontiguous_param),
    "optim-sparse-grad-in-a-later-group": Case(
        optim_sparse_grad_in_group_1, r"cast_ext\.AdamS does not support sparse gradients"
    ),
    "optim-overlapping-params": Case(
        optim_overlapping_params,
        r"cast_ext\.AdamS: param 1 of group 0 of shape \[8, 16\] shares memory with param 0 of "
        r"group 0 of shape \[8, 16\]: each param the step writes must have memory of its own",
    ),
    "optim-interleaved-params-ok": Case(optim_interleaved_params),
    "optim-noncontiguous-grad-ok": Case(optim_noncontiguous_grad),
    # GEMM (its argument rules are in test_sparse24_gemm.py): what it accepts, and devices
    "gemm-x-nan-propagates": Case(gemm_x_nan, check=check_like_linear),
    "gemm-values-inf-propagates": Case(gemm_values_inf, check=check_like_linear),
    "gemm-empty-batch-ok": Case(
        lambda: gemm(torch.randn(0, 16), torch.randn(8, 16)), check=check_like_linear
    ),
    "gemm-noncontiguous-ok": Case(gemm_noncontiguous, check=check_like_linear),
    "gemm-values-bf16-x-fp32": Case(
        lambda: gemm(torch.randn(3, 16), torch.randn(8, 16).bfloat16()),
        r"cast_ext\.sparse24_gemm: x has dtype Float but values has dtype BFloat16",
    ),
    "gemm-cuda-values-on-cpu": Case(
        lambda: gemm(torch.randn(3, 16, device="cuda"), torch.randn(8, 16)),
        r"cast_ext\.sparse24_gemm: x is on cuda:\d but values is on cpu",
        cuda=True,
    ),
    "gemm-cuda-bias-on-cpu": Case(
        lambda: gemm(
            torch.randn(3, 16, device="cuda"), torch.randn(8, 16, device="cuda"), torch.ones(8)
        ),
        r"cast_ext\.sparse24_gemm: bias is on cpu but x is on cuda",
        cuda=True,
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=requires_cuda) if c.cuda else n for n, c in CASES.items()]
)
def test_hostile_input(name: str) -> None:
    case = CASES[name]
    fn, tensors = case.make()
    before = [bits(t) for t in tensors]
    if case.error is None:
        result = fn()
        if case.check is not None:
            case.check(result)
        return
    with pytest.raises(case.exc, match=case.error):
        fn()
    for i, (t, b) in enumerate(zip(tensors, before, strict=True)):
        assert torch.equal(bits(t), b), f"tensor {i} of shape {list(t.shape)} changed"


@pytest.mark.parametrize(
    "name", [n for n, c in CASES.items() if n.startswith("op-") and c.error and not c.cuda]
)
def test_reference_refuses_them_too(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """reference.adams_step_ (AdamS(impl="reference"), what the kernels are held to) refuses
    every input the kernel does, changing nothing: it accepted aliased, overlapping and
    non-contiguous tensors before (its messages are its own)."""
    monkeypatch.setattr(cast_ext.ops, "adams_step_", reference.adams_step_)
    fn, tensors = CASES[name].make()
    before = [bits(t) for t in tensors]
    with pytest.raises(RuntimeError, match=OP):
        fn()
    for i, (t, b) in enumerate(zip(tensors, before, strict=True)):
        assert torch.equal(bits(t), b), f"tensor {i} of shape {list(t.shape)} changed"


def _shared_layouts() -> dict[str, tuple[list[list[Tensor]], str]]:
    """Param groups the step cannot write in place, and the refusal's message."""
    one, buf, flat = torch.randn(1, 16), torch.randn(8, 16), torch.randn(160)
    zero_stride = torch.randn(16).as_strided((8, 16), (0, 1))
    return {
        "expanded": ([[one.expand(8, 16)]], r"param 0 of group 0 of shape \[8, 16\] has elements"),
        "zero-stride": ([[zero_stride]], r"param 0 of group 0 .* has elements that share memory"),
        "strided-overlap": (
            [[buf[:, :8], buf[:, 4:12]]],  # columns 4..7 in both
            r"param 1 of group 0 of shape \[8, 8\] shares memory with param 0 of group 0",
        ),
        "across-groups": (
            [[flat[:128].view(8, 16)], [flat[120:]]],  # a sparse and a dense group's param
            r"param 0 of group 1 of shape \[40\] shares memory with param 0 of group 0",
        ),
    }


@pytest.mark.parametrize("layout", list(_shared_layouts()))
def test_params_sharing_memory_are_refused_before_any_state_is_made(layout: str) -> None:
    """AdamS steps a non-contiguous param through a contiguous copy and each (device, dtype,
    sparse) bucket in its own kernel call, so the kernel's overlap check saw neither case: an
    expanded param raised torch's own error from the copy back after its state had stepped, and
    overlapping strided params or params of two buckets stepped with no error (the shared
    elements kept whichever copy came last). Now refused up front: no state, params unchanged."""
    groups, needle = _shared_layouts()[layout]
    params = [[nn.Parameter(t) for t in g] for g in groups]
    opt = AdamS([{"params": g} for g in params], lr=1e-2, total_steps=10)
    flat = [p for g in params for p in g]
    for p in flat:
        p.grad = torch.randn(p.shape)
    before = [bits(p) for p in flat]
    with pytest.raises(RuntimeError, match=r"cast_ext\.AdamS: " + needle):
        opt.step()
    assert not opt.state
    assert all(torch.equal(bits(p), b) for p, b in zip(flat, before, strict=True))


def test_params_side_by_side_in_one_buffer_step_as_separate_ones() -> None:
    """Params that are neighbouring slices of one buffer (one ends where the next begins, as a
    flat parameter's views do) share no element: they step, each as its own copy would."""
    flat = torch.randn(16 * 8 * 3)
    views = [flat[:128].view(8, 16), flat[128:256].view(8, 16), flat[256:]]
    grads = [torch.randn(v.shape) for v in views]
    results = []
    for tensors in (views, [v.clone() for v in views]):
        params = [nn.Parameter(t) for t in tensors]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt = AdamS(params, lr=1e-2, decay=1e-2, total_steps=10)
        for _ in range(3):
            opt.step()
        results.append([bits(p.detach()) for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert torch.equal(bits(flat[:128].view(8, 16)), results[0][0])


def test_a_param_added_over_a_stepped_one_leaves_its_state_unchanged() -> None:
    buf = torch.randn(8, 16)
    p = nn.Parameter(buf[:, :8])
    opt = AdamS([p], lr=1e-2, total_steps=10)
    p.grad = torch.randn(8, 8)
    opt.step()
    state = {k: bits(v) for k, v in opt.state[p].items()}
    q = nn.Parameter(buf[:, 6:14])
    opt.add_param_group({"params": [q]})
    q.grad = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match=r"param 0 of group 1 .* shares memory with param 0"):
        opt.step()
    assert q not in opt.state
    assert all(torch.equal(bits(opt.state[p][k]), b) for k, b in state.items())


def test_the_fused_step_moves_version_counters_like_torch_optimizers() -> None:
    """adams_step_ writes in place as torch's in-place ops do: every tensor it writes gets a new
    version (it had none: a backward through a weight the step changed ran on the new values,
    where torch.optim.Adam's step makes autograd refuse), and outside no_grad a tensor that
    requires grad is refused before anything is written."""
    for make in (AdamS, torch.optim.Adam):
        lin = nn.Linear(8, 4, bias=False)
        opt = make(lin.parameters(), lr=0.1, **({"total_steps": 10} if make is AdamS else {}))
        x = torch.randn(3, 8, requires_grad=True)
        loss = (lin(x) ** 2).sum()
        lin.weight.grad = torch.ones_like(lin.weight)
        before = lin.weight._version
        opt.step()
        assert lin.weight._version > before, make
        assert all(t._version > 0 for t in opt.state[lin.weight].values() if torch.is_tensor(t))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    d = lists()
    d["params"][1].requires_grad_(True)
    tensors = [t for v in d.values() for t in v]
    before = [bits(t) for t in tensors]
    with pytest.raises(RuntimeError, match=OP + r"params\[1\] requires grad .* torch\.no_grad"):
        call(torch.ops.cast_ext.adams_step_, d)
    assert all(torch.equal(bits(t), b) for t, b in zip(tensors, before, strict=True))
    with torch.no_grad():
        call(torch.ops.cast_ext.adams_step_, d)
    assert all(t._version > 0 for k in ("params", "exp_avgs", "masks", "steps") for t in d[k])
    d["params"][1].requires_grad_(False)
    with torch.inference_mode():
        d["params"][0] = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match=OP + r"params\[0\] is an inference tensor"):
        call(torch.ops.cast_ext.adams_step_, d)
    with torch.inference_mode():  # every tensor an inference one: no Autograd key to reach
        d = {k: [t.clone() for t in v] for k, v in lists().items()}
    with pytest.raises(RuntimeError, match=OP + r"params\[0\] is an inference tensor"):
        call(torch.ops.cast_ext.adams_step_, d)
    # a step inside inference_mode moves the versions too (autograd then refuses the backward)
    lin = nn.Linear(8, 4, bias=False)
    opt = AdamS(lin.parameters(), lr=0.1, total_steps=10)
    loss = (lin(torch.randn(3, 8, requires_grad=True)) ** 2).sum()
    lin.weight.grad = torch.ones_like(lin.weight)
    with torch.inference_mode():
        opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_params_on_meta_or_fake_tensors_step_as_shapes() -> None:
    """Meta and fake tensors have no memory (a data pointer of 0 each): the memory check skips
    them, as memory estimation under FakeTensorMode needs (they all read as one address)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ps = [nn.Parameter(torch.empty(8, 16, device="meta")) for _ in range(2)]
    for p in ps:
        p.grad = torch.empty_like(p)
    AdamS(ps, lr=1e-2, total_steps=10).step()
    with FakeTensorMode():
        ps = [nn.Parameter(torch.empty(8, 16)) for _ in range(2)]
        for p in ps:
            p.grad = torch.randn(8, 16)
        AdamS(ps, lr=1e-2, total_steps=10).step()


def test_the_layout_checks_agree_with_element_sets() -> None:
    """optim._self_overlapping and _share_elements (markers over the views' span) against the
    offsets of every element, on random strided views of one buffer."""
    from cast_ext import optim

    def offsets(off: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> set[int]:
        idx = torch.arange(off + optim._extent(shape, stride)).as_strided(shape, stride, off)
        return set(idx.reshape(-1).tolist())

    gen = torch.Generator().manual_seed(0)

    def view() -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        dims = int(torch.randint(1, 4, (1,), generator=gen))
        shape = tuple(int(v) for v in torch.randint(1, 5, (dims,), generator=gen))
        stride = tuple(int(v) for v in torch.randint(0, 9, (dims,), generator=gen))
        return int(torch.randint(0, 12, (1,), generator=gen)), shape, stride

    seen = {True: 0, False: 0}
    for _ in range(400):
        a, b = view(), view()
        elems = offsets(*a)
        assert optim._self_overlapping(a[1], a[2]) == (len(elems) < math.prod(a[1]))
        shared = bool(elems & offsets(*b))
        assert optim._share_elements(a, b) == shared, (a, b)
        seen[shared] += 1
    assert min(seen.values()) > 50


def test_a_param_cast_to_float64_after_construction_is_refused_before_any_bucket() -> None:
    """The fused op refused the float64 bucket after the fp32 one had stepped, naming the
    param's index in its bucket (params[0]) rather than in the optimizer."""
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    opt = AdamS([a.weight, b.weight], lr=1e-2, total_steps=10)
    b.double()
    a.weight.grad, b.weight.grad = torch.randn(8, 16), torch.randn(8, 16, dtype=torch.float64)
    before = [bits(a.weight), bits(b.weight)]
    with pytest.raises(ValueError, match=r"AdamS: param 1 of group 0 of shape \[8, 16\] has dtype"):
        opt.step()
    assert not opt.state
    assert all(torch.equal(bits(p), x) for p, x in zip((a.weight, b.weight), before, strict=True))
