"""sparse24_gemm (packed format, CPU kernel / CUDA decompress+cuBLAS) and the cuSPARSELt ops.

Results are checked against ``F.linear`` in fp64 with the decompressed weight. The error is
measured relative to ``|x| @ |W|^T + |bias|`` (the GEMM's own scale), with the bound of
``conftest.gemm_tol``: the dtype's output rounding plus fp32 accumulation over K terms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    DTYPES,
    cslt_fp16_refusal,
    dtype_id,
    gemm_tol,
    requires_cusparselt,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cast_ext
from benchmarks.cuda_smoke import fp32_reductions
from cast_ext import ops, reference
from cast_ext.nn import SparseLinear

SHAPES = [  # (leading dims of x, N, K)
    ((1,), 8, 16),
    ((7,), 24, 12),  # odd M; K % 8 == 4 (the last meta byte holds one group)
    ((2, 5), 16, 40),  # 3-D input
    ((33,), 40, 64),
    ((0,), 8, 16),  # no rows
    # CUDA's packed small-M kernel (M <= 16, K % 16 == 0): one warp per row, 16-column chunks
    ((3,), 24, 64),
    ((2, 8), 40, 48),  # M = 16, 3-D
    ((5,), 12, 1040),  # 65 chunks: uneven across the 32 lanes; N not a multiple of 8 rows
    ((9,), 16, 2048),
    ((4,), 8, 100),  # CPU AVX-512 path: 3 blocks of 8 groups, then 1 group
    # CPU AVX-512 paths past M = 4: chunks of x copied side by side, the last chunk partial (fp32
    # at M = 8: 34 blocks of 8 groups in chunks of 16; bf16: 17 blocks of 16 groups in chunks of
    # 16)
    ((8,), 24, 1088),
    # CPU kernels with rows of x in the lanes (M >= 9; bf16 with AVX-512 BF16: the pairs kernel,
    # else the kept-value kernel): one tile of 16 rows of x; 3 tiles (a pair, then one alone),
    # tiles of 12 rows of W (the last partial), 261 groups in chunks of 128 (the last odd: its
    # final meta byte holds one group; fewer than 8 groups: the kept-value kernel's scalar tail)
    ((16,), 24, 1088),
    ((40,), 30, 1044),
    ((520,), 12, 16),  # blocks of 512 rows of x, the second of 8
]


def make_weight(n: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A random [n, k] weight, pruned to 2:4."""
    return ops.sparse24_prune(torch.randn(n, k, device=device).to(dtype))


