"""Shared pieces of the benchmarks in bench/: the environment header, timing, MFU peaks and the
summary lines that `bench/run_all` collects.

Summary line format (the last lines a benchmark prints, one per figure):

    <name>: <value> (target <target>) <status>

where <status> is `met`, `missed`, or `not measured` followed by why (a figure that cannot be
measured on this device, e.g. host syncs on CPU).  Only `met` means the target was reached.
"""

from __future__ import annotations

import datetime
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:  # `python3 bench/x.py` from a checkout without an installed trainlab
    sys.path.insert(0, str(SRC))

SUMMARY_RE = re.compile(r"^(?P<name>[^:\n]+): (?P<value>.+) \(target (?P<target>[^()]*(?:\([^()]*\)[^()]*)*)\) "
                        r"(?P<status>met|missed|not measured(?: .*)?)$")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched in
# order against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
)


def summary(name: str, value: str, target: str, status: str) -> str:
    """One summary line; `status` is met, missed or 'not measured ...'."""
    line = f"{name}: {value} (target {target}) {status}"
    if not SUMMARY_RE.match(line):
        raise ValueError(f"not a summary line: {line!r}")
    return line


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def parse_summary(text: str) -> list[dict[str, str]]:
    """Every summary line in `text`, as dicts with name, value, target, status."""
    return [m.groupdict() for m in map(SUMMARY_RE.match, text.splitlines()) if m]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def header(device: torch.device, what: str) -> str:
    return (f"# {what} | device {device_name(device)} | torch {torch.__version__} | "
            f"{datetime.date.today().isoformat()} | {' '.join(['python'] + sys.argv)}")


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU, else None (CPU: no known peak, MFU is not defined)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values) -> float:
    return statistics.median(values)


def time_call(fn, device: torch.device, iters: int) -> float:
    """Seconds per call of fn over `iters` calls; synchronised at the boundaries only."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def interleaved(fns: dict, device: torch.device, rounds: int, iters: int, warmup: int = 2) -> dict[str, float]:
    """Median over `rounds` of seconds per call of each fn, run A, B, A, B, ... (the order turned
    every round so neither always runs first); `warmup` calls of each first, untimed."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(time_call(fns[name], device, iters))
    return {name: median(t) for name, t in times.items()}


def rounds_parser(description: str, rounds: int = 5):
    """The options every interleaved-rounds benchmark of Trainer runs takes: device, rounds, timed steps."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    return parser


def ratio_interval(numerators: list[float], denominators: list[float],
                   confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Median of the per-round ratios numerators[i] / denominators[i] of interleaved rounds, and a
    distribution-free interval for it: the order statistics (k-th smallest, k-th largest) with the
    largest k whose coverage of the median, 1 - 2 P(Binomial(n, 1/2) < k), is still >= `confidence`
    -- or, with too few rounds for that, the whole range, whose coverage 1 - 2^(1-n) is returned as
    the fourth value.  Returns (median, low, high, coverage).  A target counts as met only when the
    whole interval is inside it: a bare median flips with the machine's noise."""
    from scipy.stats import binom

    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    n = len(ratios)
    if n == 0:
        raise ValueError("ratio_interval needs at least one round")
    k, coverage = 1, 1 - 2 * binom.cdf(0, n, 0.5)
    while k + 1 <= n // 2:
        wider = 1 - 2 * binom.cdf(k, n, 0.5)  # coverage of (ratios[k], ratios[n-1-k])
        if wider < confidence:
            break
        k, coverage = k + 1, wider
    return statistics.median(ratios), ratios[k - 1], ratios[n - k], float(coverage)


def fmt_rate(x: float) -> str:
    """3 significant figures with an SI suffix: 1.23 M, 456 k."""
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"
