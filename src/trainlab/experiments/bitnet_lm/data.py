"""Text for the language model: the embedded corpus or a user's files, a fixed train/validation
split, byte or BPE tokens, and batches that are a pure function of (seed, step, micro) for a given
device (the window offsets come from the device's own generator).

Split: the text is cut into blocks of `split_block` characters; a generator seeded with
`split_seed` picks `val_fraction` of the blocks for validation.  Each side keeps its blocks in their
original order, joined, so training windows never read validation text.  The split does not depend
on train.seed: runs with different seeds are scored on the same held-out text.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from trainlab.config import knob
from trainlab.engine.state import step_seed
from trainlab.errors import ConfigError

CORPUS_FILE = Path(__file__).parent / "corpus" / "python_docs.txt.gz"
EMBEDDED = "embedded"
BYTE_VOCAB = 256
MAX_TEXT_CHARS = 2_000_000_000  # the whole corpus is held in memory (and as int64 tokens: 8 bytes each)


@dataclass
class BitLMDataConfig:
    path: str = knob(EMBEDDED, "embedded = English prose shipped with trainlab (CPython's reference topics and "
                               "standard-library docstrings, 1.68 MB; corpus/NOTICE); or a UTF-8 file, or a "
                               "folder whose files are all UTF-8 (read in sorted order, hidden entries skipped)")
    tokenizer: Literal["bytes", "bpe"] = knob("bytes", "bytes: the 256 byte values; bpe: a byte-level BPE trained "
                                                       "here on the training split (needs the tokenizers package)")
    vocab_size: int = knob(4096, "BPE vocabulary size (tokenizer bpe)", ge=257)
    seq_len: int = knob(512, "tokens per training sequence", ge=8)
    val_fraction: float = knob(0.05, "share of the text held out for validation", gt=0, lt=0.5)
    split_block: int = knob(8192, "characters per block of the train/validation split", ge=256)
    split_seed: int = knob(0, "seed of the split (independent of train.seed)", ge=0)
    eval_sequences: int = knob(32, "validation sequences in the fixed evaluation batch (loss, bits per byte, "
                                   "distinct predictions)", ge=1)
    sample_tokens: int = knob(200, "tokens generated, greedy and sampled, at each evaluation; 0 = none", ge=0)
    sample_temperature: float = knob(1.0, "temperature of the sampled text", gt=0)
    prompt_tokens: int = knob(64, "tokens of validation text the samples continue", ge=1)


def read_text(path: str) -> str:
    """The corpus text; bad paths and non-UTF-8 files raise ConfigError naming the file."""
    if path == EMBEDDED:
        return gzip.decompress(CORPUS_FILE.read_bytes()).decode("utf-8")
    root = Path(path).expanduser()
    if not root.is_file() and not root.is_dir():
        what = "is not a regular file or folder" if root.exists() else "does not exist"
        raise ConfigError("data.path", f"{path} {what}; allowed: 'embedded', a UTF-8 file, "
                                       "or a folder of UTF-8 files")
    parts, total = [], 0
    for file in _text_files(root):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("data.path", f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                           "every file must be UTF-8") from None
        except OSError as exc:
            raise ConfigError("data.path", f"{file} cannot be read ({exc.strerror})") from None
        total += len(text)
        if total > MAX_TEXT_CHARS:  # a wrong folder (a home directory, /) must not be read whole
            raise ConfigError("data.path", f"{path} holds more than {MAX_TEXT_CHARS:,} characters of text; "
                                           "point it at the corpus itself")
        parts.append(text)
    if not parts:
        raise ConfigError("data.path", f"folder {path} holds no files; allowed: 'embedded', a UTF-8 file, "
                                       "or a folder of UTF-8 files")
    return "\n\n".join(parts)


def _text_files(root: Path):
    """The file itself, or a folder's files in sorted order, walked lazily (the first bad file stops the
    walk) and without hidden entries (.git, .venv) or symlinked folders."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():  # regular files only: never a device or a pipe
                yield path


def split_text(text: str, val_fraction: float, block: int, seed: int) -> tuple[str, str]:
    blocks = [text[i:i + block] for i in range(0, len(text), block)]
    n_val = max(1, math.ceil(val_fraction * len(blocks)))
    if len(blocks) < 2:
        raise ConfigError("data.path", f"the text has {len(text)} characters, one split block "
                                       f"(data.split_block={block}); needs at least two blocks for a "
                                       "train/validation split -- more text or a smaller split_block")
    picked = set(np.random.default_rng(seed).permutation(len(blocks))[:n_val].tolist())
    train = "".join(b for i, b in enumerate(blocks) if i not in picked)
    val = "".join(b for i, b in enumerate(blocks) if i in picked)
    return train, val


