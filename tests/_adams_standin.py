"""Test-only stand-in for ``cast_ext.AdamS`` while the real optimizer is built on another branch.

Same constructor, param-group ``sparse`` flag, ``mask(p)`` and state layout as the planned API,
implementing ``cast_ext.reference.adams_step_`` (the spec; checked against it in the tests).
Tests use ``cast_ext.AdamS`` when it exists and fall back to this; nothing in the package
imports it.
"""

from __future__ import annotations

import torch

import cast_ext


class StandInAdamS(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decay: float = 4e-7,
        total_steps: int,
        mask_interval: int = 10,
        n: int = 2,
        m: int = 4,
        impl: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decay=decay,
            total_steps=total_steps,
            mask_interval=mask_interval,
            n=n,
            m=m,
            sparse=None,
        )
        super().__init__(params, defaults)

    def _is_sparse(self, group, p) -> bool:
        if group["sparse"] is None:
            return p.dim() == 2 and p.shape[-1] % group["m"] == 0
        return bool(group["sparse"]) and p.dim() == 2

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                sparse = self._is_sparse(group, p)
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if sparse:
                        st["mask"] = cast_ext.pack_mask(
                            cast_ext.nm_mask(p.detach(), group["n"], group["m"])
                        )
                t = int(st["step"])
                if sparse and t % group["mask_interval"] == 0:
                    st["mask"].copy_(
                        cast_ext.pack_mask(cast_ext.nm_mask(p.detach(), group["n"], group["m"]))
                    )
                # reference.adams_step_ written out (its mask refresh uses the slow reference
                # nm_mask; tests check this against it)
                g = p.grad.float()
                w = p
                if group["weight_decay"]:
                    w.mul_(1.0 - group["lr"] * group["weight_decay"])
                mu, v = st["exp_avg"], st["exp_avg_sq"]
                mu.mul_(b1).add_((1.0 - b1) * g)
                if sparse:
                    kept = cast_ext.unpack_mask(st["mask"], p.shape[-1])
                    alpha = min(t / group["total_steps"], 1.0)
                    decayed = (1.0 - alpha) * mu + (alpha * group["decay"]) * torch.sign(w)
                    mu_eff = torch.where(kept, mu, decayed)
                else:
                    mu_eff = g
                v.mul_(b2).add_((1.0 - b2) * mu_eff * mu_eff)
                bc1 = 1.0 - b1 ** (t + 1)
                bc2 = 1.0 - b2 ** (t + 1)
                upd = (mu_eff if sparse else mu) / bc1 / ((v / bc2).sqrt() + group["eps"])
                w.sub_(group["lr"] * upd)
                st["step"].add_(1)
        return loss

    def mask(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "mask" not in st:
            raise KeyError("no mask for this parameter (not sparse, or no step taken yet)")
        return cast_ext.unpack_mask(st["mask"], p.shape[-1])


def adams_class():
    """``cast_ext.AdamS`` if it exists, else the stand-in."""
    return getattr(cast_ext, "AdamS", StandInAdamS)
