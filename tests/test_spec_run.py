"""The whole CAST run (SPEC §1-5) written in plain torch, against the library's run on a tiny LLaMA.

The plain side below uses no cast_ext code: N:M mask with the tie rule (§1), AdamS per element and
Adam for the rest (§2), A [out, n] by column blocks (§3), eta * KL(teacher || student) + (1 - eta)
* CE over next tokens (§4), the loop with a frozen teacher, refreshes every T1 steps and finalize
W <- (A * W) * mask (§5).

The two runs are compared in lockstep: each step, the plain side starts from the library's state
(weights, scales, other params, exp_avg, exp_avg_sq, masks) and computes the loss, the gradients,
the mask and the optimizer update; they must agree to fp32 rounding. Trajectories are not
compared over many steps: AdamS divides by the momentum's magnitude, so elements whose gradient is
at rounding level, and pruned weights crossing zero (sign(w) flips the decay), make two roundings
of the same run drift apart (plain fp32 vs plain fp64 differs more than plain fp32 vs library).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import cast_ext
from cast_ext import cast

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------ plain CAST, from SPEC only
def plain_nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    g = w.detach().abs().reshape(-1, m)
    a, b = g.unsqueeze(-1), g.unsqueeze(-2)  # element i, element j
    idx = torch.arange(m)
    beats = (b > a) | ((b == a) & (idx[None, :] < idx[:, None]))  # j beats i (ties: lower index)
    return (beats.sum(-1) < n).reshape(w.shape)


def plain_scale(A: torch.Tensor, in_features: int) -> torch.Tensor:
    return A.repeat_interleave(in_features // A.shape[1], dim=1)  # A[r, c // (in / n)]


def plain_loss(s_logits, t_logits, ids, eta, tau):
    vocab = s_logits.shape[-1]
    s = s_logits[:, :-1].reshape(-1, vocab)
    t = t_logits[:, :-1].reshape(-1, vocab)
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    lp_s, lp_t = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean() * tau * tau
    return eta * kl + (1 - eta) * ce


@torch.no_grad()
def plain_step_(p, g, mu, v, mask, *, t, lr, betas, eps, weight_decay, lam=0.0, total_steps=1):
    """AdamS (mask given) or Adam(W) (mask None); t = completed steps."""
    b1, b2 = betas
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    mu.mul_(b1).add_((1 - b1) * g)
    if mask is None:
        mu_eff, second = mu, g * g
    else:
        alpha = min(t / total_steps, 1.0)
        mu_eff = torch.where(mask, mu, (1 - alpha) * mu + alpha * lam * torch.sign(p))
        second = mu_eff * mu_eff
    v.mul_(b2).add_((1 - b2) * second)
    p.sub_(lr * (mu_eff / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + eps))


# ------------------------------------------------------------------ the comparison
def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).float()


def _rel(x, y):
    x, y = x.double(), y.double()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


CONFIGS = {
    "defaults": dict(impl="auto", wd=0.0, tau=1.0, eta=1 / 3, n=2, m=4, blocks=2),
    "reference-wd-tau-blocks4": dict(
        impl="reference", wd=0.1, tau=2.0, eta=0.5, n=2, m=4, blocks=4
    ),
    "4:8-blocks1": dict(impl="auto", wd=0.0, tau=1.0, eta=1 / 3, n=4, m=8, blocks=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cast_run_matches_plain_spec_in_lockstep(name):
    c = CONFIGS[name]
    lr, lam, betas, eps, T, T1, steps = 1e-3, 1e-3, (0.9, 0.95), 1e-8, 8, 3, 10  # past T
    base = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 96, (2, 16), generator=g) for _ in range(3)]

    model = copy.deepcopy(base)
    teacher = copy.deepcopy(model).eval()  # SPEC §5: a frozen copy of the dense model
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = cast.prepare(model, scale_blocks=c["blocks"])
    opt = cast_ext.AdamS(
        cast.param_groups(model, weight_decay=c["wd"]),
        lr=lr,
        betas=betas,
        eps=eps,
        decay=lam,
        total_steps=T,
        mask_interval=T1,
        n=c["n"],
        m=c["m"],
        impl=c["impl"],
    )
    assert {L.name.split(".")[-1] for L in layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }  # every Linear of the decoder layers, not the head
    sparse_ids = {id(L.weight) for L in layers}
    scale_ids = {id(L.scale) for L in layers}
    plain_model = copy.deepcopy(base)
    masks = {}
    model.train()
    for t in range(steps):
        ids = data[t % len(data)]
        logits = model(ids).logits
        with torch.no_grad():
            t_logits = teacher(ids).logits
        loss = cast.distill_loss(
            logits,
            t_logits,
            cast.shift_labels(ids),
            eta=c["eta"],
            temperature=c["tau"],
            impl=c["impl"],
        )
        opt.zero_grad()
        loss.backward()

        # plain forward/backward from the library's current state
        lib_params = dict(model.named_parameters())
        Ws = [L.weight.detach().clone().requires_grad_(True) for L in layers]
        As = [L.scale.detach().clone().requires_grad_(True) for L in layers]
        used = {
            L.name + ".weight": plain_scale(A, L.in_features) * W
            for L, W, A in zip(layers, Ws, As, strict=True)
        }
        others = {
            k: p
            for k, p in lib_params.items()
            if id(p) not in sparse_ids and id(p) not in scale_ids
        }
        Ds = {k: p.detach().clone().requires_grad_(True) for k, p in others.items()}
        used.update(Ds)
        out = functional_call(plain_model, used, (ids,)).logits
        p_loss = plain_loss(out, t_logits, ids, c["eta"], c["tau"])
        p_grads = torch.autograd.grad(p_loss, Ws + As + list(Ds.values()))
        lib_list = [L.weight for L in layers] + [L.scale for L in layers] + list(others.values())
        assert abs(p_loss.item() - loss.item()) <= 1e-5 * abs(loss.item()), (t, p_loss, loss)
        for pg, p in zip(p_grads, lib_list, strict=True):
            assert _rel(p.grad, pg) < 2e-5, (t, list(p.shape), _rel(p.grad, pg))

        # the mask: refreshed at the start of steps 0, T1, 2 T1, ... from |W|
        if t % T1 == 0:
            masks = {L.name: plain_nm_mask(L.weight, c["n"], c["m"]) for L in layers}
        # the plain update, with the library's gradients, from the library's optimizer state
        planned = []
        for i, p in enumerate(lib_list):
            st = opt.state.get(p, {})
            mu = st["exp_avg"].clone() if "exp_avg" in st else torch.zeros_like(p)
            v = st["exp_avg_sq"].clone() if "exp_avg_sq" in st else torch.zeros_like(p)
            q = p.detach().clone()
            is_sparse = i < len(layers)
            is_scale = len(layers) <= i < 2 * len(layers)
            plain_step_(
                q,
                p.grad.clone(),
                mu,
                v,
                masks[layers[i].name] if is_sparse else None,
                t=t,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=0.0 if is_scale else c["wd"],
                lam=lam,
                total_steps=T,
            )
            planned.append((p, q, mu, v, layers[i].name if is_sparse else None))
        opt.step()
        for p, q, mu, v, lname in planned:
            st = opt.state[p]
            assert int(st["step"]) == t + 1
            assert (p.detach() - q).abs().max() <= 1e-3 * lr, (t, lname, list(p.shape))
            assert _rel(st["exp_avg"], mu) < 1e-6 and _rel(st["exp_avg_sq"], v) < 1e-6, (t, lname)
            if lname is not None:
                assert torch.equal(opt.mask(p), masks[lname]), (t, lname)

    # finalize: W <- (A * W) * mask_T (mask_T: the mask of the last step), plain Linear layers
    want = {
        L.name: plain_scale(L.scale.detach(), L.in_features) * L.weight.detach() * masks[L.name]
        for L in layers
    }
    plain_final = copy.deepcopy(plain_model)
    with torch.no_grad():
        lib_params = dict(model.named_parameters())
        for k, p in plain_final.named_parameters():
            mod = k[: -len(".weight")]
            p.copy_(want[mod] if mod in want else lib_params[k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4:8 is not 2:4: finalize warns
        cast.finalize(model, opt)
    final = dict(model.named_parameters())
    for L in layers:
        assert type(L.module) is torch.nn.Linear and not hasattr(L.module, "parametrizations")
        assert torch.equal(final[L.name + ".weight"], want[L.name]), L.name
        kept = (final[L.name + ".weight"] != 0).reshape(-1, c["m"]).sum(-1)
        assert (kept <= c["n"]).all()
    with torch.no_grad():
        torch.testing.assert_close(
            model(data[0]).logits, plain_final(data[0]).logits, rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8)])
def test_masks_with_ties_match_plain_spec(n, m):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (16, 64), generator=g).float() * 0.5  # ties everywhere, zeros, signs
    assert torch.equal(cast_ext.nm_mask(w, n, m), plain_nm_mask(w, n, m))
    if (n, m) == (2, 4):
        assert torch.equal(cast_ext.sparse24_mask(w), plain_nm_mask(w))
