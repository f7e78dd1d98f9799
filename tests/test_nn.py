"""cast_ext.nn: SparseLinear, to_sparse / to_dense, state_dict, gradients and the dispatch."""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, dtype_id, gemm_tol, requires_cusparselt
from torch import Tensor, nn

import cast_ext
from cast_ext import ops
from cast_ext.nn import SparseLinear, dispatch_decisions, to_dense, to_sparse


def close_to_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    err = ((y.double() - ref).abs() / (scale + 1e-30)).max().item()
    assert y.shape == ref.shape and err <= gemm_tol(x.dtype, w.shape[1]), err


def linear(k: int, n: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    return nn.Linear(k, n, bias=bias).to(dtype)


def linear24(k: int, n: int) -> nn.Linear:
    """``linear(k, n)`` with its weight pruned to 2:4: to_sparse converts it without a warning."""
    lin = linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(ops.sparse24_prune(lin.weight))
    return lin


def test_from_dense_prunes_and_warns() -> None:
    lin = linear(32, 16)
    before = lin.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"not 2:4 sparse .* pruned to 2:4 by magnitude"):
        sl = SparseLinear.from_dense(lin)
    assert torch.equal(lin.weight, before)  # the dense layer is left alone
    pruned = ops.sparse24_prune(before)
    assert torch.equal(sl.dense_weight(), pruned)
    x = torch.randn(3, 5, 32)
    close_to_linear(sl(x), x, pruned, lin.bias.detach())


def test_from_dense_of_exact_24_is_silent_and_lossless() -> None:
    lin = linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(ops.sparse24_prune(lin.weight))
        lin.weight[0, :4] = 0.0  # a group with no nonzero is 2:4 too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sl = SparseLinear.from_dense(lin)
    assert torch.equal(sl.to_dense().weight, lin.weight)
    assert sl.bias is None and sl.to_dense().bias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
def test_forward_cpu_matches_linear(dtype: torch.dtype, mode: str) -> None:
    lin = linear(24, 40, dtype=dtype)
    sl = SparseLinear.from_dense(lin, mode=mode, warn=False)  # type: ignore[arg-type]
    w = sl.dense_weight()
    for shape in [(1, 24), (7, 24), (2, 3, 24)]:
        x = torch.randn(shape).to(dtype)
        close_to_linear(sl(x), x, w, sl.bias.detach())


def test_gradients_match_dense() -> None:
    lin = linear(32, 24)
    sl = SparseLinear.from_dense(lin, warn=False)
    dense = sl.to_dense()
    x = torch.randn(4, 6, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(4, 6, 24)
    sl(x).backward(g)
    dense(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)
    assert [n for n, p in sl.named_parameters()] == ["bias"]  # the 2:4 base is frozen


@pytest.mark.parametrize("mode", ["auto", "dense"])
def test_recorded_calls_after_inference_mode_calls(mode: str) -> None:
    """Weights the layer derives and caches during calls under torch.inference_mode (an
    evaluation between training steps) are normal tensors: later calls that autograd records
    (adapters trained on the layer) still run and give the dense layer's gradients."""
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(32, 24), mode=mode, warn=False)
    dense = sl.to_dense()
    with torch.inference_mode():
        for _ in range(2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES)):
            sl(torch.randn(5, 32))
    assert all(not t.is_inference() for _, t in sl._derived.values())
    x = torch.randn(5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    sl(x).sum().backward()
    dense(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_lora_on_frozen_base_trains() -> None:
    sl = SparseLinear.from_dense(linear(16, 16, bias=False), warn=False)
    a = nn.Parameter(torch.randn(4, 16) * 0.1)
    b = nn.Parameter(torch.zeros(16, 4))
    opt = torch.optim.Adam([a, b], lr=0.05)
    x = torch.randn(64, 16)
    with torch.no_grad():  # reachable: the base plus a rank-4 update
        target = sl(x) + x @ (torch.randn(16, 4) @ torch.randn(4, 16)) * 0.3
    losses = []
    for _ in range(30):
        loss = F.mse_loss(sl(x) + x @ a.t() @ b.t(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert sl.values.grad is None


def test_state_dict_round_trip() -> None:
    # One forced path: auto's first calls alternate paths, which round differently.
    sl = SparseLinear.from_dense(linear(32, 16), mode="sparse", warn=False)
    sd = sl.state_dict()
    assert set(sd) == {"values", "metadata", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = SparseLinear(32, 16, mode="sparse")
    x = torch.randn(5, 32)
    fresh_y0 = fresh(x)
    fresh._dense_cached()  # a derived weight built before the load must not survive it
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), sl(x))
    assert not torch.equal(fresh(x), fresh_y0)
    assert torch.equal(fresh._dense_cached(), sl.dense_weight())


def test_state_dict_with_the_legacy_meta_key_loads() -> None:
    """State dicts saved when the metadata buffer was named ``meta`` load (plain and nested);
    the new key wins where a dict holds both."""
    sl = SparseLinear.from_dense(linear(32, 16), mode="sparse", warn=False)
    model = nn.Sequential(nn.ReLU(), sl)
    legacy = {k.replace("metadata", "meta"): v for k, v in model.state_dict().items()}
    assert "1.meta" in legacy and "1.metadata" not in legacy
    fresh = nn.Sequential(nn.ReLU(), SparseLinear(32, 16, mode="sparse"))
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh[1].metadata, sl.metadata)
    both = {**sl.state_dict(), "meta": torch.zeros_like(sl.metadata)}
    other = SparseLinear(32, 16, mode="sparse")
    with pytest.raises(RuntimeError, match=r"Unexpected key.*\"meta\""):
        other.load_state_dict(both)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_torch_export_module_and_unflatten(mode: str) -> None:
    """torch.export of a bare layer and of a model: ``ep.module()`` and ``unflatten`` rebuild
    modules whose buffers hold the weight (a buffer named ``meta`` clashed with
    ``GraphModule.meta`` there) and compute what the layer does."""
    torch.manual_seed(0)
    sl = SparseLinear.from_dense(linear(32, 16), mode=mode, warn=False)
    model = nn.Sequential(
        SparseLinear.from_dense(linear(32, 32), mode=mode, warn=False), nn.ReLU(), sl
    )
    x = torch.randn(3, 32)
    for m in (sl, model):
        ep = torch.export.export(m, (x,))
        assert torch.equal(ep.module()(x), m(x))
        assert torch.equal(torch.export.unflatten(ep)(x), m(x))


def test_dtype_conversion_keeps_meta() -> None:
    sl = SparseLinear.from_dense(linear(16, 8), warn=False)
    w = sl.dense_weight()
    sl = sl.to(torch.bfloat16)
    assert sl.values.dtype == torch.bfloat16 and sl.bias.dtype == torch.bfloat16
    assert sl.metadata.dtype == torch.uint8
    assert torch.equal(sl.dense_weight(), w.bfloat16())
    x = torch.randn(3, 16).bfloat16()
    close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())


def test_to_sparse_and_back() -> None:
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 8)
    )
    model.add_module("head", nn.Linear(8, 8))
    ref = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    # filter_fn choosing Linear(30, 8) (30 % 4 != 0): refused, nothing replaced (it was skipped
    # silently, and the caller believed it 2:4)
    with pytest.raises(ValueError, match=r"layer '4' has input dim 30 \(weight \[8, 30\]\)"):
        to_sparse(model, filter_fn=lambda name, m: name != "head")
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    with pytest.warns(UserWarning, match=r"2 layer\(s\) were not 2:4"):
        to_sparse(model, filter_fn=lambda name, m: name not in ("4", "head"))
    kinds = [type(m).__name__ for m in model]
    # Linear(30, 8) and "head" are filtered out.
    assert kinds == ["SparseLinear", "ReLU", "SparseLinear", "ReLU", "Linear", "Linear"]
    x = torch.randn(5, 32)
    y_sparse = model(x)
    to_dense(model)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    assert torch.equal(model[0].weight, ops.sparse24_prune(ref[0]))
    assert torch.equal(model[4].weight, ref[2])  # untouched layer
    torch.testing.assert_close(model(x), y_sparse, rtol=1e-5, atol=1e-5)


