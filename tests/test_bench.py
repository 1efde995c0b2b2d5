"""The performance benchmarks in bench/: their real entry points at tiny sizes, the summary-line
format, and equal work -- the hand-written loop and the Trainer compute the same losses on the
same data.  Nothing here asserts a timing (shared machines make timing tests flaky)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import engine_overhead as E  # noqa: E402

STATUSES = ("met", "missed", "not measured")


def run_script(*args: str, timeout: int = 120) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_summary_line_round_trip():
    line = C.summary("engine overhead modadd (cpu, trainer/hand)", "1.012", "<= 1.05", "met")
    assert line == "engine overhead modadd (cpu, trainer/hand): 1.012 (target <= 1.05) met"
    assert C.parse_summary("noise\n" + line + "\nmore: noise") == [
        {"name": "engine overhead modadd (cpu, trainer/hand)", "value": "1.012", "target": "<= 1.05",
         "status": "met"}]
    line = C.summary("host syncs between log steps", "not measured on cpu (needs CUDA)", "0", "not measured")
    assert C.parse_summary(line)[0]["status"] == "not measured"
    assert C.verdict(True) == "met" and C.verdict(False) == "missed"
    with pytest.raises(ValueError):
        C.summary("x", "1", "2", "fine")


@pytest.mark.parametrize("name,extra", [
    ("modadd", [("model.dim", "16"), ("model.layers", "1"), ("model.heads", "2"), ("train.micro_batch", "32")]),
    ("sha256", [("model.dim", "16"), ("model.layers", "1"), ("model.heads", "2"), ("train.micro_batch", "16")]),
    ("bitnet_lm", [("model.hidden", "32"), ("model.layers", "1"), ("model.heads", "2"), ("data.seq_len", "32"), ("data.prompt_tokens", "16"),
                   ("train.micro_batch", "4")]),
])
def test_hand_loop_and_trainer_do_equal_work(name, extra):
    # the same losses at every step, bit for bit: same model, data, optimizer, schedule, clipping
    device = torch.device("cpu")
    exp, cfg = E.make_config(name, device, 6, extra + [("log.every", "3")])
    clocks = {k: E.Clock(device, 2, 6, keep_losses=True) for k in ("trainer", "hand")}
    E.trainer_loop(exp, cfg, device, clocks["trainer"])
    E.hand_loop(exp, cfg, device, clocks["hand"])
    losses = {k: torch.stack(c.losses) for k, c in clocks.items()}
    assert losses["trainer"].shape == (6,)
    assert torch.equal(losses["trainer"], losses["hand"]), losses
    assert all(c.step_time() > 0 for c in clocks.values())


def test_run_all_quick_cpu_ends_with_one_line_per_figure():
    out = run_script(str(BENCH / "run_all"), "--device", "cpu", "--quick", timeout=300)
    tail = out[out.index("== summary"):].splitlines()[1:]
    parsed = C.parse_summary("\n".join(tail))
    assert len(parsed) == len(tail), tail  # nothing but summary lines after the header
    assert parsed[0]["name"].startswith("engine overhead")
    names = " | ".join(p["name"] for p in parsed)
    for figure in ("engine overhead", "lightning", "host syncs between log steps", "sha256 data, GPU generator",
                   "64-round traces", "bitlinear fwd+bwd", "bitnet_lm tokens/s", "memory_lm / plain transformer",
                   "memory_lm generation state"):
        assert figure in names, names
    for p in parsed:
        assert p["status"].startswith(STATUSES), p
        assert "failed" not in p["value"], p
    syncs = next(p for p in parsed if p["name"].startswith("host syncs"))
    assert syncs["status"].startswith("not measured") and "needs CUDA" in syncs["value"]  # never "met" on cpu


def test_bitlinear_saved_bytes_counts_what_backward_keeps():
    x = torch.randn(64, 32, requires_grad=True)
    mods = __import__("bitlinear_speed").layers(32, torch.device("cpu"))
    import contextlib
    saved = {k: __import__("bitlinear_speed").saved_bytes(m, x, contextlib.nullcontext) for k, m in mods.items()}
    assert saved["linear"] == 0  # nn.Linear keeps only its input and weight, which exist anyway
    # the plain-autograd BitLinear keeps float32 copies; the default one int8 codes and per-token floats
    assert saved["ref"] > saved["dense"] > saved["bit"] > 0


def test_flops_per_token_formula():
    from bitnet_throughput import flops_per_token
    from trainlab.config import resolve
    from trainlab.experiment import get_experiment
    exp = get_experiment("bitnet_lm")
    cfg = resolve(exp, "smoke", None, [("model.linear", "dense")], None)
    model = exp.build_model(cfg)
    embed = model.embed.weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed
    assert flops_per_token(model, cfg) == 6 * n + 12 * 1 * cfg.model.hidden * cfg.data.seq_len
