"""Memory: an AdamS step allocates no full-size temporaries; the distillation loss allocates
nothing [tokens, vocab]-sized but the gradient.

On the CPU the kernel's buffers come from ``new`` (not torch's allocator), so the peak is
measured as the process's peak resident set: ``/proc/self/clear_refs`` (5) resets ``VmHWM`` to
the current RSS, the step runs, and the new ``VmHWM`` minus the old is what the step touched
beyond what was resident. A full-size temporary would add the param's size; the step's one
temporary is the refresh's packed mask, 1 bit per element (1/32 of an fp32 param). The
measurement is calibrated in the test by a statement that does allocate one (``p + g``). On
CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import requires_cuda
from torch import nn

from cast_ext import AdamS, cast

ROWS, COLS = 4096, 4096  # 64 MiB of fp32
PARAM_BYTES = ROWS * COLS * 4
LIMIT = PARAM_BYTES // 8  # far below a full-size temporary, above the 1/32 packed mask


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _peak_growth(fn) -> int:
    """Bytes by which the resident set's peak during ``fn()`` exceeds the RSS before it."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _hwm()
    fn()
    return _hwm() - before


def _cuda_peak_growth(fn) -> int:
    """Bytes by which CUDA's allocated peak during ``fn()`` exceeds the allocation before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _can_measure() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _hwm()
    except OSError:
        return False
    return True


def _model(device: str) -> tuple[nn.Parameter, AdamS]:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(ROWS, COLS, device=device) * 0.02)
    # mask_interval=1: every step refreshes (the step with the most work and temporaries).
    opt = AdamS([w], lr=1e-3, decay=1e-3, total_steps=10, mask_interval=1)
    w.grad = torch.randn_like(w) * 1e-3
    opt.step()  # creates the state (full-size by design: exp_avg, exp_avg_sq, masks)
    return w, opt


@pytest.mark.skipif(not _can_measure(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_step_allocates_no_full_size_temporary() -> None:
    w, opt = _model("cpu")
    opt.step()  # warm: thread pool, allocator arenas
    grown = _peak_growth(opt.step)
    assert grown < LIMIT, f"the step's peak grew by {grown / 2**20:.1f} MiB"
    # The measurement sees a full-size temporary when there is one.
    with torch.no_grad():
        seen = _peak_growth(lambda: w.add_(w.grad + 0.0))
    assert seen > 0.9 * PARAM_BYTES, f"calibration: saw only {seen / 2**20:.1f} MiB"
    assert float(opt.state[w]["step"]) == 3


@pytest.mark.skipif(not _can_measure(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_first_bf16_step_after_a_load_allocates_no_full_size_temporary() -> None:
    """The first step after load_state_dict compares each bf16 param with its fp32 master (a
    param written since wins): a chunk at a time, not with full-size temporaries."""
    torch.manual_seed(0)
    w = nn.Parameter((torch.randn(ROWS, COLS) * 0.02).bfloat16())
    hp = {"lr": 1e-3, "decay": 1e-3, "total_steps": 10, "mask_interval": 1}
    opt = AdamS([w], **hp)
    w.grad = (torch.randn_like(w, dtype=torch.float32) * 1e-3).bfloat16()
    opt.step()
    fresh = AdamS([w], **hp)
    fresh.load_state_dict(opt.state_dict())
    del opt
    grown = _peak_growth(fresh.step)
    assert grown < LIMIT, f"the step's peak grew by {grown / 2**20:.1f} MiB"


@requires_cuda
def test_cuda_step_allocates_no_full_size_temporary() -> None:
    _, opt = _model("cuda")
    opt.step()
    grown = _cuda_peak_growth(opt.step)
    assert grown < LIMIT, f"the step's peak grew by {grown / 2**20:.1f} MiB"


# ---- the distillation loss: the gradient is its only [tokens, vocab] allocation ------------------

TOKENS, VOCAB = 1024, 16384  # 64 MiB of fp32 logits per model


def _distill_step(device: str, impl: str):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(TOKENS, VOCAB, generator=gen).to(device).requires_grad_()
    t = torch.randn(TOKENS, VOCAB, generator=gen).to(device)
    y = torch.randint(0, VOCAB, (TOKENS,), generator=gen).to(device)

    def step() -> None:
        cast.distill_loss(s, t, y, impl=impl).backward()
        s.grad = None

    return step


@pytest.mark.skipif(not _can_measure(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_distill_loss_allocates_only_the_gradient() -> None:
    step = _distill_step("cpu", "auto")
    step()  # warm
    grown = _peak_growth(step)
    assert grown < PARAM_BYTES + LIMIT, f"fwd + bwd peak grew by {grown / 2**20:.1f} MiB"
    # calibration: the reference path's chunked fp32 temporaries are seen, well above the bound
    # (about 32 MiB of them: a suite run on 2026-12-01 saw 95.9 MiB in all, just under the
    # 96 MiB this asked for then, where the test alone sees more)
    ref = _distill_step("cpu", "reference")
    ref()
    seen = _peak_growth(ref)
    assert seen > PARAM_BYTES + 2 * LIMIT, f"calibration: saw only {seen / 2**20:.1f} MiB"


@requires_cuda
def test_cuda_distill_loss_allocates_only_the_gradient() -> None:
    step = _distill_step("cuda", "auto")
    step()
    grown = _cuda_peak_growth(step)
    assert grown < PARAM_BYTES + LIMIT, f"fwd + bwd peak grew by {grown / 2**20:.1f} MiB"
