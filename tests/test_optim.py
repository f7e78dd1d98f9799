"""cast_ext.AdamS, the optimizer: against its reference implementation, torch's Adam, and the
behaviour users expect of a torch optimizer (state_dict, schedulers, GradScaler, groups)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import TOL, requires_cuda
from torch import Tensor, nn

import cast_ext
from cast_ext import AdamS

RTOL = TOL[torch.float32][0] * 4


def make_model(device: str = "cpu", bf16: bool = False) -> nn.ParameterList:
    """Sparse-eligible matrices, a 2-D param with last dim 6 (dense), a bias, a scale vector."""
    shapes = [(32, 64), (48, 32), (10, 6), (32,), (16, 2)]
    ps = [nn.Parameter(torch.randn(s, device=device) * 0.05) for s in shapes]
    if bf16:
        ps.append(nn.Parameter((torch.randn(24, 16, device=device) * 0.05).bfloat16()))
    return nn.ParameterList(ps)


def set_grads(model: nn.ParameterList, gen: torch.Generator, skip: int | None = None) -> None:
    for i, p in enumerate(model):
        if i == skip:
            p.grad = None
            continue
        g = torch.randn(p.shape, generator=gen) * 1e-3
        p.grad = g.to(device=p.device, dtype=p.dtype)


def assert_close_scaled(x: Tensor, y: Tensor, msg: str = "") -> None:
    if x.dtype in (torch.uint8, torch.bool):
        assert torch.equal(x, y), msg
        return
    if x.dtype != torch.float32:
        rt, at = TOL[x.dtype]
        torch.testing.assert_close(x, y, rtol=rt, atol=at, msg=msg)
        return
    scale = float(y.abs().max()) if y.numel() else 0.0
    torch.testing.assert_close(x, y, rtol=RTOL, atol=RTOL * scale, msg=msg)


def assert_opt_close(m1: nn.ParameterList, o1: AdamS, m2: nn.ParameterList, o2: AdamS) -> None:
    for i, (p, q) in enumerate(zip(m1, m2, strict=True)):
        assert_close_scaled(p.detach(), q.detach(), f"param {i}")
        s1, s2 = o1.state.get(p, {}), o2.state.get(q, {})
        assert s1.keys() == s2.keys(), i
        for key in s1:
            if key == "step":
                assert torch.equal(s1[key], s2[key]), f"param {i} step"
            else:
                assert_close_scaled(s1[key], s2[key], f"param {i} state {key}")


HP = {"lr": 2e-3, "weight_decay": 0.01, "decay": 1e-3, "total_steps": 25, "mask_interval": 10}


def test_matches_reference_optimizer() -> None:
    """35 steps: refreshes at 0, 10, 20, 30; alpha reaches 1 at step 25 and stays."""
    m1 = make_model(bf16=True)
    m2 = copy.deepcopy(m1)
    o1 = AdamS(m1.parameters(), **HP)
    o2 = AdamS(m2.parameters(), **HP, impl="reference")
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(35):
        set_grads(m1, g1, skip=3 if step % 7 == 3 else None)
        set_grads(m2, g2, skip=3 if step % 7 == 3 else None)
        o1.step()
        o2.step()
        assert_opt_close(m1, o1, m2, o2)
    assert float(o1.state[m1[0]]["step"]) == 35.0
    assert float(o1.state[m1[3]]["step"]) == 30.0  # skipped when it had no grad
    stats = o1.sparsity_stats()
    assert stats[m1[0]]["alpha"] == 1.0
    assert stats[m1[0]]["mask_flips"] == int(
        cast_ext.mask_flips(o1.state[m1[0]]["prev_mask"], o1.state[m1[0]]["mask"])
    )


def test_group_without_flag_is_sparse_by_shape_and_dense_is_adam() -> None:
    """A group without `sparse` stays one group (groups are the ones given, as schedulers and
    ZeroRedundancyOptimizer expect); its 2-D params with a last dim that is a multiple of m step
    as AdamS, the others as torch's AdamW."""
    model = make_model()
    opt = AdamS(model.parameters(), lr=1e-3, weight_decay=0.1, total_steps=10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert [(g["sparse"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups] == [
        (None, shapes)
    ]
    dense = [copy.deepcopy(p) for p in model[2:]]
    ref = torch.optim.AdamW(dense, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        set_grads(model, gen)
        for p, q in zip(model[2:], dense, strict=True):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(model[2:], dense, strict=True):
        assert_close_scaled(p.detach(), q.detach())
        assert_close_scaled(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
    sparse_shapes = [tuple(p.shape) for p in model.parameters() if "mask" in opt.state[p]]
    assert sparse_shapes == [(32, 64), (48, 32)]
    assert opt.mask(model[0]).shape == (32, 64)
    with pytest.raises(ValueError, match=r"shape \[10, 6\] is not stepped as sparse \(not 2-D"):
        opt.mask(model[2])
    # An explicit flag overrides the split.
    opt2 = AdamS([{"params": list(model), "sparse": False}], total_steps=5)
    assert [g["sparse"] for g in opt2.param_groups] == [False]


def test_mask_finds_each_params_group_after_the_groups_change() -> None:
    """AdamS.mask finds a param's group where it was last seen, and searches again when the
    groups were edited since (a param moved to another group, one removed, one added)."""
    a, b, c = (torch.nn.Parameter(torch.randn(8, 16)) for _ in range(3))
    opt = AdamS([{"params": [a, b]}, {"params": [c], "sparse": False}], total_steps=5)
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.mask(b).shape == (8, 16) and opt.mask(a).shape == (8, 16)
    with pytest.raises(ValueError, match=r"is not stepped as sparse \(its group has sparse=F"):
        opt.mask(c)
    # b moves to the dense group: its old position now holds nothing, a is still first
    first, second = (g["params"] for g in opt.param_groups)
    del first[1]  # b (list.remove would compare tensors)
    second.append(b)
    with pytest.raises(ValueError, match=r"is not stepped as sparse \(its group has sparse=F"):
        opt.mask(b)
    assert opt.mask(a).shape == (8, 16)
    del second[1]  # b
    with pytest.raises(ValueError, match=r"shape \[8, 16\] is not managed by this optimizer"):
        opt.mask(b)
    # c swaps in where b was, in the sparse group (no mask yet: it was stepped dense)
    del second[0]  # c
    first.append(c)
    with pytest.raises(RuntimeError, match=r"has no mask yet"):
        opt.mask(c)


def test_alpha_ramp_closed_form() -> None:
    """Zero gradients: kept weights never move; a pruned weight's update follows alpha = t / T."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 16) * 0.05)
    lr, lam, T, b2 = 1e-2, 1e-3, 4, 0.95
    opt = AdamS([w], lr=lr, decay=lam, total_steps=T, mask_interval=1000, eps=1e-8)
    w0 = w.detach().clone()
    kept = cast_ext.sparse24_mask(w0)
    v = 0.0
    prev = w0.clone()
    for t in range(7):
        w.grad = torch.zeros_like(w)
        assert opt.sparsity_stats().get(w, {"alpha": 0.0})["alpha"] == min(t / T, 1.0)
        opt.step()
        alpha = min(t / T, 1.0)
        mu_eff = alpha * lam  # times sign(w); mu stays 0
        v = b2 * v + (1 - b2) * mu_eff**2
        step = 0.0 if mu_eff == 0 else lr * (mu_eff / (1 - 0.9 ** (t + 1)))
        step = step / ((v / (1 - b2 ** (t + 1))) ** 0.5 + 1e-8) if step else 0.0
        now = w.detach()
        assert torch.equal(now[kept], w0[kept])
        moved = (prev - now)[~kept] * prev[~kept].sign()
        torch.testing.assert_close(moved, torch.full_like(moved, step), rtol=1e-4, atol=1e-9)
        prev = now.clone()
    assert opt.sparsity_stats()[w]["alpha"] == 1.0  # past T it stays 1


@pytest.mark.parametrize("via_bytes", [False, True])
def test_state_dict_resume_is_exact(via_bytes: bool) -> None:
    """Save at step 13 (between refreshes), load into a fresh optimizer: bitwise the same run."""
    base = make_model(bf16=True)
    gen = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(30):
        set_grads(base, gen)
        grads.append([p.grad.clone() for p in base])

    def run(model: nn.ParameterList, opt: AdamS, steps: range) -> None:
        for s in steps:
            for p, g in zip(model, grads[s], strict=True):
                p.grad = g.clone()
            opt.step()

    m_full = copy.deepcopy(base)
    o_full = AdamS(m_full.parameters(), **HP)
    run(m_full, o_full, range(30))

    m_a = copy.deepcopy(base)
    o_a = AdamS(m_a.parameters(), **HP)
    run(m_a, o_a, range(13))
    sd = copy.deepcopy(o_a.state_dict())
    if via_bytes:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf)
    m_b = copy.deepcopy(m_a)
    o_b = AdamS(m_b.parameters(), **HP)
    o_b.load_state_dict(sd)
    assert o_b.state[m_b[5]]["master"].dtype == torch.float32
    assert o_b.state[m_b[0]]["mask"].dtype == torch.uint8
    run(m_b, o_b, range(13, 30))
    for p, q in zip(m_full, m_b, strict=True):
        assert torch.equal(p, q)
        for key, val in o_full.state[p].items():
            assert torch.equal(val, o_b.state[q][key]), key


def test_pickle_named_params_and_foreign_state_dicts() -> None:
    """A deep copy or torch.save of AdamS keeps its impl and steps; named parameters (as torch's
    optimizers take them); a state dict of params in another dtype loads (masters follow the
    params); one of another optimizer (AdamW) is refused with nothing changed."""
    model = make_model(bf16=True)
    gen = torch.Generator().manual_seed(5)
    opt = AdamS(model.parameters(), **HP, impl="reference")
    set_grads(model, gen)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    for other in (copy.deepcopy(opt), torch.load(buf, weights_only=False)):
        assert other.impl == "reference" and other._step_supports_amp_scaling
        for p in other.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        other.step()

    named = AdamS(model.named_parameters(), **HP)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert named.param_groups[0]["params"] == list(model.parameters())
    named.step()

    # fp32 run -> bf16 params: masters made from the params; bf16 run -> fp32: masters taken
    # (where the params hold them rounded) and dropped at the next step
    fp32 = nn.ParameterList([nn.Parameter(p.detach().float()) for p in model])
    o32 = AdamS(fp32.parameters(), **HP)
    set_grads(fp32, gen)
    o32.step()
    o16 = AdamS(model.parameters(), **HP)
    o16.load_state_dict(o32.state_dict())
    assert torch.equal(o16.state[model[5]]["master"], model[5].detach().float())
    set_grads(model, gen)
    o16.step()
    o32.load_state_dict(o16.state_dict())
    assert torch.equal(o32.state[fp32[5]]["master"], o16.state[model[5]]["master"])
    set_grads(fp32, gen)
    o32.step()
    assert "master" not in o32.state[fp32[5]]

    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    before = copy.deepcopy(o16.state_dict())
    with pytest.raises(ValueError, match=r"group 0 of the state dict lacks AdamS's \['decay'"):
        o16.load_state_dict(adamw.state_dict())
    after = o16.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, st in before["state"].items():
        for name, val in st.items():
            assert torch.equal(after["state"][key][name], val), name


def scaler_setup(
    init_scale: float,
) -> tuple[nn.Linear, nn.Linear, AdamS, AdamS, torch.amp.GradScaler, Tensor]:
    """A Linear with a fused AdamS, its copy with the reference AdamS, a CPU GradScaler, x."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    ref = copy.deepcopy(model)
    opt = AdamS(model.parameters(), lr=1e-3, total_steps=10)
    ref_opt = AdamS(ref.parameters(), lr=1e-3, total_steps=10, impl="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return model, ref, opt, ref_opt, scaler, torch.randn(4, 16)


def test_grad_scaler_inf_skip() -> None:
    model, ref, opt, ref_opt, scaler, x = scaler_setup(2.0**10)
    for it in range(4):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        if it == 1:
            model.weight.grad[0, 0] = float("inf")
            before = {k: v.clone() for k, v in opt.state[model.weight].items()}
            w_before = model.weight.detach().clone()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if it == 1:
            assert torch.equal(model.weight, w_before)
            for key, val in opt.state[model.weight].items():
                assert torch.equal(val, before[key]), key
            assert scaler.get_scale() == scale / 2
            continue
        # A finite step equals the reference on the unscaled gradients.
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.grad = p.grad / scale
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert_close_scaled(p.detach(), q.detach())
    assert float(opt.state[model.weight]["step"]) == 3.0
    assert not hasattr(opt, "found_inf")


def test_grad_scaler_unscale_then_clip() -> None:
    """scaler.unscale_(opt), clip_grad_norm_, scaler.step(opt): the step takes the unscaled
    (clipped) gradients as they are (GradScaler passes no grad_scale after unscale_), equal to
    the reference on the same gradients; an inf found by unscale_ still skips the step."""
    model, ref, opt, ref_opt, scaler, x = scaler_setup(2.0**12)
    for it in range(3):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        if it == 1:
            model.bias.grad[0] = float("nan")
            w_before = model.weight.detach().clone()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if it == 1:
            assert torch.equal(model.weight, w_before)
            continue
        for q, g in zip(ref.parameters(), grads, strict=True):
            q.grad = g
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert_close_scaled(p.detach(), q.detach())
    assert float(opt.state[model.weight]["step"]) == 2.0


def test_lr_scheduler_and_no_grad_params() -> None:
    model = make_model()
    opt = AdamS(model.parameters(), lr=1e-3, total_steps=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 3 else 0.0)
    gen = torch.Generator().manual_seed(0)
    for s in range(6):
        set_grads(model, gen, skip=1)
        before = [p.detach().clone() for p in model]
        opt.step()
        sched.step()
        moved = [not torch.equal(p, b) for p, b in zip(model, before, strict=True)]
        assert not moved[1]  # no grad: untouched, no state
        assert moved[0] == (s < 3)  # lr 0 from step 3 on
    assert model[1] not in opt.state


def test_bf16_master_keeps_small_decay() -> None:
    """lam far below bf16 resolution still moves the fp32 masters; params are their rounding."""
    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(16, 32) * 0.05).bfloat16())
    opt = AdamS([w], lr=1e-7, decay=4e-7, total_steps=2, mask_interval=100)
    start = w.detach().float().clone()
    for _ in range(4):
        w.grad = torch.zeros_like(w)
        opt.step()
    master = opt.state[w]["master"]
    assert master.dtype == torch.float32
    assert torch.equal(w.detach(), master.bfloat16())
    kept = opt.mask(w)
    # Steps of ~1e-7 round away in bf16 for all but the tiniest weights...
    assert (w.detach().float() == start).float().mean() > 0.9
    # ...yet every pruned master weight moved toward 0.
    assert (master[~kept].abs() < start[~kept].abs()).all()
    assert torch.equal(master[kept], start[kept])


def test_bf16_param_written_outside_the_step_is_the_new_master() -> None:
    """A bf16 param changed in place between steps (a fixed mask re-applied, a checkpoint
    loaded into the model) goes on from its new value: its fp32 master is re-read from it,
    where the stale master used to be written back over the change. An fp32 twin (its own
    master) given the same grads and the same write is the yardstick: the pruned entries agree
    exactly; untouched, the masters agree exactly too (no re-read)."""
    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(16, 32) * 0.05).bfloat16())
    twin = nn.Parameter(w.detach().float())
    hp = {"lr": 1e-3, "decay": 1e-3, "total_steps": 10, "mask_interval": 100}
    opt, opt32 = AdamS([w], **hp), AdamS([twin], **hp)

    def step(g: Tensor) -> None:
        w.grad, twin.grad = g.bfloat16(), g.bfloat16().float()
        opt.step()
        opt32.step()

    for _ in range(3):
        step(torch.randn(16, 32))
    assert torch.equal(opt.state[w]["master"], twin.detach())
    kept = opt.mask(w)
    with torch.no_grad():  # the hard prune a fixed-mask fine-tune re-applies
        w.mul_(kept)
        twin.mul_(kept)
    step(torch.zeros(16, 32))
    master = opt.state[w]["master"]
    assert torch.equal(master[~kept], twin.detach()[~kept])
    assert torch.equal(w.detach(), master.bfloat16())


def test_bf16_param_written_after_load_state_dict_is_the_new_master() -> None:
    """Loading the optimizer, then writing the model (a prune, another checkpoint): the first
    step takes the written entries from the param (the load left no version to compare), and
    keeps the fp32 master where the param is its master rounded."""
    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(16, 32) * 0.05).bfloat16())
    hp = {"lr": 1e-3, "decay": 1e-3, "total_steps": 10, "mask_interval": 100}
    opt = AdamS([w], **hp)
    for _ in range(2):
        w.grad = torch.randn(16, 32).bfloat16()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = AdamS([w], **hp)
    fresh.load_state_dict(saved)
    master = fresh.state[w]["master"]
    kept = fresh.mask(w)
    with torch.no_grad():
        w.mul_(kept)
    expected = torch.where(kept, master, torch.zeros_like(master))
    w.grad = torch.zeros(16, 32).bfloat16()
    twin = AdamS([nn.Parameter(expected.clone())], **hp)
    twin.load_state_dict({**saved, "state": {0: {**saved["state"][0], "master": expected}}})
    twin.param_groups[0]["params"][0].grad = w.grad.float()
    fresh.step()
    twin.step()
    assert torch.equal(fresh.state[w]["master"], twin.param_groups[0]["params"][0].detach())


