"""Ranger: RAdam + Lookahead (+ gradient centralisation), the optimiser of the StyleCLIP / StyleGAN-NADA
latent mapper, with the defaults of its reference version 20.4.11: betas (0.95, 0.999), eps 1e-5,
Lookahead k = 6, alpha = 0.5, gradient centralisation on every weight with more than one dimension.

The RAdam update is ``torch.optim.RAdam``'s (the same rectification, threshold 5 and bias corrections
as the reference); Lookahead keeps a slow copy of each parameter in the optimiser state, so
``state_dict()`` round-trips everything and a resumed run continues exactly.
"""
from __future__ import annotations

import torch


class Ranger(torch.optim.RAdam):
    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.5, k: int = 6, betas=(0.95, 0.999),
                 eps: float = 1e-5, weight_decay: float = 0.0, use_gc: bool = True):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"invalid Lookahead alpha {alpha}")
        if k < 1:
            raise ValueError(f"invalid Lookahead k {k}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        for group in self.param_groups:
            group.setdefault("alpha", alpha)
            group.setdefault("k", k)
            group.setdefault("use_gc", use_gc)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fresh = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_gc"] and p.grad.ndim > 1:  # gradient centralisation: zero-mean per output row
                    p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.ndim)), keepdim=True))
                if "slow_buffer" not in self.state[p]:
                    fresh[p] = p.detach().clone()  # Lookahead's slow weights start at the weights before step 1
        super().step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p in fresh:
                    state["slow_buffer"] = fresh[p]
                if int(state["step"]) % group["k"] == 0:  # every k steps: slow += alpha (fast - slow); fast = slow
                    slow = state["slow_buffer"]
                    slow.add_(p - slow, alpha=group["alpha"])
                    p.copy_(slow)
        return loss
