"""memory_lm's recall test: the probes' layout, scoring against models whose answers are known (an oracle
that reads the planted key, a blind one that always says '0'), the Wilson intervals, and the training
plants.  No training: everything here runs in well under a second of model time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainlab.errors import ConfigError
from trainlab.experiments.memory_lm.recall import (
    DIGITS, KEY_END, LETTERS, MARKER, MULTIPLES, QUERY, RecallConfigError, RecallProbes, RecallResult, build_probes,
    describe, metric_suffix, min_distance, plant_in_batch, score_recall, trials_to_tell, wilson_interval)

WORDS = ["the", "model", "reads", "bytes", "and", "remembers", "nothing", "Grüße", "naïve", "日本語", "river",
         "stone", "a", "of", "is", "key", "The"]  # the phrase's words, so that text_ids must remove it where it forms


def text_ids(seed: int = 0, words: int = 6000, phrase_every: int = 0) -> torch.Tensor:
    """Random prose with one- two- and three-byte characters; `phrase_every` > 0 writes "The key is" into it."""
    rng = np.random.default_rng(seed)
    picked = [WORDS[i] for i in rng.integers(0, len(WORDS), size=words)]
    if phrase_every:
        for i in range(0, len(picked), phrase_every):
            picked[i] = "The key is"
    raw = " ".join(picked).encode("utf-8")
    if not phrase_every:
        raw = raw.replace(MARKER, b"The kex is")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def occurrences(row: torch.Tensor, pattern: bytes) -> list[int]:
    data = bytes(row.tolist())
    found, at = [], data.find(pattern)
    while at >= 0:
        found.append(at)
        at = data.find(pattern, at + 1)
    return found


class Oracle(nn.Module):
    """Reads its input as a copying head would: after the last " The key is " (the query) it has produced j
    bytes; it answers with byte j of what followed the " The key is " before that (the planted key)."""

    def __init__(self):
        super().__init__()
        self.most_rows = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.most_rows = max(self.most_rows, tokens.shape[0])
        logits = torch.zeros(*tokens.shape, 256)
        for b, row in enumerate(tokens.cpu()):
            plant, query = occurrences(row, QUERY)[-2:]
            produced = len(row) - (query + len(QUERY))
            logits[b, -1, row[plant + len(QUERY) + produced]] = 1.0
        return logits.to(tokens.device)


class Blind(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, 256, device=tokens.device)
        logits[..., ord("0")] = 1.0
        return logits


# ------------------------------------------------------------------------------------------------
# probes
# ------------------------------------------------------------------------------------------------

def test_probe_layout_and_distances():
    window, key_len, lead = 40, 4, 32
    probes = build_probes(text_ids(), window, trials=12, key_len=key_len, seed=3, lead=lead)
    assert [p.multiple for p in probes] == list(MULTIPLES)
    assert [p.distance for p in probes] == [20, 40, 80, 160, 320]
    for p in probes:
        trials, length = p.prompts.shape
        assert trials == 12 and p.keys.shape == (12, key_len) and p.prompts.dtype == torch.long
        assert length == lead + len(QUERY) + p.distance  # lead, the plant's " The key is ", then d bytes
        # the key sits exactly `distance` bytes before the end: at the position after the prompt
        assert torch.equal(p.prompts[:, -p.distance:-p.distance + key_len], p.keys)
        assert torch.equal(p.prompts[:, lead:lead + len(QUERY)], torch.tensor(list(QUERY)).expand(12, -1))
        assert torch.equal(p.prompts[:, -p.distance + key_len:-p.distance + key_len + len(KEY_END)],
                           torch.tensor(list(KEY_END)).expand(12, -1))
        assert torch.equal(p.prompts[:, -len(QUERY):], torch.tensor(list(QUERY)).expand(12, -1))
        assert set(bytes(p.keys.flatten().tolist()).decode()) <= set(DIGITS)
        for row in p.prompts:
            assert occurrences(row, MARKER) == [lead + 1, length - len(QUERY) + 1]  # no third in lead or filler
            bytes(row.tolist()).decode("utf-8")  # cuts on character boundaries: no broken characters
    # trial i asks for the same key at every distance
    assert all(torch.equal(p.keys, probes[0].keys) for p in probes)


def test_probes_deterministic_per_seed_and_different_across_seeds():
    text = text_ids()
    first = build_probes(text, 24, trials=8, seed=5)
    again = build_probes(text, 24, trials=8, seed=5)
    other = build_probes(text, 24, trials=8, seed=6)
    assert all(torch.equal(a.prompts, b.prompts) and torch.equal(a.keys, b.keys) for a, b in zip(first, again))
    assert not any(torch.equal(a.prompts, b.prompts) for a, b in zip(first, other))
    assert not torch.equal(first[0].keys, other[0].keys)
    # one distance's text does not depend on which other distances are asked for
    alone = build_probes(text, 24, trials=8, seed=5, multiples=(4.0,))
    assert torch.equal(alone[0].prompts, first[3].prompts)


def test_short_distances_clamp_to_the_minimum():
    key_len = 6
    probes = build_probes(text_ids(), 10, trials=4, key_len=key_len, alphabet=LETTERS, multiples=(0.5, 1.0, 2.0))
    least = min_distance(key_len)
    assert least == key_len + len(KEY_END) + len(QUERY) == 21
    assert [p.distance for p in probes] == [least, least, least]  # 2 x 10 = 20 is below it too
    for p in probes:
        assert torch.equal(p.prompts[:, -p.distance:-p.distance + key_len], p.keys)
        assert set(bytes(p.keys.flatten().tolist()).decode()) <= set(LETTERS)


def test_text_containing_the_phrase_is_avoided_and_three_byte_text_still_works():
    probes = build_probes(text_ids(phrase_every=80), 32, trials=10, seed=1)
    for p in probes:
        for row in p.prompts:
            assert len(occurrences(row, MARKER)) == 2
    # only three-byte characters: a filler length that is not a multiple of three must split one
    cjk = torch.frombuffer(bytearray("日本語の文章".encode() * 400), dtype=torch.uint8).long()
    probes = build_probes(cjk, 16, trials=5, lead=30, multiples=(1.0, 2.0))
    assert [p.prompts.shape[1] for p in probes] == [30 + len(QUERY) + min_distance(4), 30 + len(QUERY) + 32]
    assert all(torch.equal(p.prompts[:, -p.distance:-p.distance + 4], p.keys) for p in probes)
    bytes(probes[0].prompts[0, :30].tolist()).decode("utf-8")  # the lead (30 bytes) can still be whole characters


def test_probe_refusals():
    with pytest.raises(RecallConfigError, match="recall.text"):
        build_probes(text_ids(words=20), 64, trials=4)  # 8 windows of filler from a 100-byte text
    with pytest.raises(RecallConfigError, match="recall.text"):
        build_probes(torch.frombuffer(bytearray(b"The key is " * 100), dtype=torch.uint8).long(), 8, trials=2)
    with pytest.raises(ValueError, match="recall.alphabet"):  # a ConfigError that is also a ValueError
        build_probes(text_ids(), 16, trials=2, alphabet="ab a")
    with pytest.raises(ConfigError, match="recall.window"):
        build_probes(text_ids(), 0, trials=2)
    with pytest.raises(ConfigError, match="recall.multiples"):
        build_probes(text_ids(), 16, trials=2, multiples=(1.0, -2.0))
    with pytest.raises(ConfigError, match="0..255"):
        build_probes(torch.tensor([1, 300, 2]), 16, trials=2)


def test_metric_suffix():
    assert [metric_suffix(m) for m in MULTIPLES] == ["half_w", "1w", "2w", "4w", "8w"]
    assert metric_suffix(1.5) == "1p5w" and "." not in metric_suffix(0.25)


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

def test_oracle_recalls_everything_in_batches_of_at_most_batch_rows():
    probes = build_probes(text_ids(), 16, trials=12, key_len=5, seed=2)
    oracle = Oracle().train()
    results = score_recall(oracle, probes, torch.device("cpu"), batch=5)
    assert oracle.most_rows == 5 and oracle.training  # chunked, and the caller's mode is given back
    for result, probe in zip(results, probes):
        assert (result.multiple, result.distance, result.trials) == (probe.multiple, probe.distance, 12)
        assert (result.exact, result.chars, result.char_trials) == (12, 60, 60)
        assert result.exact_rate == 1.0 and result.char_rate == 1.0
        assert result.exact_ci == pytest.approx(wilson_interval(12, 12))
        assert result.chance_exact == pytest.approx(1e-5) and result.chance_char == pytest.approx(0.1)


def test_oracle_is_wrong_when_the_planted_key_is_replaced():
    # the oracle must read the prompt: swap each probe's key for another's and it answers the planted one
    probe = build_probes(text_ids(), 16, trials=10, seed=4, multiples=(2.0,))[0]
    shuffled = RecallProbes(probe.multiple, probe.distance, probe.prompts, probe.keys.roll(1, dims=0))
    result = score_recall(Oracle(), [shuffled], torch.device("cpu"))[0]
    assert result.exact == int((probe.keys == probe.keys.roll(1, dims=0)).all(dim=1).sum())


def test_blind_model_scores_at_chance():
    probes = build_probes(text_ids(), 16, trials=48, seed=0, multiples=(1.0, 4.0))
    for result, probe in zip(score_recall(Blind(), probes, torch.device("cpu")), probes):
        zeros = probe.keys == ord("0")
        assert result.exact == int(zeros.all(dim=1).sum()) and result.chars == int(zeros.sum())
        assert result.exact_ci[0] <= result.chance_exact <= result.exact_ci[1]
        assert result.char_ci[0] <= result.chance_char <= result.char_ci[1]
        assert result.exact_ci[1] < 0.10  # 48 trials are enough to tell this from 10 %


def test_wilson_intervals_against_known_values():
    assert wilson_interval(0, 48) == pytest.approx((0.0, 0.07410), abs=1e-5)  # z^2 / (n + z^2)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(3, 48) == pytest.approx((0.02148, 0.16835), abs=1e-5)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.72247, abs=1e-5)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_trials_to_tell_is_the_smallest_sufficient_n():
    n = trials_to_tell()
    assert n == 35
    assert wilson_interval(0, n)[1] < 0.10 <= wilson_interval(0, n - 1)[1]
    stricter = trials_to_tell(0.0, 0.05)
    assert wilson_interval(0, stricter)[1] < 0.05 <= wilson_interval(0, stricter - 1)[1]
    assert trials_to_tell(0.1, 0.2) > trials_to_tell(0.0, 0.1)  # a nonzero rate is harder to bound
    assert trials_to_tell(confidence=0.99) > n
    assert len(build_probes(text_ids(), 16, multiples=(1.0,))[0].keys) == n  # the default number of probes


def test_describe():
    result = RecallResult(multiple=2.0, distance=256, trials=48, exact=3, chars=60, char_trials=192,
                          exact_rate=3 / 48, exact_ci=wilson_interval(3, 48), char_rate=60 / 192,
                          char_ci=wilson_interval(60, 192), chance_exact=1e-4, chance_char=0.1)
    line = describe(result)
    assert line.startswith("2x window (256 bytes): exact 3/48 = 6.2 % [2.1, 16.8], per char 60/192 = 31.2 %")
    assert "\n" not in line and "chance 0.01 % exact, 10 % per char" in line
    assert describe(RecallResult(0.5, 20, 1, 0, 0, 4, 0.0, (0.0, 0.8), 0.0, (0.0, 0.5), 1e-4, 0.1)).startswith(
        "0.5x window (20 bytes)")


# ------------------------------------------------------------------------------------------------
# training plants
# ------------------------------------------------------------------------------------------------

def random_windows(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    # bytes 128..255: no accidental query in the text, and every plant changes its row
    return torch.randint(128, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def planted_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [r for r in range(len(before)) if not torch.equal(before[r], after[r])]


def test_plants_share_layout_and_key():
    windows, key_len = random_windows(200, 129), 4
    before = windows.clone()
    after = plant_in_batch(windows, 0.25, torch.Generator().manual_seed(7), key_len, LETTERS, max_distance=128)
    assert torch.equal(windows, before)  # not in place
    changed = planted_rows(before, after)
    assert len(changed) == 50
    shortest = len(QUERY) + key_len + len(KEY_END) + len(QUERY) + key_len
    distances = []
    for r in changed:
        plant, query = occurrences(after[r], QUERY)
        planted_key = after[r, plant + len(QUERY):plant + len(QUERY) + key_len]
        assert torch.equal(after[r, query + len(QUERY):query + len(QUERY) + key_len], planted_key)
        assert bytes(after[r, plant + len(QUERY) + key_len:plant + len(QUERY) + key_len + 2].tolist()) == KEY_END
        assert set(bytes(planted_key.tolist()).decode()) <= set(LETTERS)
        distances.append(query - plant)  # first planted key byte to first recalled key byte
        # outside the plant and the recall the row is the original text
        untouched = torch.ones(129, dtype=torch.bool)
        untouched[plant:plant + len(QUERY) + key_len + len(KEY_END)] = False
        untouched[query:query + len(QUERY) + key_len] = False
        assert torch.equal(after[r][untouched], before[r][untouched])
    # capped at what a 129-byte row holds: the recalled key's last byte is the row's last target
    assert shortest <= min(distances) and max(distances) <= 129 - len(QUERY) - key_len
    assert max(distances) - min(distances) > 40  # spread over the range, not one fixed distance


def test_plants_cover_a_narrow_distance_range_and_reach_the_last_target():
    key_len = 3
    shortest = 2 * len(QUERY) + 2 * key_len + len(KEY_END)
    windows = random_windows(100, shortest + len(QUERY) + key_len + 2)  # room for three distances at most
    after = plant_in_batch(windows, 1.0, torch.Generator().manual_seed(1), key_len, DIGITS, max_distance=10_000)
    seen = {occurrences(row, QUERY)[1] - occurrences(row, QUERY)[0] for row in after}
    assert seen == {shortest, shortest + 1, shortest + 2}
    ends = {occurrences(row, QUERY)[1] + len(QUERY) + key_len for row in after}
    assert max(ends) == windows.shape[1]


def test_plants_reproducible_and_share_zero_unchanged():
    windows = random_windows(16, 97)
    first = plant_in_batch(windows, 0.5, torch.Generator().manual_seed(3), 4, DIGITS, 80)
    again = plant_in_batch(windows, 0.5, torch.Generator().manual_seed(3), 4, DIGITS, 80)
    other = plant_in_batch(windows, 0.5, torch.Generator().manual_seed(4), 4, DIGITS, 80)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(planted_rows(windows, first)) == 8
    # the rows are the generator's choice: another seed plants other rows
    assert planted_rows(windows, first) != planted_rows(windows, other)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    untouched = plant_in_batch(windows, 0.0, generator, 4, DIGITS, 80)
    assert torch.equal(untouched, windows) and untouched is not windows
    assert torch.equal(generator.get_state(), state)  # nothing drawn for nothing planted


def test_plant_refusals():
    with pytest.raises(RecallConfigError, match="recall.max_distance"):
        plant_in_batch(random_windows(4, 30), 0.5, torch.Generator(), 4, DIGITS, 100)  # a 30-byte row is too short
    with pytest.raises(ValueError, match="recall.max_distance"):
        plant_in_batch(random_windows(4, 200), 0.5, torch.Generator(), 4, DIGITS, 20)
    with pytest.raises(ConfigError, match="recall_share"):
        plant_in_batch(random_windows(4, 200), 1.5, torch.Generator(), 4, DIGITS, 100)