def test_model_cast_after_steps_gets_or_drops_masters() -> None:
    """The model cast to bf16 after AdamS made fp32 state (and back): the state gains a master
    from the param (it lost it), whichever param of the bucket comes first."""
    a, b = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 16))
    opt = AdamS([a, b], lr=1e-3, total_steps=5)
    a.grad = torch.randn(8, 16)
    opt.step()  # a has fp32 state, b none
    for p in (a, b):
        p.data = p.data.bfloat16()
        p.grad = torch.randn(8, 16).bfloat16()
    opt.step()
    assert opt.state[a]["master"].dtype == torch.float32 and "master" in opt.state[b]
    assert torch.equal(a.detach(), opt.state[a]["master"].bfloat16())
    for p in (a, b):
        p.data = p.data.float()
        p.grad = torch.randn(8, 16)
    opt.step()
    assert "master" not in opt.state[a] and "master" not in opt.state[b]


def test_a_bf16_runs_state_loaded_into_an_fp32_model_goes_on_as_the_cast_model() -> None:
    """A bf16 run's model and optimizer state dicts loaded into a fresh fp32 model and AdamS go
    on bit for bit as the live model cast to fp32 does: the params take their masters' values
    at the next step (load_state_dict dropped fp32 params' masters, so the run went on from
    their bf16 rounding, ~1e-3 off). A sync_masters call between leaves the masters alone."""

    def make(dtype: torch.dtype) -> tuple[nn.Linear, AdamS]:
        torch.manual_seed(0)
        model = nn.Linear(8, 8).to(dtype)
        return model, AdamS(model.parameters(), lr=1e-3, decay=1e-3, total_steps=20)

    def steps(model: nn.Linear, opt: AdamS, k: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(k):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()

    live, live_opt = make(torch.bfloat16)
    steps(live, live_opt, 4, 1)
    saved = copy.deepcopy((live.state_dict(), live_opt.state_dict()))
    live.float()
    model, opt = make(torch.float32)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    opt.sync_masters()
    steps(live, live_opt, 3, 2)
    steps(model, opt, 3, 2)
    for p, q in zip(live.parameters(), model.parameters(), strict=True):
        assert q.dtype == torch.float32 and torch.equal(p, q)
        assert live_opt.state[p].keys() == opt.state[q].keys() and "master" not in opt.state[q]
        for key, val in live_opt.state[p].items():
            assert torch.equal(val, opt.state[q][key]), key


def test_a_refused_step_changes_no_group_and_impl_survives_load() -> None:
    """A NaN weight at a mask refresh in a later group (or in the same list, for the reference
    implementation, which steps param by param) refuses the whole step: no param, state or
    step of any group changes, and no mask appears. impl="reference" stays after a
    load_state_dict."""
    for impl in ("auto", "reference"):
        ok, bad = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
        bias, ok16 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4, 8).bfloat16())
        late = nn.Parameter(torch.randn(4, 8))
        groups = [{"params": [bias, ok, ok16]}, {"params": [late, bad]}]
        opt = AdamS(groups, lr=0.1, total_steps=5, impl=impl)
        params = (bias, ok, ok16, late, bad)
        for p in params:
            p.grad = torch.ones_like(p)
        with torch.no_grad():
            bad[1, 2] = float("nan")
        before = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match=r"param 1 of group 1 of shape \[4, 8\] contains"):
            opt.step()
        for p, q in zip(params, before, strict=True):
            assert torch.equal(p.detach().nan_to_num(), q.nan_to_num())
            assert not opt.state[p] or float(opt.state[p]["step"]) == 0
        with pytest.raises(RuntimeError, match="no mask yet"):
            opt.mask(ok)  # a refused (or GradScaler-skipped) first step: a state, no mask
        assert opt.sparsity_stats() == {}
        loaded = AdamS(groups, lr=0.1, total_steps=5, impl=impl)
        loaded.load_state_dict(opt.state_dict())
        assert loaded.impl == impl
        one_list = AdamS([ok, bad], lr=0.1, total_steps=5, impl=impl)
        with pytest.raises(RuntimeError, match=r"adams_step_: params\[1\] .* NaN or Inf"):
            one_list.step()
        assert torch.equal(ok.detach(), before[1])