def gemm_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """The largest error of ``y`` against ``F.linear`` in fp64, relative to the GEMM's own scale
    ``|x| @ |W|^T + |b|`` (0 for an empty ``y``)."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs() / (scale + 1e-30)
    return 0.0 if err.numel() == 0 else err.max().item()


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    err, bound = gemm_error(y, x, w, b), gemm_tol(x.dtype, w.shape[1])
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(device: str, dtype: torch.dtype, shape: tuple, with_bias: bool) -> None:
    lead, n, k = shape
    w = make_weight(n, k, dtype, device)
    x = torch.randn(*lead, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if with_bias else None
    values, meta = ops.sparse24_compress(w)
    y = cast_ext.sparse24_gemm(x, values, meta, b)
    check_close(y, x, w, b)
    # And against the spec, which also accumulates in fp32 and rounds once.
    ref = reference.sparse24_gemm(x, values, meta, b)
    assert ref.shape == y.shape
    check_close(ref, x, w, b)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 30),
    groups=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_shapes_match_linear(
    m: int, n: int, groups: int, dtype: torch.dtype, with_bias: bool, seed: int
) -> None:
    """Random shapes on the CPU kernels (each instruction-set version runs this through
    test_cpu_isa.py): 1-70 rows of x (the permute kernels to 8 rows, then tiles of 16 or 8 rows
    of x, the last partial), rows of W past the last whole tile of 12 or 6, and up to 300
    groups (chunks of up to 128, blocks of 8 or 16 groups and the groups after them, a row's
    odd last group)."""
    gen = torch.Generator().manual_seed(seed)
    k = 4 * groups
    w = ops.sparse24_prune(torch.randn(n, k, generator=gen).to(dtype))
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    values, meta = ops.sparse24_compress(w)
    check_close(cast_ext.sparse24_gemm(x, values, meta, b), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpu_kernels_give_the_same_bits_at_any_thread_count(dtype: torch.dtype) -> None:
    """Each output of the CPU kernels on the packed format is summed by one thread in a fixed
    order (threads split the rows of W), so the thread count does not change the bits."""
    w = make_weight(200, 1040, dtype, "cpu")  # the permute kernel splits rows 64 at a time
    values, meta = ops.sparse24_compress(w)
    threads = torch.get_num_threads()
    for m in (1, 5, 12, 40):  # the permute kernel, then rows of x in the lanes
        x = torch.randn(m, 1040).to(dtype)
        try:
            torch.set_num_threads(1)
            one = cast_ext.sparse24_gemm(x, values, meta)
            torch.set_num_threads(3)
            three = cast_ext.sparse24_gemm(x, values, meta)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, three), m


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device: str) -> None:
    w = make_weight(16, 32, torch.float32, device)
    values, meta = ops.sparse24_compress(w)
    x = torch.randn(32, 9, device=device).t()  # [9, 32], strided
    check_close(cast_ext.sparse24_gemm(x, values, meta), x, w, None)
    x = torch.randn(34, device=device)[2:]  # contiguous 1-D view at an 8-byte offset
    check_close(cast_ext.sparse24_gemm(x, values, meta), x, w, None)

    # 3-D, strided, with a bias, past the small-M kernel: the same bits as contiguous (the
    # dense fallback's at::linear rounded twice there, the product then the bias)
    w = make_weight(16, 64, torch.float16, device)
    values, meta = ops.sparse24_compress(w)
    bias = torch.randn(16, device=device, dtype=torch.float16) * 100
    x = torch.randn(4, 64, 5, device=device, dtype=torch.float16).transpose(1, 2)  # [4, 5, 64]
    y = cast_ext.sparse24_gemm(x, values, meta, bias)
    assert torch.equal(y, cast_ext.sparse24_gemm(x.contiguous(), values, meta, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_groups_with_fewer_than_two_nonzeros(device: str) -> None:
    w = torch.zeros(8, 16, device=device)
    w[0, 3] = 2.0  # one nonzero in a group; compress keeps a zero beside it
    w[5, 8:12] = torch.tensor([0.0, -1.0, 3.0, 0.0])
    values, meta = ops.sparse24_compress(w)
    x = torch.randn(3, 16, device=device)
    check_close(cast_ext.sparse24_gemm(x, values, meta), x, w, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 4, 16, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_nonfinite_x_at_pruned_positions_propagates_like_linear(
    device: str, m: int, dtype: torch.dtype
) -> None:
    """0 * NaN and 0 * Inf are NaN in F.linear on the decompressed weight; every path forms them
    too (the CPU's kernels on the packed format, which skip pruned weights, hand such inputs to
    another)."""
    w = make_weight(8, 64, dtype, device)
    w[:, 5] = 0.0  # column 5 pruned in every row
    x = torch.randn(m, 64, device=device).to(dtype)
    values, meta = ops.sparse24_compress(w)
    for bad in (float("nan"), float("inf")):
        x[m - 1, 5] = bad
        y = cast_ext.sparse24_gemm(x, values, meta)
        want = F.linear(x.double(), w.double())
        assert torch.isnan(y[m - 1]).all() and torch.isnan(want[m - 1]).all()
        check_close(y[: m - 1], x[: m - 1], w, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [4, 20])
@pytest.mark.parametrize("k", [68, 64])
def test_a_subnormal_x_is_not_read_as_zero(device: str, m: int, k: int) -> None:
    """The CPU's bf16 kernels (vdpbf16ps) read subnormal inputs as 0: an x with a subnormal
    element takes the fp32 ones, which do not. All of x subnormal, then one element, the last
    (at K = 68, past the last 32 that the CPU's check reads at a time; K = 64 at M = 4 is CUDA's
    tensor-core kernel on sm80+)."""
    w = make_weight(8, k, torch.bfloat16, device) * 1e30
    values, meta = ops.sparse24_compress(w)
    x = torch.full((m, k), 1e-39, device=device).bfloat16()  # below bf16's 1.2e-38: subnormal
    y = cast_ext.sparse24_gemm(x, values, meta)
    assert bool((y != 0).all())
    check_close(y, x, w, None)
    x = torch.zeros(m, k, device=device).bfloat16()
    x[-1, -1] = 1e-39
    y = cast_ext.sparse24_gemm(x, values, meta)
    assert torch.equal(y[-1] != 0, w[:, -1] != 0) and bool((w[:, -1] != 0).any())
    check_close(y, x, w, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck(dtype: torch.dtype) -> None:
    w = make_weight(16, 24, dtype, "cpu")
    values, meta = ops.sparse24_compress(w)
    x = torch.randn(5, 24).to(dtype).requires_grad_()
    b = torch.randn(16).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.cast_ext.sparse24_gemm.default, (x, values, meta, b))
    torch.library.opcheck(torch.ops.cast_ext.sparse24_gemm.default, (x.detach(), values, meta))
    torch.library.opcheck(
        torch.ops.cast_ext.sparse24_gemm.default, (x, values, meta, b), {"check_meta": False}
    )


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_and_empty_weights_vs_dense(device: str) -> None:
    """A second derivative through the GEMM (a gradient penalty) equals F.linear's on the
    decompressed weight (the weight's path was dropped: decompress had no gradient); a weight
    with no rows or no columns has gradients, as F.linear's."""
    w = make_weight(8, 16, torch.float32, device)
    values, meta = ops.sparse24_compress(w)
    x = torch.randn(3, 16, device=device, requires_grad=True)
    v = values.clone().requires_grad_()
    (gx,) = torch.autograd.grad(cast_ext.sparse24_gemm(x, v, meta).sum(), x, create_graph=True)
    (got,) = torch.autograd.grad(gx.pow(2).sum(), v)
    dense = ops.sparse24_decompress(values, meta).requires_grad_()
    (gx,) = torch.autograd.grad(F.linear(x, dense).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad(gx.pow(2).sum(), dense)
    kept = ops.unpack_mask(meta, 16)
    torch.testing.assert_close(got, want[kept].reshape(8, 8), rtol=1e-5, atol=1e-5)
    for n, k in ((0, 16), (8, 0)):
        x = torch.randn(3, k, device=device, requires_grad=True)
        v = torch.zeros(n, k // 2, device=device, requires_grad=True)
        meta = torch.zeros(n, (k + 7) // 8, dtype=torch.uint8, device=device)
        cast_ext.sparse24_gemm(x, v, meta).sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x)) and v.grad.shape == (n, k // 2)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_vs_dense(device: str) -> None:
    n, k = 24, 32
    w = make_weight(n, k, torch.float32, device)
    values, meta = ops.sparse24_compress(w)
    values = values.clone().requires_grad_()
    x = torch.randn(2, 7, k, device=device, requires_grad=True)
    b = torch.randn(n, device=device, requires_grad=True)
    g = torch.randn(2, 7, n, device=device)
    cast_ext.sparse24_gemm(x, values, meta, b).backward(g)

    x64 = x.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    w64 = reference.sparse24_decompress(v64, meta)  # differentiable in v64
    F.linear(x64, w64, b64).backward(g.double())
    for got, want in ((x.grad, x64.grad), (values.grad, v64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("k", "byte", "bad"),
    [
        (16, 1, 0x37),
        (72, 2, 0x13),
        (72, 8, 0x60),
        (12, 1, 0x35),
        (12, 1, 0x07),
        (320, 13, 0x70),
        (320, 36, 0x1),
        (1280, 70, 0x70),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_meta_of_wrong_pattern_is_an_error_and_changes_nothing(
    device: str, k: int, byte: int, bad: int, dtype: torch.dtype
) -> None:
    """A group keeping 3, 1 or 0 elements: in a row with no full block of 8 groups, inside a
    block (the CPU's AVX-512 path takes 8 groups at a time, its bf16 one 16: the second half of
    the second block of 16, the first half of the fifth) and in the groups after the last (12,
    1, 0x07: a row's odd last group, which the kept-value kernels' packing takes alone); in the
    second chunk of 128 groups of the kernels with rows of x in the lanes, among the meta bytes
    they read 16 (bf16 pairs) or 4 (kept values) at a time (1280, byte 70); a row's padding
    nibble set (k % 8 == 4: sparse24_decompress, the backward's, refuses it). An x without rows
    is no excuse: no kernel pass reads the meta then, but it is checked."""
    w = make_weight(8, k, dtype, device)
    values, meta = ops.sparse24_compress(w)
    meta = meta.clone()
    meta[3, byte] = bad
    for m in (0, 1, 4, 12, 20):  # CPU: no kernel, the AVX-512 one, then rows of x in the lanes
        x = torch.randn(m, k, device=device).to(dtype)
        before = (x.clone(), values.clone(), meta.clone())
        with pytest.raises(RuntimeError, match=r"cast_ext\.sparse24_gemm: meta .* not a valid"):
            cast_ext.sparse24_gemm(x, values, meta)
        for t, t0 in zip((x, values, meta), before, strict=True):
            assert torch.equal(t, t0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's import
@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_ad_is_refused_not_zero(device: str) -> None:
    """torch.func.jvp and torch.autograd.forward_ad through the differentiable ops (and
    SparseLinear's packed path) gave a tangent of 0 without an error: torch drops a custom op's
    tangent. Refused now; vmap (torch's fallback) still matches a loop, and a dense-path
    SparseLinear still gives the right tangent."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    w = torch.randn(8, 16, device=device)
    values, meta = cast_ext.sparse24_compress(w)
    x = torch.randn(2, 16, device=device)
    calls = {
        "sparse24_gemm": (lambda x: cast_ext.sparse24_gemm(x, values, meta), x),
        "sparse24_prune": (cast_ext.sparse24_prune, w),
        "sparse24_compress": (lambda w: cast_ext.sparse24_compress(w)[0], w),
        "sparse24_decompress": (lambda v: cast_ext.sparse24_decompress(v, meta), values),
        "distill_fwd": (lambda s: ops.distill_fwd(s, None, torch.zeros(2, dtype=torch.long,
            device=device))[1], x),
        "nn.SparseLinear": (cast_ext.nn.SparseLinear.from_dense(
            torch.nn.Linear(16, 8), mode="sparse", warn=False).to(device), x),
    }  # fmt: skip
    if device == "cuda":
        calls.pop("nn.SparseLinear")  # mode="sparse" is cuSPARSELt there, an autograd.Function
    for op, (f, arg) in calls.items():
        with pytest.raises(RuntimeError, match=rf"cast_ext\.{op}: forward-mode AD"):
            torch.func.jvp(f, (arg,), (torch.ones_like(arg),))
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
            f(fwAD.make_dual(arg, torch.ones_like(arg)))
    xs = torch.randn(3, 2, 16, device=device)
    batched = torch.func.vmap(lambda x: cast_ext.sparse24_gemm(x, values, meta))(xs)
    torch.testing.assert_close(
        batched, torch.stack([x @ ops.sparse24_decompress(values, meta).T for x in xs])
    )
    dense = cast_ext.nn.SparseLinear.from_dense(torch.nn.Linear(16, 8), mode="dense", warn=False)
    dense = dense.to(device)
    dx = torch.randn_like(x)
    _, tangent = torch.func.jvp(dense, (x,), (dx,))
    torch.testing.assert_close(tangent, F.linear(dx, dense.dense_weight()))


@pytest.mark.parametrize("device", DEVICES)
def test_check_meta_false_skips_only_the_check(device: str) -> None:
    """check_meta=False gives the same bits on valid meta. With an invalid group, the CPU still
    raises (its check is free); CUDA skips the read-back, so the other rows stay right."""
    k = 64
    w = make_weight(8, k, torch.float32, device)
    values, meta = ops.sparse24_compress(w)
    bad_meta = meta.clone()
    bad_meta[3, 2] = 0x37
    for m in (1, 4, 20):  # CUDA: the packed small-M kernel and decompress + cuBLAS
        x = torch.randn(m, k, device=device)
        y = cast_ext.sparse24_gemm(x, values, meta)
        assert torch.equal(cast_ext.sparse24_gemm(x, values, meta, check_meta=False), y)
        if device == "cpu":
            with pytest.raises(RuntimeError, match=r"sparse24_gemm: meta .* not a valid"):
                cast_ext.sparse24_gemm(x, values, bad_meta, check_meta=False)
        else:
            y_bad = cast_ext.sparse24_gemm(x, values, bad_meta, check_meta=False)
            rows = [r for r in range(8) if r != 3]
            assert torch.equal(y_bad[:, rows], y[:, rows])


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("x_dtype", r"x has dtype .*Double"),
        ("k", r"last dim must be in_features = .*16"),
        ("values_3d", r"must be 2-D"),
        ("meta_shape", r"meta of shape \[8, 3\]"),
        ("meta_dtype", r"expected uint8"),
        ("bias_shape", r"bias of shape \[7\]"),
        ("bias_dtype", r"bias has dtype"),
        ("x_0d", r"at least one dim"),
    ],
)
def test_bad_arguments(case: str, pattern: str) -> None:
    values, meta = ops.sparse24_compress(make_weight(8, 16, torch.float32, "cpu"))
    x, b = torch.randn(3, 16), torch.randn(8)
    if case == "x_dtype":
        x = x.double()
    elif case == "k":
        x = torch.randn(3, 20)
    elif case == "values_3d":
        values, meta = values[None], meta[None]
    elif case == "meta_shape":
        meta = torch.zeros(8, 3, dtype=torch.uint8)
    elif case == "meta_dtype":
        meta = meta.to(torch.int32)
    elif case == "bias_shape":
        b = torch.randn(7)
    elif case == "bias_dtype":
        b = b.half()
    elif case == "x_0d":
        x = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match=r"cast_ext\.sparse24_gemm: .*" + pattern):
        cast_ext.sparse24_gemm(x, values, meta, b)


def test_cslt_ops_on_cpu_say_what_to_use() -> None:
    w = make_weight(16, 16, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_compress: .*needs CUDA tensors"):
        ops.cslt_compress(w)
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_linear: .*sparse24_gemm"):
        ops.cslt_linear(torch.randn(2, 16).bfloat16(), w.reshape(-1), 16, 16)


# ---- cuSPARSELt (CUDA only) ------------------------------------------------------------------

CSLT_SHAPES = [((1,), 64, 128), ((7,), 128, 64), ((3, 100), 256, 512), ((64,), 32, 64)]


def fp16_refused(w: torch.Tensor, x: torch.Tensor) -> bool:
    """True where this GPU refuses cuSPARSELt float16 and ``w`` is float16, after checking that
    both ops refuse it before any work, naming the op, the cause and the way out."""
    if w.dtype != torch.float16 or not cslt_fp16_refusal():
        return False
    refused = r"float16 is refused on sm_90 with cuSPARSELt .*CAST_EXT_CSLT_FP16=1"
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_compress: " + refused):
        ops.cslt_compress(w)
    fake = torch.zeros(16, dtype=torch.float16, device="cuda")  # never read: refused first
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_linear: " + refused):
        ops.cslt_linear(x, fake, w.shape[0], w.shape[1])
    return True


@requires_cusparselt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", CSLT_SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_cslt_matches_linear(dtype: torch.dtype, shape: tuple, with_bias: bool) -> None:
    lead, n, k = shape
    w = make_weight(n, k, dtype, "cuda")
    x = torch.randn(*lead, k, device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    if fp16_refused(w, x):
        return
    wc = ops.cslt_compress(w)
    check_close(ops.cslt_linear(x, wc, n, k, b), x, w, b)


@requires_cusparselt
def test_cslt_fp16_refusal_is_sm90_with_cusparselt_up_to_0_8_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the H200 (sm_90, cuSPARSELt 0.8.0) fp16 cslt_linear faulted the GPU: refused there,
    with CAST_EXT_CSLT_FP16=1 to run it anyway; SparseLinear then keeps fp16 off cuSPARSELt."""
    monkeypatch.delenv("CAST_EXT_CSLT_FP16", raising=False)
    version = tuple(int(v) for v in cast_ext._C.cslt_runtime_version().split("."))
    want = torch.cuda.get_device_capability(0)[0] == 9 and version <= (0, 8, 0)
    assert bool(cslt_fp16_refusal()) == want
    if want:
        layer = SparseLinear.from_dense(nn.Linear(64, 32).half(), mode="sparse", warn=False).cuda()
        x = torch.randn(16, 64, device="cuda").half()
        with pytest.raises(RuntimeError, match=r"mode='sparse' but float16 is refused on sm_90"):
            layer(x)
        layer.mode = "auto"
        cast_ext.nn.clear_dispatch_decisions()
        trial = cast_ext.nn._TRIAL_WARMUP + cast_ext.nn._TRIAL_SAMPLES
        for _ in range(2 * (trial + cast_ext.nn._TRIAL_MAX_UNCOVERED)):  # dense and packed
            check_close(layer(x), x, layer.dense_weight(), layer.bias.detach())
            if cast_ext.nn.dispatch_decisions():  # every trial, then the decision
                break
        decisions = cast_ext.nn.dispatch_decisions()
        assert decisions and all(d["choice"] != "sparse" for d in decisions), decisions
        cast_ext.nn.clear_dispatch_decisions()
    monkeypatch.setenv("CAST_EXT_CSLT_FP16", "1")
    assert cslt_fp16_refusal() == ""


@requires_cusparselt
def test_cslt_relu_epilogue_and_no_gelu() -> None:
    """ReLU is fused; cuSPARSELt's GELU epilogue takes int8/fp8 inputs only, so "gelu" on
    fp16/bf16 is refused up front, saying what to do instead."""
    n, k = 128, 256
    w = make_weight(n, k, torch.bfloat16, "cuda")
    x = torch.randn(48, k, device="cuda").bfloat16()
    b = torch.randn(n, device="cuda").bfloat16()
    wc = ops.cslt_compress(w)
    y = ops.cslt_linear(x, wc, n, k, b, "relu")
    ref = F.relu(F.linear(x.float(), w.float(), b.float()))
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)
    with pytest.raises(RuntimeError, match=r"cslt_linear: activation .* gelu .*int8/fp8"):
        ops.cslt_linear(x, wc, n, k, b, "gelu")


@requires_cusparselt
def test_cslt_plan_cache_reuse_and_bias_pointer() -> None:
    cast_ext._C.cslt_cache_clear(True)
    n, k = 128, 256
    w = make_weight(n, k, torch.bfloat16, "cuda")
    wc = ops.cslt_compress(w)
    x = torch.randn(40, k, device="cuda").bfloat16()
    biases = [torch.randn(n, device="cuda").bfloat16() for _ in range(3)]
    for b in biases:  # each bias tensor: its own plan (the bias is fixed in a plan), one search
        check_close(ops.cslt_linear(x, wc, n, k, b), x, w, b)
    info = cast_ext.nn.cslt_cache_info()
    assert (info["plans"], info["misses"], info["hits"], info["searches"]) == (3, 3, 0, 1)
    b = biases[0]
    b.mul_(-1)  # same tensor, new values: its plan is reused and reads the current values
    check_close(ops.cslt_linear(x, wc, n, k, b), x, w, b)
    info = cast_ext.nn.cslt_cache_info()
    assert (info["plans"], info["hits"], info["searches"]) == (3, 1, 1)
    # Another M in the same bucket (40 -> 64): a new plan, the bucket's algorithm, no search.
    x2 = torch.randn(60, k, device="cuda").bfloat16()
    check_close(ops.cslt_linear(x2, wc, n, k, b), x2, w, b)
    info = cast_ext.nn.cslt_cache_info()
    assert (info["plans"], info["misses"], info["searches"]) == (4, 4, 1)
    assert all(e["alg_id"] >= 0 for e in info["entries"])


@requires_cusparselt
def test_cslt_plan_built_under_graph_capture_is_searched_at_the_next_eager_call() -> None:
    """No search while a CUDA graph is captured (it syncs): the graph runs the default
    algorithm; the first eager call of the shape searches; the graph still replays right (its
    plan is retired, not destroyed)."""
    cast_ext._C.cslt_cache_clear(True)
    n, k = 128, 256
    w = make_weight(n, k, torch.bfloat16, "cuda")
    wc = ops.cslt_compress(w)
    x = torch.randn(32, k, device="cuda").bfloat16()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.cslt_linear(x, wc, n, k)
    graph.replay()
    torch.cuda.synchronize()
    check_close(y, x, w, None)
    (entry,) = cast_ext.nn.cslt_cache_info()["entries"]
    assert entry["captured"] and entry["needs_search"] and not entry["searched"]
    check_close(ops.cslt_linear(x, wc, n, k), x, w, None)  # eager: searched now
    info = cast_ext.nn.cslt_cache_info()
    assert info["searches"] + info["search_failures"] == 1
    (entry,) = info["entries"]
    assert not entry["needs_search"]
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check_close(y, x, w, None)
    cast_ext._C.cslt_cache_clear(True)


@requires_cusparselt
def test_cslt_opcheck() -> None:
    w = make_weight(64, 128, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.cast_ext.cslt_compress.default, (w,))
    wc = ops.cslt_compress(w)
    x = torch.randn(9, 128, device="cuda").bfloat16()
    b = torch.randn(64, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.cast_ext.cslt_linear.default, (x, wc, 64, 128, b, "none"))


@requires_cusparselt
def test_cslt_errors() -> None:
    w = make_weight(64, 128, torch.bfloat16, "cuda")
    wc = ops.cslt_compress(w)
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_compress: .*not 2:4 sparse"):
        ops.cslt_compress(torch.randn(64, 128, device="cuda").bfloat16())
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_compress: .*multiples of 16"):
        ops.cslt_compress(make_weight(24, 128, torch.bfloat16, "cuda"))
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_compress: .*bfloat16 and float16"):
        ops.cslt_compress(w.float())
    x = torch.randn(4, 128, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_linear: .*were n and k"):
        ops.cslt_linear(x[:, :64].contiguous(), wc, 64, 64)
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_linear: .*x's dtype"):
        ops.cslt_linear(x.half(), wc, 64, 128)
    with pytest.raises(RuntimeError, match=r"cast_ext\.cslt_linear: activation must be none or"):
        ops.cslt_linear(x, wc, 64, 128, None, "tanh")


@requires_cusparselt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_cslt_each_algorithm_on_the_compressed_weight(dtype: torch.dtype) -> None:
    """cslt_compress compresses without a plan, and since cuSPARSELt 0.6.2 a compressed layout
    need not suit every algorithm. Each algorithm id is forced in turn (through the table) and
    compared with F.linear: the default (id 0), which the search's check takes as the truth,
    must be right; the ids that are wrong are printed (a searched winner among them is refused
    by that check, and the searched result must be right: test_cslt_matches_linear). Last in
    this file, the last test file: a wrong algorithm that faults would break the CUDA context
    of every test after it."""
    n, k, m = 256, 512, 64
    w = make_weight(n, k, dtype, "cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    if fp16_refused(w, x):
        return
    wc = ops.cslt_compress(w)
    cast_ext._C.cslt_cache_clear(True)
    check_close(ops.cslt_linear(x, wc, n, k), x, w, None)  # the searched (checked) winner
    info = cast_ext.nn.cslt_cache_info()
    (key,) = cast_ext._C.cslt_get_algs()
    max_id = info["entries"][0]["max_alg_id"]
    assert max_id >= 1
    wrong, unbuildable = [], []
    for alg in range(max_id):
        cast_ext._C.cslt_cache_clear(True)
        cast_ext._C.cslt_set_algs({key: (alg, 1, 0)})
        y = ops.cslt_linear(x, wc, n, k)
        if cast_ext.nn.cslt_cache_info()["entries"][0]["alg_id"] != alg:
            unbuildable.append(alg)
        elif gemm_error(y, x, w, None) > gemm_tol(dtype, k):
            wrong.append(alg)
    print(
        f"cuSPARSELt {cast_ext._C.cslt_runtime_version()}, {dtype}: {max_id} algorithm ids; "
        f"wrong on cslt_compress's layout: {wrong}; not buildable here: {unbuildable}; "
        f"first search: rejected={info['rejected']} failures={info['search_failures']}"
    )
    assert 0 not in wrong and 0 not in unbuildable
    cast_ext._C.cslt_cache_clear(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_16bit_output_is_rounded_once_to_nearest(
    device: str, dtype: torch.dtype, shape: tuple, with_bias: bool
) -> None:
    """fp32 accumulation (bias included) rounded once, to nearest, to the 16-bit dtype: each
    element within half an ulp of the fp64 result plus the fp32 accumulation bound. gemm_tol's
    16-bit bound (1.6e-2 bf16, 1e-3 fp16 of the GEMM's scale) is several ulps wide, so a
    truncating conversion or a second rounding (the bias added after rounding) passes it. On
    CUDA more than 16 rows go through F.linear's cuBLAS call, which rounds once only with torch's
    reduced-precision reductions off (see ops.sparse24_gemm)."""
    lead, n, k = shape
    gen = torch.Generator().manual_seed(7)
    w = ops.sparse24_prune(torch.randn(n, k, generator=gen).to(dtype)).to(device)
    x = torch.randn(*lead, k, generator=gen).to(dtype).to(device)
    b = (torch.randn(n, generator=gen) * 4).to(dtype).to(device) if with_bias else None
    values, meta = ops.sparse24_compress(w)
    with fp32_reductions():
        y = cast_ext.sparse24_gemm(x, values, meta, b).double().cpu()
    x64, w64 = x.double().cpu(), w.double().cpu()
    b64 = None if b is None else b.double().cpu()
    want = F.linear(x64, w64, b64)
    scale = F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    acc = 2.0 * (k + 1) * 2.0**-24 * scale  # fp32 accumulation, any order
    bits = {torch.float16: 11, torch.bfloat16: 8}[dtype]
    _, e = torch.frexp(want.abs() + acc)
    ulp = torch.ldexp(torch.ones_like(want), e - bits)
    if dtype == torch.float16:
        ulp = ulp.clamp_min(2.0**-24)  # subnormal spacing
    err = (y - want).abs()
    bound = 0.5 * ulp + acc
    assert bool((err <= bound).all()), float((err / bound).max())
