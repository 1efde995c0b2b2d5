"""A byte-level decoder-only language model with a local attention window and a per-head decaying memory.

Each block (pre-norm, RMSNorm) computes one projection qkv = Linear(d, 3d) that feeds two readers of the past:

- Sliding-window attention: rotary positions (RoFormer, half-split layout as bitnet_lm) on q and k; query i
  sees keys j with i - window < j <= i.  Exact and sharp, but blind beyond the window.
- A decaying memory per head: normalised linear attention in the manner of Infini-attention (Munkhdalai et al.
  2024, arXiv:2404.07143) with a learned per-head decay, the best-known relative being RetNet (Sun et al. 2023).
  With phi(x) = elu(x) + 1 (positive, so the normaliser is positive) of the UN-rotated q and k:

      S_t = lambda_h S_{t-1} + phi(k_t)^T [v_t, 1]         (head_dim x (head_dim + 1): numerator and normaliser)
      r_t = phi(q_t) S_t,   mem_t = r_t[:head_dim] / (r_t[head_dim] + eps)

  The memory is position-free on purpose: rotary phases would make phi(q).phi(k) depend on the distance in a
  way the decay already covers, and a position-free state is what lets it summarise arbitrarily far back.
  lambda_h = lambda_min + (1 - lambda_min) sigmoid(decay_logit_h) keeps every head's horizon at least
  1 / (1 - lambda_min) bytes: the memory is meant to carry what the window cannot, so it is not allowed to
  collapse into a second short-range reader.  phi(q) is not scaled: the normaliser divides any scale out.

The two readers are mixed per head with a learned gate, as Infini-attention does:
y_h = sigmoid(g_h) mem_h + (1 - sigmoid(g_h)) attn_h (g_h = 0 at the start: an even mix).  `memory: false` removes
the memory, its decay and its gate (y = attn): the window-only ablation, otherwise the same network.

Two forms compute the same function (tests/test_memory_lm_model.py holds them equal):

- Training (`forward`): window attention in chunks of `window` queries, each attending to its own and the
  previous chunk's keys through a (window x 2 window) band mask, so no T x T matrix exists; the memory chunk-wise
  parallel, chunks of MEMORY_CHUNK positions: inside a chunk (phi(Q) phi(K)^T * D) V' with D_ij = lambda^(i-j),
  across chunks the carried state.  All decays are exp(n log lambda) in float32, with n >= 0, so they never
  overflow.
- Generation (`init_state`/`step`/`generate`): a ring buffer of the last `window` rotated keys and values and the
  memory state per head: constant size whatever the length (window 0, full attention, keeps a growing cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.experiments.bitnet_lm.model import apply_rotary, gpt2_init, next_token, rotary_tables
from trainlab.nn import RMSNorm

VOCAB = 256  # bytes

# The memory's chunk length in the training form.  The in-chunk part costs T x MEMORY_CHUNK and the carried state
# one Python iteration per chunk: 64 keeps the (64 x 64) decay matrix and score block small while a 512-byte
# sequence needs only 8 iterations.  It is not tied to the window, so window 1 or window 0 cost no more.
MEMORY_CHUNK = 64
# Added to the memory's normaliser (phi(q) . sum of decayed phi(k), always > 0): guards only the division.
MEMORY_EPS = 1e-6
# 1 - lambda is kept at most this close to 1 (lambda >= 1e-6): log(lambda) then stays finite, so a head driven
# to lambda_min = 0 gives a memory of the current byte, not NaN (0 * log 0 on the diagonal of D).
MAX_FORGET = 1.0 - 1e-6


@dataclass
class MemoryLMModelConfig:
    d_model: int = knob(256, "width of the residual stream", ge=8)
    layers: int = knob(4, "transformer blocks", ge=1)
    heads: int = knob(4, "attention heads (= memory heads); d_model / heads must be an even head size", ge=1)
    window: int = knob(64, "bytes each position attends to: itself and the window - 1 before it; 0 = full causal "
                           "attention", ge=0)
    memory: bool = knob(True, "the per-head decaying memory; false = the same network with window attention only "
                              "(the ablation)")
    lambda_min: float = knob(0.99, "each head's decay is lambda = lambda_min + (1 - lambda_min) * sigmoid(logit) "
                                   "(Phase 7: 0.99, Phase 8: 0.995)", ge=0.0, lt=1.0)
    decay_init: float = knob(8.0, "initial decay logit of every head (the Phase 8 report: 8.0; its old default: 0)")
    mlp_ratio: int = knob(4, "MLP hidden width as a multiple of d_model", ge=1)
    rope_base: float = knob(10000.0, "rotary base frequency", gt=1)


def check_shape(cfg: MemoryLMModelConfig) -> None:
    """ValueError unless d_model splits into `heads` heads of an even size (rotary pairs dimensions)."""
    if cfg.d_model % cfg.heads:
        raise ValueError(f"must divide model.d_model={cfg.d_model} into equal heads; {cfg.heads} heads do not "
                         f"divide it")
    if (cfg.d_model // cfg.heads) % 2:
        raise ValueError(f"must give an even head size for the rotary positions; model.d_model={cfg.d_model} / "
                         f"{cfg.heads} heads = {cfg.d_model // cfg.heads}")


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1: positive, so the memory's normaliser is positive; linear for x > 0."""
    return F.elu(x) + 1


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of (B, heads, T, head_dim) queries to the keys j with i - window < j <= i.

    window 0 or window >= T is plain causal attention.  Otherwise the sequence, padded to a multiple of
    `window`, is cut into chunks of `window` queries; chunk c attends to the keys of chunks c - 1 and c through a
    (window x 2 window) band mask, chunk 0's missing predecessor masked out.  Scores cost T x 2 window, never
    T x T.  Padded keys lie after every real query, so the causal band never lets a real query see them; padded
    queries are cut off.  Every row keeps its own key (b = a + window), so no row is fully masked (no NaN).
    """
    batch, heads, length, head_dim = q.shape
    if window == 0 or window >= length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    chunks = -(-length // window)
    padding = chunks * window - length
    if padding:
        q, k, v = (F.pad(t, (0, 0, 0, padding)) for t in (q, k, v))

    def own_and_previous_chunk(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(batch, heads, chunks, window, head_dim)
        previous = torch.cat((torch.zeros_like(t[:, :, :1]), t[:, :, :-1]), dim=2)
        return torch.cat((previous, t), dim=3).reshape(batch, heads * chunks, 2 * window, head_dim)

    # query a of chunk c is position c*window + a, key b is (c-1)*window + b: in the window iff a < b <= a + window
    query_index = torch.arange(window, device=q.device)[:, None]
    key_index = torch.arange(2 * window, device=q.device)[None, :]
    band = (key_index > query_index) & (key_index <= query_index + window)
    allowed = band.expand(chunks, window, 2 * window).clone()
    allowed[0, :, :window] = False
    # 4-D tensors (chunks folded into the head dimension) keep SDPA's fused kernels eligible
    out = F.scaled_dot_product_attention(q.reshape(batch, heads * chunks, window, head_dim),
                                         own_and_previous_chunk(k), own_and_previous_chunk(v),
                                         attn_mask=allowed.repeat(heads, 1, 1))
    return out.reshape(batch, heads, chunks * window, head_dim)[:, :, :length]


def decaying_memory(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    chunk: int = MEMORY_CHUNK, eps: float = MEMORY_EPS) -> torch.Tensor:
    """The memory's read-out for every position, chunk-wise parallel.

    phi_q, phi_k, v: (B, heads, T, head_dim); log_decay: (heads,) log lambda.  Returns (B, heads, T, head_dim) in
    v's dtype: sum_{j<=i} lambda^(i-j) (phi_q_i . phi_k_j) v_j divided by the same sum without v_j, plus eps.
    Products run in the inputs' dtype (autocast-friendly); the carried state and the division are float32.
    """
    batch, heads, length, head_dim = v.shape
    work = phi_q.dtype
    values = torch.cat((v, v.new_ones(batch, heads, length, 1)), dim=-1)  # [v, 1]: numerator and normaliser
    size = min(chunk, length)
    log_decay = log_decay.float()
    offset = torch.arange(size, device=v.device, dtype=torch.float32)
    lag = offset[:, None] - offset[None, :]
    within = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_decay[:, None, None]), 0.0).to(work)
    query_decay = torch.exp((offset + 1) * log_decay[:, None])[..., None].to(work)  # lambda^(a+1): (heads, C, 1)
    key_decay = torch.exp((size - 1 - offset) * log_decay[:, None])[..., None].to(work)  # lambda^(C-1-b)
    chunk_decay = torch.exp(size * log_decay)[:, None, None]  # lambda^C: (heads, 1, 1)
    state = torch.zeros(batch, heads, head_dim, head_dim + 1, device=v.device, dtype=torch.float32)
    outputs = []
    for start in range(0, length, size):
        n = min(size, length - start)
        q_c, k_c, v_c = (t[:, :, start:start + n] for t in (phi_q, phi_k, values))
        scores = (q_c @ k_c.transpose(-1, -2)) * within[:, :n, :n]
        outputs.append(scores @ v_c + (q_c * query_decay[:, :n]) @ state.to(work))
        if start + size < length:  # the last chunk's state is never read
            state = chunk_decay * state + ((k_c * key_decay).transpose(-1, -2) @ v_c).float()
    read = torch.cat(outputs, dim=2).float()
    return (read[..., :head_dim] / (read[..., head_dim:] + eps)).to(v.dtype)


@dataclass
class LayerState:
    """One block's generation state.  keys/values: (B, heads, window, head_dim), a ring buffer (slot = position
    mod window) of rotated keys and values; with window 0 a cache that grows by one position per step.  memory:
    (B, heads, head_dim, head_dim + 1) float32, or None without the memory."""
    keys: torch.Tensor
    values: torch.Tensor
    memory: torch.Tensor | None


@dataclass
class GenerationState:
    """What `step` needs of the past: the position of the next token and one LayerState per block."""
    position: int = 0
    layers: list[LayerState] = field(default_factory=list)


def state_bytes(state: GenerationState) -> int:
    """Bytes held by the tensors of a GenerationState."""
    total = 0
    for layer in state.layers:
        for t in (layer.keys, layer.values, layer.memory):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


class Block(nn.Module):
    def __init__(self, cfg: MemoryLMModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.d_model // cfg.heads
        self.window = cfg.window
        self.lambda_min = cfg.lambda_min
        self.attn_norm = RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.memory = cfg.memory
        if cfg.memory:
            # 1-D, so the engine keeps them out of weight decay
            self.decay_logit = nn.Parameter(torch.full((cfg.heads,), float(cfg.decay_init)))
            self.gate = nn.Parameter(torch.zeros(cfg.heads))

    def _forget(self) -> torch.Tensor:
        """1 - lambda per head, float32: (1 - lambda_min) sigmoid(-logit), the same as 1 - (lambda_min +
        (1 - lambda_min) sigmoid(logit)) without the cancellation."""
        return ((1.0 - self.lambda_min) * torch.sigmoid(-self.decay_logit.float())).clamp(max=MAX_FORGET)

    def log_decay(self) -> torch.Tensor:
        """log lambda per head, float32.  log1p(-forget) keeps the precision that lambda itself (within 1e-6 of 1
        at the defaults, where float32 has steps of 6e-8) has lost."""
        return torch.log1p(-self._forget())

    def decay(self) -> torch.Tensor:
        """lambda per head, float32."""
        return 1.0 - self._forget()

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(width, dim=-1)
        return tuple(t.view(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def _finish(self, x: torch.Tensor, attn: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
        if mem is not None:
            gate = torch.sigmoid(self.gate.float()).view(self.heads, 1, 1)
            attn = (gate * mem + (1 - gate) * attn).to(attn.dtype)
        batch, _, length, _ = attn.shape
        x = x + self.out(attn.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(x)
        attn = window_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, self.window)
        mem = decaying_memory(feature_map(q), feature_map(k), v, self.log_decay()) if self.memory else None
        return self._finish(x, attn, mem)

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        slots = self.window  # window 0: an empty cache that grows
        keys = torch.zeros(batch, self.heads, slots, self.head_dim, device=device, dtype=dtype)
        memory = (torch.zeros(batch, self.heads, self.head_dim, self.head_dim + 1, device=device,
                              dtype=torch.float32) if self.memory else None)
        return LayerState(keys, torch.zeros_like(keys), memory)

    def step(self, x: torch.Tensor, cache: LayerState, position: int, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
        """One position: x (B, 1, d_model) at `position`; cos/sin: that position's rotary rows (1, head_dim / 2).
        Updates `cache` in place."""
        q, k, v = self._split_heads(x)
        q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.window:
            slot = position % self.window
            cache.keys[:, :, slot] = k_rot[:, :, 0]
            cache.values[:, :, slot] = v[:, :, 0]
            # before the ring is full, slots 0..position hold the past in order; once full it holds exactly the
            # last `window` positions, in an order softmax attention does not care about
            filled = min(position + 1, self.window)
            keys, values = cache.keys[:, :, :filled], cache.values[:, :, :filled]
        else:
            cache.keys = torch.cat((cache.keys, k_rot.to(cache.keys.dtype)), dim=2)
            cache.values = torch.cat((cache.values, v.to(cache.values.dtype)), dim=2)
            keys, values = cache.keys, cache.values
        attn = F.scaled_dot_product_attention(q_rot, keys.to(q_rot.dtype), values.to(q_rot.dtype))
        mem = None
        if self.memory:
            phi_q, phi_k = feature_map(q[:, :, 0]).float(), feature_map(k[:, :, 0]).float()  # (B, heads, head_dim)
            value = torch.cat((v[:, :, 0].float(), v.new_ones(*v.shape[:2], 1, dtype=torch.float32)), dim=-1)
            decay = torch.exp(self.log_decay())[:, None, None]  # the parallel form's lambda, to the last bit
            cache.memory = decay * cache.memory + phi_k[..., :, None] * value[..., None, :]
            read = torch.einsum("bhd,bhde->bhe", phi_q, cache.memory)
            mem = (read[..., :self.head_dim] / (read[..., self.head_dim:] + MEMORY_EPS))[:, :, None].to(v.dtype)
        return self._finish(x, attn, mem)


class MemoryLM(nn.Module):
    def __init__(self, cfg: MemoryLMModelConfig, max_seq_len: int):
        super().__init__()
        check_shape(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        cos, sin = rotary_tables(max_seq_len, cfg.d_model // cfg.heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_seq_len = max_seq_len
        gpt2_init(self)  # as bitnet_lm: N(0, 0.02) for every matrix and the embedding

    def _rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables covering `length` positions, extended (doubling, so generation pays it rarely) when a
        sequence runs past max_seq_len -- the recall evaluation reads 8 windows and more."""
        if self.rope_cos.shape[0] < length:
            cos, sin = rotary_tables(max(length, 2 * self.rope_cos.shape[0]), self.cfg.d_model // self.cfg.heads,
                                     self.cfg.rope_base)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self.rope_cos, self.rope_sin

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> next-token logits (B, T, 256); T may exceed max_seq_len."""
        cos, sin = self._rotary(tokens.shape[1])
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))

    def init_state(self, batch: int, device: torch.device) -> GenerationState:
        """The state before the first token: per block a ring of `window` keys and values (window 0: empty and
        growing) and the memory's (head_dim x (head_dim + 1)) state per head."""
        dtype = self.embed.weight.dtype
        return GenerationState(0, [block.empty_state(batch, torch.device(device), dtype) for block in self.blocks])

    def step(self, token: torch.Tensor, state: GenerationState) -> tuple[torch.Tensor, GenerationState]:
        """Feed one token per sequence, (B,) -> next-token logits (B, 256).  Advances `state` in place and returns
        it, so `logits, state = model.step(token, state)` reads naturally."""
        position = state.position
        cos, sin = self._rotary(position + 1)
        cos, sin = cos[position:position + 1], sin[position:position + 1]
        x = self.embed(token[:, None])
        for block, cache in zip(self.blocks, state.layers):
            x = block.step(x, cache, position, cos, sin)
        state.position = position + 1
        return self.head(self.norm(x))[:, 0], state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue (B, T) `prompt` by `new_tokens` -> (B, new_tokens), all in the recurrent form (the prompt too),
        so memory and time per token stay constant with window > 0.  Greedy at temperature 0, else sampled from
        softmax(logits / temperature) on the CPU with `generator`, reproducible across devices."""
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"generate needs a (batch, length >= 1) prompt; got shape {tuple(prompt.shape)}")
        state = self.init_state(prompt.shape[0], prompt.device)
        for t in range(prompt.shape[1]):
            logits, state = self.step(prompt[:, t], state)
        produced = []
        for i in range(new_tokens):
            token = next_token(logits, temperature, generator)
            produced.append(token)
            if i + 1 < new_tokens:  # the last token's logits would never be read
                logits, state = self.step(token, state)
        if not produced:
            return prompt.new_zeros(prompt.shape[0], 0)
        return torch.stack(produced, dim=1)

    def decay_lambdas(self) -> torch.Tensor | None:
        """(layers, heads) float32: each head's current lambda; None without the memory."""
        if not self.cfg.memory:
            return None
        return torch.stack([block.decay() for block in self.blocks]).detach()

    def decay_forgets(self) -> torch.Tensor | None:
        """(layers, heads) float32: each head's 1 - lambda, computed without the cancellation that lambda itself,
        within 1e-6 of 1 at the defaults, suffers in float32; None without the memory."""
        if not self.cfg.memory:
            return None
        return torch.stack([block._forget() for block in self.blocks]).detach()

    def mix_gates(self) -> torch.Tensor | None:
        """(layers, heads) float32: sigmoid(g), each head's weight on the memory; None without the memory."""
        if not self.cfg.memory:
            return None
        return torch.stack([torch.sigmoid(block.gate.float()) for block in self.blocks]).detach()