def test_group_settings_and_params_are_checked_like_torch() -> None:
    p = nn.Parameter(torch.randn(4, 8))
    opt = AdamS([{"params": [p], "total_steps": 7}])  # total_steps per group is enough
    assert opt.param_groups[0]["total_steps"] == 7
    with pytest.raises(ValueError, match="total_steps is required"):
        AdamS([{"params": [p]}])
    with pytest.raises(TypeError, match="ordered collection"):
        AdamS([{"params": {p}}], total_steps=5)
    with pytest.raises(TypeError, match="params must be Tensors, got float"):
        AdamS([{"params": [1.0], "sparse": True}], total_steps=5)
    with pytest.raises(ValueError, match="0 < n <= m"):
        AdamS([p], total_steps=5, n=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts' states equal, tensor for tensor."""
    assert a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys(), i
        for key, val in st.items():
            assert torch.equal(val, b["state"][i][key]), (i, key)


@pytest.mark.parametrize(
    ("gi", "key", "value", "needle"),
    [
        (1, "lr", -1.0, "lr must be finite and >= 0, got -1.0"),
        (1, "lr", float("nan"), "lr must be finite"),
        (1, "total_steps", None, "total_steps is required"),
        (1, "betas", (0.9, 1.5), r"betas must be two values in \[0, 1\)"),
        (1, "eps", -1.0, "eps must be"),
        (0, "mask_interval", 2.5, "mask_interval must be an int >= 1, got 2.5"),
        (0, "total_steps", 5.5, "total_steps must be an int >= 1, got 5.5"),
        (0, "n", 5, r"need m in \(4, 8\) and 0 < n <= m, got n=5"),
        (0, "amsgrad", True, r"a group sets \['amsgrad'\]"),
    ],
)
def test_a_group_changed_to_bad_settings_is_refused_before_any_group_steps(
    gi: int, key: str, value: object, needle: str
) -> None:
    """A group's settings changed after construction are checked as the constructor checks
    them, at the start of the step: the constructor's ValueError naming the group, no param or
    state of any group changed (the kernels checked them one call at a time: the sparse group
    had stepped, and int() truncated a float total_steps or mask_interval, amsgrad was ignored).
    The changed value put back, the step goes on; a 0-d tensor lr (as schedulers may set) steps."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8))
    opt = AdamS([{"params": [w]}, {"params": [b], "sparse": False}], lr=1e-2, total_steps=10)
    for p in (w, b):
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in (w, b)], copy.deepcopy(opt.state_dict())
    old = opt.param_groups[gi].get(key)
    opt.param_groups[gi][key] = value
    with pytest.raises(ValueError, match=rf"cast_ext.AdamS: group {gi}: {needle}"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip((w, b), before[0], strict=True))
    assert_same_state(opt.state_dict(), before[1])
    opt.param_groups[gi][key] = old
    opt.param_groups[1]["lr"] = torch.tensor(1e-2)
    opt.step()
    assert float(opt.state[w]["step"]) == float(opt.state[b]["step"]) == 2


@pytest.mark.parametrize(
    ("gi", "sparse", "needle"),
    [
        (0, "yes", "group 0: a group's sparse must be a bool, got 'yes'"),
        (1, True, r"param 0 of group 1 of shape \[8\] is in a sparse group but has fewer "),
        (2, True, r"param 1 of group 2 of shape \[4, 6\] is in a sparse group: its last dim must"),
    ],
)
def test_a_group_made_sparse_against_the_rules_is_refused_before_any_group_steps(
    gi: int, sparse: object, needle: str
) -> None:
    """A group's ``sparse`` changed after construction is checked as add_param_group checks
    it, for every param of the group, at the start of the step: the constructor's ValueError
    naming the param, nothing changed (a truthy non-bool counted as True, a 1-D param got a
    mask, and a [4, 6] one failed inside nm_mask naming neither group nor param)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8))
    v, c = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 6))
    groups = [
        {"params": [w]},
        {"params": [b], "sparse": False},
        {"params": [v, c], "sparse": False},
    ]
    opt = AdamS(groups, lr=1e-2, total_steps=10)
    for p in (w, b, v, c):
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in (w, b, v, c)], copy.deepcopy(opt.state_dict())
    opt.param_groups[gi]["sparse"] = sparse
    with pytest.raises(ValueError, match=rf"cast_ext.AdamS: {needle}"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip((w, b, v, c), before[0], strict=True))
    assert_same_state(opt.state_dict(), before[1])


