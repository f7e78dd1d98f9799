"""Pure-PyTorch reference semantics of every cast_ext op.

This module is THE specification the kernels are tested against (``../shared/SPEC.md`` in the
project's steering repo, restated in the docstrings below). It is written for clarity, not
speed: plain torch ops, no custom kernels, device-agnostic (it runs wherever its inputs live).

Conventions shared by all ops:

* Groups of ``m`` consecutive elements run along the **last** dimension (a weight ``[out, in]``
  is grouped along ``in``, the GEMM's K). The last dimension must be a multiple of ``m``.
* Mask rule: in every group keep the ``n`` elements of largest ``|w|``; on equal magnitudes the
  lower index wins. NaN or Inf in a weight is an error.
* Packed masks: one bit per element, 8 elements per byte, least significant bit first, each row
  (everything but the last dim) padded to a whole byte: shape ``[*w.shape[:-1], ceil(k / 8)]``,
  dtype ``uint8``. A 2:4 group therefore occupies one nibble (4 bits per group) and a 4:8 or 2:8
  group one byte. The same encoding is the metadata of the compressed 2:4 format: the positions
  of the 2 kept values of a group are the set bits of its nibble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "adams_step_",
    "distill_bwd",
    "distill_fwd",
    "mask_flips",
    "nm_mask",
    "pack_mask",
    "scaled_linear",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_gemm",
    "sparse24_mask",
    "sparse24_prune",
    "unpack_mask",
]


def _check_groups(op: str, name: str, w: Tensor, m: int) -> None:
    if w.dim() < 1 or w.shape[-1] % m != 0:
        raise ValueError(
            f"cast_ext.{op}: {name} of shape {list(w.shape)}: last dim must be a multiple of {m}"
        )
    if not w.is_floating_point():
        raise TypeError(f"cast_ext.{op}: {name} has dtype {w.dtype}; expected a floating dtype")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"cast_ext.{op}: {name} of shape {list(w.shape)} contains NaN or Inf; "
            "a mask of non-finite weights is undefined"
        )


def nm_mask(w: Tensor, n: int, m: int) -> Tensor:
    """N:M mask: in each group of ``m`` along the last dim, True for the ``n`` largest ``|w|``.

    Ties go to the lower index: elements are ranked by ``|w|`` descending, then by position
    ascending, and the first ``n`` are kept. ``sparse24_mask`` is ``nm_mask(w, 2, 4)``.

    Args:
        w: floating tensor, last dim a multiple of ``m``, finite.
        n: elements kept per group, ``0 < n <= m``.
        m: group size.

    Returns:
        bool tensor of ``w``'s shape.
    """
    if not 0 < n <= m:
        raise ValueError(f"cast_ext.nm_mask: need 0 < n <= m, got n={n}, m={m}")
    _check_groups("nm_mask", "w", w, m)
    a = w.detach().abs().reshape(-1, m)  # |w| is exact in every dtype: ranked as it is
    # rank[i] = number of group members that beat element i: larger |w|, or equal |w| at a
    # lower index. Element i is kept iff fewer than n members beat it. O(m^2) per group, exact.
    idx = torch.arange(m, device=w.device)
    bigger = a.unsqueeze(1) > a.unsqueeze(2)  # [g, i, j]: a[j] > a[i]
    equal_lower = (a.unsqueeze(1) == a.unsqueeze(2)) & (idx.view(1, 1, m) < idx.view(1, m, 1))
    rank = (bigger | equal_lower).sum(dim=2)
    return (rank < n).reshape(w.shape)


def sparse24_mask(w: Tensor) -> Tensor:
    """2:4 mask of ``w`` (see :func:`nm_mask`)."""
    return nm_mask(w, 2, 4)


def sparse24_prune(w: Tensor) -> Tensor:
    """``w`` with the 2 smallest-magnitude elements of every group of 4 set to zero."""
    return torch.where(sparse24_mask(w), w, torch.zeros((), dtype=w.dtype, device=w.device))


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask into bits: ``[..., k]`` -> ``[..., ceil(k / 8)]`` uint8, LSB first."""
    if mask.dtype != torch.bool:
        raise TypeError(f"cast_ext.pack_mask: mask has dtype {mask.dtype}; expected torch.bool")
    k = mask.shape[-1]
    kb = (k + 7) // 8
    padded = torch.zeros(*mask.shape[:-1], kb * 8, dtype=torch.uint8, device=mask.device)
    padded[..., :k] = mask.to(torch.uint8)
    weights = (2 ** torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.reshape(*mask.shape[:-1], kb, 8) * weights).sum(-1).to(torch.uint8)


