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