def test_to_sparse_by_default_keeps_the_head_and_tied_weights_dense() -> None:
    """Without filter_fn, the rule cast.prepare uses: the output head (get_output_embeddings)
    and a Linear sharing the embedding's weight stay nn.Linear."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.body = nn.Linear(8, 8)
            self.tied = nn.Linear(8, 16, bias=False)
            self.tied.weight = self.emb.weight
            self.head = nn.Linear(8, 16)

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    model = LM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not 2:4, pruned"
        to_sparse(model)
    assert type(model.body) is SparseLinear
    assert type(model.head) is nn.Linear and type(model.tied) is nn.Linear


@pytest.mark.parametrize("mode", ["auto", "dense", "sparse"])
def test_autocast_computes_in_the_autocast_dtype(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under autocast a SparseLinear does what nn.Linear does: computes and returns in the
    autocast dtype, whatever its own dtype and the path taken (an "auto" layer's output dtype
    alternated with its timing trials), with gradients for x and the bias."""
    torch.manual_seed(0)
    fp32 = SparseLinear.from_dense(linear(32, 16), mode=mode, warn=False)  # type: ignore[arg-type]
    bf16 = SparseLinear.from_dense(linear(32, 16, dtype=torch.bfloat16), mode=mode, warn=False)  # type: ignore[arg-type]
    packed_calls = []
    real = ops.sparse24_gemm
    monkeypatch.setattr(
        ops, "sparse24_gemm", lambda *a, **k: packed_calls.append(1) or real(*a, **k)
    )
    for layer in (fp32, bf16):
        w, b = layer.dense_weight().bfloat16(), layer.bias.detach().bfloat16()
        for _ in range(6):  # past the auto mode's trials
            x = torch.randn(5, 32, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            assert y.dtype == torch.bfloat16
            close_to_linear(y, x.detach().bfloat16(), w, b)
            if layer is fp32:  # nn.Linear's way (the weight cast per call) unless forced sparse
                assert len(packed_calls) == (mode == "sparse")
                packed_calls.clear()
            y.float().sum().backward()
            assert x.grad is not None and layer.bias.grad is not None
            layer.bias.grad = None


def test_to_sparse_and_back_keep_shared_modules_shared() -> None:
    """A layer used twice (in one parent, or by two) is converted in every slot, to one layer:
    still shared, so one bias trains for both uses; and back again."""
    torch.manual_seed(0)
    lin, lin2 = nn.Linear(32, 32), nn.Linear(32, 32)
    model = nn.Module()
    model.seq = nn.Sequential(lin, nn.ReLU(), lin)
    model.a, model.b = nn.Sequential(lin2), nn.Sequential(lin2)
    x = torch.randn(3, 32)
    with pytest.warns(UserWarning, match=r"2 layer\(s\) were not 2:4"):
        to_sparse(model)
    assert isinstance(model.seq[0], SparseLinear) and model.seq[0] is model.seq[2]
    assert isinstance(model.a[0], SparseLinear) and model.a[0] is model.b[0]
    assert len(list(model.parameters())) == 2  # the two biases
    want = model.seq(x)
    to_dense(model)
    assert type(model.seq[0]) is nn.Linear and model.seq[0] is model.seq[2]
    assert type(model.a[0]) is nn.Linear and model.a[0] is model.b[0]
    torch.testing.assert_close(model.seq(x), want)


def test_to_sparse_on_the_meta_device_then_load() -> None:
    """The large-model path: the skeleton built on meta and converted (no values to check or
    compress there), then the packed state dict of a converted model assigned into it."""

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"2 layer\(s\) were not 2:4"):
        real = to_sparse(build(), mode="sparse")
    with torch.device("meta"):
        skeleton = build()
    to_sparse(skeleton, mode="sparse")
    assert skeleton[0].values.is_meta
    skeleton.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(skeleton(x), real(x))


@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
def test_forward_on_the_meta_device_gives_shapes_and_records_nothing(mode: str) -> None:
    """Shape tracing on a meta skeleton gives nn.Linear's shape and dtype, with no dispatch trial
    or decision recorded (nothing can be timed there)."""
    layer = SparseLinear(16, 8, mode=mode, device="meta")  # type: ignore[arg-type]
    before = (dict(cast_ext.nn._DECISIONS), dict(cast_ext.nn._TRIALS))
    y = layer(torch.empty(2, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (2, 5, 8) and y.dtype == torch.float32
    assert (dict(cast_ext.nn._DECISIONS), dict(cast_ext.nn._TRIALS)) == before


def test_bad_construction_and_inputs() -> None:
    with pytest.raises(ValueError, match=r"in_features=6 must be a positive multiple of 4"):
        SparseLinear(6, 4)
    with pytest.raises(ValueError, match=r"mode must be in"):
        SparseLinear(8, 4, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SparseLinear: dtype torch.float64 is not supported"):
        SparseLinear(8, 4, dtype=torch.float64)
    sl = SparseLinear(8, 4)
    with pytest.raises(TypeError, match=r"input has dtype torch.float64"):
        sl(torch.randn(2, 8, dtype=torch.float64))
    doubled = SparseLinear(8, 4).double()  # a whole model's .double() reaches the buffers
    with pytest.raises(TypeError, match=r"SparseLinear: the layer is torch.float64; expected"):
        doubled(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"last dim must be in_features = .*8"):
        sl(torch.randn(2, 12))
    # numel divisible by in_features: refused by the layer before any reshape or dispatch
    with pytest.raises(RuntimeError, match=r"SparseLinear: input of shape \[3, 16\]"):
        sl(torch.randn(3, 16))


def test_introspection_without_gpu() -> None:
    assert isinstance(dispatch_decisions(), list)
    info = cast_ext.nn.cslt_cache_info()
    assert info["available"] == cast_ext.cusparselt_available()
    assert "SparseLinear(in_features=8, out_features=4, bias=True, mode='auto')" in repr(
        SparseLinear(8, 4)
    )


def test_release_unused_keeps_only_the_used_path() -> None:
    sl = SparseLinear.from_dense(linear(64, 32), warn=False)
    dense = sl._dense_cached()
    buf = sl._get("cslt", lambda: torch.empty(100, dtype=torch.float16))  # stand-in buffer
    assert sl.derived_bytes() == dense.numel() * 4 + 200
    sl._uses = {"sparse"}
    sl._release_unused()
    assert sl.derived_bytes() == 200 and sl._get("cslt", lambda: torch.empty(0)) is buf
    sl._uses = {"sparse", "dense"}
    sl._dense_cached()
    sl._release_unused()  # both paths used: both kept
    assert sl.derived_bytes() == dense.numel() * 4 + 200


def decide_cpu(m_bucket: int, choice: str, n: int = 16, k: int = 32, bias: bool = True) -> None:
    """Record a CPU fp32 decision for ``[n, k]`` layers (times made up)."""
    key = ("cpu", torch.float32, m_bucket, n, k, bias)
    cast_ext.nn._DECISIONS[key] = cast_ext.nn.DispatchDecision(
        "cpu", "float32", m_bucket, n, k, bias, choice, None, 10.0, 9.0
    )


def test_cpu_dispatch_times_the_first_calls_in_place() -> None:
    """The first calls of a bucket alternate packed and dense (every output right), then one
    decision holds for every layer of that shape, and each layer keeps only what it uses."""
    cast_ext.nn.clear_dispatch_decisions()
    layers = [SparseLinear.from_dense(linear(64, 48), warn=False) for _ in range(3)]
    calls = 2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES)
    for i in range(calls):
        assert dispatch_decisions() == []
        sl = layers[i % 3]
        x = torch.randn(3, 64)
        close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())
    (d,) = dispatch_decisions()
    assert (d["device"], d["dtype"], d["m_bucket"], d["n"], d["k"]) == ("cpu", "float32", 4, 48, 64)
    assert d["choice"] in ("packed", "dense") and d["sparse_us"] is None
    assert d["packed_us"] > 0 and d["dense_us"] > 0
    assert d["choice"] == cast_ext.nn._pick({"dense": d["dense_us"], "packed": d["packed_us"]})
    for sl in layers:
        sl(torch.randn(2, 2, 64))  # M = 4: the same bucket, decided
        assert sl.derived_bytes() == (48 * 64 * 4 if d["choice"] == "dense" else 0)
    assert len(dispatch_decisions()) == 1
    cast_ext.nn.clear_dispatch_decisions()


def test_cpu_trial_dense_copy_is_dropped_by_a_packed_layer() -> None:
    """A layer whose decisions are all "packed" drops the dense copy a later trial built."""
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(32, 16), warn=False)
    for m, bucket in ((1, 1), (3, 4)):
        sl(torch.randn(m, 32))  # a trial call of this bucket (it may build the dense copy)
        sl._dense_cached()  # as a dense trial call does
        cast_ext.nn._TRIALS.clear()
        decide_cpu(bucket, "packed")
        sl(torch.randn(m, 32))
        assert sl.derived_bytes() == 0, m
    cast_ext.nn.clear_dispatch_decisions()


