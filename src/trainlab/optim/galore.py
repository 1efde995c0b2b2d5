"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
arXiv:2403.03507) for AdamW and Lion.

For a 2-D weight W (m x n) with min(m, n) > rank r, the gradient G is projected onto a rank-r
subspace taken from its own SVD, G = U S V^T, recomputed every `update_every` steps (and on the
first step).  The paper keeps the smaller of the two possible low-rank views:

    m <= n:  P = U[:, :r]  (m x r),  R = P^T G  (r x n),  update = alpha * P N
    m >  n:  Q = V[:, :r]  (n x r),  R = G Q    (m x r),  update = alpha * N Q^T

where N is the inner optimizer's normalised direction computed from R alone, so its state is
r x n (or m x r) instead of m x n:

    AdamW:  M = b1 M + (1-b1) R;  V = b2 V + (1-b2) R^2;  N = (M / bc1) / (sqrt(V / bc2) + eps)
    Lion:   N = sign(b1 M + (1-b1) R);  M = b2 M + (1-b2) R

    W <- W (1 - lr wd) - lr * update       # decoupled decay on the full weight, as in AdamW/Lion

The moments are kept when the projection is refreshed, as in the paper's algorithm (a subspace
switch does not reset them); from then on they are read in the new basis.  Every other parameter
(1-D, >2-D, or too small to gain from rank r) is optimised by the plain rule at full rank, with
no alpha.

Why not galore-torch (PyPI): it keeps a Python `GaLoreProjector` object in the optimizer state,
which our checkpoints cannot hold (state.pt is read back with torch.load(weights_only=True),
which refuses arbitrary objects), and it has no Lion.  Here the projection is a plain tensor in
the state (`galore_proj`) with the step of its last refresh (`galore_refresh_step`, an int), so
state_dict()/load_state_dict() round-trip through a safe load and resume is bitwise exact.
"""

from __future__ import annotations

import abc
import math

import torch
from torch.optim import Optimizer

from trainlab.optim.state_dtypes import restore_buffer_dtypes

# State keys.  The projection is stored as P (m x r) when the left side is used and as Q (n x r)
# when the right side is; which one is implied by its first dimension (m or n).
PROJ = "galore_proj"
REFRESH = "galore_refresh_step"


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by every tensor in `optimizer.state` (moments, projections, step counters).

    Meaningful after the first step: optimizers allocate their state lazily."""
    total = 0

    def visit(value) -> None:
        nonlocal total
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    return total


def _projected(p: torch.Tensor, rank: int) -> bool:
    # at rank >= min(m, n) a projection saves nothing and only rotates the update
    return p.dim() == 2 and rank > 0 and min(p.shape) > rank


def _left(shape: torch.Size) -> bool:
    """The paper's choice of side: the one whose projected gradient, r x n or m x r, is smaller."""
    m, n = shape
    return m <= n


def _low_rank_shape(shape: torch.Size, rank: int) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if _left(shape) else (m, rank)


