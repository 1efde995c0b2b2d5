#!/usr/bin/env python3
"""BitNet LM training throughput: tokens/s and model-FLOPs utilisation of trainlab's Trainer on
bitnet_lm with BitLinear b1.58 against the same model with nn.Linear, in one run.

Both variants are Trainer.fit() runs of the same preset (CUDA: s1024 -- hidden 1024, 8 layers,
16 heads, 512-token sequences x 32, bf16 autocast, train.compile on, deterministic algorithms off; CPU: hidden 128, 2 layers, 128-token sequences
x 8, fp32), differing only in model.linear, run in interleaved rounds (bit, dense, dense, bit, ...)
with eval and periodic checkpoints off.  A round's time is its mean step time over steps
warmup+1..steps (bench/engine_overhead.py's Clock); the figure is the median over rounds.

Model FLOPs per token (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's
estimate_mfu):  6 N + 12 L H T,  N = parameters outside the embedding table (the untied head
included), L layers, H hidden, T sequence length.  MFU = FLOPs/token x tokens/s / peak, the peak
being the dense bf16 figure of a known GPU (bench/_common.py); on CPU MFU is not defined (no
known peak) and is not reported.  The quantisers' elementwise work is not counted (model FLOPs).

    python bench/bitnet_throughput.py [--device cpu|cuda] [--rounds 3] [--steps N] [--warmup W]
The last lines are the summary lines (bench/_common.py).
"""

from __future__ import annotations

import torch

import _common as C
from engine_overhead import COMMON, interleaved_trainer_rounds
from trainlab.config import resolve
from trainlab.engine.trainer import parameter_counts, resolve_precision
from trainlab.experiment import get_experiment
from trainlab.experiments.bitnet_lm.model import resolved_shape

# CUDA: compiled and without deterministic algorithms, as the plain-PyTorch references ran; the CPU
# side stays eager (compiling on 2 cores would take longer than the whole benchmark).
CASES = {"cpu": ("cpu", [("model.hidden", "128"), ("train.micro_batch", "8")], 30, 10),
         "cuda": ("s1024", [("train.compile", "true"), ("train.deterministic", "false")], 60, 15)}
# The plain-PyTorch references on an H100 (torch 2.11, torch.compile): tokens/s
REFERENCE = {"bitlinear": 0.57e6, "dense": 0.66e6}


def flops_per_token(model: torch.nn.Module, cfg) -> float:
    counts = parameter_counts(model)
    layers, _ = resolved_shape(cfg.model)
    return 6 * (counts["params"] - counts["params_embedding"]) + 12 * layers * cfg.model.hidden * cfg.data.seq_len


def main() -> None:
    parser = C.rounds_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = torch.device(args.device)
    preset, overrides, steps, warmup = CASES[device.type]
    steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    exp = get_experiment("bitnet_lm")
    cfgs = {kind: resolve(exp, preset, None, COMMON + overrides + [("train.steps", str(steps)),
                                                                   ("model.linear", kind)], None)
            for kind in ("bitlinear", "dense")}
    cfg = cfgs["bitlinear"]
    tokens_per_step = cfg.data.seq_len * cfg.train.micro_batch * cfg.train.accum
    fpt = {k: flops_per_token(exp.build_model(c), c) for k, c in cfgs.items()}
    peak = C.peak_tflops(device)
    print(C.header(device, "BitNet LM training throughput, Trainer, BitLinear vs nn.Linear"))
    print(f"preset {preset}: hidden {cfg.model.hidden}, {resolved_shape(cfg.model)[0]} layers, seq {cfg.data.seq_len} x "
          f"batch {cfg.train.micro_batch}, {resolve_precision(cfg.train.precision, device)}; {args.rounds} "
          f"interleaved rounds of {steps} steps, steps {warmup + 1}..{steps} timed; model FLOPs/token "
          + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in fpt.items())
          + (f"; peak {peak} TFLOP/s bf16" if peak else "; MFU not defined on this device (no known peak)"))
    times = interleaved_trainer_rounds(exp, cfgs, device, args.rounds, warmup, steps)
    rate = {k: tokens_per_step / C.median(v) for k, v in times.items()}
    mfu = {k: fpt[k] * rate[k] / (peak * 1e12) for k in rate} if peak else {}
    print(f"{'model.linear':12} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}   per-round ms/step")
    for k in cfgs:
        print(f"{k:12} {C.median(times[k]) * 1e3:9.1f} {C.fmt_rate(rate[k]):>10} "
              f"{(f'{mfu[k] * 100:.1f} %' if mfu else 'n/a'):>7}   " + " ".join(f"{t * 1e3:.1f}" for t in times[k]))
    ratio = rate["bitlinear"] / rate["dense"]
    # throughput ratio bitlinear / dense = dense step time / bitlinear step time, round by round
    median, lo, hi, coverage = C.ratio_interval(times["dense"], times["bitlinear"])
    print(f"bitlinear / dense throughput: {ratio:.3f} (ratio of medians); per-round median {median:.3f} "
          f"[{lo:.3f}, {hi:.3f}] ({100 * coverage:.0f} % interval over {args.rounds} rounds)")

    if device.type == "cuda":
        lines = [C.summary(f"bitnet_lm tokens/s, BitLinear, hidden {cfg.model.hidden} (cuda, Trainer)",
                           f"{C.fmt_rate(rate['bitlinear'])} tokens/s"
                           + (f", MFU {mfu['bitlinear'] * 100:.1f} %" if mfu else ", MFU n/a (unknown GPU peak)"),
                           ">= 0.57 M tokens/s, plain compiled BitLinear on an H100",
                           C.verdict(rate["bitlinear"] >= REFERENCE["bitlinear"])),
                 C.summary(f"bitnet_lm tokens/s, nn.Linear bf16, hidden {cfg.model.hidden} (cuda, Trainer)",
                           f"{C.fmt_rate(rate['dense'])} tokens/s"
                           + (f", MFU {mfu['dense'] * 100:.1f} %" if mfu else ", MFU n/a (unknown GPU peak)"),
                           ">= 0.66 M tokens/s, plain compiled nn.Linear on an H100",
                           C.verdict(rate["dense"] >= REFERENCE["dense"]))]
    else:
        lines = [C.summary("bitnet_lm tokens/s and MFU at hidden 1024",
                           f"not measured on {device.type} (needs CUDA); on {device.type} at hidden "
                           f"{cfg.model.hidden}: BitLinear {C.fmt_rate(rate['bitlinear'])}, nn.Linear "
                           f"{C.fmt_rate(rate['dense'])} tokens/s ({ratio:.2f}x), MFU not defined on cpu",
                           ">= 0.57 M BitLinear and >= 0.66 M nn.Linear tokens/s on an H100", "not measured")]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
