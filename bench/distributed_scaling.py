#!/usr/bin/env python3
"""Data-parallel runs: CPU throughput of 2 processes against 1 at the same effective batch, and
(with --gpu, CUDA only) the DDP overhead of a 1-rank torchrun job against a plain run.

Figure 1 (CPU) -- `trainlab run modadd --preset quick --device cpu` as one process with
train.accum=2 against `--nproc 2` with train.accum=1: the same effective batch (micro_batch x
accum x processes).  Rounds A, B, B, A, ...; each run in a fresh --run-dir under a temp dir.  A
run's throughput is the median of metrics.csv's samples_per_s over its rows after the first; the
figure is the median of the per-round ratios 2-proc / 1-proc with its interval (_common.ratio_interval).
On a 2-core machine no speed-up is expected: both configurations keep the same 2 cores busy.

Figure 2 (--gpu, CUDA only) -- `python -m torch.distributed.run --standalone --nproc-per-node 1
-m trainlab run ...` (world size 1 under torchrun: the model is wrapped in DDP) against plain
`trainlab run ...` on one GPU, the same per-GPU batch; ratio of step time (1 / samples_per_s),
target <= 1.03, met only when the interval's upper end is <= 1.03.

    python bench/distributed_scaling.py [--device cpu|cuda] [--rounds 5] [--steps N] [--gpu] [--quick]
The last lines are the summary lines (bench/_common.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common as C
from trainlab.engine.logs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
BASE = ["modadd", "--preset", "quick", "--set", "log.progress=off", "--set", "eval.every=0",
        "--set", "eval.at_end=false", "--set", "ckpt.every=0"]
CPU_STEPS, QUICK_STEPS = 200, 30  # 200: one run of the quick preset takes ~10-20 s on 2 cores
GPU_STEPS = 600
GPU_TARGET = 1.03


def trainlab_cmd(device: str, steps: int, sets: list[str], run_dir: Path, nproc: int | None = None,
                 torchrun: bool = False) -> list[str]:
    args = ["run", *BASE, "--steps", str(steps), "--device", device, "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    if nproc is not None:
        args += ["--nproc", str(nproc)]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "trainlab", *args]
    return [sys.executable, "-m", "trainlab", *args]


def one_run(cmd: list[str], run_dir: Path) -> tuple[float, float]:
    """(median samples/s over metrics rows after the first, wall seconds) of one run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rates = [float(r["samples_per_s"]) for r in read_metrics(run_dir / "metrics.csv")[1:]
             if r.get("samples_per_s") not in (None, "")]
    if not rates:
        raise SystemExit(f"{run_dir / 'metrics.csv'}: no samples_per_s after the first row (more --steps?)")
    return C.median(rates), wall


def interleaved_runs(configs: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """configs: name -> function(run_dir) giving the command.  Order turned every round."""
    out = {name: {"rate": [], "wall": []} for name in configs}
    order = list(configs)
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                run_dir = Path(tmp) / f"{name}-{r}"
                rate, wall = one_run(configs[name](run_dir), run_dir)
                out[name]["rate"].append(rate)
                out[name]["wall"].append(wall)
    return out


def show(results: dict) -> None:
    for name, v in results.items():
        print(f"{name:24s} samples/s median {C.fmt_rate(C.median(v['rate']))} wall median {C.median(v['wall']):.1f} s"
              f" | per round samples/s " + " ".join(f"{x:.0f}" for x in v["rate"])
              + " | wall s " + " ".join(f"{x:.1f}" for x in v["wall"]))


def interval_text(ratio: float, lo: float, hi: float, coverage: float) -> str:
    return f"{ratio:.3f} [{lo:.3f}, {hi:.3f}] ({coverage:.0%} interval)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="accepted like every bench; figure 1 always runs on cpu, figure 2 needs --gpu")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each configuration (interleaved)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--gpu", action="store_true", help="also figure 2 (DDP overhead on one GPU)")
    parser.add_argument("--quick", action="store_true", help="smallest settings (tests; figures not to be quoted)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: allowed: 1 or more")
    steps = args.steps or (QUICK_STEPS if args.quick else CPU_STEPS)
    rounds = 1 if args.quick else args.rounds
    # a quick run is short: log often enough that there are rows after the first to take the median of
    extra = ["log.every=5"] if args.quick else []
    cpu = torch.device("cpu")
    print(C.header(cpu, "data-parallel scaling: 2 processes (gloo) vs 1 at the same effective batch"))
    print(f"{rounds} interleaved rounds, {steps} steps per run; 1 process train.accum=2 vs --nproc 2 train.accum=1. "
          f"This machine has {os.cpu_count()} cores: with 2, no speed-up is expected (both use the same 2 cores).")
    results = interleaved_runs({
        "1 process, accum 2": lambda d: trainlab_cmd("cpu", steps, ["train.accum=2", *extra], d),
        "2 processes, accum 1": lambda d: trainlab_cmd("cpu", steps, ["train.accum=1", *extra], d, nproc=2),
    }, rounds)
    show(results)
    ratio, lo, hi, cov = C.ratio_interval(results["2 processes, accum 1"]["rate"], results["1 process, accum 2"]["rate"])
    lines = [C.summary(f"data-parallel 2-proc/1-proc samples/s (cpu, {os.cpu_count()} cores, modadd quick)",
                       interval_text(ratio, lo, hi, cov), "none: a record; > 1 needs more cores than 2",
                       "not measured as a target (no speed-up expected on 2 cores)"
                       if (os.cpu_count() or 1) <= 2 else "not measured as a target (a record)")]

    name = "DDP overhead torchrun 1 rank / plain (cuda, step time)"
    if not args.gpu:
        lines.append(C.summary(name, "not run", f"<= {GPU_TARGET} (interval's upper end)",
                               "not measured (pass --gpu on a CUDA machine)"))
    elif not torch.cuda.is_available():
        print("--gpu: torch.cuda.is_available() is False here; the DDP overhead is not measured")
        lines.append(C.summary(name, "no CUDA device", f"<= {GPU_TARGET} (interval's upper end)",
                               "not measured (no CUDA device)"))
    else:
        gsteps = args.steps or (QUICK_STEPS if args.quick else GPU_STEPS)
        print(C.header(torch.device("cuda"), "DDP overhead: torchrun --nproc-per-node 1 vs plain run"))
        gpu = interleaved_runs({
            "plain": lambda d: trainlab_cmd("cuda", gsteps, extra, d),
            "torchrun 1 rank (DDP)": lambda d: trainlab_cmd("cuda", gsteps, extra, d, torchrun=True),
        }, rounds)
        show(gpu)
        # step time is 1 / samples_per_s at the same batch: ratio DDP/plain of step time = plain rate / DDP rate
        r, lo, hi, cov = C.ratio_interval(gpu["plain"]["rate"], gpu["torchrun 1 rank (DDP)"]["rate"])
        lines.append(C.summary(name, interval_text(r, lo, hi, cov), f"<= {GPU_TARGET} (interval's upper end)",
                               C.verdict(hi <= GPU_TARGET)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
