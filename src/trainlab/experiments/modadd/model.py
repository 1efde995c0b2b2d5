"""A small pre-norm transformer for (a + b) mod p, after Power et al. 2022 ("Grokking",
arXiv:2201.02177): the input is the sequence [a, b, =], the answer is read at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob


@dataclass
class ModAddModelConfig:
    dim: int = knob(128, "width of the residual stream", ge=8)
    layers: int = knob(2, "transformer blocks", ge=1)
    heads: int = knob(4, "attention heads (dim must divide evenly)", ge=1)
    mlp_ratio: int = knob(4, "MLP hidden width as a multiple of dim", ge=1)
    dropout: float = knob(0.0, "dropout after attention and MLP", ge=0, lt=1)


class Block(nn.Module):
    def __init__(self, cfg: ModAddModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.norm2(x)))


class ModAddTransformer(nn.Module):
    SEQ_LEN = 3  # a, b, "="

    def __init__(self, cfg: ModAddModelConfig, modulus: int):
        super().__init__()
        self.tok = nn.Embedding(modulus + 1, cfg.dim)  # residues 0..p-1 and the "=" token p
        self.pos = nn.Parameter(torch.zeros(self.SEQ_LEN, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, modulus, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 3) -> logits over residues (B, p), read at the "=" position."""
        x = self.tok(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -1]))
