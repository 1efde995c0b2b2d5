"""Bytes for the memory language model: bitnet_lm's corpus and split (the embedded English prose, or the
user's own UTF-8 text through data.path -- any language: the model reads bytes, so a Turkish
corpus's two-byte letters are two symbols each), training windows drawn as bitnet_lm draws them, and
optionally recall practice planted into a share of them (recall.py's template), so that the recall
test asks for a skill the model had a chance to learn.

The recall probes are built once per stream from the validation split with their own seed
(data.recall_seed), so every run of a sweep is asked the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainlab.config import knob
from trainlab.experiments.bitnet_lm.data import EMBEDDED, TextStream
from trainlab.experiments.memory_lm.recall import DIGITS, LETTERS, build_probes, plant_in_batch

ALPHABETS = {"digits": DIGITS, "letters": LETTERS}


@dataclass
class MemoryLMDataConfig:
    path: str = knob(EMBEDDED, "embedded = the English prose bitnet_lm ships (1.68 MB); or a UTF-8 file, or a folder "
                               "whose files are all UTF-8 (read in sorted order, hidden entries skipped)")
    seq_len: int = knob(1024, "bytes per training sequence", ge=8)
    val_fraction: float = knob(0.05, "share of the text held out for validation", gt=0, lt=0.5)
    split_block: int = knob(8192, "characters per block of the train/validation split", ge=256)
    split_seed: int = knob(0, "seed of the split (independent of train.seed)", ge=0)
    eval_sequences: int = knob(16, "validation sequences of seq_len bytes in the fixed evaluation batch", ge=1)
    sample_tokens: int = knob(200, "bytes generated, greedy and sampled, at each evaluation; 0 = none", ge=0)
    sample_temperature: float = knob(1.0, "temperature of the sampled text", gt=0)
    prompt_tokens: int = knob(64, "bytes of validation text the samples continue", ge=1)
    recall_share: float = knob(0.0, "share of training sequences with a planted key and, later in the sequence, its "
                                    "query and the key again (recall practice); 0 = plain text only", ge=0, le=1)
    recall_trials: int = knob(0, "recall probes per distance at each evaluation; 0 = the fewest whose 95 % Wilson "
                                 "interval tells 0 % from 10 % (0 of n has its upper end below 10 %); "
                                 "no recall test: set recall_multiples to []", ge=0)
    recall_multiples: list[float] = knob(factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0], help=(
        "distances of the recall test, in windows (model.window; with full attention: in sequences); "
        "keys at 0.5 window sit inside the attention window -- the positive control"), gt=0)
    recall_key_len: int = knob(4, "characters per recall key", ge=1, le=32)
    recall_alphabet: Literal["digits", "letters"] = knob("digits", "what a recall key is made of")
    recall_seed: int = knob(0, "seed of the recall probes (independent of train.seed, like the split)", ge=0)


def recall_unit(cfg) -> int:
    """The length the recall distances are multiples of: the attention window, or the training sequence where
    attention is full (model.window 0)."""
    return cfg.model.window or cfg.data.seq_len


class MemoryTextStream(TextStream):
    """bitnet_lm's training windows, with recall practice planted into data.recall_share of them (drawn from the
    same generator after the window offsets: still a pure function of (seed, step, micro))."""

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        d = cfg.data
        self.alphabet = ALPHABETS[d.recall_alphabet]
        # kept on the host: score_recall moves each batch of probes to the device as it scores it
        self.probes = [] if not d.recall_multiples else build_probes(
            self.corpus.val, recall_unit(cfg), d.recall_trials or None, d.recall_key_len, self.alphabet,
            d.recall_seed, tuple(d.recall_multiples))  # None: build_probes' default, trials_to_tell()

    def batch(self, step: int, micro: int, level: float | None):
        windows = self.windows(step, micro)
        share = self.cfg.data.recall_share
        if share > 0:
            windows = plant_in_batch(windows, share, self._generator, self.cfg.data.recall_key_len, self.alphabet,
                                     self.seq_len)
        return windows[:, :-1], windows[:, 1:], self.train_bpb_factor
