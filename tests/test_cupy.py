"""CuPy on the GPU: an independent second implementation of the mask rule to cross-check the CUDA
kernels, and zero-copy DLPack interop for users who hold CuPy arrays. Skipped without a GPU or
CuPy (the GPU machine has cupy-cuda13x)."""

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
