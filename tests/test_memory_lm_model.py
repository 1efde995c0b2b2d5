"""memory_lm's model: the parallel (training) form equals the recurrent (generation) form, the chunked window
attention and chunked memory equal naive references, the decay parameterisation, causality and receptive fields,
long sequences, gradients, generation and the constant-size generation state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainlab.experiments.memory_lm.model import (
    VOCAB,
    MemoryLM,
    MemoryLMModelConfig,
    check_shape,
    decaying_memory,
    feature_map,
    state_bytes,
    window_attention,
)


def tiny(seed: int = 0, max_seq_len: int = 64, **overrides) -> MemoryLM:
    """A tiny model whose matrices are re-drawn with std 0.3: at the training init (0.02) every block is close to
    the identity and logits barely move, which would let a wrong mask or decay pass a tolerance test."""
    torch.manual_seed(seed)
    cfg = MemoryLMModelConfig(**{"d_model": 32, "layers": 2, "heads": 2, "window": 12, **overrides})
    model = MemoryLM(cfg, max_seq_len)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
            elif name.endswith("gate"):
                p.normal_(0.0, 1.0)  # uneven mixes, so a head's memory and attention are not interchangeable
    return model


def recurrent_logits(model: MemoryLM, tokens: torch.Tensor) -> torch.Tensor:
    state = model.init_state(tokens.shape[0], tokens.device)
    logits = []
    for t in range(tokens.shape[1]):
        step_logits, state = model.step(tokens[:, t], state)
        logits.append(step_logits)
    return torch.stack(logits, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# 1. the training form is the generation form
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {"window": 12, "memory": True},
    {"window": 12, "memory": False},
    {"window": 0, "memory": True},
    {"window": 0, "memory": False},
    {"window": 12, "memory": True, "decay_init": 0.0, "lambda_min": 0.5, "heads": 4},  # lambda = 0.75: decay matters
    {"window": 5, "memory": True, "decay_init": -3.0, "lambda_min": 0.0},  # lambda = 0.047
], ids=["window-memory", "window-only", "full-memory", "full-only", "fast-decay", "very-fast-decay"])
def test_parallel_forward_equals_recurrent_steps(overrides):
    model = tiny(**overrides)
    # 100 positions: > 3 windows, not a multiple of the window, and two memory chunks (64 + 36)
    tokens = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(tokens)
        recurrent = recurrent_logits(model, tokens)
    assert parallel.shape == recurrent.shape == (2, 100, VOCAB)
    assert parallel.abs().max() > 1.0  # the logits are not all near zero
    torch.testing.assert_close(parallel, recurrent, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# 2., 3. the chunked kernels against naive references
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,window", [(29, 8), (32, 8), (17, 1), (10, 16), (10, 0), (40, 39)])
def test_chunked_window_attention_equals_band_masked_attention(length, window):
    gen = torch.Generator().manual_seed(length * 100 + window)
    q, k, v = (torch.randn(2, 3, length, 8, generator=gen) for _ in range(3))
    got = window_attention(q, k, v, window)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else torch.ones(length, length, dtype=torch.bool))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def naive_memory(phi_q, phi_k, v, lambdas, eps=1e-6):
    """sum_{j<=i} lambda^(i-j) (phi_q_i . phi_k_j) v_j / (sum_{j<=i} lambda^(i-j) phi_q_i . phi_k_j + eps), in
    float64, one output position at a time."""
    phi_q, phi_k, v, lambdas = (t.double() for t in (phi_q, phi_k, v, lambdas))
    out = torch.zeros_like(v)
    for i in range(v.shape[2]):
        lags = i - torch.arange(i + 1, dtype=torch.float64)
        weights = lambdas[:, None] ** lags[None, :]  # (heads, i + 1)
        match = torch.einsum("bhd,bhjd->bhj", phi_q[:, :, i], phi_k[:, :, :i + 1]) * weights
        numerator = torch.einsum("bhj,bhjd->bhd", match, v[:, :, :i + 1])
        out[:, :, i] = numerator / (match.sum(-1, keepdim=True) + eps)
    return out


@pytest.mark.parametrize("chunk", [1, 5, 23, 64])
def test_chunked_memory_equals_naive_sum(chunk):
    gen = torch.Generator().manual_seed(chunk)
    q, k, v = (torch.randn(2, 3, 23, 6, generator=gen) for _ in range(3))
    lambdas = torch.tensor([0.5, 0.9, 0.9999])
    got = decaying_memory(feature_map(q), feature_map(k), v, torch.log(lambdas), chunk=chunk)
    want = naive_memory(feature_map(q), feature_map(k), v, lambdas)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_memory_with_fast_decay_forgets_and_with_slow_decay_averages():
    # one head that keeps (lambda ~ 1) and one that forgets (lambda ~ 0): with equal phi everywhere the first
    # reads the mean of the values so far, the second only the current one
    length = 10
    ones = torch.ones(1, 2, length, 4)
    v = torch.randn(1, 2, length, 4, generator=torch.Generator().manual_seed(0))
    got = decaying_memory(ones, ones, v, torch.log(torch.tensor([1.0, 1e-6])), chunk=4)
    running_mean = v[0, 0].cumsum(0) / torch.arange(1, length + 1)[:, None]
    torch.testing.assert_close(got[0, 0], running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 1], v[0, 1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 4. the decay and gate parameters
# ---------------------------------------------------------------------------------------------------------------

def test_lambda_follows_its_formula_and_range():
    model = tiny(decay_init=8.0, lambda_min=0.995, layers=3, heads=4)
    lambdas = model.decay_lambdas()
    assert lambdas.shape == (3, 4) and lambdas.dtype == torch.float32
    expected = 0.995 + 0.005 * (1 / (1 + math.exp(-8.0)))
    torch.testing.assert_close(lambdas, torch.full((3, 4), expected), atol=1e-7, rtol=0)
    with torch.no_grad():
        for block in model.blocks:
            block.decay_logit.copy_(torch.tensor([-1e4, -3.0, 3.0, 1e4]))
    lambdas = model.decay_lambdas()
    assert (lambdas >= 0.995).all() and (lambdas <= 1.0).all()
    torch.testing.assert_close(lambdas[0, 0], torch.tensor(0.995), atol=1e-7, rtol=0)
    torch.testing.assert_close(model.mix_gates(), torch.sigmoid(torch.stack([b.gate for b in model.blocks])))


def test_memory_off_has_no_decay_or_gate_parameters():
    with_memory = tiny(memory=True, heads=4, layers=2)
    without = tiny(memory=False, heads=4, layers=2)
    names = [name for name, _ in without.named_parameters()]
    assert not any("decay" in name or "gate" in name for name in names)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(with_memory) - count(without) == 2 * 4 * 2
    assert without.decay_lambdas() is None and without.mix_gates() is None
    fresh = MemoryLM(MemoryLMModelConfig(d_model=32, layers=2, heads=4, decay_init=0.0), 16)
    torch.testing.assert_close(fresh.mix_gates(), torch.full((2, 4), 0.5))
    assert all(p.dim() == 1 for name, p in fresh.named_parameters() if "decay" in name or "gate" in name)


@pytest.mark.parametrize("d_model,heads", [(30, 4), (24, 8)])
def test_check_shape_refuses_uneven_or_odd_heads(d_model, heads):
    cfg = MemoryLMModelConfig(d_model=d_model, heads=heads)
    with pytest.raises(ValueError, match="d_model"):
        check_shape(cfg)
    with pytest.raises(ValueError):
        MemoryLM(cfg, 16)
    check_shape(MemoryLMModelConfig(d_model=32, heads=4))


# ---------------------------------------------------------------------------------------------------------------
# 5. causality and reach
# ---------------------------------------------------------------------------------------------------------------

def logits_after_changing(model: MemoryLM, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    changed = tokens.clone()
    changed[:, position] = (changed[:, position] + 1) % VOCAB
    with torch.no_grad():
        return model(tokens), model(changed)


@pytest.mark.parametrize("overrides", [{"window": 8}, {"window": 8, "memory": False}, {"window": 0}])
def test_no_logit_depends_on_a_later_token(overrides):
    model = tiny(**overrides)
    tokens = torch.randint(0, VOCAB, (1, 37), generator=torch.Generator().manual_seed(2))
    before, after = logits_after_changing(model, tokens, 20)
    torch.testing.assert_close(before[:, :20], after[:, :20], atol=1e-6, rtol=0)
    assert (before[:, 20:] - after[:, 20:]).abs().amax() > 1e-2


def test_window_only_reach_is_layers_times_window_minus_one_and_memory_reaches_further():
    window, layers, length = 8, 2, 40
    reach = layers * (window - 1)  # 14
    tokens = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(3))
    changed_at = 10
    window_only = tiny(window=window, layers=layers, memory=False)
    before, after = logits_after_changing(window_only, tokens, changed_at)
    difference = (before - after).abs().amax(-1)[0]  # per position
    assert (difference[changed_at + reach + 1:] < 1e-6).all()  # beyond the receptive field: untouched
    assert difference[changed_at + reach] > 1e-4  # at its edge: reached
    with_memory = tiny(window=window, layers=layers, memory=True)
    before, after = logits_after_changing(with_memory, tokens, changed_at)
    assert ((before - after).abs().amax(-1)[0, changed_at + reach + 1:] > 1e-4).all()


# ---------------------------------------------------------------------------------------------------------------
# 6. long sequences, gradients, generation, state size, precision
# ---------------------------------------------------------------------------------------------------------------

def test_forward_past_max_seq_len_extends_the_rotary_tables():
    short = tiny(max_seq_len=16, window=8)
    long = tiny(max_seq_len=128, window=8)
    long.load_state_dict(short.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(short(tokens), long(tokens))
    assert short.rope_cos.shape[0] >= 70


def test_gradients_reach_decay_and_gate():
    model = tiny(decay_init=0.0)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
    for block in model.blocks:
        assert block.decay_logit.grad is not None and block.decay_logit.grad.abs().min() > 0
        assert block.gate.grad is not None and block.gate.grad.abs().min() > 0


def test_generate_greedy_is_the_argmax_of_forward_and_sampling_reproduces():
    model = tiny(window=8)
    prompt = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, 12)
    assert greedy.shape == (2, 12) and greedy.dtype == torch.long
    assert torch.equal(greedy, model.generate(prompt, 12))
    with torch.no_grad():
        sequence = prompt
        for _ in range(12):
            sequence = torch.cat((sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(greedy, sequence[:, prompt.shape[1]:])
    sampled = model.generate(prompt, 20, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(sampled, model.generate(prompt, 20, 1.0, torch.Generator().manual_seed(7)))
    assert not torch.equal(sampled, model.generate(prompt, 20, 1.0, torch.Generator().manual_seed(8)))
    assert model.generate(prompt, 0).shape == (2, 0)


def test_generation_state_is_constant_size_with_a_window():
    model = tiny(window=8, heads=2)
    state = model.init_state(3, torch.device("cpu"))
    head_dim = 16
    per_layer = 2 * 3 * 2 * 8 * head_dim * 4 + 3 * 2 * head_dim * (head_dim + 1) * 4  # ring k/v + memory, fp32
    assert state_bytes(state) == 2 * per_layer
    with torch.no_grad():
        for t in range(30):
            _, state = model.step(torch.full((3,), t), state)
    assert state.position == 30 and state_bytes(state) == 2 * per_layer
    full = tiny(window=0)
    state = full.init_state(1, torch.device("cpu"))
    with torch.no_grad():
        for t in range(5):
            _, state = full.step(torch.tensor([t]), state)
    grown = state_bytes(state)
    with torch.no_grad():
        _, state = full.step(torch.tensor([5]), state)
    assert state_bytes(state) > grown  # window 0 keeps every key: the measure does see growth


def test_forward_under_bf16_autocast_is_finite_and_near_fp32():
    model = tiny(window=8)
    tokens = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().amax() < 0.1 * reference.abs().amax()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(tokens[:, :-1]).float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
