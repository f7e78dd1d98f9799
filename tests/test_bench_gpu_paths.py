"""The GPU benchmarks' Python, run on the CPU: each one's main path end to end, small shapes.

The GPU suite runs these benchmarks once per lent machine, where an error in their Python costs
device time; here a shim runs them on the CPU: every ``device="cuda"`` (and ``.to("cuda")``,
``.cuda()``) becomes the CPU through a ``TorchFunctionMode``, CUDA events become host clocks, the
device's name and properties are an H200's, and the CUDA-only calls (cuSPARSELt's compress and
GEMM, torch's ``_cslt_*``, its algorithm search and its 2:4 tile sparsifier) are dense stand-ins.
The checks are on the rows each writes (their keys, finite numbers, the baselines' ratios), never
on the times. Every patch goes through a ``MonkeyPatch`` undone after each test, the mode is left
on exit, and the fixture then checks that the process is as the test found it: nothing here
changes it for the tests after it (the whole suite runs in one process).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

import cast_ext
from cast_ext import nn as cnn
from cast_ext import ops

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "benchmarks" / "bench_sparse24_gemm.py").is_file():
    pytest.skip("no benchmarks/ beside tests/ (an installed package)", allow_module_level=True)
targets = importlib.import_module("benchmarks.targets")


def _cpu(d: Any) -> Any:
    if isinstance(d, str) and d.startswith("cuda"):
        return "cpu"
    if isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("cpu")
    return d


class _CudaToCpu(TorchFunctionMode):
    """Runs what the benchmarks put on ``cuda`` on the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