class FakeEvent:
    """Stands in for a timed ``torch.cuda.Event`` recorded at ``ms`` (milliseconds)."""

    def __init__(self, ms: float) -> None:
        self.ms, self.synced = ms, False

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.synced, "an event pair is read before its end event was synchronized"
        return end.ms - self.ms


def test_trial_reads_cuda_event_samples_when_all_are_in() -> None:
    """CUDA trial calls store their event pairs unread (no sync per call); the medians read them
    once every path has its samples: milliseconds to microseconds, warm-up calls left out."""
    warmup, samples = cast_ext.nn._TRIAL_WARMUP, cast_ext.nn._TRIAL_SAMPLES
    trial = cast_ext.nn._Trial(("dense", "sparse", "packed"))
    cost_ms = {"dense": 0.010, "sparse": 0.006, "packed": 0.008}
    events = []
    calls = 3 * (warmup + samples)
    for i in range(calls):
        path = trial.next_path()
        assert path == ("dense", "sparse", "packed")[i % 3]  # the paths alternate
        ms = 1000.0 if trial.calls.get(path, 0) < warmup else cost_ms[path] * (1 + i / 100)
        pair = (FakeEvent(float(i)), FakeEvent(i + ms))
        events.append(pair)
        assert trial.add(path, pair) == (i == calls - 1)
        assert not any(e.synced for _, e in events[:-1] if i < calls - 1)
    us = trial.medians()
    assert set(us) == {"dense", "sparse", "packed"}
    for path, ms in cost_ms.items():
        assert ms * 1e3 < us[path] < ms * 1.2e3, (path, us)  # the warm-up's 1000 ms is left out
    assert cast_ext.nn._pick(us) == "sparse"


def test_trial_leaves_out_uncovered_samples_up_to_a_limit() -> None:
    """A CUDA sample whose events may have timed the host (the GPU's spin ran out before the
    call was queued) is left out, and its path is called again; after _TRIAL_MAX_UNCOVERED of
    them a path's samples count as they are (a call that syncs inside is never covered)."""
    warmup, samples = cast_ext.nn._TRIAL_WARMUP, cast_ext.nn._TRIAL_SAMPLES
    limit = cast_ext.nn._TRIAL_MAX_UNCOVERED
    trial = cast_ext.nn._Trial(("dense", "packed"))
    for _ in range(warmup):  # warm-up calls count whether covered or not
        for path in ("dense", "packed"):
            assert not trial.add(path, 1.0, covered=False)
    assert trial.uncovered == {}
    assert not trial.add("dense", 5000.0, covered=False)  # timed the host: left out
    assert trial.uncovered == {"dense": 1} and "dense" not in trial.samples
    assert trial.next_path() == "dense"  # called again: it is owed the left-out sample
    assert not trial.add("packed", 9.0)
    assert trial.next_path() == "dense"
    for _ in range(samples):
        assert not trial.add("dense", 10.0)
    for _ in range(limit):  # packed never covered: left out up to the limit ...
        assert not trial.add("packed", 7000.0, covered=False)
    assert trial.uncovered["packed"] == limit
    for i in range(samples - 1):  # ... then its samples count
        assert trial.add("packed", 8.0, covered=False) == (i == samples - 2)
    assert trial.medians() == {"dense": 10.0, "packed": 8.0}


@pytest.mark.parametrize("spinning", [True, False])
def test_timed_on_device_spins_before_the_start_event(
    monkeypatch: pytest.MonkeyPatch, spinning: bool
) -> None:
    """The GPU spin is queued before the start event, the call between the events, and the
    sample is covered iff the start event is still pending once the call is queued (on fakes of
    torch.cuda: the order of what is queued)."""
    queued: list[str] = []
    made: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.name = ("start", "end")[len(made)]
            made.append(self.name)

        def record(self, stream: object) -> None:
            assert stream == "stream"
            queued.append(self.name)

        def query(self) -> bool:
            assert self.name == "start" and queued[-1] == "end"
            return not spinning

    class Device:
        def __init__(self, device: torch.device) -> None:
            assert device == torch.device("cuda", 1)

        def __enter__(self) -> None:
            queued.append("enter")

        def __exit__(self, *exc: object) -> None:
            queued.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "stream")
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: queued.append(f"sleep {cycles}"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    y = torch.ones(2)
    out, (start, end), covered = cast_ext.nn._timed_on_device(
        torch.device("cuda", 1), lambda: queued.append("call") or y
    )
    assert out is y and (start.name, end.name) == ("start", "end") and covered == spinning
    assert queued == ["enter", f"sleep {cast_ext.nn._HOST_AHEAD[0]}", "start", "call", "end",
                      "exit"]  # fmt: skip


def test_a_failing_cusparselt_trial_drops_that_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """If cuSPARSELt raises during a trial call, the call is served by another path, a warning
    says why, and the bucket is decided among the others (here on the CPU, with cuSPARSELt
    pretended available and failing)."""
    cast_ext.nn.clear_dispatch_decisions()
    monkeypatch.setattr(cast_ext.nn, "_cslt_reason", lambda *_: None)
    real_run = SparseLinear._run

    def run(self: SparseLinear, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "sparse":
            raise RuntimeError("cast_ext.cslt_linear: cusparseLtMatmul failed (simulated)")
        return real_run(self, path, x)

    monkeypatch.setattr(SparseLinear, "_run", run)
    monkeypatch.setattr(SparseLinear, "_cslt_buffer", lambda self: torch.empty(0))
    sl = SparseLinear.from_dense(linear(64, 48), warn=False)
    hooks: list[int] = []
    sl.register_forward_hook(lambda *_: hooks.append(1))
    x = torch.randn(3, 64)
    with pytest.warns(UserWarning, match=r"cuSPARSELt failed for \[48, 64\].*simulated"):
        for _ in range(3):  # dense, then sparse (fails, served by the next path), ...
            close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())
    assert len(hooks) == 3  # the call served after the failure ran the module's hooks once
    for _ in range(2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES)):
        if dispatch_decisions():
            break
        close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())
    (d,) = dispatch_decisions()
    assert d["choice"] in ("dense", "packed") and d["sparse_us"] is None and d["packed_us"] > 0
    cast_ext.nn.clear_dispatch_decisions()


