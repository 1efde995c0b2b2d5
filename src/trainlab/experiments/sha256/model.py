"""SparseLogicTransformer (the SHA-256 curriculum's name): a bidirectional transformer over 32-bit word tokens,
built from BitLinear b1.58 layers, that predicts the 256 bits of the SHA-256 working state.

Tokens are words given as 32 bits (mapped to +-1); the answer is read at the first 8 positions
(the a..h slots), 32 logits each.  BitLinear normalises its own input (RMSNorm inside the layer), so
blocks have no separate pre-norms in the ternary model; `linear: dense` swaps in nn.Linear with
RMSNorm pre-norms as the full-precision baseline.  Embedding and head stay full precision, as in
the BitNet papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.nn import BitLinear, RMSNorm

WORD_BITS = 32
STATE_WORDS = 8


@dataclass
class Sha256ModelConfig:
    dim: int = knob(128, "width of the residual stream", ge=8)
    layers: int = knob(2, "transformer blocks", ge=1)
    heads: int = knob(4, "attention heads (dim must divide evenly)", ge=1)
    mlp_ratio: int = knob(4, "MLP hidden width as a multiple of dim", ge=1)
    linear: Literal["bitlinear", "dense"] = knob("bitlinear", "BitLinear b1.58 (ternary) or nn.Linear (baseline)")


def _linear(kind: str, fan_in: int, fan_out: int) -> nn.Module:
    if kind == "bitlinear":
        return BitLinear(fan_in, fan_out)
    return nn.Sequential(RMSNorm(fan_in), nn.Linear(fan_in, fan_out, bias=False))


class LogicBlock(nn.Module):
    def __init__(self, cfg: Sha256ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = _linear(cfg.linear, cfg.dim, 3 * cfg.dim)
        self.proj = _linear(cfg.linear, cfg.dim, cfg.dim)
        self.up = _linear(cfg.linear, cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.down = _linear(cfg.linear, cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # every word sees every word: no causal mask
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(x)))


class SparseLogicTransformer(nn.Module):
    def __init__(self, cfg: Sha256ModelConfig, tokens: int):
        super().__init__()
        self.embed = nn.Linear(WORD_BITS, cfg.dim)
        self.pos = nn.Parameter(torch.randn(tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(LogicBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, WORD_BITS)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        """bits (B, T, 32) in {0, 1} -> logits (B, 256) for a..h, most significant bit first."""
        x = self.embed(bits.to(self.pos.dtype) * 2 - 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, :STATE_WORDS])).flatten(1)
