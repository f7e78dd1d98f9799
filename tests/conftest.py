"""Shared test configuration: devices, per-dtype tolerances, seeding.

Tolerances are written once here. Masks are discrete and compared exactly; tolerances apply to
floating results (optimizer states, GEMM outputs), never by skipping an assertion.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

import cast_ext

CUDA_OK = torch.cuda.is_available() and cast_ext.cuda_kernels_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])
if os.environ.get("CAST_EXT_TEST_DEVICE"):
    DEVICES = [os.environ["CAST_EXT_TEST_DEVICE"]]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) per dtype, for results computed in that dtype.
TOL = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close_trained(
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    loose_atol: float,
    max_outside: float = 0.01,
    msg: str = "",
) -> None:
    """Two runs of the same training whose reductions add in different orders (ranks, shards,
    another CPU's BLAS): all but ``max_outside`` of the elements within (``rtol``, ``atol``), and
    every element within (``rtol``, ``loose_atol``).

    Adam divides by the gradient's running magnitude, so an element whose gradient is itself at
    the level of rounding noise can take a step of up to ``lr`` in another direction: a few such
    elements drift further than the rest (2.3e-6 at lr 1e-2 over 20 steps, measured on an AMD
    EPYC whose BLAS sums in another order than the Intel machine's, where all were within 1e-6).
    """
    torch.testing.assert_close(got, want, rtol=rtol, atol=loose_atol, msg=msg)
    outside = (got.double() - want.double()).abs() > atol + rtol * want.double().abs()
    share = outside.double().mean().item() if outside.numel() else 0.0
    assert share <= max_outside, f"{msg}: {share:.2%} of the elements differ by more than {atol}"


# AdamS hyperparameters of the kernel-vs-reference tests: a short ramp (total_steps 7) and a
# refresh every 3 steps, so a 10-step run crosses both.
ADAMS_HP = {
    "lr": 1e-3,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "decay": 1e-3,
    "total_steps": 7,
    "mask_interval": 3,
}


# The op's list arguments, in its argument order (dicts of AdamS lists are keyed by these).
ADAMS_LIST_KEYS = (
    "params",
    "grads",
    "exp_avgs",
    "exp_avg_sqs",
    "masks",
    "steps",
    "masters",
    "prev",
)


def adams_args(d: dict[str, list]) -> tuple[list, ...]:
    """The op's positional list arguments from a dict keyed by ADAMS_LIST_KEYS."""
    return tuple(d[key] for key in ADAMS_LIST_KEYS)


def clone_lists(d: dict[str, list]) -> dict[str, list]:
    return {key: [t.clone() for t in ts] for key, ts in d.items()}


def assert_adams_state_close(got: dict[str, list], want: dict[str, list]) -> None:
    """AdamS lists (params, states, masks, steps by key) against another run of the same step:
    masks, prev masks and steps exactly; fp32 floats to 4x fp32 rounding relative to each
    tensor's scale (values near 0 carry no weight); low-precision params to their dtype."""
    rtol = TOL[torch.float32][0] * 4
    for key in want:
        for i, (x, y) in enumerate(zip(got[key], want[key], strict=True)):
            msg = f"{key}[{i}]"
            if not x.is_floating_point() or key == "steps":
                assert torch.equal(x, y), msg
            elif key == "params" and x.dtype != torch.float32:
                rt, at = TOL[x.dtype]
                torch.testing.assert_close(x, y, rtol=rt, atol=at, msg=msg)
            else:
                scale = float(y.abs().max()) if y.numel() else 0.0
                torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * scale, msg=msg)


def tol(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


requires_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA kernels")


# The CPU kernels' instruction-set versions, lowest first (csrc/cpu/isa.h; "avx512_bf16" is
# "avx512" with the bf16 GEMM's vdpbf16ps path).
CPU_ISAS = ["default", "avx2", "avx512", "avx512_bf16"]


def capped_isa(cap: str) -> str:
    """The version a process started with CAST_EXT_CPU_ISA=cap runs on this machine."""
    native = cast_ext.build_info()["cpu_isa"]
    return CPU_ISAS[min(CPU_ISAS.index(cap), CPU_ISAS.index(native))]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that runs CUDA code `cuda`: a `cuda` device parameter, a skip that needs a
    GPU, or "cuda" in its name. The GPU suite runs `-m cuda` first (device time is short) and
    the CPU-only rest last."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = [] if callspec is None else [str(v) for v in callspec.params.values()]
        gated = any(
            m.name == "skipif" and "CUDA GPU" in str(m.kwargs.get("reason", ""))
            for m in item.iter_markers()
        )
        if "cuda" in params or gated or "cuda" in item.name.lower():
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode_kept() -> Iterator[None]:
    """Every test leaves autograd's grad mode as it found it (the suite runs in one process: a
    test that left it off made dozens of later ones fail far from the cause)."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    torch.set_grad_enabled(before)
    assert after == before, f"the test left grad mode {after} (was {before})"


@pytest.fixture(autouse=True)
def _malloc_untouched() -> Iterator[None]:
    """``cast.tune_cpu_malloc`` changes glibc's malloc for the whole process, for good: a test
    that ran the demo on the CPU would leave the suite's freed memory resident, which
    test_memory's peak-RSS measurements read (the suite runs in one process). Here it does
    nothing; its own tests run it in fresh processes. Its own MonkeyPatch, not the
    ``monkeypatch`` fixture: that would be set up before (so torn down after) every fixture a
    test names, and undo a test's patches with values a fixture (the shim of
    test_bench_gpu_paths) had patched in and taken back already."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cast_ext.cast, "tune_cpu_malloc", lambda: False)
        yield


@pytest.fixture(autouse=True)
def _cuda_context_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """A CUDA fault (an illegal instruction, say) is sticky: every later CUDA call of the process
    fails. On the H200 (2026-11-30) one fault in a cuSPARSELt call became 43 errors in later tests.
    After each test, a failed synchronize ends the process: a pytest-xdist worker exits (the
    test is reported as having crashed it, and a new worker takes the remaining tests); a plain
    run stops and names the test."""
    yield
    if not (CUDA_OK and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:  # torch.AcceleratorError
        msg = f"CUDA context broken after {request.node.nodeid}: {str(e).splitlines()[0]}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            print(msg, file=sys.stderr, flush=True)
            os._exit(3)
        pytest.exit(msg, returncode=3)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- cuSPARSELt tests ---------------------------------------------------------------
CUSPARSELT_OK = CUDA_OK and cast_ext.cusparselt_available()
requires_cusparselt = pytest.mark.skipif(
    not CUSPARSELT_OK, reason="needs a CUDA GPU and a cast_ext built with cuSPARSELt"
)


def cslt_fp16_refusal() -> str:
    """Why cuSPARSELt float16 is refused on this GPU ("" where it runs: sm_90 with cuSPARSELt
    <= 0.8.0 faulted the H200, csrc/cuda/cusparselt.cpp's fp16_refusal)."""
    return cast_ext._C.cslt_fp16_refusal(0) if CUSPARSELT_OK else ""


def gemm_tol(dtype: torch.dtype, k: int) -> float:
    """Error bound of a GEMM with fp32 accumulation over k terms, relative to sum |x_i w_i|.

    The output rounding of ``dtype`` (its TOL rtol) plus fp32 accumulation (k * 2^-24).
    """
    return TOL[dtype][0] + 2.0 * k * 2.0**-24


# ---- distillation loss tests -----------------------------------------------------------


def distill_inputs(
    rows: int, vocab: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
    scale: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Student and teacher logits ``[rows, vocab]`` and labels; row 1 ignored (-100) when there
    are more than 2 rows."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)
    t = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=gen)
    if rows > 2:
        y[1] = -100
    return s.to(device), t.to(device), y.to(device)


def distill_peaked_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 rows of 64 fp32 logits, the student's and the teacher's each peaked near 1e3 at a
    column of its own (the largest softmax entries, where a backward that rounds s / T unlike
    the forward's log-sum-exp is off), and labels."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(8, 64, generator=gen)
    t = torch.randn(8, 64, generator=gen)
    s[:, 5] += 1000.0
    t[:, 9] += 1000.0
    return s, t, torch.randint(0, 64, (8,), generator=gen)


def distill_inf_inputs(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits ``[8, 40]`` with +inf entries: a student +inf off the label (row 0) and at it
    (row 2), an ignored row (1), a teacher +inf (3), two student +infs (4); row 5 finite; a NaN
    beside a +inf, the student's (6) and the teacher's (7), each on both sides of the +inf."""
    s, t, y = distill_inputs(8, 40, torch.float32, seed=5)
    inf, nan = float("inf"), float("nan")
    s[0, 3] = s[1, 0] = s[2, 7] = s[4, 1] = s[4, 2] = t[3, 11] = inf
    s[6, 20] = t[7, 30] = inf
    s[6, 5] = s[6, 33] = t[7, 2] = t[7, 38] = nan
    y[0], y[2], y[4] = 0, 7, 9
    return s.to(device), t.to(device), y.to(device)


def tiny_llama(vocab: int, tied: bool = True) -> torch.nn.Module:
    """A random 2-layer LLaMA (hidden 32, MLP 64, 4 heads, 2 KV heads) in eval mode; needs
    transformers."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing on a transformers model, by the name its version
    has: ``activation_checkpointing_enable`` (transformers >= 5.24), else
    ``gradient_checkpointing_enable`` (5.17, the GPU machine's)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
