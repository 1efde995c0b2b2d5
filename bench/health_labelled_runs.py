#!/usr/bin/env python3
"""The labelled set of real runs behind docs/health.md: each run made by the CLI, then judged by
`trainlab check` (the detectors offline) and by `trainlab preflight` of the same config (a short
run, 200 steps by default), whose projections are set beside what the full run really reached.

Usage: python bench/health_labelled_runs.py OUT_DIR [--only NAME ...] [--parallel K]
Prints a Markdown section per run: detector -> what it reported (offline and live), then one row per
preflight variant: its verdict and first reason, its loss projection at the run's last step against
the run's measured loss there, and each goal's projection against what the run reached.
Every process runs with OMP_NUM_THREADS=1 (the figures are bitwise reproducible only at a fixed
thread count).  CPU-sized: on a 2-core machine, --parallel 2, the whole set takes about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GOAL = ["--target", "val_acc>=0.9"]  # the goal a person has for modadd: generalise, not only memorise

# name: (label a human gives the run, what a correct detector set says, CLI args of the run,
#        preflight variants: name -> extra preflight args)
RUNS = {
    "healthy": ("healthy: modadd quick, the README's main job (memorises, loss falls to ~0; validation stays "
                "near 0.3)", "no divergence, no stuck; the jump at step 600 a spike; overfitting",
                ["modadd", "--preset", "quick"], {"as configured": [], "goal val_acc>=0.9": GOAL}),
    "grok": ("grokking: memorises, then generalises (val_acc >= 0.9) long after", "grokking; no stuck",
             ["modadd", "--preset", "grok"], {"as configured": [], "goal val_acc>=0.9": GOAL}),
    "grok_no_wd": ("grokking preset without weight decay: memorises, never generalises", "overfitting; no stuck",
                   ["modadd", "--preset", "grok", "--set", "optim.weight_decay=0"],
                   {"as configured": [], "goal val_acc>=0.9": GOAL}),
    "stuck": ("learning rate too small to move the weights (lr 1e-8)", "stuck",
              ["modadd", "--preset", "quick", "--set", "optim.lr=1e-8"], {"as configured": []}),
    "diverging": ("learning rate driven far too high: linear ramp from 1e-3 to 0.3, no clipping",
                  "divergence or nonfinite",
                  ["modadd", "--preset", "quick", "--set", "train.clip=0",
                   "--set", "schedule.phases=[{kind: linear, steps: 0, start: 1, end: 300}]"],
                  {"as configured": []}),
    "lr_too_high_from_start": ("learning rate far too high from the start (lr 0.3, no clipping)",
                               "stuck (it never learns) or divergence",
                               ["modadd", "--preset", "quick", "--set", "optim.lr=0.3", "--set", "train.clip=0"],
                               {"as configured": []}),
    "sha256_quick": ("sha256 quick: six state words learned, words a and e at chance; bit accuracy stalls below "
                     "the curriculum gate 0.95", "no alert (it learns, then plateaus); preflight NOT READY on its "
                     "gate", ["sha256", "--preset", "quick"], {"as configured": []}),
    "sha256_multi_64": ("sha256 multi mode at 64 rounds from the start", "stuck (at the baseline)",
                        ["sha256", "--preset", "multi", "--steps", "600", "--set", "curriculum.values=[64]",
                         "--set", "curriculum.min_steps=[0]", "--set", "curriculum.gates=[1.0]"],
                        {"as configured": []}),
}


def trainlab(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "trainlab", *args], capture_output=True, text=True, env=env)


def read_rows(run_dir: Path) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from trainlab.engine.logs import read_metrics

    return read_metrics(run_dir / "metrics.csv")


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def reached(goal: dict, rows: list[dict], events: list[dict]) -> str:
    """What the full run measured for one of preflight's goals: a gate's running mean at the end of
    the run (or the step of the promotion it gated), a target's last value and the first step it
    was met."""
    metric, op, level = goal["metric"], goal["op"], goal["level"]
    series = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    if not series:
        return f"{metric} not logged"
    if goal.get("phase") is not None:
        promoted = [e for e in events if e.get("kind") == "promotion" and e.get("from_phase") == goal["phase"]]
        if promoted:
            return f"gate passed at step {promoted[0]['step']} (running mean {promoted[0]['running_mean']:.4g})"
        last = [v for _, v in series[-max(1, len(series) // 10):]]
        return f"gate never passed: {metric} {sum(last) / len(last):.4g} over the last {len(last)} rows"
    met = {">=": lambda v: v >= level, "<=": lambda v: v <= level, ">": lambda v: v > level,
           "<": lambda v: v < level}[op]
    first = next((s for s, v in series if met(v)), None)
    return f"{metric} {series[-1][1]:.4g} at step {series[-1][0]}" + (
        f"; first met at step {first}" if first is not None else "; never met")


def judge_one(name: str, out: Path, preflight_steps: int) -> str:
    label, expected, run_args, variants = RUNS[name]
    run_dir = out / name
    t0 = time.monotonic()
    run = trainlab("run", *run_args, "--run-dir", str(run_dir), "--set", "log.progress=off")
    wall = time.monotonic() - t0
    trainlab("check", str(run_dir))
    data = json.loads((run_dir / "check.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    live = [e for e in events if e.get("kind") == "alert"]
    rows = read_rows(run_dir)
    lines = [f"\n### {name}: {label}\n",
             f"`trainlab run {' '.join(run_args)}` -> exit {run.returncode} in {wall:.0f} s; expected: {expected}\n",
             "| detector | offline check | live alerts during the run |", "|---|---|---|"]
    for claim in data["claims"]:
        mine = [a for a in live if a.get("detector") == claim["name"]]
        shown = "; ".join(f"step {a['step']}" for a in mine[:4]) + (" ..." if len(mine) > 4 else "")
        lines.append(f"| {claim['name']} | {claim['verdict']}: {claim['value']} | {shown or '-'} |")
    last = rows[-1] if rows else {}
    lines += ["", f"| preflight ({preflight_steps} steps) | verdict: first reason | loss projected at step "
              f"{last.get('step')} | measured there | goals: projected -> reached |", "|---|---|---|---|---|"]
    for variant, extra in variants.items():
        pre_dir = out / f"{name}-preflight-{variant.split()[0]}"
        trainlab("preflight", *run_args, *extra, "--steps", str(preflight_steps), "--run-dir", str(pre_dir),
                 "--set", "log.progress=off")
        try:
            pre = json.loads((pre_dir / "preflight.json").read_text())
        except (OSError, ValueError) as exc:
            lines.append(f"| {variant} | no preflight.json ({type(exc).__name__}) | - | - | - |")
            continue
        proj = pre.get("learning", {}).get("projection")
        projected = "-" if not proj else f"{fmt(proj['value'])} [{fmt(proj['interval'][0])}, {fmt(proj['interval'][1])}]"
        goals = []
        for g in pre.get("goals", []):
            if g.get("projected") is not None:
                shown = f"{fmt(g['projected'])} [{fmt(g['interval'][0])}, {fmt(g['interval'][1])}]"
            else:
                shown = f"now {fmt(g.get('now'))}"
            goals.append(f"{g['metric']} {g['op']} {g['level']:g}: {g['status']}, {shown} -> {reached(g, rows, events)}")
        lines.append(f"| {variant} | {pre['summary']} | {projected} | {fmt(last.get('loss'))} | "
                     f"{'; '.join(goals) or 'no goal'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--preflight-steps", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=1, help="runs judged at once (each is one process)")
    args = parser.parse_args()
    unknown = set(args.only or ()) - set(RUNS)
    if unknown:
        parser.error(f"unknown run {', '.join(sorted(unknown))}; allowed: {', '.join(RUNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in RUNS if not args.only or n in args.only]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # printed in RUNS order as each finishes
        for text in pool.map(lambda n: judge_one(n, args.out, args.preflight_steps), names):
            print(text, flush=True)


if __name__ == "__main__":
    main()
