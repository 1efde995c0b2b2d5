"""Optimizer-state memory of each optimizer setting on a transformer-shaped stack of linear layers.

    python bench/optimizer_memory.py [--width 512] [--depth 4] [--rank 128] [--device cuda]

Each setting takes one step (optimizers allocate their state lazily) and its state is measured
with trainlab.optim.optimizer_state_bytes: the bytes of every tensor in optimizer.state, so the
GaLore projections count too.  Parameters, gradients and activations are the same for every
setting and are not counted.  The last lines, one per setting, read
`optimizer state <setting>: <MiB> MiB (<ratio> x adamw)`.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from trainlab.config import OptimConfig
from trainlab.optim import build_optimizer, optimizer_state_bytes

MiB = 1024 * 1024


class Block(nn.Module):
    """A pre-norm transformer block's parameter shapes: qkv (3d x d), out (d x d), mlp (4d x d,
    d x 4d), two LayerNorms.  The mixing is a cheap gate, not attention: only the shapes and the
    gradients matter here."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.out(q * torch.sigmoid(k) * v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def settings(rank: int) -> dict[str, OptimConfig]:
    return {
        "adamw": OptimConfig(name="adamw"),
        "lion-fp32": OptimConfig(name="lion", lr=1e-4),
        "lion-bf16": OptimConfig(name="lion", lr=1e-4, momentum_dtype="bf16"),
        f"galore-adamw-r{rank}": OptimConfig(name="adamw", galore_rank=rank),
        f"galore-lion-bf16-r{rank}": OptimConfig(name="lion", lr=1e-4, momentum_dtype="bf16", galore_rank=rank),
    }


def measure(cfg: OptimConfig, args: argparse.Namespace, device: torch.device) -> tuple[int, float, int]:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(args.width) for _ in range(args.depth)]).to(device)
    opt = build_optimizer(cfg, model, device)
    x = torch.randn(args.batch, args.width, device=device)
    model(x).pow(2).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.step()  # the first step: allocates the state and, for GaLore, runs the SVDs
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return optimizer_state_bytes(opt), seconds, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512, help="model width d")
    parser.add_argument("--depth", type=int, default=4, help="number of blocks")
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank")
    parser.add_argument("--batch", type=int, default=8, help="rows of the random input")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = [(name, *measure(cfg, args, device)) for name, cfg in settings(args.rank).items()]
    n_params = rows[0][3]
    adamw = rows[0][1]
    print(f"model: {args.depth} blocks of width {args.width}, {n_params / 1e6:.2f}M parameters "
          f"({4 * n_params / MiB:.1f} MiB in fp32), GaLore rank {args.rank}, device {device}")
    print(f"{'setting':<24} {'state MiB':>10} {'x adamw':>8} {'first step s':>13}")
    for name, nbytes, seconds, _ in rows:
        print(f"{name:<24} {nbytes / MiB:>10.2f} {nbytes / adamw:>8.3f} {seconds:>13.3f}")
    print()
    for name, nbytes, _, _ in rows:
        print(f"optimizer state {name}: {nbytes / MiB:.2f} MiB ({nbytes / adamw:.3f} x adamw)")


if __name__ == "__main__":
    main()