def test_per_group_weight_decay_and_3d_params_step_as_adamw() -> None:
    """Dense groups are AdamW with each group's own weight_decay (not the default's); a 3-D
    param in a group without the flag is dense (no mask), as AdamW steps it."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(4, 2, 8))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    hp = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    groups = [{"params": [ps[0]], "sparse": False, "weight_decay": 0.3}, {"params": [ps[1]]}]
    opt = AdamS(groups, weight_decay=0.0, total_steps=5, **hp)
    ref = torch.optim.AdamW(
        [{"params": [qs[0]], "weight_decay": 0.3}, {"params": [qs[1]]}], weight_decay=0.0, **hp
    )
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert "mask" not in opt.state[ps[1]]


def test_stats_against_independent_figures() -> None:
    """mask_flips is None until the second refresh (mask_interval 3: refreshes at t = 0, 3),
    then counts the groups whose kept pair changed (all of them, the ranking reversed), with
    prev_mask the first refresh's mask; pruned_over_kept is mean |pruned| / mean |kept|."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.rand(8, 16) + 0.5)
    opt = AdamS([w], lr=1e-3, decay=1e-3, total_steps=10, mask_interval=3)
    for t in range(3):
        w.grad = torch.zeros_like(w)
        opt.step()
        st = opt.sparsity_stats()[w]
        assert st["mask_flips"] is None and st["step"] == t + 1
        kept = opt.mask(w)
        ratio = float(w.detach()[~kept].abs().mean() / w.detach()[kept].abs().mean())
        assert st["pruned_over_kept"] == pytest.approx(ratio, rel=1e-6)
    first = opt.state[w]["mask"].clone()
    with torch.no_grad():
        w.copy_(1.0 / w)  # every group's ranking reversed
    w.grad = torch.zeros_like(w)
    opt.step()
    st = opt.sparsity_stats()[w]
    assert torch.equal(opt.state[w]["prev_mask"], first)
    assert st["mask_flips"] == w.numel() // 4 and st["flip_rate"] == 1.0