def unpack_mask(packed: Tensor, last_dim: int) -> Tensor:
    """Inverse of :func:`pack_mask`: ``[..., ceil(k / 8)]`` uint8 -> ``[..., k]`` bool."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"cast_ext.unpack_mask: packed has dtype {packed.dtype}; expected uint8")
    if last_dim < 0 or packed.shape[-1] != (last_dim + 7) // 8:
        raise ValueError(
            f"cast_ext.unpack_mask: packed of shape {list(packed.shape)} cannot hold "
            f"{last_dim} elements per row"
        )
    bits = torch.arange(8, device=packed.device)
    unpacked = (packed.unsqueeze(-1).long() >> bits) & 1
    # An explicit last dim: -1 cannot be inferred when a leading dim is 0.
    return unpacked.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :last_dim].bool()


def mask_flips(a: Tensor, b: Tensor, m: int = 4) -> Tensor:
    """Number of groups of ``m`` whose kept set differs between two packed masks.

    Args:
        a, b: packed masks (see :func:`pack_mask`) of the same shape.
        m: group size, 4 or 8 (a group is a nibble or a byte of the packed mask).

    Returns:
        0-d int64 tensor.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"cast_ext.mask_flips: a of shape {list(a.shape)} and b of shape {list(b.shape)} differ"
        )
    diff = (a ^ b).long()
    if m == 8:
        return (diff != 0).sum()
    if m == 4:
        return ((diff & 0x0F) != 0).sum() + ((diff & 0xF0) != 0).sum()
    raise ValueError(f"cast_ext.mask_flips: m must be 4 or 8, got {m}")


