"""The recall test of memory_lm: can the model give back a short key it read further back than its
attention window reaches?

Template (bytes, UTF-8).  A probe is

    lead text + PLANT(key) + filler text + QUERY          and the model should continue with the key,

    PLANT(key) = " The key is $" + key + ". "      QUERY = " The key is $"

The query ends in '$', a byte ordinary prose rarely holds (34 times in the 1.68 MB embedded corpus), so
"the byte after the last '$'" names the key without ambiguity: copying it is the one-step induction a
small model can learn.  With a query ending in a space (the first template), the key's position was
one of every word start, and the quick preset's models never learned to copy it (key-position loss
ln 10 after 1500 steps: "a digit comes next", not which -- docs/experiments/memory_lm.md).

The distance d of a probe is the number of bytes from the first byte of the planted key to the position
right after the query (where the model must emit the first key byte), so the key sits exactly d bytes
before the end of the prompt.  Distances are multiples of the window W (MULTIPLES: 0.5, 1, 2, 4, 8);
0.5 W puts the key inside the attention window, the positive control: a model that fails there cannot
do the task at all, and failures further out say nothing about its memory.

Minimum distance.  The filler gets d - key_len - len(". ") - len(QUERY) bytes, so d cannot be below
`min_distance(key_len)` = key_len + 15 (empty filler).  A multiple whose distance falls below that (0.5 W
of a window under 2 * (key_len + 15) bytes) is clamped up to the minimum, and `distance` reports the
distance actually used; such a "control" may then lie outside the window.

Text.  Lead (a fixed `lead` bytes) and filler are cut from the validation split at positions drawn from
a numpy generator, so the probes are a pure function of (text, window, trials, key_len, alphabet, seed,
lead).  A cut never contains "The key is" (positions whose cut would hold it are never drawn: the same as
redrawing until none does), and where the text allows it, starts and ends on UTF-8 character boundaries
so the joins create no broken characters.  Keys come from their own stream of the seed: trial i asks for
the same key at every distance (paired trials), and the text of one distance does not change when the
list of multiples does.  All probes of one distance have the same length and form one tensor.

Scoring (`score_recall`).  Greedy decoding: the full sequence goes through `model(tokens)` -> (B, T, 256)
logits, the argmax at the last position is appended, key_len times.  Exact match (every key byte right)
and per-character accuracy (position by position) each get a 95 % Wilson interval
(scipy.stats.binomtest(...).proportion_ci(method="wilson")).  The per-character interval treats the
n * key_len characters as independent trials; the characters of one key are not independent (one
probe's memory is there or it is not, and greedy decoding continues from its own mistakes), so that
interval is too narrow.  The exact-match interval, over independent probes, is the honest one.  Chance:
(1/alphabet)^key_len exact, 1/alphabet per character.  `trials_to_tell()` (35 at 95 %) is the fewest
probes for which 0 successes has its upper bound below 10 %, enough to tell 0 % from 10 %.

Training plants (`plant_in_batch`).  The same template written into a share of the training windows:
PLANT(key) at a random position and QUERY + key at a random distance after it, so the language-model loss
on the second key is recall practice.  Everything is drawn from the caller's torch generator on its
device and written with one vectorised index assignment: no loop over rows, no host synchronisation.

Errors a user can cause (a window, a text, an alphabet that cannot work) raise `RecallConfigError`, a
ConfigError (one-line message, CLI exit 2) that is also a ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trainlab.errors import ConfigError

DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MULTIPLES = (0.5, 1.0, 2.0, 4.0, 8.0)

QUERY = b" The key is $"
KEY_END = b". "
MARKER = b"The key is"  # what ordinary text around a probe must not contain: a second plant or query
BYTE_SYMBOLS = 256


class RecallConfigError(ConfigError, ValueError):
    """A recall setting or input that cannot work; a ConfigError for the CLI, a ValueError for callers
    that check the argument the usual Python way."""


def min_distance(key_len: int) -> int:
    """The shortest probe distance: the key, ". " and the query with no filler between them."""
    return key_len + len(KEY_END) + len(QUERY)


def metric_suffix(multiple: float) -> str:
    """A metric-name suffix without dots: 0.5 -> "half_w", 1 -> "1w", 8 -> "8w", 1.5 -> "1p5w"."""
    if not multiple > 0:
        raise RecallConfigError("recall.multiples", f"distances must be positive multiples of the window, "
                                                    f"got {multiple}")
    if multiple == 0.5:
        return "half_w"
    if float(multiple).is_integer():
        return f"{int(multiple)}w"
    return f"{multiple:g}".replace(".", "p") + "w"


@dataclass
class RecallProbes:
    """The probes of one distance: prompts end with the query; keys are the byte ids to produce."""
    multiple: float
    distance: int
    prompts: torch.Tensor  # (trials, L) long
    keys: torch.Tensor     # (trials, key_len) long
    alphabet_size: int = len(DIGITS)  # for the chance levels


@dataclass
class RecallResult:
    """The score of one distance."""
    multiple: float
    distance: int
    trials: int
    exact: int
    chars: int
    char_trials: int
    exact_rate: float
    exact_ci: tuple[float, float]
    char_rate: float
    char_ci: tuple[float, float]
    chance_exact: float
    chance_char: float


# ------------------------------------------------------------------------------------------------
# probes
# ------------------------------------------------------------------------------------------------

def _alphabet_bytes(alphabet: str) -> np.ndarray:
    if not alphabet or len(set(alphabet)) != len(alphabet) or not alphabet.isascii():
        raise RecallConfigError("recall.alphabet", f"needs distinct ASCII characters (one byte each), got {alphabet!r}")
    return np.frombuffer(alphabet.encode("ascii"), dtype=np.uint8).copy()


def _text_bytes(text_ids: torch.Tensor) -> np.ndarray:
    if text_ids.dim() != 1 or text_ids.dtype.is_floating_point or text_ids.dtype == torch.bool:
        raise RecallConfigError("recall.text", f"needs a 1-D tensor of byte ids, got {tuple(text_ids.shape)} "
                                               f"{text_ids.dtype}")
    ids = text_ids.detach().cpu().long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= BYTE_SYMBOLS):
        raise RecallConfigError("recall.text", "byte ids must lie in 0..255 (memory_lm reads bytes)")
    return ids.numpy().astype(np.uint8)


class _TextCutter:
    """Draws cuts of ordinary text: the allowed start positions of each cut length are computed once."""

    def __init__(self, text: np.ndarray):
        self.text = text
        n = len(text)
        # a start or an end on a UTF-8 continuation byte (10xxxxxx) would split a character
        self.boundary = np.ones(n + 1, dtype=bool)
        self.boundary[:n] = (text & 0xC0) != 0x80
        marker = np.frombuffer(MARKER, dtype=np.uint8)
        hits = np.zeros(n + 1, dtype=np.int64)  # hits[i]: a marker starts at i
        if n >= len(marker):
            windows = np.lib.stride_tricks.sliding_window_view(text, len(marker))
            hits[:len(windows)] = (windows == marker).all(axis=1)
        self.marker_before = np.concatenate([[0], np.cumsum(hits)])  # markers starting before i
        self._starts: dict[int, np.ndarray] = {}

    def starts(self, length: int) -> np.ndarray:
        if length not in self._starts:
            n = len(self.text)
            if length > n:
                raise RecallConfigError("recall.text", f"a probe needs {length} bytes of ordinary text in one piece, "
                                                       f"the validation text has {n}; more text or shorter distances")
            s = np.arange(n - length + 1)
            # markers wholly inside [s, s + length): they start in [s, s + length - len(MARKER)]
            last_marker_start = np.maximum(s + length - len(MARKER) + 1, s)
            clean = self.marker_before[last_marker_start] == self.marker_before[s]
            aligned = clean & self.boundary[s] & self.boundary[s + length]
            # text with no aligned cut of this length (all three-byte characters and a length not a multiple
            # of three): accept split characters rather than refuse
            allowed = np.flatnonzero(aligned if aligned.any() else clean)
            if not len(allowed):
                raise RecallConfigError("recall.text", f"every {length}-byte piece of the validation text contains "
                                                       f"{MARKER.decode()!r}; the recall probes need text without it")
            self._starts[length] = allowed
        return self._starts[length]

    def cut(self, length: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """(count, length) bytes of text, each row from a random allowed position."""
        allowed = self.starts(length)
        starts = allowed[rng.integers(0, len(allowed), size=count)]
        return self.text[starts[:, None] + np.arange(length)]


def build_probes(text_ids: torch.Tensor, window: int, trials: int | None = None, key_len: int = 4,
                 alphabet: str = DIGITS, seed: int = 0, multiples=MULTIPLES, lead: int = 32) -> list[RecallProbes]:
    """One RecallProbes per multiple of `window`, `trials` probes each (None: trials_to_tell()), from the
    byte ids `text_ids` (the validation split).  Distances below min_distance(key_len) are clamped up to it."""
    trials = trials_to_tell() if trials is None else trials
    for key, value, least in (("recall.window", window, 1), ("recall.trials", trials, 1),
                              ("recall.key_len", key_len, 1), ("recall.lead", lead, 0), ("recall.seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise RecallConfigError(key, f"must be a whole number >= {least}, got {value!r}")
    symbols = _alphabet_bytes(alphabet)
    cutter = _TextCutter(_text_bytes(text_ids))
    key_index = np.random.default_rng([seed, 0]).integers(0, len(symbols), size=(trials, key_len))
    keys = symbols[key_index]
    query = np.broadcast_to(np.frombuffer(QUERY, dtype=np.uint8), (trials, len(QUERY)))
    key_end = np.broadcast_to(np.frombuffer(KEY_END, dtype=np.uint8), (trials, len(KEY_END)))
    probes = []
    for multiple in multiples:
        metric_suffix(multiple)  # refuses a non-positive multiple
        distance = max(int(round(multiple * window)), min_distance(key_len))
        # a stream per distance (keyed by the multiple, not its place in the list): adding a multiple
        # leaves the other distances' text as it was
        rng = np.random.default_rng([seed, 1, int(round(multiple * 1_000_000))])
        lead_text = cutter.cut(lead, trials, rng)
        filler = cutter.cut(distance - min_distance(key_len), trials, rng)
        prompts = np.concatenate([lead_text, query, keys, key_end, filler, query], axis=1)
        probes.append(RecallProbes(multiple, distance, torch.from_numpy(prompts.astype(np.int64)),
                                   torch.from_numpy(keys.astype(np.int64)), len(symbols)))
    return probes


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of successes/trials (scipy's; scipy.stats imported here, where first
    needed: it costs about 1.7 s per process)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"a Wilson interval needs 0 <= successes <= trials and trials >= 1, "
                         f"got {successes}/{trials}")
    from scipy.stats import binomtest
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def trials_to_tell(rate_low: float = 0.0, rate_high: float = 0.10, confidence: float = 0.95) -> int:
    """The fewest trials n for which an observed rate of `rate_low` has its Wilson upper bound below
    `rate_high` (defaults: 0 successes of n below 10 %, n = 35): enough to tell the two rates apart.

    The bound, for a fixed observed rate, falls as n grows, so the answer is found by doubling and
    bisection on the closed-form Wilson bound (scipy's formula, without loading scipy.stats)."""
    if not 0.0 <= rate_low < rate_high <= 1.0:
        raise ValueError(f"needs 0 <= rate_low < rate_high <= 1, got {rate_low}, {rate_high}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    from scipy.special import ndtri
    z = float(ndtri(1.0 - (1.0 - confidence) / 2.0))

    def upper(n: int) -> float:
        p, zz = rate_low, z * z
        centre = p + zz / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n))
        return (centre + spread) / (1 + zz / n)

    high = 1
    while not upper(high) < rate_high:
        high *= 2
    low = high // 2  # upper(low) >= rate_high, or low == 0
    while high - low > 1:
        middle = (low + high) // 2
        if upper(middle) < rate_high:
            high = middle
        else:
            low = middle
    return high


