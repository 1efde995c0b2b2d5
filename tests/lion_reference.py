"""Lion's rule written out from the paper (Chen et al. 2023, arXiv:2302.06675, Algorithm 2) as plain
tensor arithmetic: the oracle for trainlab.optim.lion.Lion and for GaLore-Lion's inner rule.  It
shares no code with them -- no lerp, no in-place buffers -- so a slip there cannot hide here.

    c = beta1 * m + (1 - beta1) * g
    p <- p * (1 - lr * wd) - lr * sign(c)
    m <- beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

import torch


def lion_direction(momentum: torch.Tensor, grad: torch.Tensor, betas: tuple[float, float],
                   momentum_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sign(c), the next momentum, c) for one step.  The arithmetic is fp32; the next momentum is
    rounded to `momentum_dtype` where the optimizer stores it in that dtype (bf16, say)."""
    beta1, beta2 = betas
    m, g = momentum.float(), grad.float()
    c = beta1 * m + (1 - beta1) * g
    next_m = beta2 * m + (1 - beta2) * g
    return torch.sign(c), next_m if momentum_dtype is None else next_m.to(momentum_dtype), c


def lion_step(param: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float,
              betas: tuple[float, float], weight_decay: float,
              momentum_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the next parameter, the next momentum, c): one Lion step with decoupled weight decay."""
    direction, next_m, c = lion_direction(momentum, grad, betas, momentum_dtype)
    return param * (1 - lr * weight_decay) - lr * direction, next_m, c


def momentum_flipping_grads(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients under which the momentum, not the gradient, decides most signs: one large first
    gradient (about +-30) builds a momentum that later small ones (about N(0, 1)) rarely outweigh,
    so sign(c) != sign(g) for about half the entries from step 2 on.  A Lion that ignored its
    momentum (or read the wrong one) would take the gradient's sign there."""
    gen = torch.Generator().manual_seed(seed)
    first = 30 * torch.sign(torch.randn(shape, generator=gen)) + torch.randn(shape, generator=gen)
    return [first] + [torch.randn(shape, generator=gen) for _ in range(steps - 1)]


def flipped_share(c: torch.Tensor, grad: torch.Tensor) -> float:
    """The share of entries where the momentum overturned the gradient's sign."""
    return (torch.sign(c) != torch.sign(grad)).float().mean().item()