class _Event:
    """``torch.cuda.Event`` on the host clock."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _Event) -> float:
        return (end.t - self.t) * 1e3


class _Generator:
    """``torch.Generator(device="cuda")`` as a CPU generator."""

    def __new__(cls, device: Any = None) -> torch.Generator:  # type: ignore[misc]
        return _REAL_GENERATOR(device=_cpu(device) or "cpu")


_REAL_GENERATOR = torch.Generator


def _patched_now() -> dict[str, Any]:
    """Some of what the shim patches, as found now."""
    return {
        "torch.cuda.is_available": torch.cuda.is_available,
        "torch.cuda.Event": torch.cuda.Event,
        "torch.cuda.get_device_properties": torch.cuda.get_device_properties,
        "torch._cslt_compress": getattr(torch, "_cslt_compress", None),
        "torch._C._cusparselt": getattr(torch._C, "_cusparselt", None),
        "cast_ext.cuda_kernels_available": cast_ext.cuda_kernels_available,
        "ops.cslt_compress": ops.cslt_compress,
        "ops.cslt_linear": ops.cslt_linear,
        "cnn._cslt_reason": cnn._cslt_reason,
        "torch.backends.cuda.matmul": torch.backends.cuda.matmul,
        "fp32 matmul precision": torch.get_float32_matmul_precision(),
    }


class _Shim:
    """What the tests read back: the compressed weights' dense stand-ins, the tile calls."""

    def __init__(self) -> None:
        self.dense: dict[int, torch.Tensor] = {}  # compressed buffer's data_ptr -> dense weight
        self.tile_algorithms: list[str] = []
        self.mode = _CudaToCpu()

    def compress(self, w: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(w.numel() * 9 // 16, dtype=w.dtype)
        self.dense[buf.data_ptr()] = w.detach().clone()
        return buf

    def cslt_linear(
        self,
        x: torch.Tensor,
        wc: torch.Tensor,
        n: int,
        k: int,
        bias: Any = None,
        *a: Any,
        **kw: Any,
    ) -> torch.Tensor:
        w = self.dense[wc.data_ptr()]
        assert w.shape == (n, k), (w.shape, n, k)
        return F.linear(x, w, bias)

    def cslt_sparse_mm(self, wc: torch.Tensor, b: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        w = self.dense[wc.data_ptr()]
        assert b.shape[0] == w.shape[1] and b.shape[1] % 8 == 0, b.shape
        y = w @ b
        return y.t() if kw.get("transpose_result") else y

    def tile(self, w: torch.Tensor, algorithm: str, use_cutlass: bool) -> tuple[torch.Tensor, ...]:
        self.tile_algorithms.append(algorithm)
        return (ops.sparse24_compress(w)[0],)


@pytest.fixture
def shim(tmp_path: Path) -> Iterator[_Shim]:
    """The CPU stand-in for an H200 (see the module's docstring); rows go to ``tmp_path``.

    Its own MonkeyPatch, undone on the way out, after which it checks that the process is as
    the test found it."""
    before = _patched_now()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        mp.setenv("OUT", str(tmp_path))
        mp.setenv("CAST_EXT_BENCH_QUICK", "1")
        s = _Shim()
        cuda = torch.cuda
        props = types.SimpleNamespace(
            name="NVIDIA H200", major=9, minor=0, total_memory=143 << 30, L2_cache_size=1 << 20
        )
        for name, value in {
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "Event": _Event,
            "synchronize": lambda *a, **k: None,
            "_sleep": lambda cycles: None,
            "empty_cache": lambda: None,
            "get_device_name": lambda *a: "NVIDIA H200",
            "get_device_properties": lambda *a: props,
            "current_stream": lambda *a, **k: None,
            "is_current_stream_capturing": lambda: False,
        }.items():
            mp.setattr(cuda, name, value)
        mp.setattr(torch, "Generator", _Generator)
        mp.setattr(torch.backends.cusparselt, "version", lambda: 0)
        mp.setattr(torch, "_cslt_compress", s.compress, raising=False)
        mp.setattr(torch, "_cslt_sparse_mm", s.cslt_sparse_mm, raising=False)
        mp.setattr(torch, "_sparse_semi_structured_tile", s.tile, raising=False)
        search = types.SimpleNamespace(mm_search=lambda *a: (3, 2, 1, 7))
        mp.setattr(torch._C, "_cusparselt", search, raising=False)
        mp.setattr(  # torch's check that a CUDA graph capture is healthy (private)
            torch.optim.Optimizer,
            "_accelerator_graph_capture_health_check",
            lambda self: None,
            raising=False,
        )
        mp.setattr(cast_ext, "cuda_kernels_available", lambda: True)
        mp.setattr(cast_ext, "cusparselt_available", lambda: True)
        mp.setattr(cast_ext, "set_cuda_value_checks", lambda on: None)
        mp.setattr(ops, "cslt_compress", s.compress)
        mp.setattr(ops, "cslt_linear", s.cslt_linear)
        # SparseLinear's dispatch tries its cuSPARSELt path (the stand-in) for 16-bit weights
        mp.setattr(
            cnn,
            "_cslt_reason",
            lambda n, k, dtype, device: None if dtype in (torch.float16, torch.bfloat16) else "no",
        )
        mp.setattr(
            cnn, "cslt_cache_info", lambda: {"plans": 0, "hits": 0, "misses": 0, "searches": 0}
        )
        # bench_cast_step sets allow_tf32, which also moves the process' fp32 precision settings;
        # setting it back would not restore those ("none" becomes "ieee"): it sets a stand-in's
        mp.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=False))
        # one thread: the shapes are tiny, and spinning worker threads on a loaded 2-core
        # machine made the run 15 times slower
        torch.set_num_threads(1)
        cnn.clear_dispatch_decisions()
        try:
            with s.mode:
                yield s
        finally:
            cnn.clear_dispatch_decisions()
            torch.set_num_threads(threads)
    assert not _get_current_function_mode_stack()
    assert torch.Generator is _REAL_GENERATOR
    assert _patched_now() == before
    assert torch.get_num_threads() == threads


def _bench(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``benchmarks.<name>`` with the device ceilings measured on small sizes."""
    mod = importlib.import_module(f"benchmarks.{name}")
    harness = importlib.import_module("benchmarks._harness")
    if hasattr(mod, "measure_copy_gbps"):
        monkeypatch.setattr(mod, "measure_copy_gbps", lambda: harness.measure_copy_gbps(1 << 20))
    if hasattr(mod, "measure_mm_tflops"):
        monkeypatch.setattr(mod, "measure_mm_tflops", lambda: harness.measure_mm_tflops(64))
    return mod


def _targets_measured(folder: Path, issue: int, count: int, skip: str = "") -> list[Any]:
    """benchmarks/targets.py's checks of ``issue`` against the rows a benchmark wrote: ``count``
    of them, each measured (a renamed field would leave a target "not measured")."""
    checks = [
        c
        for c in targets.check_all(folder)
        if c.issue == issue and (not skip or skip not in c.what)
    ]
    assert len(checks) == count, checks
    assert all(c.verdict in ("met", "NOT met", "reported") for c in checks), checks
    return checks


def _rows(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    assert data["env"]["gpu"] == "NVIDIA H200", data["env"]
    assert data["rows"], path
    return data["rows"]


def _finite(row: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, row)
        assert value >= 0, (key, row)


def test_bench_sparse24_mask_main(shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    mod = _bench("bench_sparse24_mask", monkeypatch)
    monkeypatch.setattr(mod, "SHAPES", {"tiny": (64, 256)})
    mod.main()
    rows = _rows(tmp_path / "sparse24_mask.json")
    ops_ = {"clone", "sparse24_mask", "sparse24_prune", "sparse24_compress"}
    baselines = {"torch._sparse_semi_structured_tile", "torch._cslt_compress"}
    assert {r["op"] for r in rows} == ops_ | baselines
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    assert set(shim.tile_algorithms) == {"largest_abs_values_greedy"}  # |w|, as ours
    for r in rows:
        _finite(r, ("median_us", "p20_us", "p80_us", "time_vs_clone"))
        if r["op"] in ops_:
            _finite(r, ("gbps", "fraction_of_clone_gbps", "fraction_of_copy_ceiling"))
        else:
            assert r["gbps"] is None and r["dtype"] == "bfloat16", r
        # torch's compressors against the op that also writes a compressed weight, only
        if r["op"] == "sparse24_compress" and r["dtype"] == "bfloat16":
            assert set(r["speedup_vs"]) == baselines, r
            _finite(r["speedup_vs"], tuple(baselines))
        else:
            assert "speedup_vs" not in r or not r["speedup_vs"], r
    impls = {r["impl"] for r in rows if r["op"] == "sparse24_compress"}
    assert impls == {"cast_ext", "cast_ext[no-check]"}
    _targets_measured(tmp_path, issue=3, count=5)


def test_bench_adams_main(shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    mod = _bench("bench_adams", monkeypatch)
    monkeypatch.setattr(mod, "layer_shapes", lambda: [(64, 64), (96, 64), (64, 96)])
    returned = mod.main()
    rows = _rows(tmp_path / "adams.json")
    assert rows == json.loads(json.dumps(returned))
    impls = [r["impl"] for r in rows]
    assert impls == [
        "torch.optim.AdamW(fused=True)",
        "cast_ext.adams_step_ (refresh every 10)",
        "cast_ext.adams_step_ (refresh every 10, amortized)",
        "cast_ext.adams_step_ (refresh every step)",
    ]
    assert rows[0]["time_vs_baseline"] == 1.0
    for r in rows:
        _finite(r, ("median_us", "p20_us", "p80_us", "time_vs_baseline", "gbps", "frac_of_copy"))
        assert r["baseline"] == "torch.optim.AdamW(fused=True)" and r["timing"], r
        assert r["device"] == "NVIDIA H200"
        assert r["fraction_of_hbm_peak"] is not None
    _targets_measured(tmp_path, issue=4, count=2)


def test_bench_distill_main(shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    mod = _bench("bench_distill", monkeypatch)
    monkeypatch.setattr(mod, "SHAPES", {"tiny": (64, 512)})
    mod.main()
    rows = _rows(tmp_path / "distill.json")
    ops_ = ["distill_fwd", "distill_bwd", "loss_fused", "loss_reference", "loss_ce_only_torch"]
    for dtype in ("bfloat16", "float32"):
        assert [r["op"] for r in rows if r["dtype"] == dtype] == ops_
    for r in rows:
        _finite(r, ("median_us", "p20_us", "p80_us", "time_vs_fused_loss"))
        if r["op"].startswith("distill_"):
            _finite(r, ("gbps", "fraction_of_copy_ceiling", "fraction_of_hbm_peak"))
        else:
            assert r["gbps"] is None, r


def test_bench_cast_step_main(shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    pytest.importorskip("transformers")
    mod = _bench("bench_cast_step", monkeypatch)
    monkeypatch.setattr(mod, "VOCAB", 512)
    # the optimizer-alone timings must step on real gradients, never on zeroed ones
    seen: list[float] = []
    step = cast_ext.AdamS.step

    def recording_step(self: Any, *a: Any, **kw: Any) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(max((float(g.abs().max()) for g in grads), default=0.0))
        return step(self, *a, **kw)

    monkeypatch.setattr(cast_ext.AdamS, "step", recording_step)
    mod.main(["--device", "cuda", "--profile"])
    rows = _rows(tmp_path / "cast_step.json")
    assert [(r["op"], r["impl"]) for r in rows] == [
        ("train_step", "dense_adamw"),
        ("train_step", "cast"),
        ("optimizer_step", "adamw"),
        ("optimizer_step", "adams"),
        ("fwd_bwd", "dense"),
        ("fwd_bwd", "cast_student"),
        ("fwd_bwd", "cast_student_parametrized"),
        ("forward", "cast_teacher"),
        ("train_step", "cast_graphed_teacher"),  # eager here: the shim's tensors are on the CPU
    ]
    for r in rows:
        _finite(r, ("median_us", "p20_us", "p80_us", "time_vs_baseline", "host_us"))
        assert r["device"] == "cuda"
    profile = (tmp_path / "cast_step_profile.txt").read_text()
    assert "== dense_adamw" in profile and "== cast" in profile and "aten::" in profile
    assert seen and min(seen) > 0, seen


def test_bench_sparse24_gemm_main(shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    mod = _bench("bench_sparse24_gemm", monkeypatch)
    monkeypatch.setattr(mod, "MODELS", {"a": [(64, 128), (96, 256)], "b": [(64, 128)]})
    monkeypatch.delenv("CAST_EXT_BENCH_QUICK")  # quick mode's M go to 4096
    monkeypatch.setattr(mod, "TOKENS", [1, 16, 64])
    mod.main()
    rows = _rows(tmp_path / "sparse24_gemm.json")
    assert {(r["n"], r["k"]) for r in rows} == {(64, 128), (96, 256)}
    assert {r["m"] for r in rows} == {1, 16, 64}
    by_m = {m: {r["impl"] for r in rows if r["m"] == m and r["n"] == 64} for m in (1, 64)}
    common = {"dense", "cast_ext_cslt", "torch_cslt", "torch_cslt_searched", "sparse_linear"}
    assert by_m[1] == common | {"packed"} and by_m[64] == common, by_m
    for r in rows:
        assert r["correct"] is True, r
        _finite(
            r,
            (
                "median_us", "tflops", "gbps", "fraction_of_copy_gbps", "measured_mm_tflops",
                "fraction_of_measured_mm", "speedup_vs_dense", "speedup_vs_torch_cslt",
            ),
        )  # fmt: skip
        assert r["path"] in {"dense", "cast_ext_cslt", "torch_cslt", "torch_cslt_searched",
                             "packed", "sparse"}  # fmt: skip
        assert r["peak_tflops"] is None or r["fraction_of_peak"] is not None
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "sparse24_gemm.png").is_file()
    # no MLP weight at M >= 4096 here: that target's logic is test_targets_verdicts'
    checks = _targets_measured(tmp_path, issue=5, count=3, skip="MLP")
    assert "(6 rows)" in checks[0].measured, checks[0]  # SparseLinear: 2 weights x 3 M


def test_bench_experts_main(shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    pytest.importorskip("transformers")
    mod = _bench("bench_experts", monkeypatch)
    monkeypatch.setattr(mod, "QUICK_SHAPES", {"a": (4, 64, 32, 2), "b": (2, 32, 64, 1)})
    returned = mod.main(["--device", "cuda"])
    rows = _rows(tmp_path / "experts.json")
    assert rows == json.loads(json.dumps(returned))
    assert [(r["shape"], r["tokens"], r["impl"]) for r in rows] == [
        (shape, tokens, impl)
        for shape in ("a", "b")
        for tokens in (1, 16, 64)
        for impl in ("dense_grouped_mm", "sparse_experts")
    ]
    for r in rows:
        assert r["correct"] is True and r["device"] == "NVIDIA H200", r
        _finite(r, ("median_us", "device_us", "speedup_vs_dense", "device_speedup_vs_dense"))
        _finite(r, ("gbps", "fraction_of_hbm_peak", "tflops"))
        assert 1 <= r["experts_hit"] <= r["experts"], r
        if r["impl"] == "dense_grouped_mm":
            assert r["speedup_vs_dense"] == r["device_speedup_vs_dense"] == 1.0, r


@pytest.mark.filterwarnings("ignore:cast_ext.nn.SparseLinear. cuSPARSELt failed")
def test_bench_sparse24_gemm_keeps_going_past_a_failing_implementation(
    shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The wrapper's first contact with a GPU may raise: that implementation gets a row with
    its error and the others are timed (one exception ended the run, and the first weight's
    rows were never written); the JSON is written after every M."""
    mod = _bench("bench_sparse24_gemm", monkeypatch)
    monkeypatch.setattr(mod, "MODELS", {"a": [(64, 128)]})
    monkeypatch.delenv("CAST_EXT_BENCH_QUICK")
    monkeypatch.setattr(mod, "TOKENS", [1, 64])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cast_ext.cslt_linear: a cuSPARSELt failure")

    monkeypatch.setattr(mod.ops, "cslt_linear", broken)
    written: list[int] = []
    write_rows = mod.write_rows

    def counting(name: str, rows: list[Any]) -> Path:
        written.append(len(rows))
        return write_rows(name, rows)

    monkeypatch.setattr(mod, "write_rows", counting)
    mod.main()
    rows = _rows(tmp_path / "sparse24_gemm.json")
    failed = [r for r in rows if "error" in r]
    assert {(r["impl"], r["m"]) for r in failed} == {("cast_ext_cslt", 1), ("cast_ext_cslt", 64)}
    assert all("a cuSPARSELt failure" in r["error"] for r in failed)
    timed = [r for r in rows if "error" not in r]
    assert {r["impl"] for r in timed} >= {"dense", "torch_cslt", "sparse_linear"}
    for r in timed:
        _finite(r, ("median_us", "speedup_vs_dense", "speedup_vs_torch_cslt"))
    assert written[:2] == [len([r for r in rows if r["m"] == 1]), len(rows)]
    vs_torch = [c for c in targets.check_all(tmp_path) if "`cast_ext_cslt`'s speedup" in c.what]
    assert [(c.verdict, c.measured) for c in vs_torch] == [("NOT met", "2 row(s) failed")]


def test_interleaved_timing_rotates_the_order_each_round(shim: _Shim) -> None:
    """Every round calls each implementation once, starting one further along the list, with
    the flush before every timed call; each name gets ``reps`` samples."""
    harness = importlib.import_module("benchmarks._harness")
    calls: list[str] = []
    flushes: list[int] = []
    fns = {name: (lambda i, name=name: calls.append(name)) for name in ("a", "b", "c")}
    stats = harness.cuda_time_interleaved(
        fns, warmup=1, reps=4, flush=lambda: flushes.append(len(calls))
    )
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    timed = calls[3:]
    assert [timed[3 * r] for r in range(4)] == ["a", "b", "c", "a"]
    assert all(sorted(timed[3 * r : 3 * r + 3]) == ["a", "b", "c"] for r in range(4))
    assert flushes == list(range(3, 15))  # one before each timed call
    assert set(stats) == {"a", "b", "c"} and all(len(t) == 3 for t in stats.values())


def test_interleaved_timing_gives_consecutive_calls_different_inputs(shim: _Shim) -> None:
    """The timed calls rotate over the input copies one call at a time: no call reads the copy
    the call before it read (with one copy per round, every callable after the first found its
    input in the L2)."""
    harness = importlib.import_module("benchmarks._harness")
    used: list[tuple[str, int]] = []
    fns = {name: (lambda i, name=name: used.append((name, i))) for name in ("a", "b", "c")}
    harness.cuda_time_interleaved(fns, n_inputs=4, warmup=0, reps=8)
    copies = [i for _, i in used]
    assert copies == [k % 4 for k in range(24)]
    assert all(len({i for n, i in used if n == name}) > 1 for name in fns)


def test_bench_sparse24_gemm_times_each_alone_if_the_rounds_fail(
    shim: _Shim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """An implementation that raises while the rounds run: each is then timed alone, so that
    the others still get their rows."""
    mod = _bench("bench_sparse24_gemm", monkeypatch)
    monkeypatch.setattr(mod, "MODELS", {"a": [(64, 128)]})
    monkeypatch.delenv("CAST_EXT_BENCH_QUICK")
    monkeypatch.setattr(mod, "TOKENS", [1])

    def fails(*a: Any, **k: Any) -> Any:
        raise RuntimeError("an implementation failed in a round")

    monkeypatch.setattr(mod, "cuda_time_interleaved", fails)
    mod.main()
    rows = _rows(tmp_path / "sparse24_gemm.json")
    assert {r["impl"] for r in rows} == {
        "dense", "cast_ext_cslt", "torch_cslt", "torch_cslt_searched", "sparse_linear", "packed"
    }  # fmt: skip
    for r in rows:
        assert "error" not in r, r
        _finite(r, ("median_us", "speedup_vs_dense"))


def test_targets_verdicts(tmp_path: Path) -> None:
    """benchmarks/targets.py on hand-made rows: a floor met exactly and missed, a ceiling, the
    GEMM's MLP-and-M filter, a failed row counting against its targets, a missing file."""
    env = {"gpu": "NVIDIA H200", "git_sha": "abc1234"}

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}))

    def mask(op: str, frac: float, **extra: Any) -> dict[str, Any]:
        return {"op": op, "impl": "cast_ext", "dtype": "bfloat16", "shape": "s",
                "fraction_of_clone_gbps": frac, **extra}  # fmt: skip

    tile = {"torch._sparse_semi_structured_tile": 1.5, "torch._cslt_compress": 0.9}
    write("sparse24_mask", [
        mask("sparse24_mask", 0.80), mask("sparse24_mask", 0.95),
        mask("sparse24_prune", 0.79), mask("sparse24_compress", 0.9, speedup_vs=tile),
        {**mask("sparse24_mask", 0.1), "impl": "cast_ext[no-check]"},  # not the default op
    ])  # fmt: skip
    amortized = "cast_ext.adams_step_ (refresh every 10, amortized)"
    write("adams", [{"impl": amortized, "frac_of_copy": 0.91, "time_vs_baseline": 1.01}])

    def gemm(impl: str, m: int, n: int, k: int, vs_dense: float, **extra: Any) -> dict[str, Any]:
        return {"op": "sparse24_gemm", "impl": impl, "m": m, "n": n, "k": k, "correct": True,
                "speedup_vs_dense": vs_dense, "speedup_vs_torch_cslt": 1.2, **extra}  # fmt: skip

    write("sparse24_gemm", [
        gemm("cast_ext_cslt", 4096, 11008, 4096, 1.31),
        gemm("cast_ext_cslt", 16384, 4096, 14336, 1.4),
        gemm("cast_ext_cslt", 1024, 11008, 4096, 0.9),  # M < 4096: not in the 1.3x target
        gemm("cast_ext_cslt", 4096, 4096, 4096, 1.0),  # attention: not in it either
        gemm("sparse_linear", 1, 4096, 4096, 0.99),
        {**gemm("sparse_linear", 16, 4096, 4096, 2.0), "correct": False},
    ])  # fmt: skip
    got = {
        c.what.split(" ")[0] + f" {c.target}": (c.verdict, c.measured)
        for c in targets.check_all(tmp_path)
    }
    assert got["`sparse24_mask` >= 0.80"] == ("met", "worst 0.80 at bfloat16 s (2 rows)")
    assert got["`sparse24_prune` >= 0.80"][0] == "NOT met"
    assert got["`sparse24_compress` >= 1.00x"] == ("met", "worst 1.50x at bfloat16 s (1 row)")
    assert got["`sparse24_compress` -"] == ("reported", "0.90x")
    assert got["AdamS >= 0.90"][0] == "met" and got["AdamS <= 1.00x"][0] == "NOT met"
    assert got["our >= 1.30x"] == ("met", "worst 1.31x at ? ? (2 rows)")
    assert got["dispatched >= 0.98x"] == ("NOT met", "worst 0.99x at ? ? (1 row); 1 row(s) failed")
    assert not any(v[0] == "not measured" for v in got.values()), got
    (tmp_path / "adams.json").unlink()
    lines = targets.report(tmp_path)
    assert "gpu NVIDIA H200" in lines[0] and "git_sha abc1234" in lines[0]
    assert sum("| not measured |" in line for line in lines) == 2
    assert targets.main([str(tmp_path / "missing")]) == 1


