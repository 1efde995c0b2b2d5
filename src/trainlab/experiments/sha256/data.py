"""Vectorised SHA-256 (FIPS 180-4) that records the working state after every round.

One implementation serves numpy arrays (CPU producer processes) and torch tensors (CPU or CUDA):
words are int64 arrays holding uint32 values (torch has no full uint32 arithmetic), and every
operation used -- &, |, ^, >>, <<, +, indexing -- means the same on both.  A Python loop runs over
the 64 rounds; each round is a handful of whole-batch operations.

Public API (other code and tests rely on it):
  compress_trace(blocks, rounds, iv=None) -> [B, rounds + 1, 8]: index 0 is the IV, index r the
      working variables a..h after round r.  `blocks` is uint8 [B, 64] (numpy or torch, any device).
  sha256_compress(blocks, iv=None) -> [B, 8]: the chaining value after 64 rounds and the
      feed-forward addition (H_i = H_{i-1} + state_64).
  pad_message(message) -> uint8 [n_blocks, 64]: FIPS 180-4 padding, for tests and examples.

Training samples (why the inputs are what they are): the state after round t+1 depends on the
state after round t *and* on W_t (the message schedule word) and K_t (the round constant).  Without
W_t the target is not a function of the input at all, so `step` samples carry W_t and K_t:
  step:  tokens = [a..h after round t, W_t, K_t] (10 words) -> a..h after round t+1, with t drawn
         uniformly from the first R rounds of the current curriculum phase;
  multi: tokens = [IV a..h, the 16 block words] (24 words) -> a..h after R rounds.  The IV is the
         same for every sample (it carries no information); it is there so that in both modes the
         model reads its answer at the first 8 token positions.
Every word is given as 32 bits, most significant first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MASK = 0xFFFFFFFF

# FIPS 180-4, 4.2.2: the first 32 bits of the fractional parts of the cube roots of the first 64 primes
K = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
)
# FIPS 180-4, 5.3.3: the initial hash value H(0)
IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
ROUNDS = 64
STATE_WORDS = 8


# ---- array-module shims: the few calls that differ between numpy and torch ------------------
def _is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _as_words_source(blocks: Any) -> Any:
    if _is_torch(blocks):
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != 64:
            raise ValueError(f"blocks must be uint8 [B, 64], got {blocks.dtype} {list(blocks.shape)}")
        return blocks.to(torch.int64)
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != 64:
        raise ValueError(f"blocks must be uint8 [B, 64], got {blocks.dtype} {list(blocks.shape)}")
    return blocks.astype(np.int64)


def _stack(arrays: list, axis: int) -> Any:
    return torch.stack(arrays, dim=axis) if _is_torch(arrays[0]) else np.stack(arrays, axis=axis)


def _full_like_batch(ref: Any, value: int) -> Any:
    if _is_torch(ref):
        return torch.full(ref.shape[:1], value, dtype=torch.int64, device=ref.device)
    return np.full(ref.shape[:1], value, dtype=np.int64)


def _iv_words(ref: Any, iv: Any) -> list:
    if iv is None:
        return [_full_like_batch(ref, v) for v in IV]
    iv = iv.to(torch.int64) if _is_torch(iv) else np.asarray(iv).astype(np.int64)
    if iv.ndim == 1:
        return [_full_like_batch(ref, int(v)) for v in iv.tolist()]
    return [iv[:, i] for i in range(STATE_WORDS)]


# ---- the SHA-256 functions (FIPS 180-4, 4.1.2) -------------------------------------------
def _rotr(x, n: int):
    return ((x >> n) | (x << (32 - n))) & MASK


def _big_sigma0(x):
    return _rotr(x, 2) ^ _rotr(x, 13) ^ _rotr(x, 22)


def _big_sigma1(x):
    return _rotr(x, 6) ^ _rotr(x, 11) ^ _rotr(x, 25)


def _small_sigma0(x):
    return _rotr(x, 7) ^ _rotr(x, 18) ^ (x >> 3)


def _small_sigma1(x):
    return _rotr(x, 17) ^ _rotr(x, 19) ^ (x >> 10)


def _ch(e, f, g):
    return (e & f) ^ ((e ^ MASK) & g)


def _maj(a, b, c):
    return (a & b) ^ (a & c) ^ (b & c)


def block_words(blocks: Any) -> list:
    """The 16 big-endian 32-bit words of each block, as a list of [B] arrays."""
    b = _as_words_source(blocks)
    return [(b[:, 4 * i] << 24) | (b[:, 4 * i + 1] << 16) | (b[:, 4 * i + 2] << 8) | b[:, 4 * i + 3]
            for i in range(16)]


def message_schedule(blocks: Any, rounds: int = ROUNDS) -> list:
    """W_0 .. W_{rounds-1}, each a [B] array."""
    w = block_words(blocks)
    for t in range(16, rounds):
        w.append((_small_sigma1(w[t - 2]) + w[t - 7] + _small_sigma0(w[t - 15]) + w[t - 16]) & MASK)
    return w[:rounds]


def _trace_words(blocks: Any, rounds: int, iv: Any = None) -> tuple[list[list], list]:
    if not 0 <= rounds <= ROUNDS:
        raise ValueError(f"rounds must be in [0, {ROUNDS}], got {rounds}")
    w = message_schedule(blocks, max(rounds, 16))
    state = _iv_words(w[0], iv)
    states = [state]
    for t in range(rounds):
        a, b, c, d, e, f, g, h = state
        t1 = (h + _big_sigma1(e) + _ch(e, f, g) + K[t] + w[t]) & MASK
        t2 = (_big_sigma0(a) + _maj(a, b, c)) & MASK
        state = [(t1 + t2) & MASK, a, b, c, (d + t1) & MASK, e, f, g]
        states.append(state)
    return states, w


def compress_trace(blocks: Any, rounds: int, iv: Any = None) -> Any:
    """Working variables a..h after each round: [B, rounds + 1, 8] int64 (uint32 values)."""
    states, _ = _trace_words(blocks, rounds, iv)
    return _stack([_stack(s, 1) for s in states], 1)


def sha256_compress(blocks: Any, iv: Any = None) -> Any:
    """The SHA-256 compression function: [B, 8] chaining value after the feed-forward addition."""
    states, _ = _trace_words(blocks, ROUNDS, iv)
    start = _iv_words(states[0][0], iv)
    return _stack([(s + v) & MASK for s, v in zip(states[-1], start)], 1)


def pad_message(message: bytes) -> np.ndarray:
    """FIPS 180-4, 5.1.1: append 0x80, zeros, and the 64-bit big-endian bit length."""
    length = len(message) * 8
    padded = message + b"\x80" + b"\x00" * ((55 - len(message)) % 64) + length.to_bytes(8, "big")
    return np.frombuffer(padded, dtype=np.uint8).reshape(-1, 64).copy()


def digest_bytes(chaining_value: Any) -> bytes:
    """The 32-byte digest from one [8] chaining value."""
    words = chaining_value.tolist() if hasattr(chaining_value, "tolist") else list(chaining_value)
    return b"".join(int(v).to_bytes(4, "big") for v in words)


# ---- training samples -------------------------------------------------------------------
def words_to_bits(words: Any) -> Any:
    """[..., n] uint32-valued words -> [..., n, 32] uint8 bits, most significant first."""
    if _is_torch(words):
        shifts = torch.arange(31, -1, -1, device=words.device, dtype=torch.int64)
        return ((words.unsqueeze(-1) >> shifts) & 1).to(torch.uint8)
    shifts = np.arange(31, -1, -1, dtype=np.int64)
    return ((words[..., None] >> shifts) & 1).astype(np.uint8)


def tokens_per_sample(mode: str) -> int:
    return STATE_WORDS + (2 if mode == "step" else 16)


def make_samples(blocks: Any, rounds: int, mode: str, round_index: Any = None) -> tuple[Any, Any]:
    """(input bits [B, T, 32], target bits [B, 8, 32]) for `mode` at curriculum depth `rounds`.

    step: `round_index` [B] (ints in [0, rounds)) picks t per sample.  multi: the state after `rounds`."""
    if mode == "multi":
        states, _ = _trace_words(blocks, rounds)
        inputs = _stack(_iv_words(states[0][0], None) + block_words(blocks), 1)
        return words_to_bits(inputs), words_to_bits(_stack(states[-1], 1))
    trace = compress_trace(blocks, rounds)  # [B, R + 1, 8]
    w = _stack(message_schedule(blocks, max(rounds, 16))[:rounds], 1)  # [B, R]
    k_table = K[:rounds]
    if _is_torch(blocks):
        batch = torch.arange(trace.shape[0], device=trace.device)
        k = torch.tensor(k_table, dtype=torch.int64, device=trace.device)[round_index]
    else:
        batch = np.arange(trace.shape[0])
        k = np.asarray(k_table, dtype=np.int64)[round_index]
    state_t = trace[batch, round_index]
    state_next = trace[batch, round_index + 1]
    inputs = _stack([state_t[:, i] for i in range(STATE_WORDS)] + [w[batch, round_index], k], 1)
    return words_to_bits(inputs), words_to_bits(state_next)


def random_batch_numpy(seed: int, batch: int, rounds: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The CPU producers' batch: a pure function of its seed."""
    rng = np.random.Generator(np.random.PCG64(seed))
    blocks = rng.integers(0, 256, size=(batch, 64), dtype=np.uint8)
    index = rng.integers(0, rounds, size=batch) if mode == "step" else None
    return make_samples(blocks, rounds, mode, index)


def random_batch_torch(seed: int, batch: int, rounds: int, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The on-device batch (the fast path on a GPU): a pure function of its seed on a given device."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = torch.randint(0, 256, (batch, 64), generator=g, device=device, dtype=torch.uint8)
    index = torch.randint(0, rounds, (batch,), generator=g, device=device) if mode == "step" else None
    return make_samples(blocks, rounds, mode, index)
