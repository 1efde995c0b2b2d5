"""A decoder-only BitNet b1.58 language model (the BitNet size study).

- Attention and MLP projections are BitLinear b1.58 (ternary weights, 8-bit activations; each
  BitLinear normalises its own input, so blocks carry no separate pre-norms); `linear: dense` swaps
  in RMSNorm + nn.Linear as the full-precision baseline of the same shape.
- Token embedding, final RMSNorm and the language-model head stay full precision, as in the BitNet
  papers (Wang et al. 2023; Ma et al. 2024).  The head is not tied to the embedding.
- Rotary positions (Su et al. 2021, RoFormer, arXiv:2104.09864) on queries and keys, in the
  half-split layout of GPT-NeoX; causal scaled-dot-product attention.
- MLP with squared ReLU, the activation of BitNet b1.58 2B4T (Ma et al. 2025, arXiv:2504.12285).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.nn import BitLinear, RMSNorm

HEAD_DIM = 64


@dataclass
class BitLMModelConfig:
    hidden: int = knob(256, "width of the residual stream (the BitNet size study: 256, 512, 768, 1024)", ge=8)
    layers: int = knob(0, "transformer blocks; 0 = by width: 4 up to 256, 6 up to 512, 8 above "
                          "(the s256..s1024 presets' values)", ge=0)
    heads: int = knob(0, "attention heads; 0 = hidden / 64 (at least 1)", ge=0)
    mlp_ratio: int = knob(4, "MLP hidden width as a multiple of hidden", ge=1)
    linear: Literal["bitlinear", "dense"] = knob("bitlinear", "BitLinear b1.58 (ternary) or nn.Linear (baseline)")
    rope_base: float = knob(10000.0, "rotary base frequency", gt=1)


def resolved_shape(cfg: BitLMModelConfig) -> tuple[int, int]:
    """(layers, heads) with the 0 = automatic rule applied; ValueError when the heads cannot split
    hidden into rotary-ready (even) head sizes."""
    layers = cfg.layers or (4 if cfg.hidden <= 256 else 6 if cfg.hidden <= 512 else 8)
    heads = cfg.heads or max(1, cfg.hidden // HEAD_DIM)
    if cfg.hidden % heads or (cfg.hidden // heads) % 2:
        raise ValueError(f"must split model.hidden={cfg.hidden} into heads of an even size; got {heads} heads")
    return layers, heads


def _linear(kind: str, fan_in: int, fan_out: int) -> nn.Module:
    if kind == "bitlinear":
        return BitLinear(fan_in, fan_out)
    return nn.Sequential(RMSNorm(fan_in), nn.Linear(fan_in, fan_out, bias=False))


def gpt2_init(model: nn.Module) -> None:
    """GPT-2's initialisation, as nanoGPT keeps it: N(0, 0.02) for every matrix and embedding."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim / 2), float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by position; pairs are (i, i + head_dim / 2)."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: BitLMModelConfig, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = _linear(cfg.linear, cfg.hidden, 3 * cfg.hidden)
        self.proj = _linear(cfg.linear, cfg.hidden, cfg.hidden)
        self.up = _linear(cfg.linear, cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.down = _linear(cfg.linear, cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.relu(self.up(x)).square())


class BitLM(nn.Module):
    def __init__(self, cfg: BitLMModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        layers, heads = resolved_shape(cfg)
        self.embed = nn.Embedding(vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, heads) for _ in range(layers))
        self.norm = RMSNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, vocab_size, bias=False)
        cos, sin = rotary_tables(max_seq_len, cfg.hidden // heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_seq_len = max_seq_len
        gpt2_init(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> next-token logits (B, T, vocab)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue (1, T) `prompt` by `new_tokens`: greedy at temperature 0, else sampled from
        softmax(logits / temperature) with `generator`.  No KV cache: evaluation-time samples of a few
        hundred tokens do not need one, and the full recompute keeps this exactly the training forward."""
        out = prompt
        for _ in range(new_tokens):
            logits = self(out[:, -self.max_seq_len:])[:, -1]
            out = torch.cat((out, next_token(logits, temperature, generator)[:, None]), dim=1)
        return out[:, prompt.shape[1]:]


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, vocab) logits -> (B,) tokens: the argmax at temperature 0, else a draw from softmax(logits /
    temperature) made on the CPU with `generator`, so a seed gives the same text on every device."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
