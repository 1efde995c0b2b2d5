#!/usr/bin/env python3
"""BitLinear b1.58 against nn.Linear: forward + backward time and activation memory, eager and
compiled, measured side by side in one run.

For each square size d (in = out = d) and each number of rows N = batch x tokens, five layers
see the same input x [N, d] (requires_grad) and the same upstream gradient:
  linear   nn.Linear(d, d, bias=False)                  -- the issue's reference
  dense    RMSNorm + nn.Linear (the models' `linear: dense` baseline, BitLinear's shape without
           the quantisers)
  ref      BitLinear(d, d, fused=False)                  -- the plain-autograd BitLinear
           (bitlinear_reference), same weights as bit
  fn       BitLinear(d, d, fused=True)                   -- always the autograd function
           BitLinearFunction (int8 codes + per-token floats kept for backward)
  bit      trainlab.nn.BitLinear(d, d)                   -- the default (fused=None): the function in
           eager, the reference graph under torch.compile
Timing: one call = forward + backward; the variants run interleaved (A, B, C, D, E, A, ...) for
--rounds rounds of --iters calls after warm-up; medians; CUDA synchronised at round boundaries
only.  Precision: bf16 autocast on CUDA, fp32 on CPU.  Activation memory: bytes of the tensors
autograd keeps for backward after one forward (saved-tensor hooks, eager; only tensors still held
by the live graph, so intermediates of sub-graphs that a .detach() cut off are not counted),
distinct storages counted once.

    python bench/bitlinear_speed.py [--device cpu|cuda] [--sizes 256,512] [--rows 1024,4096]
                                    [--compile | --no-compile] [--rounds 5] [--iters 5]
The last lines are the summary lines (bench/_common.py): the worst BitLinear / nn.Linear ratio
over the sizes, compiled (target <= 1.1) and eager.
"""

from __future__ import annotations

import argparse
import contextlib
import weakref

import torch
from torch import nn

import _common as C
from trainlab.nn import BitLinear, RMSNorm

DEFAULTS = {"cpu": ("256,512", "1024,4096"), "cuda": ("256,512,1024,2048,4096", "4096,16384,65536")}
TARGET = 1.1


def layers(d: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mods = {"linear": nn.Linear(d, d, bias=False).to(device),
            "dense": nn.Sequential(RMSNorm(d), nn.Linear(d, d, bias=False)).to(device),
            "bit": BitLinear(d, d).to(device),
            "ref": BitLinear(d, d, fused=False).to(device),
            "fn": BitLinear(d, d, fused=True).to(device)}
    for name in ("ref", "fn"):
        mods[name].load_state_dict(mods["bit"].state_dict())
    return mods


class _Saved:
    """What the pack hook hands autograd: alive exactly as long as a graph node holds it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def saved_bytes(module: nn.Module, x: torch.Tensor, autocast) -> int:
    """Bytes autograd keeps for backward after one forward of `module` (distinct storages).

    Counted while the output (so the graph) is alive, and only for saved tensors some node still
    holds: tensors saved by ops whose graph was dropped during the forward (e.g. the rounding inside
    a straight-through estimator, cut off by .detach()) are freed with it and do not count.
    """
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor):
        box = _Saved(t)
        packed.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor), autocast():
        out = module(x)
    seen: dict[int, int] = {}
    for ref in packed:
        box = ref()
        if box is None:
            continue
        try:
            seen[box.tensor.untyped_storage().data_ptr()] = box.tensor.untyped_storage().nbytes()
        except RuntimeError:
            pass
    del out
    # the input and the parameters exist anyway: only what the layer adds counts
    for t in [x, *module.parameters()]:
        seen.pop(t.untyped_storage().data_ptr(), None)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="comma-separated d (in = out features)")
    parser.add_argument("--rows", default=None, help="comma-separated N = batch x tokens")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile'd layers (default on)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="calls per round (default: 5 cpu, 20 cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes, rows = DEFAULTS[device.type]
    sizes = [int(v) for v in (args.sizes or sizes).split(",")]
    rows = [int(v) for v in (args.rows or rows).split(",")]
    iters = args.iters or (20 if device.type == "cuda" else 5)
    dtype_name = "bf16 autocast" if device.type == "cuda" else "fp32"

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    print(C.header(device, "BitLinear b1.58 vs nn.Linear, forward + backward"))
    print(f"{dtype_name}; {args.rounds} interleaved rounds x {iters} calls; ms per forward+backward (median); "
          f"activation memory = bytes saved for backward (eager)")
    print(f"{'d':>5} {'rows':>6} {'mode':8} {'linear ms':>10} {'dense ms':>9} {'ref ms':>8} {'fn ms':>8} "
          f"{'bit ms':>8} {'bit/linear':>10} {'bit/dense':>9} {'fn/ref':>7} | "
          f"{'saved MiB: linear':>17} {'dense':>7} {'ref':>7} {'bit':>7}")
    worst = {"eager": 0.0, "compiled": 0.0}
    at_worst = {}
    for d in sizes:
        for n in rows:
            mods = layers(d, device)
            x = torch.randn(n, d, device=device, requires_grad=True)
            grad = torch.randn(n, d, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            mem = {k: saved_bytes(m, x, autocast) / 2**20 for k, m in mods.items()}  # eager: bit == fn
            modes = {"eager": mods}
            if args.compile:
                # three BitLinear variants share BitLinear.forward's code: without a reset per shape
                # dynamo hits its recompile limit and silently runs the later shapes eagerly
                torch._dynamo.reset()
                modes["compiled"] = {k: torch.compile(m, dynamic=False) for k, m in mods.items()}
            for mode, ms in modes.items():
                def call(m):
                    def run():
                        with autocast():
                            y = m(x)
                        y.backward(grad.to(y.dtype))
                        x.grad = None
                        for p in m.parameters():
                            p.grad = None
                    return run
                t = C.interleaved({k: call(m) for k, m in ms.items()}, device, args.rounds, iters, warmup=2)
                ratio, ratio_dense, fn_ref = t["bit"] / t["linear"], t["bit"] / t["dense"], t["fn"] / t["ref"]
                if ratio > worst[mode]:
                    worst[mode], at_worst[mode] = ratio, (d, n)
                print(f"{d:5d} {n:6d} {mode:8} {t['linear'] * 1e3:10.3f} {t['dense'] * 1e3:9.3f} "
                      f"{t['ref'] * 1e3:8.3f} {t['fn'] * 1e3:8.3f} {t['bit'] * 1e3:8.3f} {ratio:10.2f} "
                      f"{ratio_dense:9.2f} {fn_ref:7.2f} | {mem['linear']:17.2f} "
                      f"{mem['dense']:7.2f} {mem['ref']:7.2f} {mem['bit']:7.2f}")
            del mods, modes, x, grad
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # one figure: compiled against compiled, the issue's target (eager stays in the table)
    if "compiled" in at_worst:
        d, n = at_worst["compiled"]
        line = C.summary(f"bitlinear fwd+bwd / nn.Linear, compiled ({device.type}, {dtype_name}, worst size)",
                         f"{worst['compiled']:.2f}x at d={d}, rows={n} (eager worst {worst['eager']:.2f}x)",
                         f"<= {TARGET}", C.verdict(worst["compiled"] <= TARGET))
    else:
        line = C.summary(f"bitlinear fwd+bwd / nn.Linear, compiled ({device.type})",
                         f"eager worst {worst['eager']:.2f}x; compiled not measured (--no-compile)", f"<= {TARGET}",
                         "not measured")
    lines = [line]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
