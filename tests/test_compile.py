"""torch.compile: the ops trace through their fake kernels without graph breaks (fullgraph=True),
and compiled results equal eager ones. ``aot_eager`` exercises Dynamo + AOTAutograd (fakes,
autograd registrations, functionalisation of mutating ops) without a C++ code-generation step."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import cast_ext

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_ops_compile_fullgraph(device):
    def f(w):
        mask = cast_ext.sparse24_mask(w)
        values, meta = cast_ext.sparse24_compress(w)
        dense = cast_ext.sparse24_decompress(values, meta)
        packed = cast_ext.pack_mask(mask)
        flips = cast_ext.mask_flips(packed, cast_ext.pack_mask(cast_ext.nm_mask(w, 1, 4)))
        unpacked = cast_ext.unpack_mask(packed, w.shape[-1])
        return dense * 2, unpacked, flips, cast_ext.sparse24_prune(w)

    w = torch.randn(16, 64, device=device)
    compiled = torch.compile(f, fullgraph=True, backend=BACKEND)
    for got, want in zip(compiled(w), f(w), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_linear_model_compiles_fullgraph(device):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)
    ).to(device)
    with pytest.warns(UserWarning):
        model = cast_ext.nn.to_sparse(dense, mode="sparse" if device == "cpu" else "dense")
    x = torch.randn(5, 64, device=device, requires_grad=True)
    eager_y = model(x)
    (eager_gx,) = torch.autograd.grad(eager_y.sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(gx, eager_gx)


def test_compiled_sparse_linear_after_load_state_dict_uses_the_new_weight():
    """load_state_dict drops a layer's derived dense weight: the compiled call that follows
    (no eager call between) computes with the loaded values, not the cached old ones."""
    torch.manual_seed(0)
    layer = cast_ext.nn.SparseLinear(32, 16, mode="dense")
    other = cast_ext.nn.SparseLinear.from_dense(torch.nn.Linear(32, 16), mode="dense", warn=False)
    x = torch.randn(4, 32)
    layer(x)  # eager: caches the dense weight
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    compiled(x)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(compiled(x), other(x))


@pytest.mark.parametrize("device", DEVICES)
def test_adams_step_compiles_fullgraph_and_matches_eager(device):
    """``opt.step()`` inside a compiled function: one graph for the first step (state creation)
    and one for every later step (no recompile as steps and masks change), bitwise the eager
    optimizer's results (the same fused kernel runs, through functionalisation)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    models = [
        torch.nn.ModuleList([torch.nn.Linear(16, 32), torch.nn.Linear(32, 8).bfloat16()]).to(device)
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    hp = {"lr": 1e-2, "decay": 5e-3, "weight_decay": 0.01, "total_steps": 10, "mask_interval": 3}
    eager_opt, opt = (cast_ext.AdamS(m.parameters(), **hp) for m in models)
    counter = CompileCounterWithBackend(BACKEND)

    @torch.compile(fullgraph=True, backend=counter)
    def step():
        opt.step()

    for s in range(8):
        x = torch.randn(4, 16, device=device)
        for m in models:
            m.zero_grad()
            m[1](m[0](x).bfloat16()).float().pow(2).mean().backward()
        eager_opt.step()
        step()
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(p, q), s
            assert eager_opt.state[p].keys() == opt.state[q].keys()
            for key, val in eager_opt.state[p].items():
                assert torch.equal(val, opt.state[q][key]), (s, key)
    assert "mask" in opt.state[models[1][1].weight]  # the bf16 weight is sparse, with a master
    assert counter.frame_count == 2


def test_cuda_dispatch_branch_traces_without_graph_breaks():
    """SparseLinear's dispatch (a decision or none, then a derived weight) is the same code on
    CUDA and the CPU, so it is compiled here on the CPU: with fullgraph=True, before and after
    the eager call that caches the dense weight, and with a recorded decision. Data pointers
    (the cache's staleness tag) and the extension's pybind11 calls cannot be traced; this guards
    against both."""
    from cast_ext.nn import _DECISIONS, DispatchDecision, SparseLinear, _bucket

    sl = SparseLinear.from_dense(torch.nn.Linear(64, 32), mode="auto", warn=False)
    x = torch.randn(5, 64)
    want = torch.nn.functional.linear(x, sl.dense_weight(), sl.bias)

    def branch(x):
        return sl(x)

    key = (str(x.device), x.dtype, _bucket(5), 32, 64, True)
    try:
        for decision in (None, "packed", "dense"):
            _DECISIONS.pop(key, None)
            if decision is not None:
                _DECISIONS[key] = DispatchDecision(
                    "cpu", "float32", 8, 32, 64, True, decision, None, 1.0, 1.0
                )
            for cached in (False, True):
                sl._derived.clear()
                if cached:
                    sl._dense_cached()
                torch._dynamo.reset()
                y = torch.compile(branch, fullgraph=True, backend=BACKEND)(x)
                torch.testing.assert_close(y, want)
    finally:
        _DECISIONS.pop(key, None)


