"""SHA-256 round traces against hashlib and the FIPS 180-4 examples; numpy and torch agree; the
training samples hold what they claim."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from trainlab.experiments.sha256.data import (IV, K, compress_trace, digest_bytes, make_samples, message_schedule,
                                              pad_message, random_batch_numpy, random_batch_torch, sha256_compress,
                                              words_to_bits)

# FIPS 180-4 examples (the NIST "SHA256.pdf" example document): message -> digest
FIPS = {
    b"": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    b"abc": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq":
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
}


def _hash(blocks, as_torch: bool) -> bytes:
    chaining = None
    for i in range(len(blocks)):
        block = torch.from_numpy(blocks[i:i + 1]) if as_torch else blocks[i:i + 1]
        chaining = sha256_compress(block, iv=chaining)
    return digest_bytes(chaining[0])


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("message", list(FIPS), ids=["empty", "abc", "448-bit"])
def test_fips_examples(message: bytes, as_torch: bool):
    blocks = pad_message(message)
    assert len(blocks) == (2 if len(message) == 56 else 1)  # the 448-bit message pads to two blocks
    assert _hash(blocks, as_torch).hex() == FIPS[message]


def test_many_random_single_block_messages_match_hashlib():
    rng = np.random.default_rng(0)
    messages = [rng.bytes(int(n)) for n in rng.integers(0, 56, size=300)]
    blocks = np.concatenate([pad_message(m) for m in messages])  # each pads to exactly one block
    for as_torch in (False, True):
        out = sha256_compress(torch.from_numpy(blocks) if as_torch else blocks)
        for i, m in enumerate(messages):
            assert digest_bytes(out[i]) == hashlib.sha256(m).digest()


def test_multi_block_messages_chain():
    rng = np.random.default_rng(1)
    for n in (64, 119, 200, 1000):
        message = rng.bytes(n)
        assert _hash(pad_message(message), as_torch=True) == hashlib.sha256(message).digest()


def test_trace_shape_iv_and_agreement_between_numpy_and_torch():
    blocks = np.random.default_rng(2).integers(0, 256, size=(64, 64), dtype=np.uint8)
    trace_np = compress_trace(blocks, 64)
    trace_t = compress_trace(torch.from_numpy(blocks), 64)
    assert trace_np.shape == (64, 65, 8) and tuple(trace_t.shape) == (64, 65, 8)
    assert (trace_np[:, 0] == np.array(IV)).all()
    assert np.array_equal(trace_np, trace_t.numpy())
    assert trace_np.min() >= 0 and trace_np.max() <= 0xFFFFFFFF
    # the feed-forward of the 64-round state is the compression function
    assert np.array_equal((trace_np[:, 64] + np.array(IV)) & 0xFFFFFFFF, sha256_compress(blocks))
    # the shifted registers: b after round t+1 is a after round t, and so on
    assert np.array_equal(trace_np[:, 1:, 1:4], trace_np[:, :-1, 0:3])
    assert np.array_equal(trace_np[:, 1:, 5:8], trace_np[:, :-1, 4:7])
    # a shorter trace is a prefix of the longer one
    assert np.array_equal(compress_trace(blocks, 8), trace_np[:, :9])


def test_words_to_bits_msb_first():
    bits = words_to_bits(np.array([[0x80000001, 0x00000002]], dtype=np.int64))
    assert bits.shape == (1, 2, 32)
    assert bits[0, 0, 0] == 1 and bits[0, 0, 31] == 1 and bits[0, 0, 1:31].sum() == 0
    assert bits[0, 1, 30] == 1 and bits[0, 1].sum() == 1
    assert torch.equal(words_to_bits(torch.tensor([[0x80000001]])), torch.from_numpy(words_to_bits(np.array([[0x80000001]]))))


def _bits_to_words(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int64) << np.arange(31, -1, -1)).sum(-1)


def test_step_samples_hold_state_w_k_and_next_state():
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(32, 64), dtype=np.uint8)
    t = rng.integers(0, 20, size=32)
    x, y = make_samples(blocks, 20, "step", t)
    trace = compress_trace(blocks, 20)
    w = np.stack(message_schedule(blocks, 20), 1)
    words_in, words_out = _bits_to_words(x), _bits_to_words(y)
    rows = np.arange(32)
    assert np.array_equal(words_in[:, :8], trace[rows, t])
    assert np.array_equal(words_in[:, 8], w[rows, t])
    assert np.array_equal(words_in[:, 9], np.array(K)[t])
    assert np.array_equal(words_out, trace[rows, t + 1])


def test_multi_samples_hold_iv_block_and_state_after_r_rounds():
    blocks = np.random.default_rng(4).integers(0, 256, size=(8, 64), dtype=np.uint8)
    x, y = make_samples(blocks, 5, "multi")
    words_in = _bits_to_words(x)
    assert np.array_equal(words_in[:, :8], np.tile(np.array(IV), (8, 1)))
    expected_words = np.array([[int.from_bytes(bytes(b[i:i + 4]), "big") for i in range(0, 64, 4)] for b in blocks])
    assert np.array_equal(words_in[:, 8:], expected_words)
    assert np.array_equal(_bits_to_words(y), compress_trace(blocks, 5)[:, 5])


def test_batches_are_pure_functions_of_their_seed():
    a = random_batch_numpy(7, 16, 8, "step")
    b = random_batch_numpy(7, 16, 8, "step")
    c = random_batch_numpy(8, 16, 8, "step")
    assert all(np.array_equal(p, q) for p, q in zip(a, b)) and not np.array_equal(a[0], c[0])
    d = random_batch_torch(7, 16, 8, "multi", torch.device("cpu"))
    e = random_batch_torch(7, 16, 8, "multi", torch.device("cpu"))
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])
    assert d[0].dtype == torch.uint8 and tuple(d[0].shape) == (16, 24, 32)