def _greedy_keys(model: nn.Module, prompts: torch.Tensor, key_len: int) -> torch.Tensor:
    tokens = prompts
    for _ in range(key_len):
        logits = model(tokens)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape or logits.shape[2] != BYTE_SYMBOLS:
            raise ValueError(f"the model must map (B, T) byte ids to (B, T, {BYTE_SYMBOLS}) logits; for input "
                             f"{tuple(tokens.shape)} it returned {tuple(logits.shape)}")
        next_byte = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_byte.to(tokens.dtype)], dim=1)
    return tokens[:, prompts.shape[1]:]


@torch.no_grad()
def score_recall(model: nn.Module, probes: list[RecallProbes], device: torch.device,
                 batch: int = 16) -> list[RecallResult]:
    """Greedy recall of every probe, `batch` prompts at a time (the model in eval mode meanwhile, its
    mode restored after)."""
    if batch < 1:
        raise RecallConfigError("recall.batch", f"must be >= 1, got {batch}")
    was_training = model.training
    model.eval()
    try:
        results = []
        for probe in probes:
            trials, key_len = probe.keys.shape
            exact = torch.zeros((), dtype=torch.long, device=device)
            chars = torch.zeros((), dtype=torch.long, device=device)
            for first in range(0, trials, batch):
                prompts = probe.prompts[first:first + batch].to(device)
                keys = probe.keys[first:first + batch].to(device)
                right = _greedy_keys(model, prompts, key_len) == keys
                exact += right.all(dim=1).sum()
                chars += right.sum()
            exact_n, chars_n = int(exact), int(chars)  # one host sync per distance
            results.append(RecallResult(
                multiple=probe.multiple, distance=probe.distance, trials=trials, exact=exact_n, chars=chars_n,
                char_trials=trials * key_len, exact_rate=exact_n / trials, exact_ci=wilson_interval(exact_n, trials),
                char_rate=chars_n / (trials * key_len), char_ci=wilson_interval(chars_n, trials * key_len),
                chance_exact=(1.0 / probe.alphabet_size) ** key_len, chance_char=1.0 / probe.alphabet_size))
        return results
    finally:
        model.train(was_training)