def test_targets_demo_checks(tmp_path: Path) -> None:
    """benchmarks/targets.py on a demo's results.json: CAST after finalize against the
    fine-tune, both against one-shot (at most a quarter of its perplexity), CAST's measured
    shrink against decay_budget's target; an incomplete run says so; no file, no rows."""
    assert [c for c in targets.check_all(tmp_path) if c.issue == 7] == []

    def write(cast: float, ft: float, shrink: float, complete: bool = True) -> dict[str, Any]:
        runs = {
            "oneshot": {"after": {"ppl": 1000.0}},
            "finetune": {"after": {"ppl": ft}},
            "cast": {"after": {"ppl": cast}, "steps": 1200, "measured_shrink": shrink,
                     "decay_budget": {"target_ratio": 0.1}},
        }  # fmt: skip
        res = {"preset": {"name": "gpu"}, "device": "cuda", "complete": complete, "runs": runs}
        (tmp_path / "results.json").write_text(json.dumps(res))
        checks = [c for c in targets.check_all(tmp_path) if c.issue == 7]
        return {c.target: (c.verdict, c.measured, c.what) for c in checks}

    got = write(cast=60.0, ft=80.0, shrink=0.05)
    assert got["< fine-tune's"][:2] == ("met", "60.0 vs 80.0 (1200 CAST steps)")
    assert got["<= 0.25"][:2] == ("met", "worst 0.080 (one-shot 1000.0)")
    assert got["<= 0.10"][:2] == ("met", "0.050 after 1200 steps")
    assert "preset gpu on cuda)" in got["< fine-tune's"][2]
    got = write(cast=300.0, ft=80.0, shrink=0.2, complete=False)
    assert [v[0] for v in got.values()] == ["NOT met"] * 3
    assert "preset gpu on cuda, incomplete" in got["< fine-tune's"][2]
    lines = targets.report(tmp_path)
    assert sum("| 7 | demo (" in line for line in lines) == 3
    # gpu_demo.sh's report: issue 7's rows only, under the demo's own fields
    (tmp_path / "results.json").write_text(
        json.dumps({**json.loads((tmp_path / "results.json").read_text()), "git_sha": "abc1234"})
    )
    lines = targets.report(tmp_path, issue=7)
    assert "git_sha abc1234" in lines[0] and len(lines) == 4 + 3, lines
    assert targets.main(["--issue", "7", str(tmp_path)]) == 0


