#!/usr/bin/env python3
"""The labelled set of real runs behind docs/health.md: each run made by the CLI, then judged by
`trainlab check` (the detectors offline) and `trainlab preflight` (a short run of the same config).

Usage: python bench/health_labelled_runs.py OUT_DIR [--only NAME ...]
Prints a Markdown table per run: detector -> what it reported, and preflight's verdict.
Runs are CPU-sized; on a 2-core machine the whole set takes about 15-25 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name: (label a human gives the run, what a correct detector set says, CLI args of the run)
RUNS = {
    "healthy": ("healthy: modadd quick (memorises, loss falls to ~0)", "no divergence, no stuck",
                ["modadd", "--preset", "quick"]),
    "stuck": ("learning rate too small to move the weights (lr 1e-8)", "stuck",
              ["modadd", "--preset", "quick", "--set", "optim.lr=1e-8"]),
    "diverging": ("learning rate driven far too high: linear ramp from 1e-3 to 0.3, no clipping",
                  "divergence or nonfinite",
                  ["modadd", "--preset", "quick", "--set", "train.clip=0",
                   "--set", "schedule.phases=[{kind: linear, steps: 0, start: 1, end: 300}]"]),
    "lr_too_high_from_start": ("learning rate far too high from the start (lr 0.3, no clipping)",
                               "stuck (it never learns) or divergence",
                               ["modadd", "--preset", "quick", "--set", "optim.lr=0.3", "--set", "train.clip=0"]),
    "sha256_multi_64": ("sha256 multi mode at 64 rounds from the start", "stuck (at the baseline)",
                        ["sha256", "--preset", "multi", "--steps", "600", "--set", "curriculum.values=[64]",
                         "--set", "curriculum.min_steps=[0]", "--set", "curriculum.gates=[1.0]"]),
}


def trainlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainlab", *args], capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--preflight-steps", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (label, expected, run_args) in RUNS.items():
        if args.only and name not in args.only:
            continue
        run_dir = args.out / name
        t0 = time.monotonic()
        run = trainlab("run", *run_args, "--run-dir", str(run_dir), "--set", "log.progress=off")
        wall = time.monotonic() - t0
        check = trainlab("check", str(run_dir))
        pre = trainlab("preflight", *run_args, "--steps", str(args.preflight_steps),
                       "--run-dir", str(args.out / f"{name}-preflight"), "--set", "log.progress=off")
        data = json.loads((run_dir / "check.json").read_text())
        live = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
                if '"alert"' in line]
        print(f"\n### {name}: {label}\n")
        print(f"`trainlab run {' '.join(run_args)}` -> exit {run.returncode} in {wall:.0f} s; "
              f"expected: {expected}\n")
        print("| detector | offline check | live alerts during the run |\n|---|---|---|")
        for claim in data["claims"]:
            mine = [a for a in live if a.get("detector") == claim["name"]]
            shown = "; ".join(f"step {a['step']}" for a in mine[:4]) + (" ..." if len(mine) > 4 else "")
            print(f"| {claim['name']} | {claim['verdict']}: {claim['value']} | {shown or '-'} |")
        verdict = [line for line in pre.stdout.splitlines() if line.startswith("trainlab: preflight")]
        print(f"\npreflight ({args.preflight_steps} steps): {verdict[0] if verdict else pre.stderr.strip()[-300:]}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