def test_a_first_step_gradscaler_skips_leaves_no_mask() -> None:
    model, _, opt, _, scaler, x = scaler_setup(2.0**10)
    scaler.scale(model(x).pow(2).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    assert float(opt.state[model.weight]["step"]) == 0
    with pytest.raises(RuntimeError, match="no mask yet"):
        opt.mask(model.weight)
    assert opt.sparsity_stats() == {}


def test_mask_and_stats() -> None:
    model = make_model()
    opt = AdamS(model.parameters(), lr=5e-3, decay=1e-2, total_steps=5, mask_interval=2)
    with pytest.raises(RuntimeError, match="no mask yet"):
        opt.mask(model[0])
    with pytest.raises(ValueError, match="not stepped as sparse"):
        opt.mask(model[2])
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(12):
        set_grads(model, gen)
        opt.step()
        st = opt.sparsity_stats()[model[0]]
        ratios.append(st["pruned_over_kept"])
    mask = opt.mask(model[0])
    assert mask.dtype == torch.bool and mask.shape == model[0].shape
    assert (mask.reshape(-1, 4).sum(-1) == 2).all()
    assert st["mask_flips"] == int(
        cast_ext.mask_flips(opt.state[model[0]]["prev_mask"], opt.state[model[0]]["mask"])
    )
    assert st["flip_rate"] == st["mask_flips"] / (model[0].numel() // 4)
    assert ratios[-1] < 0.5 * ratios[0]  # pruned weights slide toward 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "total_steps is required"),
        ({"total_steps": 0}, "total_steps must be"),
        ({"total_steps": 5, "betas": (1.0, 0.9)}, "betas"),
        ({"total_steps": 5, "betas": (0.9, -0.1)}, "betas"),
        ({"total_steps": 5, "lr": -1.0}, "lr"),
        ({"total_steps": 5, "eps": -1.0}, "eps"),
        ({"total_steps": 5, "decay": -1.0}, "decay"),
        ({"total_steps": 5, "weight_decay": -1.0}, "weight_decay"),
        ({"total_steps": 5, "mask_interval": 0}, "mask_interval"),
        ({"total_steps": 5, "m": 6}, "m in"),
        ({"total_steps": 5, "impl": "fast"}, "impl"),
    ],
)
def test_construction_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        AdamS([nn.Parameter(torch.zeros(4, 8))], **kwargs)


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ((4, 6), r"\[4, 6\].*multiple of m=4"),
        ((8,), r"\[8\].*fewer than 2 dims"),
        ((2, 4, 6), "m=4"),
    ],
)
def test_sparse_group_shape_errors(shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        AdamS([{"params": [nn.Parameter(torch.zeros(shape))], "sparse": True}], total_steps=5)


@requires_cuda
def test_cpu_and_cuda_agree() -> None:
    m_cpu = make_model(bf16=True)
    m_gpu = copy.deepcopy(m_cpu).cuda()
    o_cpu = AdamS(m_cpu.parameters(), **HP)
    o_gpu = AdamS(m_gpu.parameters(), **HP)
    gen = torch.Generator().manual_seed(5)
    for _ in range(25):
        set_grads(m_cpu, gen)
        for p, q in zip(m_cpu, m_gpu, strict=True):
            q.grad = p.grad.cuda()
        o_cpu.step()
        o_gpu.step()
    for p, q in zip(m_cpu, m_gpu, strict=True):
        assert_close_scaled(q.detach().cpu(), p.detach())
        for key, val in o_cpu.state[p].items():
            assert_close_scaled(o_gpu.state[q][key].cpu(), val, key)


@requires_cuda
def test_cuda_grad_scaler() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 32).cuda()
    opt = AdamS(model.parameters(), total_steps=10)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 64, device="cuda")
    scaler.scale(model(x).pow(2).sum()).backward()
    model.weight.grad[0, 0] = float("nan")
    w = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight, w)
    assert float(opt.state[model.weight]["step"]) == 0.0


def test_writes_through_data_reach_the_bf16_master() -> None:
    """``p.data = new`` (no version bump: the storage changes) is taken at the next step;
    ``p.data.copy_`` (invisible to autograd) after ``sync_masters()``. Each is checked with
    lr 0, where the step must leave the written value as it is."""
    p = nn.Parameter((torch.randn(4, 8) * 0.05).bfloat16())
    opt = AdamS([p], lr=0.0, total_steps=10)
    p.grad = torch.zeros_like(p)
    opt.step()
    p.data = torch.full((4, 8), 3.0, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, 3.0))
    assert torch.equal(opt.state[p]["master"], torch.full((4, 8), 3.0))
    p.data.copy_(torch.full((4, 8), -2.0))
    opt.sync_masters()
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, -2.0))
    # sync_masters keeps the master's fp32 bits where the param is the master rounded
    p.grad = torch.randn(4, 8).bfloat16()
    opt.param_groups[0]["lr"] = 1e-3
    opt.step()
    master = opt.state[p]["master"].clone()
    assert not torch.equal(master, master.bfloat16().float())
    opt.sync_masters()
    assert torch.equal(opt.state[p]["master"], master)


def test_grad_scaler_step_with_no_grads_in_this_optimizer() -> None:
    """GradScaler hands found_inf = 0 (an int: a sum over no grads) to an optimizer none of whose
    params has a gradient this iteration (a sub-model unused in it): nothing to step, no error."""
    used, unused = nn.Linear(8, 8), nn.Linear(8, 8)
    opt_used = torch.optim.SGD(used.parameters(), lr=0.1)
    opt = AdamS(unused.parameters(), lr=0.1, total_steps=5)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in unused.parameters()]
    scaler.scale(used(torch.randn(2, 8)).sum()).backward()
    scaler.step(opt_used)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(unused.parameters(), before, strict=True))
    assert not opt.state


def test_empty_sparse_param_in_a_later_bucket_steps() -> None:
    """A zero-size sparse param after the first bucket (checked for NaN at a refresh before
    any call) used to fail the whole step (an inf norm of an empty tensor)."""
    a = nn.Parameter(torch.randn(4, 8))
    e = nn.Parameter(torch.randn(0, 8).bfloat16())
    opt = AdamS([a, e], lr=0.1, total_steps=5)
    a.grad, e.grad = torch.ones_like(a), torch.ones_like(e)
    before = a.detach().clone()
    opt.step()
    assert not torch.equal(a.detach(), before) and float(opt.state[e]["step"]) == 1


def test_nan_written_into_a_bf16_param_refuses_the_step_before_any_bucket() -> None:
    """A NaN written into a bf16 param since the last step is seen by the check before any
    bucket steps (its master used to be refreshed only in its own bucket's turn, after the
    fp32 bucket had stepped)."""
    w32, w16 = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8).bfloat16())
    opt = AdamS([w32, w16], lr=0.1, total_steps=5, mask_interval=1)
    for p in (w32, w16):
        p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        w16[0, 0] = float("nan")
    before = w32.detach().clone()
    with pytest.raises(RuntimeError, match=r"param 1 of group 0 of shape \[4, 8\] contains NaN"):
        opt.step()
    assert torch.equal(w32.detach(), before) and float(opt.state[w32]["step"]) == 1


