"""The 3^9 = 19,683 ternary operations, their 3-adic valuations, and the batch stream.

An operation is an index n in [0, 3^9); its 9 trits are the base-3 digits of n shifted to
{-1, 0, 1}: trit i = (n // 3^i) mod 3 - 1.  Its valuation v_3(n) is how many times 3 divides n
(0 for 2/3 of the operations), with v(0) = 9 by convention: 0 is divisible by every power of 3,
and 9 is one more than any other index reaches.

`OperationBatches.batch(step, micro)` is a pure function of (seed, step, micro), so a resumed run
draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch

from trainlab.engine.state import step_seed
from trainlab.errors import ConfigError

N_TRITS = 9
N_OPS = 3 ** N_TRITS
MAX_VALUATION = N_TRITS  # v(0); every other index has v <= 8

_POWERS = 3 ** torch.arange(N_TRITS, dtype=torch.long)  # 3^0 .. 3^8
# third argument of step_seed for the per-epoch permutations: keeps those streams apart from the
# per-(step, micro) streams of stratified sampling should a run ever mix the two
_PERMUTATION_STREAM = 0x7E57


def _as_index(indices: torch.Tensor) -> torch.Tensor:
    indices = torch.as_tensor(indices).long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= N_OPS):
        raise ValueError(f"operation indices must be in [0, {N_OPS}), "
                         f"got {int(indices.min())}..{int(indices.max())}")
    return indices


def trits(indices: torch.Tensor) -> torch.Tensor:
    """[..., 9] long in {-1, 0, 1}: trit i of index n is (n // 3^i) mod 3 - 1."""
    n = _as_index(indices)
    return (n.unsqueeze(-1) // _POWERS.to(n.device)) % 3 - 1


def valuation(indices: torch.Tensor) -> torch.Tensor:
    """Long tensor of v_3(n) for each index n, with v(0) = 9."""
    n = _as_index(indices)
    v = torch.zeros_like(n)
    for power in range(1, N_TRITS + 1):  # v = how many of 3, 9, ..., 3^9 divide n
        v += (n % 3 ** power == 0).long()
    return v


def level_counts() -> list[int]:
    """How many operations have v = 0, 1, ..., 9 (13122, 4374, ..., 2, 1)."""
    return valuation(torch.arange(N_OPS)).bincount(minlength=MAX_VALUATION + 1).tolist()


class Operations:
    """All 19,683 operations on one device: `index` long [N], `x` float [N, 9] in {-1, 0, 1},
    `target` long [N, 9] = x + 1 in {0, 1, 2} (cross-entropy classes), `v` long [N]."""

    def __init__(self, device: torch.device | str = "cpu"):
        index = torch.arange(N_OPS)
        digits = trits(index)
        self.device = torch.device(device)
        self.index = index.to(self.device)
        self.x = digits.float().to(self.device)
        self.target = (digits + 1).to(self.device)
        self.v = valuation(index).to(self.device)

    def __len__(self) -> int:
        return N_OPS

    def take(self, picks: torch.Tensor) -> dict:
        """The batch dict (x, target, v, index) for the operations at `picks` (long, any device)."""
        picks = picks.to(self.device)
        return {"x": self.x[picks], "target": self.target[picks], "v": self.v[picks], "index": self.index[picks]}


class OperationBatches:
    """The training data stream: `batch(step, micro)` -> {x, target, v, index} of `batch_size` operations.

    The engine calls micro = 0 .. accum-1 for each optimizer step; (step, micro) is the global
    micro-batch g = step * accum + micro.

    Plain (stratified=False): epoch sampling without replacement.  The operations form one endless
    stream, the concatenation of a fresh random permutation per epoch (epoch e's permutation comes
    from a generator seeded by (seed, e)), and micro-batch g is items [g*B, (g+1)*B) of it.  Every
    batch has exactly B operations; when B divides 19,683 each epoch is exactly 19,683 / B batches
    and covers every operation once; otherwise a batch straddles the boundary, taking the tail of
    epoch e and the head of e+1 (it may then hold one operation twice), and epoch_of stays exact.

    stratified=True: each batch is drawn with replacement from a generator seeded by
    (seed, step, micro).  Exactly round(B * high_v_share) of it come uniformly from the operations
    with v >= high_v_min (the first rows), the rest uniformly from those with v < high_v_min, so the
    share of high-valuation operations is exactly what high_v_share says; drawing the rest from the
    whole set would add another 1/9 (for high_v_min = 2) of them by chance, and the knob would not
    mean its value.  high_v_share and high_v_min are read only when stratified.

    `level` (a curriculum value) is accepted and ignored: this stream has no curriculum.
    """

    def __init__(self, ops: Operations, batch_size: int, seed: int, high_v_share: float = 0.0,
                 high_v_min: int = 2, stratified: bool = False, accum: int = 1):
        if batch_size < 1:
            raise ConfigError("train.micro_batch", f"must be at least 1, got {batch_size}")
        if accum < 1:
            raise ConfigError("train.accum", f"must be at least 1, got {accum}")
        if not 0.0 <= high_v_share <= 1.0:
            raise ConfigError("data.high_v_share", f"must be in [0, 1], got {high_v_share}")
        if not 1 <= high_v_min <= MAX_VALUATION:
            # 0 would leave no operation with v < high_v_min to fill the rest of the batch
            raise ConfigError("data.high_v_min", f"must be in [1, {MAX_VALUATION}], got {high_v_min}")
        self.ops = ops
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.accum = int(accum)
        self.stratified = bool(stratified)
        self.high_v_share = float(high_v_share)
        self.high_v_min = int(high_v_min)
        self.high_per_batch = round(self.batch_size * self.high_v_share)
        v = ops.v.cpu()  # the pools index the CPU draws (picks), whatever device ops live on
        self.high_pool = torch.nonzero(v >= self.high_v_min).flatten()
        self.low_pool = torch.nonzero(v < self.high_v_min).flatten()
        self._permutations: dict[int, torch.Tensor] = {}  # a cache: the result stays a pure function

    def epoch_of(self, step: int) -> float:
        """Passes over the 19,683 operations that `step` optimizer steps make."""
        return step * self.batch_size * self.accum / N_OPS

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps needed for `epochs` passes (rounded up): the inverse of epoch_of."""
        return math.ceil(epochs * N_OPS / (self.batch_size * self.accum))

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._permutations.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, _PERMUTATION_STREAM))
            perm = torch.randperm(N_OPS, generator=g)
            if len(self._permutations) >= 4:  # a batch spans at most two epochs unless B > N
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[epoch] = perm
        return perm

    def _epoch_picks(self, global_micro: int) -> torch.Tensor:
        start = global_micro * self.batch_size
        stop = start + self.batch_size
        parts = []
        for epoch in range(start // N_OPS, (stop - 1) // N_OPS + 1):
            lo, hi = max(start, epoch * N_OPS) - epoch * N_OPS, min(stop, (epoch + 1) * N_OPS) - epoch * N_OPS
            parts.append(self._permutation(epoch)[lo:hi])
        return torch.cat(parts)

    def _stratified_picks(self, step: int, micro: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.seed, step, micro))
        n_high = self.high_per_batch
        high = self.high_pool[torch.randint(len(self.high_pool), (n_high,), generator=g)]
        low = self.low_pool[torch.randint(len(self.low_pool), (self.batch_size - n_high,), generator=g)]
        return torch.cat([high, low])

    def picks(self, step: int, micro: int) -> torch.Tensor:
        """The operation indices (CPU long [B]) of micro-batch (step, micro)."""
        if not 0 <= micro < self.accum:
            raise ValueError(f"micro must be in [0, {self.accum}), got {micro}")
        if self.stratified:
            return self._stratified_picks(step, micro)
        return self._epoch_picks(step * self.accum + micro)

    def batch(self, step: int, micro: int, level: float | None = None) -> dict:
        return self.ops.take(self.picks(step, micro))
