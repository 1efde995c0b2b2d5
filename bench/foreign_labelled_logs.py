#!/usr/bin/env python3
"""The labelled set of foreign logs behind docs/health.md: logs written by real training scripts that
are not trainlab runs -- a plain PyTorch loop writing CSV, a Lightning fit's CSVLogger, a Hugging Face
Trainer's TensorBoard logs -- each healthy, stuck (learning rate 0) and diverging (a learning rate far
too high), judged by `trainlab check LOG --baseline ce:4`.

Usage: python bench/foreign_labelled_logs.py OUT_DIR [--steps 600]
Needs the test extra (lightning, transformers, accelerate, tensorboard).  Prints one Markdown table:
log, label, what `trainlab check` reported (critical alerts and warnings), its exit code, and
whether that is a hit, a miss or a false alarm.  About two minutes on one CPU core.

The task is the same everywhere: 4 Gaussian blobs in 8 dimensions, a 2-layer MLP, cross-entropy, so
the random guess is ln 4 (`--baseline ce:4`).  Batches are drawn from a seeded generator.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

CLASSES, DIM, BATCH = 4, 8, 64
# label -> (SGD learning rate, what a correct check says)
LABELS = {"healthy": (0.1, "no critical alert"), "stuck": (0.0, "stuck"), "diverging": (30.0, "divergence or nonfinite")}
CRITICAL = ("stuck", "divergence", "nonfinite", "collapse")


def make_task(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=g) * 1.5

    def batch(step: int):
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        return centres[y] + torch.randn(BATCH, DIM, generator=gen), y

    def model():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES))

    return batch, model


def plain_loop(out: Path, lr: float, steps: int) -> Path:
    """A hand-written loop appending `step,loss,accuracy` to a CSV every 10 steps."""
    import torch

    batch, build = make_task()
    net = build()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    log = out / "training_log.csv"
    with log.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "accuracy"])
        for step in range(1, steps + 1):
            x, y = batch(step)
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0:
                writer.writerow([step, float(loss), float((logits.argmax(-1) == y).float().mean())])
    return log


def lightning_fit(out: Path, lr: float, steps: int) -> Path:
    """A Lightning fit logging train_loss and acc through its own CSVLogger."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    batch, build = make_task()

    class Blobs(torch.utils.data.IterableDataset):
        def __iter__(self):
            for step in range(1, steps + 1):
                yield batch(step)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build()

        def training_step(self, xy, _):
            x, y = xy
            logits = self.net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            self.log("train_loss", loss)
            self.log("acc", (logits.argmax(-1) == y).float().mean())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    logger = CSVLogger(str(out), name="lightning", version=0)
    trainer = pl.Trainer(max_steps=steps, logger=logger, log_every_n_steps=10, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Module(), torch.utils.data.DataLoader(Blobs(), batch_size=None))
    return Path(logger.log_dir) / "metrics.csv"


def transformers_fit(out: Path, lr: float, steps: int) -> Path:
    """A Hugging Face Trainer run on a plain nn.Module, logging to TensorBoard every 10 steps."""
    import torch
    from transformers import Trainer, TrainingArguments

    batch, build = make_task()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build()

        def forward(self, x, labels):
            logits = self.net(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Blobs(torch.utils.data.Dataset):
        def __len__(self):
            return steps * BATCH

        def __getitem__(self, i):
            x, y = batch(i // BATCH + 1)
            return {"x": x[i % BATCH], "labels": y[i % BATCH]}

    args = TrainingArguments(output_dir=str(out / "hf"), max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=lr, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
                             max_grad_norm=0.0, logging_steps=10, report_to=["tensorboard"],
                             save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints every logged dict; the table is stdout
        Trainer(model=Net(), args=args, train_dataset=Blobs()).train()
    # where the Trainer's TensorBoard writer put its event file (under output_dir; the folder name
    # differs between transformers versions)
    events = sorted((out / "hf").rglob("events.out.tfevents.*"))
    if not events:
        raise SystemExit(f"no TensorBoard event file under {out / 'hf'}")
    return events[-1].parent


WRITERS = {"plain PyTorch loop (CSV)": plain_loop, "Lightning CSVLogger": lightning_fit,
           "transformers Trainer (TensorBoard)": transformers_fit}


def check(log: Path, out: Path) -> tuple[int, list[str], list[str]]:
    import json

    proc = subprocess.run([sys.executable, "-m", "trainlab", "check", str(log), "--baseline", f"ce:{CLASSES}",
                           "--out", str(out)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode == 2:
        return 2, [proc.stderr.strip()], []
    claims = json.loads((out / "check.json").read_text())["claims"]
    critical = [f"{c['name']}: {c['value']}" for c in claims if c["verdict"] == "fail"]
    warned = [f"{c['name']}: {c['value']}" for c in claims if c["verdict"] == "warn"]
    return proc.returncode, critical, warned


def outcome(label: str, critical: list[str]) -> str:
    names = {c.split(":")[0] for c in critical}
    if label == "healthy":
        return "correct" if not names else "FALSE ALARM"
    wanted = {"stuck"} if label == "stuck" else {"divergence", "nonfinite"}
    return "hit" if names & wanted else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    print("| log | label (SGD lr) | trainlab check: critical | warnings | exit | outcome |\n|---|---|---|---|---|---|")
    for writer_name, writer in WRITERS.items():
        for label, (lr, _) in LABELS.items():
            out = args.out / f"{writer.__name__}-{label}"
            out.mkdir(parents=True, exist_ok=True)
            log = writer(out, lr, args.steps)
            code, critical, warned = check(log, out / "check")
            shown = "; ".join(critical) or "-"
            print(f"| {writer_name} | {label} ({lr:g}) | {shown} | {'; '.join(warned) or '-'} | {code} | "
                  f"{outcome(label, critical) if code != 2 else 'bad input'} |", flush=True)


if __name__ == "__main__":
    main()