def test_a_trial_error_outside_cusparselt_is_raised_not_blamed_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only cuSPARSELt's own calls in a sparse trial call fall back to the other paths: an error
    of the timing around them (on a GPU, a CUDA event refused while another thread captures a
    graph) is raised as it is, with no "cuSPARSELt failed" warning, and the sparse path stays a
    candidate of the bucket."""
    import time
    import types

    cast_ext.nn.clear_dispatch_decisions()
    monkeypatch.setattr(cast_ext.nn, "_cslt_reason", lambda *_: None)
    real_run = SparseLinear._run
    monkeypatch.setattr(
        SparseLinear,
        "_run",
        lambda self, path, x: real_run(self, "dense" if path == "sparse" else path, x),
    )
    monkeypatch.setattr(SparseLinear, "_cslt_buffer", lambda self: torch.empty(0))
    armed = [False]

    def perf_counter() -> float:
        if armed[0]:
            raise RuntimeError("timing refused (simulated)")
        return time.perf_counter()

    monkeypatch.setattr(cast_ext.nn, "time", types.SimpleNamespace(perf_counter=perf_counter))
    sl = SparseLinear.from_dense(linear(64, 48), warn=False)
    x = torch.randn(3, 64)
    sl(x)  # the trial's first call: dense
    armed[0] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="timing refused"):
            sl(x)  # the sparse path's turn
    (trial,) = cast_ext.nn._TRIALS.values()
    assert "sparse" in trial.paths
    cast_ext.nn.clear_dispatch_decisions()


@pytest.mark.parametrize("checks, capturing", [(True, False), (False, False), (True, True)])
def test_a_cuda_meta_check_counts_only_where_the_kernel_ran_it(
    monkeypatch: pytest.MonkeyPatch, checks: bool, capturing: bool
) -> None:
    """A packed CUDA call that asked for the meta check marks the layer's meta checked only where
    the kernel ran it: not with the value checks off, nor while a CUDA graph is captured (the
    kernel skips it there), so that a later call checks (a stand-in for a CUDA input)."""
    import types

    monkeypatch.setattr(cast_ext.nn, "cuda_value_checks", lambda: checks)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    sl = SparseLinear.from_dense(linear(64, 48), warn=False)
    assert sl._meta_checked is None
    sl._meta_passed(types.SimpleNamespace(is_cuda=True), True)
    assert (sl._meta_checked is not None) == (checks and not capturing)


def test_derived_weights_and_cuda_graph_captures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a CUDA graph capture (pretended here, on the CPU): a dense weight derived during the
    capture is not cached (made in the graph's memory, it holds nothing until the first replay:
    eager calls would have read it unwritten); one cached before the capture is kept alive for
    the layer's life once a capture read it (the graph reads it at every replay), even after the
    layer drops it from its cache."""
    sl = SparseLinear.from_dense(linear(64, 48), mode="dense", warn=False)
    x = torch.randn(3, 64)
    monkeypatch.setattr(cast_ext.nn, "_capturing", lambda t: True)
    close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())
    assert not sl._derived and not sl.__dict__.get("_graph_held")
    monkeypatch.setattr(cast_ext.nn, "_capturing", lambda t: False)
    sl(x)  # eager: cached
    (_, cached) = sl._derived["dense"]
    alive = weakref.ref(cached)
    monkeypatch.setattr(cast_ext.nn, "_capturing", lambda t: True)
    sl(x)  # captured: the graph reads the cached weight
    del cached
    sl._derived.clear()  # as a decision that no longer uses it, or a load, drops it
    gc.collect()
    assert alive() is not None
    assert "_graph_held" not in copy.deepcopy(sl).__dict__  # a copy has no graphs


def test_threads_sharing_a_bucket_decide_it_once() -> None:
    """Threads making the first calls of one shape bucket at once: every call is served, the
    trial is completed and decided by one of them (it raised KeyError in the others)."""
    import threading

    cast_ext.nn.clear_dispatch_decisions()
    layers = [SparseLinear.from_dense(linear(64, 32), warn=False) for _ in range(4)]
    x = torch.randn(8, 64)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(layers))

    def work(sl: SparseLinear) -> None:
        barrier.wait()
        try:
            for _ in range(2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES)):
                close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())
        except BaseException as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(sl,)) for sl in layers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(dispatch_decisions()) == 1 and not cast_ext.nn._TRIALS
    cast_ext.nn.clear_dispatch_decisions()


def test_cpu_packed_backward_reuses_one_dense_weight() -> None:
    """Training through a packed layer (an adapter's input grads): the backward's dense weight
    is built once and kept, not decompressed again in every step, and grads match dense."""
    sl = SparseLinear.from_dense(linear(64, 32), mode="sparse", warn=False)
    dense = sl.to_dense()
    built = []
    for _ in range(3):
        x = torch.randn(4, 64, requires_grad=True)
        xd = x.detach().clone().requires_grad_()
        sl(x).square().sum().backward()
        dense(xd).square().sum().backward()
        torch.testing.assert_close(x.grad, xd.grad)
        built.append(sl._derived["dense"][1])
    assert built[0] is built[1] is built[2]
    torch.testing.assert_close(sl.bias.grad, dense.bias.grad)
    with torch.no_grad():  # a forward alone keeps it too: the layer trains through it
        sl(torch.randn(2, 64))
    assert sl.derived_bytes() == 32 * 64 * 4


@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
def test_values_get_no_gradient_on_any_path(mode: str) -> None:
    """values/metadata are frozen buffers: a values.requires_grad_() set by a user gives no
    gradient on any path (the packed op alone would give one, so the path would decide)."""
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(64, 32), mode=mode, warn=False)
    sl.values.requires_grad_()
    x = torch.randn(4, 64, requires_grad=True)
    for _ in range(2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES) + 1):
        sl(x).sum().backward()
    assert sl.values.grad is None and x.grad is not None
    cast_ext.nn.clear_dispatch_decisions()


def test_export_after_eager_calls_derives_the_weight_in_the_graph() -> None:
    """torch.export never bakes a cached dense copy in: the exported program follows a
    load_state_dict, and in mode auto it takes a dynamic batch dim."""
    a = SparseLinear.from_dense(linear(64, 32), mode="dense", warn=False)
    b = SparseLinear.from_dense(linear(64, 32), mode="dense", warn=False)
    x = torch.randn(5, 64)
    a(x)  # an eager call caches a's dense weight
    ep = torch.export.export(a, (x,))
    assert not ep.constants
    mod = ep.module()
    mod.load_state_dict(b.state_dict())
    torch.testing.assert_close(mod(x), b(x))
    auto = SparseLinear.from_dense(linear(64, 32), warn=False)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(auto, (x,), dynamic_shapes=({0: batch},))
    x9 = torch.randn(9, 64)
    close_to_linear(ep.module()(x9), x9, auto.dense_weight(), auto.bias.detach())


def test_pickle_and_deepcopy_leave_the_derived_weights_behind() -> None:
    import copy

    sl = SparseLinear.from_dense(linear(256, 256), mode="dense", warn=False)
    buf = io.BytesIO()
    torch.save(sl, buf)
    before = buf.tell()
    sl(torch.randn(3, 256))
    assert sl.derived_bytes() > 0
    buf = io.BytesIO()
    torch.save(sl, buf)
    assert buf.tell() == before
    cp = copy.deepcopy(sl)
    assert cp.derived_bytes() == 0 and sl.derived_bytes() > 0
    x = torch.randn(3, 256)
    torch.testing.assert_close(cp(x), sl(x))