@pytest.mark.parametrize("device", DEVICES)
def test_distill_loss_compiles_fullgraph_and_matches_eager(device):
    """The fused loss (its ops' fakes, no host sync for the token count) traces without graph
    breaks; loss and gradient equal eager's."""
    from cast_ext import cast

    s = torch.randn(2, 16, 300, device=device)
    t = torch.randn(2, 16, 300, device=device)
    y = torch.randint(0, 300, (2, 16), device=device)
    y[:, -1] = -100

    def loss_and_grad(fn):
        x = s.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        return loss.detach(), x.grad

    def f(x):
        return cast.distill_loss(x, t, y, eta=0.25, temperature=2.0)

    eager = loss_and_grad(f)
    compiled = loss_and_grad(torch.compile(f, fullgraph=True, backend=BACKEND))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_prepared_model_cast_step_compiles_fullgraph_and_matches_eager(device):
    """A CAST step with the model's forward and the loss compiled (the prepared layers'
    scaled_linear op with its C++ backward, the teacher, the fused distillation loss: one
    graph) and AdamS eager gives the losses and weights of the eager step."""
    import copy

    from cast_ext import cast

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 40)
    ).to(device)
    teacher = copy.deepcopy(model).requires_grad_(False)
    cast.prepare(model, filter_fn=lambda name, module: True)
    eager_model = copy.deepcopy(model)

    def loss(m, x, y):
        with torch.no_grad():
            t = teacher(x)
        return cast.distill_loss(m(x), t, y)

    compiled = torch.compile(loss, fullgraph=True, backend=BACKEND)
    hp = {"lr": 1e-2, "decay": 1e-2, "total_steps": 4, "mask_interval": 2}
    runs = [(model, compiled), (eager_model, loss)]
    opts = [cast_ext.AdamS(cast.param_groups(m), **hp) for m, _ in runs]
    for s in range(4):
        gen = torch.Generator().manual_seed(s)
        x = torch.randn(8, 16, generator=gen).to(device)
        y = torch.randint(0, 40, (8,), generator=gen).to(device)
        losses = []
        for (m, fn), opt in zip(runs, opts, strict=True):
            value = fn(m, x, y)
            value.backward()
            opt.step()
            opt.zero_grad()
            losses.append(value.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(
        model.state_dict().items(), eager_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_adams_takes_writes_between_steps_into_the_masters():
    """A compiled step skipped the master catch-up for bf16 params (versions cannot be traced):
    weights loaded between compiled steps were undone by the stale fp32 masters."""

    def run(compiled: bool) -> torch.Tensor:
        torch.manual_seed(0)
        lin = torch.nn.Linear(16, 32).bfloat16()
        opt = cast_ext.AdamS(lin.parameters(), lr=1e-3, total_steps=10)
        step = torch.compile(opt.step, backend=BACKEND, fullgraph=True) if compiled else opt.step
        new = {k: torch.randn_like(v) for k, v in lin.state_dict().items()}
        for s in range(4):
            if s == 2:
                lin.load_state_dict(new)
            lin.zero_grad()
            lin(torch.ones(4, 16, dtype=torch.bfloat16)).float().pow(2).sum().backward()
            step()
        return lin.weight.detach()

    eager = run(False)
    assert torch.equal(run(True), eager)


def test_compiled_sparse_linear_with_other_buffers_derives_their_weight():
    """Compiled, the cached dense weight was used whatever the buffers were: after assigning new
    ones, or with torch.func.functional_call swapping them in, the old layer's weight."""
    from cast_ext.nn import SparseLinear

    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32), mode="dense", warn=False)
    other = SparseLinear.from_dense(torch.nn.Linear(64, 32), mode="dense", warn=False)
    x = torch.randn(5, 64)
    layer(x)  # an eager call caches the dense weight
    swapped = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    call = torch.compile(
        lambda sd, x: torch.func.functional_call(layer, sd, (x,)), backend=BACKEND, fullgraph=True
    )
    assert torch.equal(call(swapped, x), other(x))
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
    layer.values, layer.metadata, layer.bias = other.values, other.metadata, other.bias
    assert torch.equal(compiled(x), other(x))