def test_a_group_made_sparse_after_steps_gets_a_mask_and_one_made_dense_drops_it() -> None:
    """A dense warm-up, then sparsity switched on (or m changed so a param becomes sparse):
    the state gains the N:M mask of the current weights (it raised KeyError). Switched off
    again, the mask leaves the state, so a state dict loads into an optimizer built dense."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 16))
    opt = AdamS([{"params": [w], "sparse": False}], lr=1e-2, total_steps=20, mask_interval=10)
    for _ in range(3):
        w.grad = torch.randn(8, 16)
        opt.step()
    assert "mask" not in opt.state[w]
    opt.param_groups[0]["sparse"] = True
    expected = cast_ext.sparse24_mask(w.detach())
    w.grad = torch.randn(8, 16)
    opt.step()  # step 3: not a refresh; the mask is the weights' at the start of the step
    assert torch.equal(opt.mask(w), expected)
    assert torch.equal(opt.state[w]["prev_mask"], opt.state[w]["mask"])  # no flips
    opt.param_groups[0]["sparse"] = False
    w.grad = torch.randn(8, 16)
    opt.step()
    assert "mask" not in opt.state[w] and "prev_mask" not in opt.state[w]
    dense = AdamS([{"params": [w], "sparse": False}], lr=1e-2, total_steps=20)
    dense.load_state_dict(opt.state_dict())


def test_a_bf16_group_made_sparse_takes_its_mask_from_the_master_after_writes() -> None:
    """bf16 params with fp32 masters, sparsity switched on after dense steps: the new mask ranks
    the fp32 masters (1.0001, 1.0002, 1.0003 all round to bf16 1.0, whose tie rule would keep
    the first two), and a weight written between the steps counts as written (the mask was
    taken from the master before the master took the write)."""
    w = nn.Parameter(torch.randn(2, 8).bfloat16())
    opt = AdamS([{"params": [w], "sparse": False}], lr=1e-3, total_steps=20, mask_interval=10)
    w.grad = torch.zeros_like(w)
    opt.step()
    master = torch.tensor([[1.0001, 1.0002, 0.5, 1.0003] * 2, [0.1, 0.2, 0.3, 0.4] * 2])
    opt.state[w]["master"].copy_(master)
    with torch.no_grad():
        w.copy_(master.bfloat16())  # the master rounded: nothing new written
        w[1, 4] = 2.0  # a write: the second row's second group keeps 4 and 7, not 6 and 7
    expected = cast_ext.sparse24_mask(torch.where(w.float() == 2.0, 2.0, master))
    opt.param_groups[0]["sparse"] = True
    w.grad = torch.zeros_like(w)
    opt.step()  # step 1: not a refresh; the mask is the weights' at the start of the step
    assert torch.equal(opt.mask(w), expected)
    assert torch.equal(expected[0, :4], torch.tensor([False, True, False, True]))


def test_load_state_dict_refuses_a_state_missing_its_tensors() -> None:
    """A state without a moment or a mask (hand-made, or another optimizer's) is refused at load,
    before anything changes (it loaded, then the step raised KeyError); a plain-number step,
    as older torch saved it, loads."""
    w = nn.Parameter(torch.randn(4, 8))
    opt = AdamS([w], lr=0.1, total_steps=5)
    w.grad = torch.ones_like(w)
    opt.step()
    saved = opt.state_dict()
    for key in ("prev_mask", "exp_avg_sq"):
        st = {k: v for k, v in saved["state"][0].items() if k != key}
        with pytest.raises(
            ValueError, match=rf"of shape \[4, 8\]: the saved state lacks \['{key}'"
        ):
            AdamS([w], lr=0.1, total_steps=5).load_state_dict({**saved, "state": {0: st}})
    fresh = AdamS([w], lr=0.1, total_steps=5)
    fresh.load_state_dict({**saved, "state": {0: {**saved["state"][0], "step": 1}}})
    assert torch.equal(fresh.state[w]["step"], torch.tensor(1.0))
    fresh.step()
    assert float(fresh.state[w]["step"]) == 2


def test_a_param_listed_twice_in_a_group_is_refused_clearly() -> None:
    w = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"shape \[4, 8\] appears twice in a group"):
        AdamS([w, w], total_steps=5)


def test_each_groups_hyperparameters_reach_the_step_against_the_reference_op() -> None:
    """Two groups, each with its own weight_decay, eps, decay, betas, total_steps, mask_interval
    and n:m, a sparse fp32, a sparse bf16 (master) and a dense param among them, against
    ``reference.adams_step_`` called directly on twin tensors with those settings (not through
    ``AdamS(impl="reference")``, whose wrapper is the code under test): a setting the wrapper
    dropped or took from the wrong group (weight_decay on sparse params, a group's eps) shows."""
    from cast_ext import reference

    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(8, 16) * 0.05)
    b = nn.Parameter((torch.randn(6, 16) * 0.05).bfloat16())
    c = nn.Parameter(torch.randn(16) * 0.05)
    d = nn.Parameter(torch.randn(4, 32) * 0.05)
    groups = [
        {"params": [a, b, c], "weight_decay": 0.1, "eps": 1e-3, "decay": 2e-3,
         "betas": (0.8, 0.9), "total_steps": 6, "mask_interval": 3},
        {"params": [d], "weight_decay": 0.05, "eps": 1e-4, "decay": 1e-3, "total_steps": 9,
         "mask_interval": 2, "n": 4, "m": 8},
    ]  # fmt: skip
    opt = AdamS(groups, lr=1e-2, weight_decay=0.0, eps=1e-8, total_steps=100)
    twins = {}
    for p in (a, b, c, d):
        w = p.detach().float().clone()
        k = (p.shape[-1] + 7) // 8
        twins[p] = {
            "w": w if p.dtype == torch.float32 else p.detach().clone(),
            "master": [w] if p.dtype != torch.float32 else [],
            "mu": torch.zeros(p.shape),
            "v": torch.zeros(p.shape),
            "mask": [torch.zeros(*p.shape[:-1], k, dtype=torch.uint8)] if p.dim() == 2 else [],
            "step": torch.zeros(()),
        }
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        for group in groups:
            for p in group["params"]:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)
                t = twins[p]
                n, m = group.get("n", 2), group.get("m", 4)
                reference.adams_step_(
                    [t["w"]], [p.grad.clone()], [t["mu"]], [t["v"]], t["mask"], [t["step"]],
                    t["master"], lr=1e-2, beta1=group.get("betas", (0.9, 0.95))[0],
                    beta2=group.get("betas", (0.9, 0.95))[1], eps=group["eps"],
                    weight_decay=group["weight_decay"], decay=group["decay"],
                    total_steps=group["total_steps"], mask_interval=group["mask_interval"],
                    n=n, m=m,
                )  # fmt: skip
        opt.step()
    for p, t in twins.items():
        state = opt.state[p]
        assert_close_scaled(p.detach(), t["w"], str(list(p.shape)))
        assert_close_scaled(state["exp_avg_sq"], t["v"], str(list(p.shape)))
        if t["mask"]:
            assert torch.equal(state["mask"], t["mask"][0]), list(p.shape)


