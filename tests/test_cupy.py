"""CuPy on the GPU: independent second implementations (the mask rule, the packed-format
decompression and GEMM, one AdamS step written from SPEC section 2) to cross-check the CUDA
kernels, and zero-copy DLPack interop for users who hold CuPy arrays. Skipped without a GPU or
CuPy (the GPU machine has cupy-cuda13x). The CuPy code only uses NumPy's API, so it was checked
once on the CPU kernels with NumPy standing in for CuPy."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_OK

import cast_ext

cp = pytest.importorskip("cupy") if CUDA_OK else None
pytestmark = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA kernels")


def cupy_nm_mask(w, n: int, m: int):
    """Rank each element by the members that beat it (larger |w|, or equal |w| at a lower
    index), in CuPy array ops; keep the elements of rank < n."""
    a = cp.abs(w.astype(cp.float32)).reshape(-1, m)
    pos = cp.arange(m)
    bigger = a[:, None, :] > a[:, :, None]
    equal_lower = (a[:, None, :] == a[:, :, None]) & (pos[None, None, :] < pos[None, :, None])
    rank = (bigger | equal_lower).sum(axis=2)
    return (rank < n).reshape(w.shape)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_cuda_mask_matches_cupy(n, m):
    x = cp.random.standard_normal((513, 1024), dtype=cp.float32)
    x[::7] = cp.round(x[::7] * 2) / 2  # many ties
    ours = cast_ext.nm_mask(torch.from_dlpack(x), n, m)
    assert cp.array_equal(cp.from_dlpack(ours), cupy_nm_mask(x, n, m))


def test_dlpack_zero_copy_round_trip():
    x = cp.random.standard_normal((256, 512), dtype=cp.float32).astype(cp.float16)
    t = torch.from_dlpack(x)
    assert t.data_ptr() == x.data.ptr  # zero-copy in
    values, meta = cast_ext.sparse24_compress(t)
    v_cp, m_cp = cp.from_dlpack(values), cp.from_dlpack(meta)
    assert v_cp.data.ptr == values.data_ptr()  # zero-copy out
    dense = cast_ext.sparse24_decompress(torch.from_dlpack(v_cp), torch.from_dlpack(m_cp))
    keep = cupy_nm_mask(x, 2, 4)
    assert cp.array_equal(cp.from_dlpack(dense), cp.where(keep, x, cp.float16(0)))


def cupy_decompress(values, meta, k: int):
    """W [n, k] from the packed form, in CuPy: group g's nibble is bits 4*(g%2).. of byte g//2;
    its first kept position takes values[:, 2g], the second values[:, 2g + 1]."""
    n = values.shape[0]
    groups = k // 4
    g = cp.arange(groups)
    nib = (meta[:, g // 2].astype(cp.int32) >> (4 * (g % 2))) & 0xF  # [n, groups]
    bit = (nib[:, :, None] >> cp.arange(4)) & 1  # [n, groups, 4]
    before = cp.cumsum(bit, axis=2) - bit  # kept positions below each one
    vals = values.reshape(n, groups, 2)
    pick = cp.take_along_axis(vals, cp.minimum(before, 1).astype(cp.int64), axis=2)
    return cp.where(bit == 1, pick, cp.zeros((), values.dtype)).reshape(n, k)


# the packed small-M kernels (M <= 16: SIMT at K = 1040, tensor cores at M >= 2 with K = 1024 on
# sm80+) and the fallback
@pytest.mark.parametrize(
    "m,k", [(1, 1040), (7, 1040), (16, 1040), (40, 1040), (7, 1024), (16, 1024)]
)
def test_cuda_sparse24_gemm_matches_cupy(m, k):
    n = 96
    w = cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16)
    w = cp.where(cupy_nm_mask(w, 2, 4), w, cp.float16(0))
    x = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
    bias = cp.random.standard_normal(n, dtype=cp.float32).astype(cp.float16)
    values, meta = cast_ext.sparse24_compress(torch.from_dlpack(w))
    assert cp.array_equal(cupy_decompress(cp.from_dlpack(values), cp.from_dlpack(meta), k), w)
    y = cast_ext.sparse24_gemm(torch.from_dlpack(x), values, meta, torch.from_dlpack(bias))
    want = x.astype(cp.float64) @ w.astype(cp.float64).T + bias.astype(cp.float64)
    scale = cp.abs(x.astype(cp.float64)) @ cp.abs(w.astype(cp.float64)).T + cp.abs(bias)
    err = cp.abs(cp.from_dlpack(y).astype(cp.float64) - want) / (scale + 1e-30)
    assert float(err.max()) <= 1e-3 + 2 * k * 2.0**-24


def cupy_adams_step(w, g, mu, v, keep, t: int, *, lr, beta1, beta2, eps, decay, total):
    """SPEC section 2, literally, in CuPy fp64 (an independent implementation)."""
    mu = beta1 * mu + (1 - beta1) * g
    alpha = min(t / total, 1.0)
    mu_eff = cp.where(keep, mu, (1 - alpha) * mu + alpha * decay * cp.sign(w))
    v = beta2 * v + (1 - beta2) * mu_eff**2
    w = w - lr * (mu_eff / (1 - beta1 ** (t + 1))) / (cp.sqrt(v / (1 - beta2 ** (t + 1))) + eps)
    return w, mu, v


def test_cuda_adams_step_matches_cupy():
    """Five steps of the CUDA op (refresh at t = 0: mask from |w|) against the CuPy version; the
    mask is held between refreshes, so CuPy keeps the step-0 mask too."""
    hp = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "decay": 1e-2}
    w0 = cp.random.standard_normal((64, 256), dtype=cp.float32)
    p = torch.from_dlpack(w0.copy())
    mu_t, v_t = torch.zeros_like(p), torch.zeros_like(p)
    mask_t = torch.zeros(64, 32, dtype=torch.uint8, device=p.device)
    step_t = torch.zeros((), device=p.device)
    w, mu, v = w0.astype(cp.float64), cp.zeros((64, 256)), cp.zeros((64, 256))
    keep = cupy_nm_mask(w0, 2, 4)
    for t in range(5):
        g = cp.random.standard_normal((64, 256), dtype=cp.float32)
        cast_ext.ops.adams_step_(
            [p], [torch.from_dlpack(g)], [mu_t], [v_t], [mask_t], [step_t], [],
            **hp, total_steps=4, mask_interval=10,
        )  # fmt: skip
        w, mu, v = cupy_adams_step(w, g.astype(cp.float64), mu, v, keep, t, total=4, **hp)
    assert int(step_t) == 5
    assert cp.array_equal(cp.from_dlpack(cast_ext.unpack_mask(mask_t, 256)), keep)
    for ours, want in ((p, w), (mu_t, mu), (v_t, v)):
        got = cp.from_dlpack(ours).astype(cp.float64)
        assert float(cp.abs(got - want).max()) <= 1e-5 * float(cp.abs(want).max()), "adams"