def describe(result: RecallResult) -> str:
    """One line: "2x window (256 bytes): exact 3/48 = 6.2 % [2.1, 16.8], per char ... chance ..."."""
    r = result
    return (f"{r.multiple:g}x window ({r.distance} bytes): exact {r.exact}/{r.trials} = {100 * r.exact_rate:.1f} % "
            f"[{100 * r.exact_ci[0]:.1f}, {100 * r.exact_ci[1]:.1f}], per char {r.chars}/{r.char_trials} = "
            f"{100 * r.char_rate:.1f} % [{100 * r.char_ci[0]:.1f}, {100 * r.char_ci[1]:.1f}] (too narrow: the "
            f"characters of one key are not independent); chance {100 * r.chance_exact:.2g} % exact, "
            f"{100 * r.chance_char:.2g} % per char")


# ------------------------------------------------------------------------------------------------
# training plants
# ------------------------------------------------------------------------------------------------

def plant_in_batch(windows: torch.Tensor, share: float, generator: torch.Generator, key_len: int, alphabet: str,
                   max_distance: int) -> torch.Tensor:
    """A copy of `windows` (B, L+1) with round(share * B) rows, chosen by `generator`, carrying PLANT(key)
    at a random position and QUERY + key at a random distance d after it (d as in the probes: from the
    first planted key byte to the first recalled one), d uniform in
    [len(PLANT) + len(QUERY) + key_len, max_distance].  max_distance is capped at what a row holds
    (L + 1 - len(QUERY) - key_len), so seq_len itself is a valid argument.

    Keys, rows, distances and positions are all drawn from `generator` on its own device (a pure
    function of its state) and moved to the windows' device; the writes are one index assignment over
    the planted rows, so there is no loop over rows and no host synchronisation."""
    if windows.dim() != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise RecallConfigError("recall.windows", f"needs a (B, L+1) tensor of byte ids, got "
                                                  f"{tuple(windows.shape)} {windows.dtype}")
    if not 0.0 <= share <= 1.0:
        raise RecallConfigError("data.recall_share", f"must lie in [0, 1], got {share}")
    if key_len < 1:
        raise RecallConfigError("data.recall_key_len", f"must be >= 1, got {key_len}")
    symbols = _alphabet_bytes(alphabet)
    rows_total, row_len = windows.shape
    plant_len = len(QUERY) + key_len + len(KEY_END)
    shortest = plant_len + len(QUERY) + key_len
    longest = min(max_distance, row_len - len(QUERY) - key_len)
    if longest < shortest:
        raise RecallConfigError("recall.max_distance", f"a plant needs distance >= {shortest} bytes and rows of "
                                                     f">= {shortest + len(QUERY) + key_len} bytes; got max_distance "
                                                     f"{max_distance} and rows of {row_len}")
    out = windows.clone()
    planted = round(share * rows_total)
    if planted == 0:
        return out
    draw_device = generator.device
    rows = torch.randperm(rows_total, generator=generator, device=draw_device)[:planted]
    key_index = torch.randint(0, len(symbols), (planted, key_len), generator=generator, device=draw_device)
    # uniform integers with per-row bounds: floor(u * count), clamped against u * count rounding up to count
    u_distance, u_start = torch.rand((2, planted), generator=generator, device=draw_device)
    distance_choices = longest - shortest + 1
    distance = shortest + (u_distance * distance_choices).long().clamp_(max=distance_choices - 1)
    start_choices = row_len - len(QUERY) - key_len - distance + 1  # the span is len(QUERY) + distance + key_len
    start = (u_start * start_choices).long().minimum(start_choices - 1)

    device, dtype = windows.device, windows.dtype
    rows, distance, start = rows.to(device), distance.to(device), start.to(device)
    keys = torch.as_tensor(symbols, device=device).to(dtype)[key_index.to(device)]
    query = torch.tensor(list(QUERY), device=device, dtype=dtype).expand(planted, -1)
    key_end = torch.tensor(list(KEY_END), device=device, dtype=dtype).expand(planted, -1)
    plant = torch.cat([query, keys, key_end], dim=1)
    recall = torch.cat([query, keys], dim=1)
    # the recalled key starts `distance` after the planted one, so its query starts `distance` after the plant
    plant_cols = start[:, None] + torch.arange(plant.shape[1], device=device)
    recall_cols = (start + distance)[:, None] + torch.arange(recall.shape[1], device=device)
    cols = torch.cat([plant_cols, recall_cols], dim=1)
    out[rows[:, None].expand_as(cols), cols] = torch.cat([plant, recall], dim=1)
    return out