def test_conversions_keep_requires_grad_and_training() -> None:
    model = nn.Sequential(linear(16, 8), nn.ReLU(), linear(8, 4)).eval()
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match="pruned"):
        to_sparse(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    to_dense(model)
    assert not any(p.requires_grad for p in model.parameters())  # weights too
    assert not any(m.training for m in model.modules())
    trainable = linear(16, 8)
    with pytest.warns(UserWarning, match="pruned"):
        assert to_dense(to_sparse(trainable)).weight.requires_grad


def test_to_sparse_refuses_before_changing_anything() -> None:
    """A layer that cannot be converted raises an error naming it, and no layer was swapped."""
    model = nn.Sequential(linear(16, 8), nn.ReLU(), nn.Linear(8, 4).double())
    with pytest.raises(TypeError, match=r"to_sparse: layer '2'.*float64"):
        to_sparse(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    with torch.no_grad():
        model[2].double().float().weight[1, 2] = float("nan")  # the kernel's own error
    with pytest.raises(RuntimeError, match=r"to_sparse: layer '2': .*NaN or Inf"):
        to_sparse(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(ValueError, match=r"out_features=0 must be positive"):
        SparseLinear(16, 0)


def test_to_sparse_and_to_dense_convert_a_bare_layer() -> None:
    lin = linear(16, 8)
    with pytest.warns(UserWarning, match="pruned"):
        sl = to_sparse(lin)
    assert isinstance(sl, SparseLinear)
    back = to_dense(sl)
    assert isinstance(back, nn.Linear)
    torch.testing.assert_close(back.weight, sl.dense_weight())


def test_linears_sharing_a_weight_stay_tied() -> None:
    a, b = linear(16, 8), linear(16, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) were not 2:4"):  # one weight
        to_sparse(model)
    assert model[0].values is model[2].values and model[0].metadata is model[2].metadata
    assert model[0].bias is not model[2].bias
    to_dense(model)
    assert model[0].weight is model[2].weight
    assert len(list(model.parameters())) == 3


def test_cleared_decisions_release_a_layer_s_old_derived_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layer dispatched dense, then re-decided packed after clear_dispatch_decisions, drops
    its dense copy (it kept it while the old decision was remembered)."""
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(64, 32), warn=False)
    x = torch.randn(4, 64)
    for choice in ("dense", "packed"):
        monkeypatch.setattr(cast_ext.nn, "_pick", lambda us, c=choice: c)
        for _ in range(2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES) + 1):
            sl(x)
        assert dispatch_decisions()[0]["choice"] == choice
        assert sl.derived_bytes() == (32 * 64 * 4 if choice == "dense" else 0)
        cast_ext.nn.clear_dispatch_decisions()


def test_dispatch_rule() -> None:
    """A 2:4 path is chosen only if it beats dense by SPARSE_MARGIN (0.98)."""
    pick = cast_ext.nn._pick
    assert pick({"dense": 10.0, "packed": 9.7}) == "packed"
    assert pick({"dense": 10.0, "packed": 9.9}) == "dense"
    assert pick({"dense": 10.0, "packed": 9.0, "sparse": 8.0}) == "sparse"
    assert pick({"dense": 10.0, "packed": 12.0, "sparse": 11.0}) == "dense"


@pytest.mark.parametrize("choice", ["packed", "dense"])
def test_cpu_dispatch_follows_the_decision(choice: str) -> None:
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(32, 16), warn=False)
    x = torch.randn(5, 32)
    decide_cpu(8, choice)
    sl._dense_cached()
    y = sl(x)
    b = sl.bias.detach()
    if choice == "packed":
        assert torch.equal(y, cast_ext.sparse24_gemm(x, sl.values, sl.metadata, b))
        assert sl.derived_bytes() == 0  # the dense copy built before is dropped
    else:
        assert torch.equal(y, F.linear(x, sl.dense_weight(), b))
        assert sl.derived_bytes() == 16 * 32 * 4
    cast_ext.nn.clear_dispatch_decisions()


def test_cpu_forced_modes_measure_nothing() -> None:
    cast_ext.nn.clear_dispatch_decisions()
    x = torch.randn(4, 32)
    sparse = SparseLinear.from_dense(linear(32, 16), mode="sparse", warn=False)
    b = sparse.bias.detach()
    assert torch.equal(sparse(x), cast_ext.sparse24_gemm(x, sparse.values, sparse.metadata, b))
    assert sparse.derived_bytes() == 0  # the packed kernel needs no dense copy
    dense = SparseLinear.from_dense(linear(32, 16), mode="dense", warn=False)
    assert torch.equal(dense(x), F.linear(x, dense.dense_weight(), dense.bias.detach()))
    assert dispatch_decisions() == [] and cast_ext.nn._TRIALS == {}


def test_decided_calls_follow_buckets_modes_clears_and_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layer keeps the paths of the buckets it has run (the per-call lookup): each bucket its
    own, a forced mode over them, a clear and a new decision, a move to another dtype, and an
    in-place write to ``values`` (the dense copy rebuilt) are all followed."""
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(32, 16), warn=False)
    decide_cpu(8, "packed")
    decide_cpu(1, "dense")
    paths: list[str] = []
    run = SparseLinear._run

    def spy(self: SparseLinear, path: str, x: Tensor) -> Tensor:
        paths.append(path)
        return run(self, path, x)

    monkeypatch.setattr(SparseLinear, "_run", spy)
    x5, x1 = torch.randn(5, 32), torch.randn(1, 32)
    b = sl.bias.detach()
    for _ in range(3):
        assert torch.equal(sl(x5), cast_ext.sparse24_gemm(x5, sl.values, sl.metadata, b))
        assert torch.equal(sl(x1), F.linear(x1, sl.dense_weight(), b))
    assert paths == ["packed", "dense"] * 3
    assert set(sl._routes.values()) == {"packed", "dense"}

    sl.mode = "dense"
    sl(x5)
    sl.mode = "sparse"
    sl(x1)
    sl.mode = "auto"
    sl(x5)
    assert paths[-3:] == ["dense", "packed", "packed"]

    cast_ext.nn.clear_dispatch_decisions()
    decide_cpu(8, "dense")
    assert torch.equal(sl(x5), F.linear(x5, sl.dense_weight(), b))
    assert paths[-1] == "dense"
    with torch.no_grad():
        sl.values.mul_(2.0)  # in place: the cached dense copy is stale
    assert torch.equal(sl(x5), F.linear(x5, sl.dense_weight(), b))

    sl.bfloat16()  # no decision for bfloat16: measured again
    xb = x5.bfloat16()
    sl(xb)
    assert cast_ext.nn._TRIALS and (torch.bfloat16 not in {k[1] for k in sl._routes})
    cast_ext.nn.clear_dispatch_decisions()


def test_a_route_taken_across_a_clear_in_another_thread_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decision read just before another thread cleared the decisions is used for that call
    but not kept as the layer's path: the next call measures the bucket again."""
    cast_ext.nn.clear_dispatch_decisions()

    class ClearedAfterTheLookup(dict):
        def get(self, key, default=None):
            hit = super().get(key, default)
            if hit is not None:
                cast_ext.nn.clear_dispatch_decisions()  # as another thread would
            return hit

    monkeypatch.setattr(cast_ext.nn, "_DECISIONS", ClearedAfterTheLookup())
    decide_cpu(8, "packed")
    sl = SparseLinear.from_dense(linear(32, 16), warn=False)
    x = torch.randn(5, 32)
    sl(x)
    assert not sl._routes
    sl(x)  # no decision now: a trial call
    assert cast_ext.nn._TRIALS
    cast_ext.nn.clear_dispatch_decisions()


def test_a_layer_whose_bias_is_removed_takes_its_new_shape_s_decision() -> None:
    cast_ext.nn.clear_dispatch_decisions()
    decide_cpu(8, "packed")
    decide_cpu(8, "dense", bias=False)
    sl = SparseLinear.from_dense(linear(32, 16), warn=False)
    x = torch.randn(5, 32)
    sl(x)
    sl.bias = None
    assert torch.equal(sl(x), F.linear(x, sl.dense_weight()))
    assert set(sl._routes.values()) == {"packed", "dense"}
    cast_ext.nn.clear_dispatch_decisions()


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_gradients_flow_through_vmap(mode: str) -> None:
    """Under torch.func.vmap ``x.requires_grad`` is the batched wrapper's (False): with no other
    input requiring grad (no bias here) the call is still recorded, and x gets the dense
    layer's gradient (it got none when the call skipped autograd)."""
    cast_ext.nn.clear_dispatch_decisions()
    decide_cpu(2, "packed", bias=False)
    lin = linear(32, 16, bias=False)
    sl = SparseLinear.from_dense(lin, mode=mode, warn=False)  # type: ignore[arg-type]
    dense = sl.to_dense()
    x = torch.randn(3, 2, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's batching fallback for the custom op
        y = torch.func.vmap(sl)(x)
    y.sum().backward()
    dense(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    cast_ext.nn.clear_dispatch_decisions()


@pytest.mark.parametrize("choice", ["packed", "dense"])
def test_calls_autograd_records_nothing_for_match_recorded_ones(choice: str) -> None:
    """Under no_grad, or with no input that requires grad, a call skips autograd (the packed
    op's autograd layer); its output is the recorded call's, bit for bit, and carries no graph.
    A bias that requires grad still gets its gradient when x does not."""
    cast_ext.nn.clear_dispatch_decisions()
    decide_cpu(8, choice)
    sl = SparseLinear.from_dense(linear(32, 16), warn=False)
    x = torch.randn(5, 32)
    y_bias = sl(x)  # the bias requires grad: recorded
    y_x = sl(x.clone().requires_grad_())
    with torch.no_grad():
        y_off = sl(x)
    sl.bias.requires_grad_(False)
    y_none = sl(x)
    assert y_bias.grad_fn is not None and y_x.grad_fn is not None
    assert y_off.grad_fn is None and y_none.grad_fn is None and not y_none.requires_grad
    assert torch.equal(y_off, y_bias) and torch.equal(y_none, y_x)
    sl.bias.requires_grad_(True)
    g = torch.randn(5, 16)
    sl(x).backward(g)
    torch.testing.assert_close(sl.bias.grad, g.sum(0))
    cast_ext.nn.clear_dispatch_decisions()


# ---- CUDA ------------------------------------------------------------------------------------


TRIAL_CALLS = cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES  # per path
UNCOVERED = cast_ext.nn._TRIAL_MAX_UNCOVERED


def run_until_decided(sl: SparseLinear, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Calls ``sl(x)`` (each output checked) until its bucket is decided: (last output, calls)."""
    w = sl.dense_weight()
    b = None if sl.bias is None else sl.bias.detach()
    for calls in range(1, 3 * (TRIAL_CALLS + cast_ext.nn._TRIAL_MAX_UNCOVERED) + 1):
        y = sl(x)
        close_to_linear(y.detach(), x.detach(), w, b)
        if dispatch_decisions():
            return y, calls
    raise AssertionError(f"no decision after {calls} calls")


@requires_cusparselt
@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
def test_cuda_forward_backward(mode: str) -> None:
    cast_ext.nn.clear_dispatch_decisions()
    lin = linear(256, 128, dtype=torch.bfloat16)
    sl = SparseLinear.from_dense(lin, mode=mode, warn=False).cuda()  # type: ignore[arg-type]
    w = sl.dense_weight()
    x = torch.randn(3, 37, 256, device="cuda").bfloat16().requires_grad_()
    y = sl(x)
    close_to_linear(y.detach(), x.detach(), w, sl.bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.float(), (g.float() @ w.float()), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sl.bias.grad.float(), g.float().sum((0, 1)), rtol=2e-2, atol=5e-2)
    if mode == "auto":
        # Trial calls alternate dense and cuSPARSELt (M = 111: no packed kernel), 6 calls each.
        _, calls = run_until_decided(sl, x.detach())
        # (a call the GPU's spin did not cover is not counted: up to 4 more per path)
        assert 2 * TRIAL_CALLS - 1 <= calls <= 2 * (TRIAL_CALLS + UNCOVERED) - 1
        (d,) = dispatch_decisions()
        assert d["m_bucket"] == 128 and d["choice"] in ("sparse", "dense")
        assert d["sparse_us"] > 0 and d["dense_us"] > 0 and d["packed_us"] is None
        sl(x.detach())  # a decided call releases what the choice does not use
        kept = {"sparse": sl._cslt_buffer, "dense": sl._dense_cached}[d["choice"]]()
        assert sl.derived_bytes() == kept.numel() * kept.element_size()
    else:
        assert dispatch_decisions() == [] and cast_ext.nn._TRIALS == {}


@requires_cusparselt
def test_cuda_trial_samples_time_the_device_not_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trial samples are device time: a path whose host side takes 3 ms (the GPU finishes its
    work in microseconds) must not read 3 ms. The spin ahead of the call starts short of that
    and grows until it covers the host's time; the uncovered samples are left out."""
    import time

    cast_ext.nn.clear_dispatch_decisions()
    monkeypatch.setitem(cast_ext.nn._HOST_AHEAD, 0, 1 << 21)  # ~1 ms at 2 GHz: too short
    real_run = SparseLinear._run

    def slow_host(self: SparseLinear, path: str, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.003)
        return real_run(self, path, x)

    monkeypatch.setattr(SparseLinear, "_run", slow_host)
    sl = SparseLinear.from_dense(linear(512, 256, dtype=torch.bfloat16), warn=False).cuda()
    x = torch.randn(64, 512, device="cuda").bfloat16()  # M = 64: dense and cuSPARSELt
    run_until_decided(sl, x)
    (d,) = dispatch_decisions()
    assert cast_ext.nn._HOST_AHEAD[0] > 1 << 21  # it grew
    assert d["dense_us"] < 1000 and d["sparse_us"] < 1000, d  # not the host's 3 ms
    cast_ext.nn.clear_dispatch_decisions()


@requires_cusparselt
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_decode_sizes_consider_the_packed_kernel(tokens: int) -> None:
    cast_ext.nn.clear_dispatch_decisions()
    lin = linear(512, 256, dtype=torch.bfloat16)
    sl = SparseLinear.from_dense(lin, warn=False).cuda()
    w = sl.dense_weight()
    x = torch.randn(tokens, 512, device="cuda").bfloat16().requires_grad_()
    y = sl(x)
    close_to_linear(y.detach(), x.detach(), w, sl.bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.float(), (g.float() @ w.float()), rtol=2e-2, atol=2e-2)
    _, calls = run_until_decided(sl, x.detach())
    assert 3 * TRIAL_CALLS - 1 <= calls <= 3 * (TRIAL_CALLS + UNCOVERED) - 1
    (d,) = dispatch_decisions()
    assert d["m_bucket"] == tokens and d["choice"] in ("sparse", "dense", "packed")
    assert d["packed_us"] > 0 and d["sparse_us"] > 0 and d["dense_us"] > 0
    y2 = sl(x.detach())  # the recorded choice is reused
    close_to_linear(y2, x.detach(), w, sl.bias.detach())
    if d["choice"] == "packed":
        assert sl.derived_bytes() == 0  # neither a dense copy nor a cuSPARSELt buffer is kept
    assert len(dispatch_decisions()) == 1


@requires_cusparselt
def test_cuda_packed_layer_checks_its_meta_once_per_weight() -> None:
    """A packed layer checks its meta at the first call (a sync), then runs unchecked; loading
    another weight checks again, and an invalid meta is refused there."""
    sl = SparseLinear.from_dense(linear(64, 32, dtype=torch.float16), mode="sparse", warn=False)
    sl = sl.cuda()
    cast_ext.nn.clear_dispatch_decisions()
    key = ("cuda:0", torch.float16, 4, 32, 64, True)
    cast_ext.nn._DECISIONS[key] = cast_ext.nn.DispatchDecision(
        "cuda:0", "float16", 4, 32, 64, True, "packed", 9.0, 10.0, 5.0
    )
    sl.mode = "auto"
    x = torch.randn(3, 64, device="cuda").half()
    assert sl._meta_unchecked(x)
    close_to_linear(sl(x), x, sl.dense_weight(), sl.bias.detach())
    assert not sl._meta_unchecked(x)  # checked once, then trusted
    state = {name: t.clone() for name, t in sl.state_dict().items()}
    state["metadata"][5, 2] = 0x37  # a group keeping 3
    sl.load_state_dict(state)
    for _ in range(2):  # a failed check is not taken as a pass
        with pytest.raises(RuntimeError, match=r"sparse24_gemm: meta .* not a valid"):
            sl(x)
    cast_ext.nn.clear_dispatch_decisions()


@requires_cusparselt
def test_cuda_state_dict_from_cpu_and_cache_rebuild() -> None:
    sl = SparseLinear.from_dense(linear(64, 32, dtype=torch.bfloat16), mode="sparse", warn=False)
    other = SparseLinear.from_dense(linear(64, 32, dtype=torch.bfloat16), mode="sparse", warn=False)
    gpu = other.cuda()
    x = torch.randn(16, 64, device="cuda").bfloat16()
    gpu(x)  # builds the cuSPARSELt buffer of `other`'s weight
    gpu.load_state_dict(sl.state_dict())  # must rebuild it from the loaded values
    close_to_linear(gpu(x), x, sl.dense_weight().cuda(), sl.bias.detach().cuda())


@pytest.mark.parametrize("other", ["embedding", "linear-left-out"])
def test_to_sparse_refuses_to_untie_a_weight(other: str) -> None:
    """A layer filter_fn chooses whose weight a module that stays holds (a head tied to the
    embedding, a Linear filter_fn leaves out) is refused, nothing changed: it was converted,
    and the module that stayed kept the dense weight, silently untied."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.a = nn.Linear(8, 16, bias=False)
            self.b = nn.Linear(8, 16, bias=False)
            if other == "embedding":
                self.a.weight = self.emb.weight
            else:
                self.b.weight = self.a.weight

    model = LM()
    tied = "emb.weight" if other == "embedding" else "b.weight"
    with pytest.raises(ValueError, match=rf"layer 'a': its weight is tied to {tied}, which stays"):
        to_sparse(model, filter_fn=lambda name, m: name == "a")
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear
    if other == "linear-left-out":  # both chosen: converted, and tied as SparseLinears
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not 2:4, pruned"
            to_sparse(model, filter_fn=lambda name, m: name in ("a", "b"))
        assert model.a.values is model.b.values


def test_to_sparse_keeps_shared_biases_shared_and_refuses_to_untie_one() -> None:
    """Linears sharing a bias: converted together, their layers share one bias Parameter, and
    to_dense keeps it shared (each got its own copy); one converted alone is refused, as for a
    weight."""
    model = nn.Sequential(linear(16, 16), nn.ReLU(), linear(16, 16))
    model[2].bias = model[0].bias
    with pytest.raises(ValueError, match=r"layer '0': its bias is tied to 2\.bias, which stays"):
        to_sparse(model, filter_fn=lambda name, m: name == "0")
    assert type(model[0]) is nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not 2:4, pruned"
        to_sparse(model)
    assert model[0].bias is model[2].bias
    to_dense(model)
    assert model[0].bias is model[2].bias and model[0].weight is not model[2].weight


def test_to_sparse_leaves_dense_what_a_sparse_linear_cannot_stand_in_for() -> None:
    """By default a Linear whose owner's code reads its .weight (nn.TransformerEncoderLayer's
    inference fast path reads linear1.weight; MultiheadAttention hands out_proj.weight to its
    functional form) and a subclass of nn.Linear (its own forward would be lost) stay dense,
    with a warning naming them: converted, the encoder layer raised AttributeError in eval under
    no_grad. filter_fn can still choose them, with a warning."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = layer(x)
    with pytest.warns(UserWarning, match=r"3 linear layer\(s\) stay dense") as record:
        to_sparse(layer)
    message = str(record[0].message)
    assert "TransformerEncoderLayer reads .linear1.weight" in message
    assert "a NonDynamicallyQuantizableLinear, whose own forward is not kept" in message
    assert "MultiheadAttention reads .out_proj.weight" in message
    assert not any(isinstance(m, SparseLinear) for m in layer.modules())
    with torch.no_grad():
        assert torch.equal(layer(x), want)

    class Scaled(nn.Linear):  # computes x W^T + b: safe to replace, as its author knows
        pass

    model = nn.Sequential(linear24(16, 8))
    model[0].__class__ = Scaled
    with pytest.warns(UserWarning, match=r"stay dense.*'0 \(a Scaled, whose own forward"):
        to_sparse(model)
    assert type(model[0]) is Scaled
    with pytest.warns(UserWarning, match=r"filter_fn chose 1 layer\(s\) that a SparseLinear"):
        to_sparse(model, filter_fn=lambda name, m: True)
    assert type(model[0]) is SparseLinear


class BaseTunerLayer:  # PEFT's adapter-layer mixin, by name (cast_ext.nn never imports peft)
    pass


class LoraLinear(nn.Module, BaseTunerLayer):
    """PEFT's lora.Linear, in its shape: a base layer and adapter Linears in ModuleDicts."""

    def __init__(self, base: nn.Linear, r: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_to_sparse_and_prepare_leave_peft_adapters_alone() -> None:
    """A PEFT-wrapped model: LoRA's A and B (plain Linears, trainable) were pruned to 2:4 and
    frozen into buffers by to_sparse; they stay dense now, and so does their base layer by
    default (PEFT reads its .weight to merge and for DoRA; filter_fn may choose it). prepare
    leaves A and B out (AdamS 2:4-decayed the adapters) and scales the base; param_groups says
    why it finds no sparse weight when the prepared base layers are frozen, as PEFT leaves
    them."""
    from cast_ext import cast

    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(linear24(16, 16)), nn.ReLU(), linear24(16, 8))
    converted = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"3 linear layer\(s\) stay dense.*PEFT adapter"):
        to_sparse(converted)
    assert type(converted[0].base_layer) is nn.Linear and type(converted[2]) is SparseLinear
    assert type(converted[0].lora_A["default"]) is nn.Linear
    assert type(converted[0].lora_B["default"]) is nn.Linear
    with pytest.warns(UserWarning, match=r"filter_fn chose 1 layer.*base layer of a PEFT"):
        to_sparse(converted, filter_fn=lambda name, m: name == "0.base_layer")
    assert type(converted[0].base_layer) is SparseLinear

    names = [layer.name for layer in cast.prepare(model)]
    assert names == ["0.base_layer", "2"]
    for p in model.parameters():
        p.requires_grad_(False)
    for lora in (model[0].lora_A, model[0].lora_B):
        lora["default"].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"all 2 prepared layers are frozen"):
        groups = cast.param_groups(model)
    assert [(g["name"], len(g["params"])) for g in groups] == [("dense", 2)]


def test_to_sparse_leaves_an_uninitialized_lazy_layer_alone() -> None:
    """An uninitialized LazyLinear is left as it is (reading its weight's shape raised);
    chosen by filter_fn, a clear error, nothing replaced."""
    model = nn.Sequential(linear24(8, 16), nn.ReLU(), nn.LazyLinear(16))
    chosen = copy.deepcopy(model)
    to_sparse(model)
    assert [type(m).__name__ for m in model] == ["SparseLinear", "ReLU", "LazyLinear"]
    with pytest.raises(ValueError, match=r"layer '2' is uninitialized \(a lazy module\)"):
        to_sparse(chosen, filter_fn=lambda name, m: True)
    assert type(chosen[0]) is nn.Linear


def test_the_owner_source_cache_does_not_keep_classes_alive() -> None:
    """Parametrized modules and fx GraphModules get a class each; the cache of which owners
    read a child's .weight held every such class (and its source lookups) forever."""
    from cast_ext.nn import _READS_WEIGHT

    def classes() -> int:
        return sum(1 for c in list(_READS_WEIGHT.keys()) if c.__module__ == "torch.fx.graph_module")

    before = classes()
    for _ in range(3):
        model = torch.fx.symbolic_trace(nn.Sequential(linear(8, 8)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not 2:4, pruned"
            to_sparse(model)
        assert classes() == before + 1
        del model
        gc.collect()
        assert classes() == before


def test_to_sparse_and_prepare_leave_a_classifier_head_dense() -> None:
    """A Hugging Face classifier has no output embeddings: its task head, the modules outside
    base_model, stays dense by default (the score layer was made 2:4)."""
    transformers = pytest.importorskip("transformers")
    from cast_ext import cast

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    assert model.get_output_embeddings() is None
    names = [layer.name for layer in cast.prepare(copy.deepcopy(model))]
    assert len(names) == 7 and not any(n.startswith("score") for n in names)

    class PeftLike(nn.Module):  # PeftModel's shape: base_model holds it all; get_base_model
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.base_model = model

        def get_base_model(self) -> nn.Module:
            return self.base_model

    names = [layer.name for layer in cast.prepare(PeftLike(copy.deepcopy(model)))]
    assert len(names) == 7 and not any(n.startswith("base_model.score") for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not 2:4, pruned"
        to_sparse(model)
    assert type(model.score) is nn.Linear
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 7


def test_to_sparse_converts_a_layer_pruned_with_torch_nn_utils_prune() -> None:
    """A Linear under torch.nn.utils.prune (its weight a plain tensor, weight_orig the
    Parameter) converts, with the pruned weight: the tie check raised a KeyError."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    pruned = model[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not 2:4, pruned"
        to_sparse(model)
    assert type(model[0]) is SparseLinear
    assert torch.equal(model[0].dense_weight(), cast_ext.sparse24_prune(pruned))


def test_cache_is_not_fooled_by_another_tensor_at_the_same_address() -> None:
    """torch.func.functional_call swaps in new values per call; a new tensor at the address of
    a freed one, whose version counter had reached the old one's, matched the cached dense
    weight's key (address, version), and the layer computed with the old weight (18 calls of
    20 in a reviewer's run). Made deterministic here: a second tensor on the first one's memory
    (its own version counter), new values written through it, its version brought level."""
    from torch.func import functional_call

    torch.manual_seed(0)
    sl = SparseLinear.from_dense(linear(256, 64), mode="dense", warn=False)
    x = torch.randn(4, 256)
    first = sl.values.clone()
    other = torch.empty(0, dtype=first.dtype).set_(
        first.untyped_storage(), first.storage_offset(), first.shape, first.stride()
    )
    with torch.no_grad():
        while first._version < other._version + 1:
            first.add_(0)  # no change but the version
        functional_call(sl, {"values": first}, (x,))  # caches first's dense weight
        other.mul_(2)  # new values at the same address
    assert other.data_ptr() == first.data_ptr() and other._version == first._version
    y = functional_call(sl, {"values": other}, (x,))
    want = F.linear(x, ops.sparse24_decompress(other, sl.metadata), sl.bias)
    torch.testing.assert_close(y, want)


def test_layers_built_under_inference_mode_run() -> None:
    """Buffers that are inference tensors have no version counter: every dense or auto call
    raised reading it."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not 2:4, pruned"
        model = to_sparse(nn.Sequential(linear(32, 16), nn.ReLU(), linear(16, 8)), mode="dense")
        y = model(torch.randn(3, 32))
    assert y.shape == (3, 8)
    assert model(torch.randn(3, 32)).shape == (3, 8)


def test_backward_after_an_in_place_write_to_values_raises() -> None:
    """The packed path's backward built the dense weight at backward time: after an in-place
    write to values between forward and backward, the input gradient came from the new weight,
    silently. It raises autograd's in-place error now, as nn.Linear does."""
    sl = SparseLinear.from_dense(linear(32, 16), mode="sparse", warn=False)  # packed on CPU
    x = torch.randn(4, 32, requires_grad=True)
    y = sl(x)
    with torch.no_grad():
        sl.values.mul_(10)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


def test_tied_layers_stay_tied_through_dtype_and_device_casts() -> None:
    """nn.Module._apply gave each layer its own copy of shared buffers (memory doubled, and
    to_dense no longer re-tied them); they are converted in place now, as Parameters are."""
    a, b = linear(16, 8), linear(16, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not 2:4, pruned"
        to_sparse(model)
    model.half().to("cpu").float()
    assert model[0].values is model[2].values and model[0].metadata is model[2].metadata
    assert model[0].values.dtype == torch.float32
    on_meta = copy.deepcopy(model).to("meta")  # not convertible in place: replaced, as torch does
    assert on_meta[0].values.is_meta and on_meta[2].metadata.is_meta
    to_dense(model)
    assert model[0].weight is model[2].weight


def test_apply_converts_each_buffer_once() -> None:
    """_apply converted values/metadata itself and then handed them to nn.Module._apply too: a
    function that is not idempotent (here: one that counts its calls and scales) ran twice."""
    sl = SparseLinear.from_dense(linear(16, 8), warn=False)
    values, bias = sl.values.clone(), sl.bias.detach().clone()
    seen: list[torch.Tensor] = []

    def double(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t * 2 if t.is_floating_point() else t.clone()

    sl._apply(double)
    assert len(seen) == 3  # values, metadata, bias: each once
    torch.testing.assert_close(sl.values, values * 2, rtol=0, atol=0)
    torch.testing.assert_close(sl.bias.detach(), bias * 2, rtol=0, atol=0)


def test_a_decision_measured_across_a_clear_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """clear_dispatch_decisions while a trial completes: its decision (measured before the
    clear) was stored after it; it is dropped now and the bucket measures again."""
    cast_ext.nn.clear_dispatch_decisions()
    sl = SparseLinear.from_dense(linear(64, 32), warn=False)
    x = torch.randn(4, 64)
    medians = cast_ext.nn._Trial.medians

    def clear_first(self: cast_ext.nn._Trial) -> dict[str, float]:
        cast_ext.nn.clear_dispatch_decisions()  # another thread's clear, at the worst moment
        return medians(self)

    monkeypatch.setattr(cast_ext.nn._Trial, "medians", clear_first)
    for _ in range(2 * (cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES)):
        sl(x)
    assert dispatch_decisions() == []


def test_from_dense_names_what_it_expected() -> None:
    with pytest.raises(TypeError, match=r"from_dense: expected an nn.Linear .* got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(4, 8, 3))


def test_the_derived_weight_cache_keeps_no_replaced_buffers_alive() -> None:
    """The cache holds the buffers it was built from weakly: replaced ones (assigned, or
    swapped in by functional_call) are freed, as before the compile-time identity check."""
    sl = SparseLinear.from_dense(linear(16, 8), mode="dense", warn=False)
    x = torch.randn(2, 16)
    sl(x)
    old = weakref.ref(sl.values)
    sl.values = sl.values.clone()
    gc.collect()
    assert old() is None
    swapped = sl.values.clone()
    torch.func.functional_call(sl, {"values": swapped}, (x,))
    ref = weakref.ref(swapped)
    del swapped
    gc.collect()
    assert ref() is None


def test_to_sparse_refuses_a_prepared_model_before_finalize() -> None:
    """A prepared (not finalized) model: the default rule left every layer dense with a warning
    that named the wrong reason, and a filter_fn made fresh magnitude masks of A * W, not the
    optimizer's."""
    from cast_ext import cast

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    cast.prepare(model)
    for kw in ({}, {"filter_fn": lambda name, m: True}):
        with pytest.raises(ValueError, match=r"2 layer\(s\) \('0', '2'\) carry CAST's weight"):
            to_sparse(model, **kw)
        assert all(hasattr(model[i], "parametrizations") for i in (0, 2))