def test_a_refused_step_leaves_no_grad_scale_behind() -> None:
    """GradScaler deletes the grad_scale / found_inf it sets only after a step that returns: a
    step AdamS refused (a NaN weight at a refresh) left them on the optimizer, and the next
    GradScaler step unscaled by their product with its own scale (grads / scale**2)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    opt = AdamS(lin.parameters(), lr=1e-2, total_steps=10, mask_interval=1)
    x = torch.randn(4, 16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    scaler.scale(lin(x).sum()).backward()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    with torch.no_grad():
        lin.weight[0, 0] = 0.5
    seen: list[Tensor] = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.grad_scale.clone()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    lin.zero_grad()
    scaler.scale(lin(x).sum()).backward()
    scaler.step(opt)
    assert float(seen[0]) == 2.0**8


def test_a_write_of_the_same_values_keeps_the_fp32_master() -> None:
    """A bf16 param written outside the step (here: the model's own state dict loaded back)
    made the master copy the param whole, dropping the precision the param lacks; the master
    now takes the param only where it is not the master rounded."""

    def run(reload: bool) -> Tensor:
        torch.manual_seed(0)
        lin = nn.Linear(64, 32, bias=False).bfloat16()
        opt = AdamS(lin.parameters(), lr=1e-4, total_steps=1000, decay=1e-3)
        for _ in range(30):
            lin.weight.grad = torch.full_like(lin.weight, 1e-3)
            opt.step()
            if reload:
                lin.load_state_dict(lin.state_dict())
        return opt.state[lin.weight]["master"]

    assert torch.equal(run(True), run(False))
    # a write of other values is still taken: the param wins where it changed
    lin = nn.Linear(64, 32, bias=False).bfloat16()
    opt = AdamS(lin.parameters(), lr=1e-4, total_steps=1000)
    lin.weight.grad = torch.full_like(lin.weight, 1e-3)
    opt.step()
    with torch.no_grad():
        lin.weight[0].zero_()
    opt.step()
    master = opt.state[lin.weight]["master"]
    assert float(master[0].abs().max()) < 2e-3 < 2e-2 < float(master[1:].abs().mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_model_cast_to_fp32_takes_its_masters(dtype: torch.dtype) -> None:
    """model.float() after 16-bit steps: the fp32 params hold the masters rounded to that
    dtype; the next step takes the masters (the more precise weights) instead of dropping
    them."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False).to(dtype)
    opt = AdamS(lin.parameters(), lr=1e-4, total_steps=1000)
    for _ in range(5):
        lin.weight.grad = torch.full_like(lin.weight, 1e-3)
        opt.step()
    master = opt.state[lin.weight]["master"].clone()
    assert not torch.equal(master, lin.weight.detach().float())
    lin.float()
    for group in opt.param_groups:
        group["lr"] = 0.0
    lin.weight.grad = torch.zeros_like(lin.weight)
    opt.step()
    assert "master" not in opt.state[lin.weight]
    assert torch.equal(lin.weight.detach(), master)


def test_load_state_dict_runs_hooks_as_torch_does() -> None:
    """A pre-hook's returned dict is the one loaded (its state too), and a post-hook's changes
    stay (the state was restored from the raw dict after torch's load, over both)."""
    model = make_model()
    opt = AdamS(model.parameters(), lr=1e-2, total_steps=20)
    set_grads(model, torch.Generator().manual_seed(0))
    opt.step()
    sd = opt.state_dict()

    def pre(o: AdamS, state_dict: dict) -> dict:
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"].zero_()
        return state_dict

    def post(o: AdamS) -> None:
        o.state[o.param_groups[0]["params"][1]]["exp_avg_sq"] = torch.full((48, 32), 7.0)

    fresh = AdamS(model.parameters(), lr=1e-2, total_steps=20)
    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    params = fresh.param_groups[0]["params"]
    assert float(fresh.state[params[0]]["exp_avg"].abs().max()) == 0.0
    assert float(sd["state"][0]["exp_avg"].abs().max()) > 0.0  # the caller's dict untouched
    assert torch.equal(fresh.state[params[1]]["exp_avg_sq"], torch.full((48, 32), 7.0))


def test_a_saved_group_without_sparse_keeps_the_setting() -> None:
    """A state dict whose group lacks `sparse` (edited, or from elsewhere) loaded, then every
    step raised KeyError; the group keeps this optimizer's setting."""
    model = make_model()
    opt = AdamS(model.parameters(), lr=1e-2, total_steps=20)
    set_grads(model, torch.Generator().manual_seed(0))
    opt.step()
    sd = opt.state_dict()
    del sd["param_groups"][0]["sparse"]
    fresh = AdamS(model.parameters(), lr=1e-2, total_steps=20)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["sparse"] is None
    set_grads(model, torch.Generator().manual_seed(1))
    fresh.step()
    assert fresh.sparsity_stats()


def test_torch_adam_options_in_a_group_are_refused() -> None:
    """amsgrad / maximize in a group dict were accepted and ignored (the keywords raise)."""
    w = nn.Parameter(torch.randn(8, 16))
    for key in ("amsgrad", "maximize"):
        with pytest.raises(ValueError, match=key):
            AdamS([{"params": [w], key: True}], total_steps=5)
    AdamS([{"params": [w], "amsgrad": False}], total_steps=5)  # the default: harmless
    np = pytest.importorskip("numpy")
    assert AdamS([w], total_steps=np.int64(5)).param_groups[0]["total_steps"] == 5


def _spec_adams_numpy(w0, grads, *, lr, betas, eps, wd, lam, total, interval):
    """SPEC §2 (paper Algorithm 1) read literally, in float64 NumPy: no code shared with the
    reference or the kernels (a misreading copied into both would pass every test comparing
    them). Returns the weights and masks after each step."""
    import numpy as np

    b1, b2 = betas
    w = w0.astype(np.float64).copy()
    mu, v = np.zeros_like(w), np.zeros_like(w)
    mask = None
    out = []
    for t, g in enumerate(grads):
        if t % interval == 0:  # refreshed at the start of the step, from the current weights
            groups = np.abs(w).reshape(w.shape[0], -1, 4)
            # the 2 largest |w| of each group; ties to the lower index (a stable sort)
            order = np.argsort(-groups, axis=-1, kind="stable")[..., :2]
            keep = np.zeros(groups.shape, dtype=bool)
            np.put_along_axis(keep, order, True, axis=-1)
            mask = keep.reshape(w.shape)
        alpha = min(t / total, 1.0)
        w = w * (1 - lr * wd)  # decoupled weight decay (AdamW)
        mu = b1 * mu + (1 - b1) * g
        mu_eff = np.where(mask, mu, (1 - alpha) * mu + alpha * lam * np.sign(w))
        v = b2 * v + (1 - b2) * mu_eff**2
        w = w - lr * (mu_eff / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
        out.append((w.copy(), mask.copy()))
    return out


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_adams_follows_an_independent_numpy_reading_of_the_spec(impl: str) -> None:
    """AdamS (the fused kernel) against SPEC §2 written out in NumPy: 25 steps, a ramp of 20
    (alpha reaches 1 and stays), refreshes at t = 0, 10, 20, a decay large enough to matter,
    weight decay; weights and masks at every step."""
    np = pytest.importorskip("numpy")
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1, lam=2e-3, total=20, interval=10)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 32)).astype(np.float32)
    grads = [(rng.standard_normal((8, 32)) * 1e-3).astype(np.float32) for _ in range(25)]
    want = _spec_adams_numpy(w0, grads, **hp)
    p = nn.Parameter(torch.from_numpy(w0.copy()))
    opt = AdamS(
        [p], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"],
        decay=hp["lam"], total_steps=hp["total"], mask_interval=hp["interval"], impl=impl,
    )  # fmt: skip
    for t, g in enumerate(grads):
        p.grad = torch.from_numpy(g)
        opt.step()
        w_want, mask_want = want[t]
        assert np.array_equal(opt.mask(p).numpy(), mask_want), f"mask at step {t}"
        np.testing.assert_allclose(p.detach().numpy(), w_want, rtol=1e-5, atol=1e-6)


