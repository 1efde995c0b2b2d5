"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675).

    c = beta1 * m + (1 - beta1) * g          # interpolation used for the update
    p <- p * (1 - lr * wd) - lr * sign(c)    # decoupled weight decay
    m <- beta2 * m + (1 - beta2) * g

Written here rather than taken from lion-pytorch because we need the momentum buffer stored in
bf16 (the SHA-256 curriculum's memory saving) with the arithmetic done in fp32, which lion-pytorch does not offer.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from trainlab.optim.state_dtypes import restore_buffer_dtypes


class Lion(Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, momentum_dtype: torch.dtype | None = None):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.momentum_dtype = momentum_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.momentum_dtype is not None:
            restore_buffer_dtypes(self, state_dict, lambda p, saved: {"exp_avg": self.momentum_dtype})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.momentum_dtype or p.dtype,
                                                        memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                grad = p.grad.float() if exp_avg.dtype != p.grad.dtype else p.grad
                momentum = exp_avg.float() if exp_avg.dtype != grad.dtype else exp_avg
                update = momentum.lerp(grad, 1 - beta1).sign_()
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
                exp_avg.copy_(momentum.lerp_(grad, 1 - beta2))
        return loss
