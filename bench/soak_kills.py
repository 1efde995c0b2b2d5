#!/usr/bin/env python3
"""Soak: SIGKILL a run N times at random moments (mid-step, mid-checkpoint, mid-log-write), resume
after each, and compare with a run never killed: metrics (last row per step) and final weights must
be identical.  Prints how many kills landed while a checkpoint was being written and how many tore
a metrics row.

Usage: python bench/soak_kills.py OUT_DIR [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainlab.engine.logs import read_metrics

# checkpoints every 3 steps of a width-256 model: saves take a good share of the time, so random
# kills often land inside one
RUN = ["run", "modadd", "--preset", "smoke", "--steps", "400", "--set", "model.dim=256", "--set", "model.heads=4",
       "--set", "ckpt.every=3", "--set", "ckpt.keep=2", "--set", "log.every=2", "--set", "eval.every=50",
       "--set", "model.dropout=0.1", "--set", "log.progress=off"]
VOLATILE = {"attempt", "elapsed_s", "samples_per_s", "ram_gb", "peak_ram_gb", "dev_mem_gb", "peak_dev_mem_gb"}


def cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "trainlab", *RUN, "--run-dir", str(run_dir)]


def history(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir / "metrics.csv")]


def weights(run_dir: Path) -> dict:
    last = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())[-1]
    return load_file(str(last / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, run = args.out / "reference", args.out / "killed"
    t0 = time.monotonic()
    subprocess.run(cmd(ref), env=env, check=True, capture_output=True)
    ref_s = time.monotonic() - t0
    rng = random.Random(args.seed)
    kills = mid_checkpoint = 0
    while kills < args.kills:
        events = run / "events.jsonl"
        before = events.stat().st_size if events.exists() else 0
        proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this attempt is training (its start/resume event is written), then a random moment
        deadline = time.monotonic() + 60
        while (not events.exists() or events.stat().st_size == before) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            break  # finished before this kill: the run is complete
        saving = any(p.name.startswith(".tmp-") for p in (run / "checkpoints").glob(".tmp-*")) \
            if (run / "checkpoints").exists() else False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_checkpoint += saving
    final = subprocess.run(cmd(run), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.startswith("{")]
    torn = sum(e.get("kind") == "metrics_torn_row_removed" for e in events)
    incomplete = sum(e.get("kind") == "checkpoint_incomplete_removed" for e in events)
    same_metrics = history(run) == history(ref)
    ref_w, got_w = weights(ref), weights(run)
    same_weights = ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    print(f"reference run: {ref_s:.1f} s, {len(history(ref))} rows")
    print(f"kills: {kills}; while a checkpoint temp folder existed: {mid_checkpoint}; "
          f"half-written checkpoints swept at resume: {incomplete}; torn metrics rows cut: {torn}")
    print(f"resumes: {sum(e.get('kind') == 'resume' for e in events)}")
    print(f"metrics identical (last row per step): {same_metrics}")
    print(f"final weights identical: {same_weights}")
    sys.exit(0 if same_metrics and same_weights else 1)


if __name__ == "__main__":
    main()