def test_the_spec_defaults() -> None:
    """The paper's / SPEC's defaults, pinned (a changed default changes every run that relies
    on it): T1 = 10, betas (0.9, 0.95), eps 1e-8, lam 4e-7, 2:4, no weight decay; eta 1/3."""
    import inspect

    d = {k: v.default for k, v in inspect.signature(AdamS.__init__).parameters.items()}
    assert (d["mask_interval"], d["betas"], d["eps"], d["decay"]) == (10, (0.9, 0.95), 1e-8, 4e-7)
    assert (d["n"], d["m"], d["weight_decay"]) == (2, 4, 0.0)
    eta = inspect.signature(cast_ext.cast.distill_loss).parameters["eta"].default
    assert eta == 1.0 / 3.0


def test_a_nan_in_a_later_bucket_refuses_the_whole_step_under_a_scaler() -> None:
    """With GradScaler's found_inf set and 0 (a normal step), every sparse bucket is still
    checked before any steps: a NaN in the bf16 bucket leaves the fp32 one unstepped."""
    a = nn.Parameter(torch.randn(8, 16))
    b = nn.Parameter(torch.randn(8, 16).bfloat16())
    opt = AdamS([a, b], lr=1e-2, total_steps=10, mask_interval=1)
    with torch.no_grad():
        b[0, 0] = float("nan")
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    before = a.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state.get(a)


def test_reference_refuses_beta2_of_one() -> None:
    """beta2 = 1 makes the bias correction 1 - beta2^(t+1) zero: inf/NaN weights."""
    w = torch.randn(4, 8)
    state = [torch.zeros_like(w)], [torch.zeros_like(w)], [], [torch.zeros(())], []
    args = ([w], [torch.ones_like(w)], *state)
    with pytest.raises(RuntimeError, match=r"beta2 must be in \[0, 1\), got 1.0"):
        cast_ext.reference.adams_step_(
            *args, lr=1e-3, beta1=0.9, beta2=1.0, eps=1e-8, weight_decay=0.0, decay=0.0,
            total_steps=10, mask_interval=10, n=2, m=4,
        )  # fmt: skip


def test_stats_count_refreshes_from_the_masks_not_from_mask_interval() -> None:
    """Whether a second refresh happened is read from prev_mask (0 until a refresh saves a mask
    there), not from step // mask_interval: mask_interval 10 changed to 2 after 5 steps (one
    refresh, t = 0) reported 8 of 8 groups flipped against the initial zeros; 3 changed to 10
    after 4 steps (refreshes at 0 and 3) reported None. A loaded state dict gives the same."""
    torch.manual_seed(0)
    for before, after, steps, second in ((10, 2, 5, False), (3, 10, 4, True)):
        w = nn.Parameter(torch.randn(4, 8))
        opt = AdamS([w], lr=1e-2, decay=1e-2, total_steps=20, mask_interval=before)
        for _ in range(steps):
            w.grad = torch.randn_like(w)
            opt.step()
        opt.param_groups[0]["mask_interval"] = after
        loaded = AdamS([w], lr=1e-2, decay=1e-2, total_steps=20, mask_interval=after)
        loaded.load_state_dict(opt.state_dict())
        flips = int(cast_ext.mask_flips(opt.state[w]["prev_mask"], opt.state[w]["mask"]))
        for o in (opt, loaded):
            st = o.sparsity_stats()[w]
            want = flips if second else None
            assert st["mask_flips"] == want and st["step"] == steps, (before, st)
            assert st["flip_rate"] == (None if want is None else want / 8)
    w.grad = torch.randn_like(w)
    opt.step()  # t = 4, not a refresh of mask_interval 10: the same previous mask
    assert opt.sparsity_stats()[w]["mask_flips"] == flips


@pytest.mark.parametrize(("n", "m"), [(1, 4), (3, 4), (2, 8)])
def test_stats_pruned_over_kept_for_other_n_of_m(n: int, m: int) -> None:
    """pruned_over_kept is mean |pruned| / mean |kept| also where the kept and pruned counts
    differ (n != m / 2): test_stats_against_independent_figures uses 2:4 only, where dividing
    the pruned sum by the kept count gives the same figure."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.rand(8, 32) + 0.5)
    opt = AdamS([w], lr=1e-3, decay=1e-3, total_steps=10, mask_interval=3, n=n, m=m)
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.step()
    kept = opt.mask(w)
    assert int(kept.sum()) == w.numel() * n // m
    ratio = float(w.detach()[~kept].abs().mean() / w.detach()[kept].abs().mean())
    st = opt.sparsity_stats()[w]
    assert st["pruned_over_kept"] == pytest.approx(ratio, rel=1e-6)
    assert st["alpha"] == pytest.approx(0.2) and st["step"] == 2 and st["mask_flips"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stacked_sparse_param_steps_as_its_matrices(dtype: torch.dtype) -> None:
    """A 3-D param in a sparse group (MoE experts [experts, out, in]) steps bit for bit as the
    same weights as one [experts * out, in] matrix: N:M groups along the last dim, masks of
    its shape, refreshes included; the reference steps it alike; without ``sparse`` it is dense
    by shape."""
    gen = torch.Generator().manual_seed(11)
    w0 = (torch.randn(3, 8, 16, generator=gen) * 0.05).to(dtype)
    stacked, flat = nn.Parameter(w0.clone()), nn.Parameter(w0.reshape(24, 16).clone())
    ref = nn.Parameter(w0.clone())
    hp = {**HP, "mask_interval": 3}
    o3 = AdamS([{"params": [stacked], "sparse": True}], **hp)
    o2 = AdamS([{"params": [flat], "sparse": True}], **hp)
    o_ref = AdamS([{"params": [ref], "sparse": True}], **hp, impl="reference")
    for _ in range(7):
        g = (torch.randn(3, 8, 16, generator=gen) * 1e-3).to(dtype)
        stacked.grad, flat.grad, ref.grad = g.clone(), g.reshape(24, 16).clone(), g.clone()
        for opt in (o3, o2, o_ref):
            opt.step()
    assert torch.equal(stacked.detach().reshape(24, 16), flat.detach())
    assert_close_scaled(stacked.detach(), ref.detach())
    assert torch.equal(o3.mask(stacked), o_ref.mask(ref))
    for key, val in o2.state[flat].items():
        got = o3.state[stacked][key]
        assert list(got.shape) == ([*stacked.shape[:-1], val.shape[-1]] if val.dim() else [])
        assert torch.equal(got.reshape(val.shape), val), key
    mask = o3.mask(stacked)
    assert mask.shape == stacked.shape and torch.equal(mask.reshape(24, 16), o2.mask(flat))
    assert int(mask.sum()) == stacked.numel() // 2
    stats3, stats2 = o3.sparsity_stats()[stacked], o2.sparsity_stats()[flat]
    assert stats3 == stats2
    auto = AdamS([nn.Parameter(w0.clone())], **hp)
    with pytest.raises(ValueError, match=r"shape \[3, 8, 16\] is not stepped as sparse"):
        auto.mask(auto.param_groups[0]["params"][0])