def test_targets_read_subfolders(tmp_path: Path) -> None:
    """benchmarks/targets.py on a GPU session's folder, whose calls each wrote a subfolder: the
    files below it are read (each once), a benchmark found twice counts with the rows of both,
    and each demo's checks name its folder."""
    env = {"gpu": "NVIDIA H200", "git_sha": "abc1234"}
    for sub, frac in (("core", 0.85), ("rerun", 0.7)):
        (tmp_path / sub).mkdir()
        rows = [{"op": "sparse24_mask", "impl": "cast_ext", "dtype": "bfloat16", "shape": sub,
                 "fraction_of_clone_gbps": frac}]  # fmt: skip
        (tmp_path / sub / "sparse24_mask.json").write_text(json.dumps({"env": env, "rows": rows}))
    for sub in ("demo-a", "demo-b"):
        (tmp_path / sub).mkdir()
        runs = {"oneshot": {"after": {"ppl": 1000.0}}, "finetune": {"after": {"ppl": 80.0}},
                "cast": {"after": {"ppl": 60.0}, "steps": 10}}  # fmt: skip
        res = {"preset": {"name": "gpu"}, "device": "cuda", "complete": True, "runs": runs}
        (tmp_path / sub / "results.json").write_text(json.dumps(res))
    (tmp_path / "other.json").write_text("not json: never read")
    checks = targets.check_all(tmp_path)
    mask = next(c for c in checks if c.what.startswith("`sparse24_mask`"))
    assert (mask.verdict, mask.measured) == ("NOT met", "worst 0.70 at bfloat16 rerun (2 rows)")
    vs_ft = [c.what for c in checks if c.target == "< fine-tune's"]
    assert [w.split(":")[0] for w in vs_ft] == ["demo (demo-a", "demo (demo-b"], vs_ft
    assert "gpu NVIDIA H200" in targets.report(tmp_path)[0]


