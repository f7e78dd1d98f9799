"""N:M masks, pruning, 2:4 compression and packed masks vs cast_ext.reference (exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES, DTYPES, dtype_id, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

import cast_ext
from cast_ext import reference as ref

SHAPES = [(1, 4), (1, 8), (3, 12), (7, 24), (33, 20), (64, 256), (2, 5, 16), (128, 1028)]
NM = [(1, 4), (2, 4), (2, 8), (4, 8)]


def distinct(shape, dtype, device):
    """Random values with no magnitude ties inside any group (a permutation, scaled)."""
    n = int(np.prod(shape))
    perm = torch.randperm(n).to(torch.float32) + 1.0
    signs = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    # Values up to n must stay exact in the dtype: keep them below 2^8 for bf16, 2^11 for fp16.
    limit = {torch.float32: 2**24, torch.float16: 2**11, torch.bfloat16: 2**8}[dtype]
    vals = (perm % limit + 1) * signs / limit
    return vals.reshape(shape).to(dtype).to(device)


def numpy_nm_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Independent NumPy reference: stable sort of -|w| per group, keep the first n."""
    a = np.abs(w.astype(np.float32)).reshape(-1, m)
    order = np.argsort(-a, axis=1, kind="stable")  # stable: equal |w| keep the lower index first
    keep = np.zeros_like(a, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(w.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sparse24_mask_matches_reference(device, dtype, shape):
    w = torch.randn(shape, dtype=dtype, device=device)
    got = cast_ext.sparse24_mask(w)
    assert got.dtype == torch.bool and got.shape == w.shape
    assert torch.equal(got, ref.sparse24_mask(w))
    assert (got.reshape(-1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("n", "m"), NM, ids=str)
def test_nm_mask_matches_reference_and_numpy(device, dtype, n, m):
    w = distinct((17, 64), dtype, device)
    got = cast_ext.nm_mask(w, n, m)
    assert torch.equal(got, ref.nm_mask(w, n, m))
    expected = numpy_nm_mask(w.float().cpu().numpy(), n, m)
    assert np.array_equal(got.cpu().numpy(), expected)
    assert (got.reshape(-1, m).sum(-1) == n).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ties_go_to_lower_index(device, dtype):
    rows = [
        [0.0, 0.0, 0.0, 0.0],  # all zero: keep 0, 1
        [1.0, 1.0, 1.0, 1.0],  # all equal: keep 0, 1
        [-1.0, 1.0, -1.0, 1.0],  # +/- pairs: equal magnitudes, keep 0, 1
        [0.5, 2.0, 2.0, 2.0],  # three-way tie for the top: keep 1, 2
        [3.0, 1.0, 1.0, 0.0],  # tie for second place: keep 0, 1
        [-0.0, 0.0, 0.0, 1.0],  # signed zeros tie: keep 3 and the first zero
        [0.0, 0.0, 2.0, -2.0],  # keep 2, 3
    ]
    expected = [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 0, 0, 1],
        [0, 0, 1, 1],
    ]
    w = torch.tensor(rows, dtype=dtype, device=device)
    got = cast_ext.sparse24_mask(w)
    assert got.int().tolist() == expected
    assert torch.equal(got, ref.sparse24_mask(w))
    # 2:8 on the same values laid out as rows of 8.
    w8 = w[:6].reshape(3, 8)
    assert torch.equal(cast_ext.nm_mask(w8, 2, 8), ref.nm_mask(w8, 2, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_quantised_ties_match_reference(device):
    # Like dequantised Q4 weights: few distinct levels, many ties at the keep/prune boundary.
    w = (torch.randint(-3, 4, (64, 128)).float() * 0.25).to(device)
    for n, m in NM:
        assert torch.equal(cast_ext.nm_mask(w, n, m), ref.nm_mask(w, n, m))
        assert np.array_equal(
            cast_ext.nm_mask(w, n, m).cpu().numpy(), numpy_nm_mask(w.cpu().numpy(), n, m)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_every_16bit_value_ranks_like_the_reference(device, dtype):
    """All finite fp16/bf16 bit patterns (both zeros, subnormals, the largest values), shuffled
    into groups and, for ties, drawn from a small pool: the kernels rank by magnitude bits."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = patterns[torch.isfinite(patterns.float())]
    gen = torch.Generator().manual_seed(0)
    shuffled = finite[torch.randperm(finite.numel(), generator=gen)]
    pool = finite[torch.randint(0, finite.numel(), (16,), generator=gen)]
    for w in (
        shuffled[: finite.numel() // 64 * 64].reshape(-1, 64),
        pool[torch.randint(0, 16, (4096, 8), generator=gen)],
    ):
        wd = w.to(device)
        assert torch.equal(cast_ext.sparse24_mask(wd).cpu(), ref.sparse24_mask(w))
        got = cast_ext.sparse24_prune(wd).cpu().view(torch.int16)
        assert torch.equal(got, ref.sparse24_prune(w).view(torch.int16))
        values, meta = cast_ext.sparse24_compress(wd)
        want_v, want_m = ref.sparse24_compress(w)
        assert torch.equal(values.cpu().view(torch.int16), want_v.view(torch.int16))
        assert torch.equal(meta.cpu(), want_m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prune_compress_decompress(device, dtype, shape):
    w = torch.randn(shape, dtype=dtype, device=device)
    pruned = cast_ext.sparse24_prune(w)
    assert torch.equal(pruned, ref.sparse24_prune(w))
    values, meta = cast_ext.sparse24_compress(w)
    rv, rm = ref.sparse24_compress(w)
    assert values.shape == (*shape[:-1], shape[-1] // 2) and values.dtype == dtype
    assert meta.shape == (*shape[:-1], (shape[-1] + 7) // 8) and meta.dtype == torch.uint8
    assert torch.equal(values, rv)
    assert torch.equal(meta, rm)
    assert torch.equal(cast_ext.sparse24_decompress(values, meta), pruned)
    assert torch.equal(ref.sparse24_decompress(values, meta), pruned)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [4, 8, 12, 20, 64, 100])
def test_pack_unpack_and_flips(device, k):
    a = torch.rand(9, k, device=device) < 0.5
    b = a.clone()
    b[0, :4] = ~b[0, :4]  # group 0 of row 0
    b[3, -1] = ~b[3, -1]  # the last group of row 3
    pa, pb = cast_ext.pack_mask(a), cast_ext.pack_mask(b)
    assert torch.equal(pa, ref.pack_mask(a))
    assert pa.shape == (9, (k + 7) // 8)
    assert torch.equal(cast_ext.unpack_mask(pa, k), a)
    assert torch.equal(ref.unpack_mask(pa, k), a)
    assert int(cast_ext.mask_flips(pa, pb, 4)) == 2 == int(ref.mask_flips(pa, pb, 4))
    assert int(cast_ext.mask_flips(pa, pa, 4)) == 0
    if k % 8 == 0:
        assert int(cast_ext.mask_flips(pa, pb, 8)) == int(ref.mask_flips(pa, pb, 8)) == 2
    # A bool whose byte is neither 0 nor 1 (a uint8 tensor viewed as bool) is true, as torch
    # reads it: it sets one bit, not its byte's bits.
    raw = torch.randint(0, 4, (9, k), dtype=torch.uint8, device=device)
    assert torch.equal(cast_ext.pack_mask(raw.view(torch.bool)), ref.pack_mask(raw != 0))
    empty = torch.zeros(0, k, dtype=torch.bool, device=device)  # no rows: nothing to infer from
    assert ref.unpack_mask(cast_ext.pack_mask(empty), k).shape == (0, k)
    assert cast_ext.unpack_mask(cast_ext.pack_mask(empty), k).shape == (0, k)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_noncontiguous(device):
    empty = torch.empty(0, 8, device=device)
    assert cast_ext.sparse24_mask(empty).shape == (0, 8)
    v, m = cast_ext.sparse24_compress(empty)
    assert v.shape == (0, 4) and m.shape == (0, 1)
    w = torch.randn(16, 32, device=device)
    wt = w.t()  # non-contiguous [32, 16]: works, on its own logical layout
    assert torch.equal(cast_ext.sparse24_mask(wt), ref.sparse24_mask(wt.contiguous()))
    sliced = torch.randn(8, 64, device=device)[:, ::2]
    assert torch.equal(cast_ext.sparse24_prune(sliced), ref.sparse24_prune(sliced))


BAD_WEIGHTS = [
    (lambda d: torch.randn(4, 6, device=d), "last dim must be a multiple of 4"),
    (lambda d: torch.randint(0, 5, (4, 8), device=d), "expected float32, float16 or bfloat16"),
    (lambda d: torch.tensor(1.0, device=d), "at least one dim"),
    (
        lambda d: torch.tensor([[1.0, float("nan"), 0.0, 2.0]], device=d),
        "contains NaN or Inf",
    ),
    (
        lambda d: torch.tensor([[1.0, float("inf"), 0.0, 2.0]], device=d),
        "contains NaN or Inf",
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("make", "message"), BAD_WEIGHTS)
@pytest.mark.parametrize(
    "op", ["sparse24_mask", "sparse24_prune", "sparse24_compress", "nm_mask"], ids=str
)
def test_bad_weights_raise_clear_errors(device, make, message, op):
    w = make(device)
    before = w.clone()
    args = (w, 2, 4) if op == "nm_mask" else (w,)
    with pytest.raises(RuntimeError, match=f"cast_ext.{op}: .*{message}"):
        getattr(cast_ext, op)(*args)
    torch.testing.assert_close(w, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    w = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match=r"cast_ext.nm_mask: m must be 4 or 8, got 3"):
        cast_ext.nm_mask(w, 1, 3)
    with pytest.raises(RuntimeError, match=r"cast_ext.nm_mask: need 0 < n <= m"):
        cast_ext.nm_mask(w, 5, 4)
    with pytest.raises(
        RuntimeError, match=r"w of shape \[4, 12\]: last dim must be a multiple of 8"
    ):
        cast_ext.nm_mask(torch.randn(4, 12, device=device), 2, 8)
    values, meta = cast_ext.sparse24_compress(w)
    with pytest.raises(RuntimeError, match=r"sparse24_decompress: meta of shape \[4, 2\] cannot"):
        cast_ext.sparse24_decompress(values, torch.zeros(4, 2, dtype=torch.uint8, device=device))
    bad_meta = meta.clone()
    bad_meta[0, 0] = 0x07  # 3 bits set in the first group
    with pytest.raises(RuntimeError, match=r"not a valid 2:4 mask"):
        cast_ext.sparse24_decompress(values, bad_meta)
    with pytest.raises(RuntimeError, match=r"pack_mask: mask of shape \[4, 8\] has dtype"):
        cast_ext.pack_mask(w)
    with pytest.raises(RuntimeError, match=r"mask_flips: a of shape \[4, 1\] and b of shape"):
        cast_ext.mask_flips(meta, torch.zeros(4, 2, dtype=torch.uint8, device=device))
    with pytest.raises(RuntimeError, match=r"unpack_mask: packed of shape \[4, 1\] cannot hold 9"):
        cast_ext.unpack_mask(meta, 9)


@requires_cuda
def test_mismatched_devices_refused():
    values, meta = cast_ext.sparse24_compress(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match=r"sparse24_decompress: meta is on cpu but values is on"):
        cast_ext.sparse24_decompress(values.cuda(), meta)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w = torch.randn(6, 16, device=device)
    mask = torch.rand(6, 12, device=device) < 0.5
    values, meta = cast_ext.sparse24_compress(w)
    packed = cast_ext.pack_mask(mask)
    cases = [
        (torch.ops.cast_ext.sparse24_mask.default, (w,)),
        (torch.ops.cast_ext.nm_mask.default, (w, 2, 8)),
        (torch.ops.cast_ext.sparse24_prune.default, (w,)),
        (torch.ops.cast_ext.sparse24_compress.default, (w,)),
        (torch.ops.cast_ext.sparse24_decompress.default, (values, meta)),
        (torch.ops.cast_ext.pack_mask.default, (mask,)),
        (torch.ops.cast_ext.unpack_mask.default, (packed, 12)),
        (torch.ops.cast_ext.mask_flips.default, (packed, packed, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    # with gradients: opcheck's autograd checks of the value-carrying ops
    wg, vg = w.clone().requires_grad_(), values.clone().requires_grad_()
    torch.library.opcheck(torch.ops.cast_ext.sparse24_prune.default, (wg,))
    torch.library.opcheck(torch.ops.cast_ext.sparse24_compress.default, (wg,))
    torch.library.opcheck(torch.ops.cast_ext.sparse24_decompress.default, (vg, meta))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_prune_compress_decompress(device):
    """Each is linear once its mask is fixed: prune passes the gradient at the kept positions,
    compress scatters the values' gradient back, decompress gathers it (the reference's formulas
    through torch's autograd give the same). They were silently zero."""
    w = torch.randn(6, 24, device=device, requires_grad=True)
    g = torch.randn(6, 24, device=device)
    kept = ref.sparse24_mask(w.detach())
    (got,) = torch.autograd.grad(cast_ext.sparse24_prune(w), w, g)
    assert torch.equal(got, g * kept)
    values, meta = cast_ext.sparse24_compress(w)
    gv = torch.randn(6, 12, device=device)
    (got,) = torch.autograd.grad(values, w, gv)
    assert torch.equal(got, ref.sparse24_decompress(gv, meta))
    v = values.detach().requires_grad_()
    (got,) = torch.autograd.grad(cast_ext.sparse24_decompress(v, meta), v, g)
    assert torch.equal(got, g[kept].reshape(6, 12))


def test_fakes_refuse_what_the_kernels_refuse():
    """On the meta device (and in a compiled trace) the ops refuse what the kernels refuse; a
    meta tensor among real ones is refused too (the fake would return uninitialised memory)."""
    w = torch.randn(4, 16)
    values, meta = cast_ext.sparse24_compress(w)
    cases = [
        (lambda: cast_ext.sparse24_decompress(values, meta.to("meta")), "meta is on meta"),
        (
            lambda: cast_ext.sparse24_decompress(torch.empty(4, 5, device="meta"), meta.to("meta")),
            r"values of shape \[4, 5\] .* even last dim",
        ),
        (
            lambda: cast_ext.sparse24_decompress(values.double().to("meta"), meta.to("meta")),
            "dtype torch.float64",
        ),
        (lambda: cast_ext.unpack_mask(torch.empty(4, 2, device="meta"), 16), "uint8"),
        (lambda: cast_ext.mask_flips(meta.to("meta"), meta.to("meta"), 3), "m must be 4 or 8"),
        (lambda: cast_ext.mask_flips(meta, meta.to("meta")), "b is on meta but a is on cpu"),
        (lambda: cast_ext.pack_mask(torch.tensor(True, device="meta")), "at least one dim"),
    ]
    for call, needle in cases:
        with pytest.raises(RuntimeError, match=needle):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_flips_refuses_0d_masks_like_its_fake(device):
    """The kernels counted flips of two 0-d uint8 tensors, which the fake (and so a compiled
    graph) refuses: both refuse now."""
    a = torch.tensor(3, dtype=torch.uint8, device=device)
    for x in (a, a.to("meta")):
        with pytest.raises(RuntimeError, match="at least one dim"):
            cast_ext.mask_flips(x, x)


def test_reference_decompress_refuses_an_invalid_meta():
    values = torch.arange(8.0).reshape(2, 4)
    for bad in (torch.tensor([[0x37], [0x33]]), torch.tensor([[0x33], [0x13]])):
        with pytest.raises(RuntimeError, match=r"meta of shape .* not a valid 2:4 mask"):
            ref.sparse24_decompress(values, bad.to(torch.uint8))
    padded = torch.tensor([[0x53], [0x33]], dtype=torch.uint8)  # k = 4: the high nibble pads
    with pytest.raises(RuntimeError, match="not a valid 2:4 mask"):
        ref.sparse24_decompress(values[:, :2], padded)


@pytest.mark.cuda  # every device in DEVICES, CUDA included where present
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    nm=st.sampled_from(NM),
    levels=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    strided=st.booleans(),
    data=st.data(),
)
def test_property_masks_match_reference(rows, groups, nm, levels, dtype, strided, data):
    """Quarter-integer weights (exact in every dtype, ties everywhere), contiguous or a column
    slice of a wider tensor (rows not adjacent): every mask op against the reference, the mask
    also against NumPy."""
    n, m = nm
    k = groups * m
    ints = data.draw(st.lists(st.integers(-levels, levels), min_size=rows * k, max_size=rows * k))
    w = (torch.tensor(ints, dtype=torch.float32).reshape(rows, k) / 4).to(dtype)
    want = ref.nm_mask(w, n, m)
    assert np.array_equal(want.numpy(), numpy_nm_mask(w.float().numpy(), n, m))
    for device in DEVICES:
        x = w.to(device)
        if strided:
            x = torch.cat([x, torch.zeros_like(x[:, :m])], 1)[:, :k]
        got = cast_ext.nm_mask(x, n, m).cpu()
        assert torch.equal(got, want)
        if (n, m) != (2, 4):
            continue
        assert torch.equal(cast_ext.sparse24_mask(x).cpu(), want)
        assert torch.equal(cast_ext.sparse24_prune(x).cpu(), ref.sparse24_prune(w))
        v, meta = cast_ext.sparse24_compress(x)
        assert torch.equal(cast_ext.sparse24_decompress(v, meta).cpu(), ref.sparse24_prune(w))
        packed = cast_ext.pack_mask(got.to(device))
        assert torch.equal(cast_ext.unpack_mask(packed, k).cpu(), want)
        flipped = cast_ext.pack_mask(cast_ext.sparse24_mask(-x.abs().flip(-1)))
        assert int(cast_ext.mask_flips(packed, flipped)) == int(
            (ref.sparse24_mask(-w.abs().flip(-1)) != want).reshape(rows, groups, m).any(-1).sum()
        )


@pytest.mark.cuda  # every device in DEVICES
def test_deterministic_run_to_run():
    w = torch.randn(64, 256)
    for device in DEVICES:
        x = w.to(device)
        a = cast_ext.sparse24_compress(x)
        b = cast_ext.sparse24_compress(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_matches_cpu_bit_for_bit(dtype):
    w = torch.randn(257, 1028).to(dtype)
    wc = w.cuda()
    assert torch.equal(cast_ext.sparse24_mask(wc).cpu(), cast_ext.sparse24_mask(w))
    vc, mc = cast_ext.sparse24_compress(wc)
    v, m = cast_ext.sparse24_compress(w)
    assert torch.equal(vc.cpu(), v) and torch.equal(mc.cpu(), m)
    for n, mm in NM:
        x = w[:, :1024]
        assert torch.equal(cast_ext.nm_mask(x.cuda(), n, mm).cpu(), cast_ext.nm_mask(x, n, mm))


def test_reference_ranks_float64_magnitudes_as_they_are():
    """The reference ranked |w| after a cast to fp32, where distinct float64 magnitudes tie (or
    overflow): the lower index won instead of the larger value."""
    w = torch.tensor(
        [
            [1, 1 + 1e-12, 0, 0],
            [1e-300, 2e-300, 0, 0],
            [1e300, 2e300, 0, 0],
            [0, 0, 1e-310, 2e-310],
        ],
        dtype=torch.float64,
    )
    assert ref.nm_mask(w, 1, 4).int().argmax(-1).tolist() == [1, 1, 1, 3]
    with pytest.raises(ValueError, match="cannot hold -3 elements"):
        ref.unpack_mask(torch.zeros(4, 0, dtype=torch.uint8), -3)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_backward_is_zero_at_pruned_elements_whatever_the_upstream(device):
    """The gradient is the upstream one where kept and 0 where pruned: an inf or NaN upstream
    at a pruned element gave NaN (a product with the mask), where autograd through the
    reference's where gives 0."""
    w = torch.tensor([[4.0, 3.0, 1.0, 0.5]], device=device, requires_grad=True)
    up = torch.tensor([[1.0, 1.0, float("inf"), float("nan")]], device=device)
    (g,) = torch.autograd.grad(cast_ext.sparse24_prune(w), w, up)
    (g_ref,) = torch.autograd.grad(ref.sparse24_prune(w), w, up)
    assert g.tolist() == g_ref.tolist() == [[1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("w", "rule"),
    [
        (torch.randint(0, 5, (3, 8)), "has dtype Long; expected float32, float16 or bfloat16"),
        (torch.tensor([[1.0, float("nan"), 0.0, 2.0]] * 3), "contains NaN or Inf"),
        (torch.tensor([[1.0, 0.0, float("-inf"), 2.0]] * 3).bfloat16(), "contains NaN or Inf"),
        (torch.randn(3, 6), "last dim must be a multiple of 4"),
    ],
    ids=["int", "nan", "bf16-inf", "last-dim"],
)
@pytest.mark.parametrize(
    "op", ["sparse24_mask", "sparse24_prune", "sparse24_compress", "nm_mask"], ids=str
)
def test_bad_weight_errors_name_op_shape_and_rule(device, w, rule, op):
    """Issue 3's bad input: the error names the op, the tensor's shape and the rule (the
    catalogue above matches the op and the rule only)."""
    w = w.to(device)
    args = (w, 2, 4) if op == "nm_mask" else (w,)
    shape = r"\[" + ", ".join(map(str, w.shape)) + r"\]"
    with pytest.raises(RuntimeError, match=rf"cast_ext\.{op}: w of shape {shape}\W.*{rule}"):
        getattr(cast_ext, op)(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 4), (3, 12), (2, 20)])
def test_decompress_refuses_a_set_padding_nibble(device, shape):
    """A row of 4 mod 8 elements ends in a half-used meta byte whose high nibble is padding and
    must be zero: the kernel refuses a meta that sets it, as the reference does (only the
    reference's refusal was tested)."""
    w = torch.randn(shape, device=device)
    values, meta = cast_ext.sparse24_compress(w)
    assert torch.equal(cast_ext.sparse24_decompress(values, meta), cast_ext.sparse24_prune(w))
    bad = meta.clone()
    bad[-1, -1] |= 0x30  # a "valid-looking" 2-of-4 pattern in the padding
    with pytest.raises(RuntimeError, match=r"sparse24_decompress: meta of shape .* not a valid"):
        cast_ext.sparse24_decompress(values, bad)
    with pytest.raises(RuntimeError, match=r"not a valid 2:4 mask"):
        ref.sparse24_decompress(values.cpu(), bad.cpu())