def test_auto_mode_compiles_one_graph_for_a_dynamic_batch():
    """mode="auto" looked its shape bucket up in the compiled graph: a graph per power of two
    of M with dynamic shapes (fullgraph failed at the recompile limit). Without decisions for
    the layer's shape it takes the dense path in one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from cast_ext.nn import SparseLinear

    cast_ext.nn.clear_dispatch_decisions()
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32), warn=False)
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    for m in (2, 3, 5, 9, 17, 33, 65, 129, 257, 513):
        x = torch.randn(m, 64)
        torch.testing.assert_close(compiled(x), layer.to_dense()(x))
    assert counter.frame_count == 1


def test_eager_calls_between_compiled_ones_recompile_nothing():
    """A layer's eager bookkeeping of its decided paths (the routes each eager call may add)
    is not guarded by the compiled graph: eager calls of new buckets between compiled calls
    left one graph (the lookup once read it before asking whether it was compiling: 4)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from cast_ext.nn import SparseLinear

    cast_ext.nn.clear_dispatch_decisions()
    layer = SparseLinear.from_dense(torch.nn.Linear(32, 16), warn=False)
    for bucket, choice in ((1, "packed"), (2, "dense"), (4, "packed")):
        key = ("cpu", torch.float32, bucket, 16, 32, True)
        cast_ext.nn._DECISIONS[key] = cast_ext.nn.DispatchDecision(
            "cpu", "float32", bucket, 16, 32, True, choice, None, 10.0, 9.0
        )
        cast_ext.nn._DECIDED_LAYERS[key[:2] + key[3:]] = True
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(layer, backend=counter)
    x1 = torch.randn(1, 32)
    with torch.no_grad():
        compiled(x1)
        for m in (1, 2, 4):
            layer(torch.randn(m, 32))
            torch.testing.assert_close(compiled(x1), layer(x1))
    assert counter.frame_count == 1
    cast_ext.nn.clear_dispatch_decisions()


def test_a_layer_built_under_inference_mode_runs_outside_it():
    """A packed-path layer built under torch.inference_mode failed when called outside it (its
    bias needs a gradient, and the forward saved the inference-tensor buffers for it)."""
    from cast_ext.nn import SparseLinear

    with torch.inference_mode():
        layer = SparseLinear.from_dense(torch.nn.Linear(64, 32), mode="sparse", warn=False)
    x = torch.randn(3, 64)
    for fn in (layer, torch.compile(layer, backend=BACKEND, fullgraph=True)):
        fn(x).sum().backward()
        assert layer.bias.grad is not None
    b = torch.randn(32, requires_grad=True)
    values, meta = cast_ext.sparse24_compress(cast_ext.sparse24_prune(torch.randn(32, 64)))
    torch.ops.cast_ext.sparse24_gemm(x, values, meta, b).sum().backward()  # bias only
    torch.testing.assert_close(b.grad, torch.full((32,), 3.0))


def test_a_compiled_step_refused_by_a_later_sparse_param_leaves_earlier_dense_ones():
    """Compiled, the host-side NaN pre-check is skipped and each kernel call checks its own
    weights; the sparse buckets run first so that a refusal (a NaN at a refresh) comes before
    any dense bucket is stepped. With the dense param listed first in the group, a step order
    following the group's order stepped it and then raised."""
    torch.manual_seed(0)
    bias = torch.nn.Parameter(torch.randn(8))  # dense, listed first
    w = torch.nn.Parameter(torch.randn(8, 16))  # sparse by shape
    opt = cast_ext.AdamS([bias, w], lr=1e-2, total_steps=10, mask_interval=1)
    # backend "eager": Dynamo without AOT functionalization, so the kernel calls' in-place
    # writes land in call order (aot_eager/inductor defer them past the raising call)
    step = torch.compile(opt.step, backend="eager")
    with torch.no_grad():
        w[0, 0] = float("nan")
    bias.grad, w.grad = torch.ones(8), torch.ones(8, 16)
    before = bias.detach().clone()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        try:
            step()
        finally:  # torch 2.14: a compiled no_grad region that raises leaves grad mode off
            torch.set_grad_enabled(True)
    assert torch.equal(bias.detach(), before)