def test_targets_report_a_file_cut_off_mid_write(tmp_path: Path) -> None:
    """A benchmark killed while writing its JSON (before writes were atomic) left half a file:
    the report names it and checks the rest, where it had raised."""
    rows = [{"op": "sparse24_mask", "impl": "cast_ext", "dtype": "bfloat16", "shape": "q",
             "fraction_of_clone_gbps": 0.9}]  # fmt: skip
    (tmp_path / "sparse24_mask.json").write_text(json.dumps({"env": {}, "rows": rows}))
    (tmp_path / "sparse24_gemm.json").write_text('{"env": {}, "rows": [{"op": "sparse24_ge')
    lines = targets.report(tmp_path)
    assert any(line.startswith("Not read: ") and "sparse24_gemm.json" in line for line in lines)
    assert any("`sparse24_mask` GB/s" in line and "| met |" in line for line in lines)


def test_benchmark_json_is_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """write_rows writes a temporary file and renames it over the old one: a kill mid-write
    leaves the previous rows, never half a file."""
    harness = importlib.import_module("benchmarks._harness")
    path = harness.write_rows("probe", [{"a": 1}], tmp_path)
    assert json.loads(path.read_text())["rows"] == [{"a": 1}]

    def killed(self: Path, text: str) -> None:
        Path.write_bytes(self, text[:10].encode())
        raise KeyboardInterrupt  # the stage's SIGINT, mid-write

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        harness.write_rows("probe", [{"a": 2}], tmp_path)
    monkeypatch.undo()
    assert json.loads(path.read_text())["rows"] == [{"a": 1}]
