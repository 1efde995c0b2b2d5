"""The engine's loop features through the real CLI on tiny configs, and its parts in isolation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import history, trainlab
from trainlab.engine.logs import MetricsLog, read_events, read_metrics, read_rows
from trainlab.optim.lion import Lion

SMOKE = ["run", "modadd", "--preset", "smoke"]


def test_accumulation_matches_one_big_batch(tmp_path: Path):
    """Full-batch data (micro_batch >= train pairs) makes every micro-batch identical, so
    accum=2 must reproduce accum=1 exactly: the loss is divided by accum before backward."""
    full = ["--steps", "12", "--set", "micro_batch=1000".replace("micro_batch", "train.micro_batch")]
    trainlab(*SMOKE, *full, "--run-dir", "a1", cwd=tmp_path, check=True)
    trainlab(*SMOKE, *full, "--set", "train.accum=2", "--run-dir", "a2", cwd=tmp_path, check=True)
    one, two = history(tmp_path / "a1"), history(tmp_path / "a2")
    assert [r["loss"] for r in one] == [r["loss"] for r in two]
    assert [r["grad_norm"] for r in one] == [r["grad_norm"] for r in two]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_paths_run_on_cpu(tmp_path: Path, precision: str):
    out = trainlab(*SMOKE, "--steps", "10", "--set", f"train.precision={precision}", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = history(tmp_path / "r")
    assert all(math.isfinite(r["loss"]) for r in rows)
    start = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "start"][0]
    assert start["precision"] == precision
    if precision == "fp16":  # GradScaler's scale and skipped steps are logged
        assert rows[-1]["amp_scale"] > 0 and rows[-1]["amp_skipped"] >= 0
    else:
        assert "amp_scale" not in rows[-1]


def test_lion_matches_the_paper_update_and_keeps_bf16_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    start = p.detach().clone()
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5, momentum_dtype=torch.bfloat16)
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    p.grad = g1.clone()
    opt.step()
    # first step: m = 0 -> c = 0.1 * g1; p <- p * (1 - lr*wd) - lr * sign(c)
    expected = start * (1 - 0.05) - 0.1 * torch.sign(g1)
    assert torch.allclose(p.detach(), expected)
    m = opt.state[p]["exp_avg"]
    assert m.dtype == torch.bfloat16
    assert torch.allclose(m.float(), (0.01 * g1), atol=1e-2 * g1.abs().max().item())
    p.grad = g2.clone()
    before = p.detach().clone()
    opt.step()
    c = 0.9 * m.float() + 0.1 * g2  # uses the stored (bf16) momentum
    assert torch.allclose(p.detach(), before * 0.95 - 0.1 * torch.sign(c))


def test_lion_run_through_the_cli(tmp_path: Path):
    out = trainlab(*SMOKE, "--steps", "10", "--set", "optim.name=lion", "--set", "optim.momentum_dtype=bf16",
                   "--set", "optim.lr=3e-4", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert history(tmp_path / "r")[-1]["step"] == 10


def test_nonfinite_loss_stops_the_run_with_exit_1(tmp_path: Path):
    out = trainlab(*SMOKE, "--set", "optim.lr=1e30", "--set", "train.clip=0", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 1
    assert "non-finite" in out.stderr and "Traceback" not in out.stderr
    events = read_events(tmp_path / "r" / "events.jsonl")
    assert events[-2]["kind"] == "nonfinite" and events[-1]["kind"] == "stopped"
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    assert not math.isfinite(rows[-1]["loss"])  # never hidden from metrics.csv
    assert not (tmp_path / "r" / "checkpoints").exists() or \
        all(int(p.name[5:]) < rows[-1]["step"] for p in (tmp_path / "r" / "checkpoints").glob("step_*"))


def test_best_checkpoint_is_kept_beyond_retention(tmp_path: Path):
    out = trainlab(*SMOKE, "--steps", "40", "--set", "ckpt.every=5", "--set", "ckpt.keep=1",
                   "--set", "eval.every=5", "--set", "ckpt.best_metric=val_loss", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = history(tmp_path / "r")
    best_step = min(rows, key=lambda r: r["val_loss"])["step"]
    best = json.loads((tmp_path / "r" / "checkpoints" / "best.json").read_text())
    assert best["step"] == best_step
    kept = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{best_step:08d}", "step_00000040"})


def test_plain_progress_never_floods(tmp_path: Path):
    out = trainlab(*SMOKE, "--steps", "40", "--set", "log.every=1", "--set", "log.progress=plain",
                   "--set", "log.plain_interval_s=3600", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("[modadd-smoke]")]
    assert len(lines) == 2  # the first and the last, nothing in between within the hour
    assert len(read_metrics(tmp_path / "r" / "metrics.csv")) == 40


def test_progress_bar_mode_runs(tmp_path: Path):
    out = trainlab(*SMOKE, "--steps", "10", "--set", "log.progress=bar", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "10/10" in out.stderr


def test_tensorboard_scalars_are_written(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trainlab(*SMOKE, "--steps", "10", "--set", "log.tensorboard=true", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    csv_losses = [r["loss"] for r in read_metrics(tmp_path / "r" / "metrics.csv")]
    assert losses == pytest.approx(csv_losses, rel=1e-6)


def test_metrics_log_tolerates_a_torn_last_line(tmp_path: Path):
    log = MetricsLog(tmp_path, ["step", "attempt", "loss"])
    log.write({"step": 1, "attempt": 1, "loss": 0.5})
    log.close()
    with open(tmp_path / "metrics.csv", "a") as fh:
        fh.write("2,1,0.4")  # a kill mid-write: no newline
    log = MetricsLog(tmp_path, ["step", "attempt", "loss"])
    log.write({"step": 2, "attempt": 2, "loss": 0.41})
    log.close()
    assert log.torn_tail == "2,1,0.4"  # a torn number must not parse as a (wrong) value
    text = (tmp_path / "metrics.csv").read_text()
    assert text == "step,attempt,loss\n1,1,0.5\n2,2,0.41\n"
    assert read_metrics(tmp_path / "metrics.csv") == [{"step": 1, "attempt": 1, "loss": 0.5},
                                                      {"step": 2, "attempt": 2, "loss": 0.41}]
    assert len(read_rows(tmp_path / "metrics.csv")) == 2


def test_lion_bf16_momentum_survives_a_safe_reload(tmp_path: Path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = Lion(model.parameters(), lr=1e-2, momentum_dtype=torch.bfloat16)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = Lion(model.parameters(), lr=1e-2, momentum_dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p in model.parameters():
        assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_changed_hyperparameters_take_effect_on_resume_but_optimizer_kind_is_fixed(tmp_path: Path):
    trainlab(*SMOKE, "--steps", "10", "--run-dir", "r", cwd=tmp_path, check=True)
    out = trainlab(*SMOKE, "--steps", "20", "--set", "optim.weight_decay=0.25", "--set", "optim.betas=[0.8,0.9]",
                   "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_00000020" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.25 and groups[1]["weight_decay"] == 0.0  # 1-D params never decay
    assert tuple(groups[0]["betas"]) == (0.8, 0.9)
    changed = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "config_changed"]
    assert "optim.weight_decay" in changed[0]["changes"]
    refused = trainlab(*SMOKE, "--steps", "30", "--set", "optim.name=lion", "--run-dir", "r", cwd=tmp_path)
    assert refused.returncode == 2 and "optim.name" in refused.stderr