def _compute_projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` singular vectors of the gradient on its smaller side, in float32."""
    # float32 because LAPACK/cuSOLVER have no bf16/fp16 SVD and the basis should be accurate;
    # nan_to_num so a non-finite gradient (which the trainer reports and stops on) cannot make
    # the SVD raise mid-step -- the parameters become non-finite as they would with plain AdamW.
    g = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    if _left(grad.shape):
        return u[:, :rank].contiguous()
    return vh[:rank, :].t().contiguous()


def _project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    g = grad.float()
    return proj.t() @ g if _left(grad.shape) else g @ proj


def _project_back(low: torch.Tensor, proj: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return proj @ low if _left(shape) else low @ proj.t()


class _GaLore(Optimizer, metaclass=abc.ABCMeta):
    """The projection bookkeeping shared by both rules; subclasses supply the inner rule."""

    # state keys of the inner rule's buffers, for load_state_dict's dtype restore
    _buffers: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, rank: int, update_every: int, scale: float):
        if defaults["lr"] <= 0:
            raise ValueError(f"lr must be > 0, got {defaults['lr']}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        # per-group keys, so a caller may give some groups their own rank (or rank 0 = off)
        super().__init__(params, dict(defaults, rank=rank, update_every=update_every, scale=scale))

    # ---- to be supplied by the rule ------------------------------------------------------------
    @abc.abstractmethod
    def _buffer_dtype(self, p: torch.Tensor, projected: bool) -> torch.dtype:
        """The dtype the rule keeps its buffers in for parameter `p`."""

    @abc.abstractmethod
    def _init_buffers(self, state: dict, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        """Create the rule's buffers (moments) of `shape` in `state`."""

    @abc.abstractmethod
    def _direction(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance the rule's buffers with `grad` (fp32 when projected, else the gradient's own dtype)
        and return the normalised direction N."""

    # ---- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, rank = group["lr"], group["weight_decay"], group["rank"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLore optimizers do not support sparse gradients")
                state = self.state[p]
                projected = _projected(p, rank)
                if not state:
                    state["step"] = 0  # a plain int: survives weights_only loading untouched
                    shape = _low_rank_shape(p.shape, rank) if projected else tuple(p.shape)
                    self._init_buffers(state, shape, self._buffer_dtype(p, projected), p.device)
                state["step"] += 1
                grad = p.grad
                if projected:
                    # refresh on steps 1, 1 + T, 1 + 2T, ...: the paper's `t mod T == 0`, 1-based
                    if PROJ not in state or (state["step"] - 1) % group["update_every"] == 0:
                        state[PROJ] = _compute_projection(grad, rank)
                        state[REFRESH] = state["step"]
                    low = self._direction(state, _project(grad, state[PROJ]), group)
                    update = _project_back(low, state[PROJ], p.shape).mul_(group["scale"])
                else:
                    update = self._direction(state, grad, group)
                # decoupled decay before the update, as torch.optim.AdamW and our Lion do
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss

    # ---- resume --------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, then put back the dtypes this optimizer keeps its buffers in.

        torch casts every floating state tensor to its parameter's dtype, which would turn bf16
        Lion momentum into fp32 (doubling its memory and changing the arithmetic) and round an
        fp32 projection of a bf16 weight.  The values are taken again from the saved tensors, so
        nothing is rounded twice and a resume continues bitwise."""
        super().load_state_dict(state_dict)

        def dtypes_for(p: torch.Tensor, saved_state: dict) -> dict[str, torch.dtype]:
            projected = PROJ in saved_state
            want = {key: self._buffer_dtype(p, projected) for key in self._buffers}
            want[PROJ] = torch.float32
            return want

        restore_buffer_dtypes(self, state_dict, dtypes_for)


class GaLoreAdamW(_GaLore):
    """AdamW whose moments live in GaLore's rank-r subspace for large 2-D weights."""

    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128,
                 update_every: int = 200, scale: float = 0.25):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                         rank, update_every, scale)

    def _buffer_dtype(self, p, projected):
        # the projected gradient is computed in fp32, so its moments are fp32; full-rank moments
        # follow the parameter, as torch.optim.AdamW does
        return torch.float32 if projected else p.dtype

    def _init_buffers(self, state, shape, dtype, device):
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)

    def _direction(self, state, grad, group):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # the bias corrections use the parameter's step count, which a refresh does not reset:
        # the moments are kept, so their warm-up is not restarted either
        bias1 = 1 - beta1 ** t
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        return (exp_avg / bias1).div_(denom)


class GaLoreLion(_GaLore):
    """Lion (Chen et al. 2023) whose momentum lives in GaLore's rank-r subspace.

    sign() of the low-rank direction is taken in the subspace (the paper's recipe: the inner
    optimizer sees only R), so the update projected back is no longer +-1 per entry; alpha
    scales it as it does for Adam."""

    _buffers = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, rank: int = 128, update_every: int = 200,
                 scale: float = 0.25, momentum_dtype: torch.dtype | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         rank, update_every, scale)
        self.momentum_dtype = momentum_dtype

    def _buffer_dtype(self, p, projected):
        if self.momentum_dtype is not None:
            return self.momentum_dtype
        return torch.float32 if projected else p.dtype

    def _init_buffers(self, state, shape, dtype, device):
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)

    def _direction(self, state, grad, group):
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        # bf16 storage, fp32 arithmetic: the same sequence of ops as trainlab.optim.lion.Lion
        grad = grad.float() if exp_avg.dtype != grad.dtype else grad
        momentum = exp_avg.float() if exp_avg.dtype != grad.dtype else exp_avg
        direction = momentum.lerp(grad, 1 - beta1).sign_()
        exp_avg.copy_(momentum.lerp_(grad, 1 - beta2))
        return direction
