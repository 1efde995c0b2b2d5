"""What every next-token experiment on bitnet_lm's text shares (bitnet_lm itself, memory_lm): the
cross-entropy loss with accuracy and bits per byte, tokens as the throughput unit, the frequency
entropy as the context-free level preflight compares with, the prompt-length check, and the greedy and
sampled text continuations written at each evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.engine.state import step_seed
from trainlab.errors import ConfigError
from trainlab.experiment import Experiment, StepContext
from trainlab.experiments.bitnet_lm.data import TextStream, check_corpus, corpus_for


class LanguageModelExperiment(Experiment):
    """Batches are (tokens, next tokens, bits-per-byte factor) from a TextStream; models map (B, T) tokens
    to (B, T, vocab) logits and have generate(prompt, new_tokens, temperature=0, generator=None)."""

    train_metrics = ("acc", "bpb")
    throughput_unit = "tokens"

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if cfg.data.prompt_tokens >= cfg.data.seq_len:
            raise ConfigError("data.prompt_tokens", f"must be < data.seq_len={cfg.data.seq_len}; "
                                                    f"got {cfg.data.prompt_tokens}")
        check_corpus(cfg)

    def items_per_sample(self, cfg) -> int:
        return cfg.data.seq_len

    def loss(self, model: nn.Module, batch, ctx: StepContext):
        x, y, bits_per_byte_factor = batch
        logits = model(x).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return loss, {"acc": acc, "bpb": loss.detach() * bits_per_byte_factor}

    def context_free_loss(self, cfg) -> float:
        return corpus_for(cfg).frequency_entropy()

    def samples(self, model: nn.Module, data: TextStream, cfg, step: int) -> dict:
        if cfg.data.sample_tokens == 0:
            return {}
        tokenizer = data.corpus.tokenizer
        prompt = data.eval_x[:1, :cfg.data.prompt_tokens]
        greedy = model.generate(prompt, cfg.data.sample_tokens)
        generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1 << 20))
        sampled = model.generate(prompt, cfg.data.sample_tokens, cfg.data.sample_temperature, generator)
        return {"prompt": tokenizer.decode(prompt[0].tolist()), "greedy": tokenizer.decode(greedy[0].tolist()),
                "sampled": tokenizer.decode(sampled[0].tolist()), "temperature": cfg.data.sample_temperature}