def sparse24_compress(w: Tensor) -> tuple[Tensor, Tensor]:
    """Compress ``w`` to 2:4: the kept values and their packed mask.

    Returns:
        ``(values, meta)``: ``values`` ``[..., k / 2]`` in ``w``'s dtype, the 2 kept elements of
        each group in ascending position; ``meta`` = ``pack_mask(sparse24_mask(w))``.
    """
    mask = sparse24_mask(w)
    values = w[mask].reshape(*w.shape[:-1], w.shape[-1] // 2)
    return values, pack_mask(mask)


def sparse24_decompress(values: Tensor, meta: Tensor) -> Tensor:
    """Inverse of :func:`sparse24_compress`: scatter the kept values back, zeros elsewhere.

    Raises:
        RuntimeError: ``meta`` is not a 2:4 mask (a group keeps other than 2, or a row's
            padding nibble is set).
    """
    k = values.shape[-1] * 2
    mask = unpack_mask(meta, k)
    padding = meta[..., -1] >> 4 if k % 8 == 4 else meta.new_zeros(())
    if bool((mask.reshape(-1, 4).sum(-1) != 2).any() or (padding != 0).any()):
        raise RuntimeError(
            f"cast_ext.sparse24_decompress: meta of shape {list(meta.shape)} is not a valid 2:4 "
            "mask: every group of 4 must keep exactly 2 elements"
        )
    out = torch.zeros(*values.shape[:-1], k, dtype=values.dtype, device=values.device)
    out[mask] = values.reshape(-1)
    return out


def sparse24_gemm(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ W^T (+ bias)`` with ``W = sparse24_decompress(values, meta)`` of shape [N, K].

    Accumulates in fp32 and rounds once to ``x``'s dtype, as the tensor-core GEMMs do.
    """
    w = sparse24_decompress(values, meta)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def scaled_linear(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None, blocks: int) -> Tensor:
    """A prepared layer's forward (SPEC §3): ``F.linear(x, W_used, bias)`` with
    ``W_used[r, c] = A[r, c // (in / blocks)] * W[r, c]`` for ``W`` ``[out, in]`` and the scale
    ``A`` ``[out, blocks]``.

    ``W_used`` has ``W``'s dtype: for fp16/bf16 the product is formed in fp32 and rounded once
    (``A`` stays fp32: rounded to 16 bits it would move in steps of 0.4-0.8% near 1); for
    fp32/fp64 ``A`` is cast to ``W``'s dtype. Differentiable in ``x``, ``W``, ``A`` and ``bias``.
    """
    cols = scale.repeat_interleave(w.shape[1] // blocks, dim=1)  # [out, in]
    if w.dtype in (torch.float16, torch.bfloat16):
        used = (w.float() * cols.float()).to(w.dtype)
    else:
        used = w * cols.to(w.dtype)
    return torch.nn.functional.linear(x, used, bias)


def _adams_one(
    p: Tensor,
    g: Tensor,
    mu: Tensor,
    v: Tensor,
    packed: Tensor | None,
    step: Tensor,
    master: Tensor | None,
    prev: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: float,
    total_steps: int,
    mask_interval: int,
    n: int,
    m: int,
    inv_scale: Tensor | None,
) -> None:
    w = master if master is not None else p
    t = int(step.item())  # completed steps
    g = g.float()
    if inv_scale is not None:
        g = g * inv_scale
    if packed is not None and t % mask_interval == 0:
        fresh = pack_mask(nm_mask(w, n, m))
        if prev is not None:
            prev.copy_(packed)
        packed.copy_(fresh)
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    mu.mul_(beta1).add_((1.0 - beta1) * g)
    if packed is not None:
        kept = unpack_mask(packed, w.shape[-1])
        alpha = min(t / total_steps, 1.0)
        decayed = (1.0 - alpha) * mu + (alpha * decay) * torch.sign(w)
        mu_eff = torch.where(kept, mu, decayed)
    else:
        mu_eff = g
    v.mul_(beta2).add_((1.0 - beta2) * mu_eff * mu_eff)
    bc1 = 1.0 - beta1 ** (t + 1)
    bc2 = 1.0 - beta2 ** (t + 1)
    upd = (mu if packed is None else mu_eff) / bc1 / ((v / bc2).sqrt() + eps)
    w.sub_(lr * upd)
    if master is not None:
        p.copy_(master)
    step.add_(1)


def adams_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    masks: list[Tensor],
    steps: list[Tensor],
    master_params: list[Tensor],
    prev_masks: list[Tensor] | tuple[Tensor, ...] = (),
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decay: float = 0.0,
    total_steps: int = 1,
    mask_interval: int = 10,
    n: int = 2,
    m: int = 4,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamS step (SPEC §2, paper Algorithm 1) over a list of tensors, in place.

    Per element, with ``t`` = ``steps[i]`` (completed steps, 0 at the first call):

    * ``g = grad * (1 / grad_scale)`` (the reciprocal rounded once, as the kernels do: exact for
      GradScaler's power-of-two scales); decoupled weight decay ``w *= 1 - lr * weight_decay``;
    * ``mu = beta1 * mu + (1 - beta1) * g`` (the stored momentum never sees the decay);
    * sparse tensors (``masks`` non-empty): if ``t % mask_interval == 0`` the packed mask is
      refreshed from the current ``|w|`` (``nm_mask(w, n, m)``) first, before any change; then
      ``alpha = min(t / total_steps, 1)`` and ``mu_eff = mu`` where kept,
      ``(1 - alpha) * mu + alpha * decay * sign(w)`` where pruned;
      ``v = beta2 * v + (1 - beta2) * mu_eff^2``;
      ``w -= lr * (mu_eff / bc1) / (sqrt(v / bc2) + eps)``;
    * dense tensors (``masks`` empty): plain Adam, ``v = beta2 * v + (1 - beta2) * g^2`` and
      ``w -= lr * (mu / bc1) / (sqrt(v / bc2) + eps)``;
    * ``bc1 = 1 - beta1^(t+1)``, ``bc2 = 1 - beta2^(t+1)``; ``steps[i] += 1``.

    With ``master_params`` (fp32 copies of bf16/fp16 ``params``) the update happens on the
    master and ``params`` receive its rounded value; the mask is ranked on the master.
    With ``prev_masks`` (one per mask) a refresh first copies the old packed mask there, so the
    groups that changed at the last refresh can be counted later (``mask_flips(prev, mask)``).
    If ``found_inf`` is nonzero nothing changes: no param, state or step. An argument the
    kernels refuse (a scalar out of range, lists of other lengths, a tensor of the wrong shape
    or dtype) raises here too, before any tensor changes.

    Args:
        params: weights, updated in place (fp32, or bf16/fp16 with ``master_params``).
        grads: gradients, same shapes and dtypes as ``params``.
        exp_avgs, exp_avg_sqs: fp32 first and second moments, updated in place.
        masks: packed masks (``pack_mask`` layout) of sparse params, or empty for plain Adam.
        steps: fp32 0-d tensors, completed steps per param, incremented in place.
        master_params: fp32 master weights, or empty.
        prev_masks: packed masks receiving the old mask at each refresh, or empty.
    """
    # the kernels' rules for the lists and the scalars (csrc/adams.h)
    from .ops import _check_adams_lists, _check_adams_scalars

    _check_adams_lists(
        params, grads, exp_avgs, exp_avg_sqs, masks, steps, master_params, prev_masks
    )
    _check_adams_scalars(locals())
    _check_adams_tensors(locals())
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            _check_one_float(name, t, params)
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    for i, st in enumerate(steps):
        t = float(st.item())
        if not (0.0 <= t < 2.0**24 and t == int(t)):
            raise RuntimeError(
                f"cast_ext.adams_step_: steps[{i}] must hold a whole number of completed steps "
                f"in [0, 2^24), got {t}"
            )
    # 0-d, so a one-element [1] scale does not broadcast 0-d params and grads to [1].
    inv_scale = None if grad_scale is None else (1.0 / grad_scale).reshape(())
    # A weight that gives no mask (NaN or Inf at a refresh) fails the call before any change.
    for i, p in enumerate(params):
        w = master_params[i] if master_params else p
        if masks and int(steps[i].item()) % mask_interval == 0 and not bool(w.isfinite().all()):
            name = "master_params" if master_params else "params"
            raise RuntimeError(
                f"cast_ext.adams_step_: {name}[{i}] of shape {list(w.shape)} contains NaN or "
                "Inf; a mask of non-finite weights is undefined"
            )
    for i, p in enumerate(params):
        _adams_one(
            p,
            grads[i],
            exp_avgs[i],
            exp_avg_sqs[i],
            masks[i] if masks else None,
            steps[i],
            master_params[i] if master_params else None,
            prev_masks[i] if prev_masks else None,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decay=decay,
            total_steps=total_steps,
            mask_interval=mask_interval,
            n=n,
            m=m,
            inv_scale=inv_scale,
        )


def _check_adams_tensors(h: dict[str, Any]) -> None:
    """The kernels' rules for the tensors of :func:`adams_step_` (csrc/adams.h), every one
    checked before any work: dtypes, devices, shapes, contiguity, and no tensor the op writes
    sharing memory with another (the kernels' result would depend on their order). ``h``: the
    call's arguments, by name."""
    from .ops import _packed_shape

    op = "cast_ext.adams_step_: "
    keys = [
        "params",
        "grads",
        "exp_avgs",
        "exp_avg_sqs",
        "master_params",
        "masks",
        "prev_masks",
        "steps",
    ]
    lists: dict[str, Sequence[Tensor]] = {k: h[k] for k in keys}
    params, m = lists["params"], h["m"]
    for i, p in enumerate(params):
        shape = list(p.shape)
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16) or (
            p.dtype != torch.float32 and not lists["master_params"]
        ):
            raise RuntimeError(
                f"{op}params[{i}] is {p.dtype}: params must be float32, or float16/bfloat16 "
                "with fp32 master_params"
            )
        if lists["masks"] and (p.dim() == 0 or shape[-1] % m):
            raise RuntimeError(
                f"{op}params[{i}] of shape {shape} is sparse: its last dim must be a multiple "
                f"of m={m}"
            )
        _check_one_float(f"steps[{i}]", lists["steps"][i], params)
        packed = _packed_shape(shape, shape[-1]) if lists["masks"] else None
        expected = {  # name -> (shape, dtype)
            "params": (shape, params[0].dtype),
            "grads": (shape, p.dtype),
            "exp_avgs": (shape, torch.float32),
            "exp_avg_sqs": (shape, torch.float32),
            "master_params": (shape, torch.float32),
            "masks": (packed, torch.uint8),
            "prev_masks": (packed, torch.uint8),
        }
        for name, (want, dtype) in expected.items():
            t = lists[name][i] if lists[name] else None
            if t is None:
                continue
            if list(t.shape) != want or t.dtype != dtype:
                raise RuntimeError(
                    f"{op}{name}[{i}] is {t.dtype} {list(t.shape)}; params[{i}] "
                    f"({p.dtype} {shape}) needs {dtype} {want}"
                )
            if t.device != params[0].device:
                raise RuntimeError(
                    f"{op}{name}[{i}] is on {t.device} but params[0] is on {params[0].device}"
                )
            if not t.is_contiguous():
                raise RuntimeError(
                    f"{op}{name}[{i}] of shape {list(t.shape)} must be contiguous (the "
                    "kernels walk every tensor as one flat array)"
                )
    # Byte ranges [begin, end) of the non-empty tensors (contiguous, checked above).
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name != "grads", f"{name}[{i}]")
        for name, ts in lists.items()
        for i, t in enumerate(ts)
        if t.numel()
    )
    reach = {True: (0, ""), False: (0, "")}  # furthest end of written / read-only spans so far
    for begin, end, written, name in spans:
        hit = reach[True] if begin < reach[True][0] else None
        if hit is None and written and begin < reach[False][0]:
            hit = reach[False]
        if hit is not None:
            raise RuntimeError(
                f"{op}{name} shares memory with {hit[1]}; every tensor the op writes must have "
                "memory of its own (no aliasing or overlapping tensors)"
            )
        if end > reach[written][0]:
            reach[written] = (end, name)


