"""Exact resume across processes: train k steps, ``torch.save`` the model and the AdamS state
(masks, prev_masks, step counts, moments, bf16 masters), load them in a fresh Python process,
continue: bit for bit the run that was never interrupted.

The model has 2:4-eligible weights, a bf16 weight (fp32 master in the state), a learnable
per-channel scale and biases (dense group). The batches are a function of the step index, so
both processes see the same data without sharing RNG state.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda
from torch import Tensor, nn

from cast_ext import AdamS

STEPS, SPLIT = 16, 7  # 7: between refreshes (mask_interval 3: t = 0, 3, 6, 9, ...)
HP = {"lr": 1e-2, "weight_decay": 0.01, "decay": 5e-3, "total_steps": STEPS, "mask_interval": 3}


class Net(nn.Module):
    """Linear -> scaled bf16 Linear -> Linear; ``scale`` is a learnable per-channel scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 24, bias=False).to(torch.bfloat16)
        self.scale = nn.Parameter(torch.ones(24))
        self.c = nn.Linear(24, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        h = self.b(h.bfloat16()).float() * self.scale
        return self.c(torch.tanh(h))


def make(device: str) -> tuple[Net, AdamS]:
    torch.manual_seed(0)
    model = Net().to(device)
    return model, AdamS(model.parameters(), **HP)


def train(model: Net, opt: AdamS, steps: range, device: str) -> None:
    for s in steps:
        gen = torch.Generator().manual_seed(1000 + s)
        x, y = torch.randn(6, 16, generator=gen), torch.randn(6, 8, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
        opt.step()


def snapshot(model: Net, opt: AdamS) -> dict[str, Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().cpu().clone()
        for key, val in opt.state[p].items():
            out[f"{name}.{key}"] = val.cpu().clone()
    return out


def _continue_in_this_process(ckpt: str, out: str, device: str) -> None:
    """Run in the fresh process: load the checkpoint into a new model/optimizer, finish."""
    model, opt = make(device)
    sd = torch.load(ckpt, map_location=device)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])
    train(model, opt, range(SPLIT, STEPS), device)
    torch.save(snapshot(model, opt), out)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_resume_in_fresh_process_is_bitwise(device: str, tmp_path: Path) -> None:
    model, opt = make(device)
    train(model, opt, range(SPLIT), device)
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, ckpt)
    train(model, opt, range(SPLIT, STEPS), device)
    want = snapshot(model, opt)
    assert {"b.weight.master", "a.weight.mask", "a.weight.prev_mask"} <= want.keys()

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_resume as t; "
        "t._continue_in_this_process(sys.argv[2], sys.argv[3], sys.argv[4])"
    )
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, here, str(ckpt), str(out), device],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    assert got.keys() == want.keys()
    for key, val in want.items():
        assert got[key].dtype == val.dtype, key
        assert torch.equal(got[key], val), key
    # The run did something to resume: masks were refreshed and the weights moved.
    assert float(want["a.weight.step"]) == STEPS
    assert not torch.equal(want["a.weight.mask"], want["a.weight.prev_mask"])