class ByteTokenizer:
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int] | bytes:
        return text.encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained on the training split with Hugging Face `tokenizers` (training it
    ourselves would be slower and no better; the library's byte-level BPE is the standard one)."""

    def __init__(self, train_text: str, vocab_size: int, block: int):
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise ConfigError("data.tokenizer", "bpe needs the tokenizers package (pip install tokenizers, or "
                                                "pip install 'trainlab[bpe]'); allowed without it: bytes") from None
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((train_text[i:i + block] for i in range(0, len(train_text), block)), trainer)
        self.tokenizer = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@dataclass
class TokenizedCorpus:
    train: torch.Tensor  # int64 token ids, CPU
    val: torch.Tensor
    tokenizer: ByteTokenizer | BPETokenizer
    bytes_train: int
    bytes_val: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def frequency_entropy(self) -> float:
        """Nats per token of the training split's token frequencies: the loss of a prediction that ignores
        the context (Experiment.context_free_loss)."""
        counts = torch.bincount(self.train, minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def bits_per_byte_factor(self, split: str) -> float:
        """Multiply a mean loss in nats per token by this to get bits per byte of that split."""
        tokens, nbytes = (len(self.train), self.bytes_train) if split == "train" else (len(self.val), self.bytes_val)
        return tokens / nbytes / math.log(2)


@functools.lru_cache(maxsize=4)
def tokenized_corpus(path: str, tokenizer: str, vocab_size: int, val_fraction: float, block: int,
                     seed: int) -> TokenizedCorpus:
    """Read, split and tokenise once per process (a sweep point, a test)."""
    train_text, val_text = split_text(read_text(path), val_fraction, block, seed)
    tok = ByteTokenizer() if tokenizer == "bytes" else BPETokenizer(train_text, vocab_size, block)

    def ids(text: str) -> torch.Tensor:
        encoded = tok.encode(text)
        if isinstance(encoded, bytes):
            return torch.frombuffer(bytearray(encoded), dtype=torch.uint8).long()
        return torch.tensor(encoded, dtype=torch.long)

    return TokenizedCorpus(ids(train_text), ids(val_text), tok, len(train_text.encode("utf-8")),
                           len(val_text.encode("utf-8")))


def corpus_for(cfg) -> TokenizedCorpus:
    d = cfg.data
    # an experiment on bytes alone (memory_lm) shares this corpus and has no tokenizer knobs
    tokenizer, vocab_size = getattr(d, "tokenizer", "bytes"), getattr(d, "vocab_size", BYTE_VOCAB)
    return tokenized_corpus(d.path, tokenizer, vocab_size, d.val_fraction, d.split_block, d.split_seed)


class TextStream:
    """Training windows at random offsets of the training split: (tokens, next tokens, the factor
    from nats per token to bits per byte of the training text)."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.corpus = corpus_for(cfg)
        self.seq_len = cfg.data.seq_len
        self.micro_batch = cfg.train.micro_batch
        self.train = self.corpus.train.to(device)
        self.train_bpb_factor = self.corpus.bits_per_byte_factor("train")
        self._offsets = torch.arange(self.seq_len + 1, device=device)
        self._generator = torch.Generator(device=device)
        val = self.corpus.val
        n = cfg.data.eval_sequences
        # evenly spaced, fixed windows over the validation text: the same batch at every evaluation
        starts = torch.linspace(0, len(val) - self.seq_len - 1, n).long()
        windows = val[starts[:, None] + torch.arange(self.seq_len + 1)]
        self.eval_x, self.eval_y = windows[:, :-1].to(device), windows[:, 1:].to(device)

    def windows(self, step: int, micro: int) -> torch.Tensor:
        """(micro_batch, seq_len + 1) training tokens; the stream's generator is left where the draw
        ended, so a subclass may go on drawing from it (memory_lm plants recall keys) and stay a pure
        function of (seed, step, micro)."""
        # offsets drawn on the training device: a CPU draw copied over would make the host wait for
        # the GPU once per step (a pageable host-to-device copy synchronises)
        generator = self._generator.manual_seed(step_seed(self.cfg.train.seed, step, micro))
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (self.micro_batch, 1), generator=generator,
                               device=self.device)
        return self.train[starts + self._offsets]

    def batch(self, step: int, micro: int, level: float | None):
        windows = self.windows(step, micro)
        return windows[:, :-1], windows[:, 1:], self.train_bpb_factor


def check_corpus(cfg) -> None:
    """Refuse a corpus too small for the configured windows (ConfigError, before any run starts)."""
    corpus = corpus_for(cfg)
    need = cfg.data.seq_len + 2
    for name, ids in (("training", corpus.train), ("validation", corpus.val)):
        if len(ids) < need:
            raise ConfigError("data.seq_len", f"the {name} split has {len(ids)} tokens, fewer than seq_len + 2 = "
                                              f"{need}; use more text, a shorter data.seq_len or a larger "
                                              "data.val_fraction")