def _check_one_float(name: str, t: Tensor, params: list[Tensor]) -> None:
    """A step count, grad_scale or found_inf: one fp32 element on params[0]'s device."""
    if t.dtype != torch.float32 or t.numel() != 1:
        raise RuntimeError(
            f"cast_ext.adams_step_: {name} of shape {list(t.shape)} and dtype {t.dtype} must be "
            "a one-element float32 tensor"
        )
    if params and t.device != params[0].device:
        raise RuntimeError(
            f"cast_ext.adams_step_: {name} is on {t.device} but params[0] is on {params[0].device}"
        )


def _check_labels(op: str, labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"cast_ext.{op}: labels[{i}] = {int(labels[i])} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


def distill_fwd(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row terms of CAST's distillation loss (SPEC §4), in fp32.

    For a row ``r`` of the ``[N, V]`` logits whose label ``y = labels[r]`` is not
    ``ignore_index``, with ``T = temperature``:

    * ``kl[r] = T^2 * KL(softmax(t / T) || softmax(s / T))`` (0 when ``teacher`` is None; a
      teacher entry of probability 0 in fp32 (a logit of -inf, a mask's finfo.min, one that
      underflows) adds 0 to the sum, whatever the student's logit: 0 log(0 / q) = 0);
    * ``ce[r] = logsumexp(s) - s[y]``;
    * ``lse[r] = (logsumexp(s / T), logsumexp(t / T), logsumexp(s))`` (the middle one 0 when
      ``teacher`` is None), what :func:`distill_bwd` needs to rebuild the softmaxes.

    Rows whose label is ``ignore_index`` give 0 in all five. A label outside ``[0, V)`` that is
    not ``ignore_index`` is an error. Math in fp32 whatever the logits' dtype.

    Returns:
        ``(kl [N], ce [N], lse [N, 3])``, fp32.
    """
    _check_labels("distill_fwd", labels, student.shape[-1], ignore_index)
    valid = labels != ignore_index
    s = student.float()
    lse_s1 = torch.logsumexp(s, dim=-1)
    lse_st = torch.logsumexp(s / temperature, dim=-1)
    ce = lse_s1 - s.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    if teacher is None:
        kl = torch.zeros_like(ce)
        lse_tt = torch.zeros_like(ce)
    else:
        t = teacher.float()
        lt = torch.log_softmax(t / temperature, dim=-1)
        ls = torch.log_softmax(s / temperature, dim=-1)
        # p_t * (log p_t - log q): 0 where p_t = 0 (a teacher logit of -inf, a mask's
        # finfo.min, one that underflows), whatever q is (0 log 0/q = 0, q = 0 included)
        p_t = lt.exp()
        terms = torch.where(p_t == 0, 0.0, p_t * (lt - ls))
        kl = terms.sum(-1) * (temperature * temperature)
        lse_tt = torch.logsumexp(t / temperature, dim=-1)
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    kl, ce = torch.where(valid, kl, zero), torch.where(valid, ce, zero)
    lse = torch.where(valid.unsqueeze(-1), torch.stack([lse_st, lse_tt, lse_s1], -1), zero)
    return kl, ce, lse


def distill_bwd(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    grad_scale: Tensor,
    eta: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Gradient of ``grad_scale * sum over valid rows of (eta * kl[r] + (1 - eta) * ce[r])``
    (:func:`distill_fwd`'s terms) with respect to ``student``, teacher held constant.

    Per valid row: ``grad_scale * (eta * T * (softmax(s / T) - softmax(t / T))
    + (1 - eta) * (softmax(s) - onehot(y)))``, the softmaxes rebuilt from ``lse`` as
    ``exp(s / T - lse[r, 0])``, ``exp(t / T - lse[r, 1])`` and ``exp(s - lse[r, 2])``; rows whose
    label is ``ignore_index`` get 0. ``teacher`` may be None only when ``eta == 0``.
    ``grad_scale`` is a 0-d fp32 tensor (``d loss / d sum``, e.g. ``1 / number of valid rows``).

    Returns:
        The gradient, ``student``'s shape and dtype (math in fp32, one rounding).
    """
    if teacher is None and eta != 0.0:
        raise ValueError("cast_ext.distill_bwd: teacher is None but eta != 0")
    valid = (labels != ignore_index).unsqueeze(-1)
    s = student.float()
    g = (1.0 - eta) * torch.exp(s - lse[:, 2:3])
    g.scatter_add_(
        -1,
        torch.where(valid.squeeze(-1), labels, 0).unsqueeze(-1),
        torch.full_like(lse[:, :1], -(1.0 - eta)),
    )
    if teacher is not None:
        q = torch.exp(s / temperature - lse[:, 0:1]) - torch.exp(
            teacher.float() / temperature - lse[:, 1:2]
        )
        g = g + (eta * temperature) * q
    g = torch.where(valid, g * grad_scale.float(), torch.zeros((), device=g.device))
    return g.to(student.dtype)
