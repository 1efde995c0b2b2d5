"""The engine's loop features through the real CLI on tiny configs, and its parts in isolation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import final_weights, history, trainlab
from lion_reference import flipped_share, lion_direction, lion_step, momentum_flipping_grads
from trainlab import Callback
from trainlab.config import resolve
from trainlab.engine.logs import MetricsLog, read_events, read_metrics, read_rows
from trainlab.engine.trainer import Trainer
from trainlab.experiments.modadd import ModAdd
from trainlab.optim.lion import Lion

SMOKE = ["run", "modadd", "--preset", "smoke"]


class _Recorder(Callback):
    """A callback (the trainer calls it around each update) that keeps, per step, the gradients the
    optimizer is about to apply and whether the step changed the weights."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights_before: list[dict[str, torch.Tensor]] = []
        self.applied: list[bool] = []

    def on_before_update(self, trainer) -> None:
        named = list(trainer.model.named_parameters())
        self.grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        self.weights_before.append({n: p.detach().clone() for n, p in named})

    def on_after_update(self, trainer) -> None:
        before = self.weights_before[-1]
        self.applied.append(any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()))


def _modadd_cfg(*overrides: tuple[str, str]):
    cfg = resolve(ModAdd(), "smoke", None, list(overrides))
    cfg.log.progress = "off"
    return cfg


def _labelled(label: str):
    """assert_close's message with `label` (which step, which tensor) in front."""
    return lambda text: f"{label}: {text}"


def test_accumulation_applies_the_mean_gradient_of_distinct_micro_batches(tmp_path: Path):
    """accum=3 micro-batches of 16 different pairs: the gradient the optimizer gets must be the
    gradient of the mean of the three losses, computed here by hand from the same weights and the
    data stream's micro-batches (0, 1, 2) of each step.  A sum instead of a mean, one micro-batch
    used three times, or gradients leaking into the next step would each differ."""
    accum = 3
    cfg = _modadd_cfg(("train.steps", "2"), ("train.accum", str(accum)), ("train.micro_batch", "16"),
                      ("train.clip", "0"), ("train.precision", "fp32"), ("log.every", "1"))
    recorder = _Recorder()
    trainer = Trainer(cfg, ModAdd(), tmp_path / "r", torch.device("cpu"), callbacks=[recorder])
    trainer.fit()
    assert len(recorder.grads) == 2
    for step in range(2):
        model = ModAdd().build_model(cfg)
        model.load_state_dict(recorder.weights_before[step])
        batches = [trainer.data.batch(step, micro, None) for micro in range(accum)]
        xs = [x for x, _ in batches]
        assert all(not torch.equal(xs[i], xs[j]) for i in range(accum) for j in range(i + 1, accum))
        params = dict(model.named_parameters())

        def grads_of(loss):
            return dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)))

        losses = [F.cross_entropy(model(x), y) for x, y in batches]
        expected = grads_of(sum(losses) / accum)
        applied = recorder.grads[step]
        assert applied.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(applied[name], expected[name], rtol=1e-5, atol=1e-7,
                                       msg=_labelled(f"step {step + 1}, {name}"))
        # the comparison can tell the mean from the wrong answers it is meant to catch: the gradient
        # is far from zero (a sum would be 3x it) and far from the last micro-batch's alone
        assert expected["head.weight"].abs().max() > 1e-3
        last_only = grads_of(losses[-1])
        assert not torch.allclose(expected["head.weight"], last_only["head.weight"], rtol=1e-2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_paths_run_on_cpu(tmp_path: Path, precision: str):
    out = trainlab(*SMOKE, "--steps", "10", "--set", f"train.precision={precision}", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = history(tmp_path / "r")
    assert all(math.isfinite(r["loss"]) for r in rows)
    start = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "start"][0]
    assert start["precision"] == precision
    if precision == "fp16":
        # GradScaler starts at 2**16, halves the scale at each skipped step and grows it only after
        # 2000 clean ones: in 10 steps the logged scale and skip count must agree exactly
        assert all(r["amp_scale"] * 2 ** r["amp_skipped"] == 2.0 ** 16 for r in rows), rows
    else:
        assert "amp_scale" not in rows[-1]


class _RecordsOutputDtype(ModAdd):
    """modadd that notes the dtype of the model's output in the training forward pass."""

    def __init__(self):
        self.output_dtypes: set[torch.dtype] = set()

    def loss(self, model, batch, ctx):
        self.output_dtypes.add(model(batch[0]).dtype)
        return super().loss(model, batch, ctx)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)], ids=["fp32", "bf16", "fp16"])
def test_training_forward_runs_in_the_configured_precision(tmp_path: Path, precision: str, dtype: torch.dtype):
    """The logged precision is the one computed in: autocast's dtype reaches the model's output."""
    exp = _RecordsOutputDtype()
    cfg = _modadd_cfg(("train.steps", "2"), ("train.precision", precision), ("eval.every", "0"))
    Trainer(cfg, exp, tmp_path / "r", torch.device("cpu")).fit()
    assert exp.output_dtypes == {dtype}


class _InfiniteBackward(torch.autograd.Function):
    """The identity going forward, an infinite gradient coming back: an fp16 overflow on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


class _OverflowsAt(ModAdd):
    """modadd whose backward overflows at the given (0-based) steps, its loss staying finite."""

    def __init__(self, steps: set[int]):
        self.overflow_steps = steps

    def loss(self, model, batch, ctx):
        loss, metrics = super().loss(model, batch, ctx)
        return (_InfiniteBackward.apply(loss) if ctx.step in self.overflow_steps else loss), metrics


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path: Path):
    """Steps 3 and 6 overflow: GradScaler must skip exactly those (weights untouched), halve its
    scale each time, and amp_skipped must count them in the rows that follow.  A skipped step is
    GradScaler's normal recovery, not a fault: under the default train.nonfinite=stop the run goes
    on, and the skipped step's (infinite) norm is left out of grad_norm, not averaged into it."""
    overflow = {2, 5}  # 0-based: steps 3 and 6 of the log
    cfg = _modadd_cfg(("train.steps", "8"), ("train.precision", "fp16"), ("log.every", "1"),
                      ("schedule.warmup", "0"))  # no warm-up: lr > 0 from step 1
    assert cfg.train.nonfinite == "stop"
    recorder = _Recorder()
    Trainer(cfg, _OverflowsAt(overflow), tmp_path / "r", torch.device("cpu"), callbacks=[recorder]).fit()
    assert recorder.applied == [s not in overflow for s in range(8)]
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    skipped_so_far = [sum(s < r["step"] for s in overflow) for r in rows]
    assert [r["amp_skipped"] for r in rows] == skipped_so_far
    assert [r["amp_scale"] for r in rows] == [2.0 ** 16 / 2 ** k for k in skipped_so_far]
    # a row whose only step was skipped has no measured norm; the others are finite
    assert [r.get("grad_norm") is None for r in rows] == [s - 1 in overflow for s in range(1, 9)]
    assert all(math.isfinite(r["grad_norm"]) for r in rows if r.get("grad_norm") is not None)
    assert not [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "nonfinite"]


def test_fp16_grad_norm_of_an_interval_is_the_mean_over_the_applied_steps(tmp_path: Path):
    """Log rows every 2 steps, steps 3 and 6 overflow: each of those intervals holds one skipped and
    one applied step, and its grad_norm is the applied step's norm (computed here from the gradients
    the optimizer got), not inf and not halved by counting the skipped step."""
    overflow = {2, 5}
    cfg = _modadd_cfg(("train.steps", "8"), ("train.precision", "fp16"), ("log.every", "2"),
                      ("train.clip", "0"), ("schedule.warmup", "0"))
    recorder = _Recorder()
    Trainer(cfg, _OverflowsAt(overflow), tmp_path / "r", torch.device("cpu"), callbacks=[recorder]).fit()
    norms = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
             for grads in recorder.grads]
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for row in rows:
        applied = [norms[s] for s in (row["step"] - 2, row["step"] - 1) if s not in overflow]
        assert row["grad_norm"] == pytest.approx(sum(applied) / len(applied), rel=1e-5), row["step"]


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_lion_matches_the_paper_update_step_by_step(momentum_dtype):
    """Six steps against the rule written out from the paper (tests/lion_reference.py), with
    gradients under which the momentum overturns the gradient's sign for many entries: a Lion that
    ignored its momentum, read it after updating it, or swapped the betas would step differently."""
    lr, betas, wd, steps = 0.1, (0.9, 0.99), 0.5, 6
    param = torch.nn.Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    opt = Lion([param], lr=lr, betas=betas, weight_decay=wd, momentum_dtype=momentum_dtype)
    ref_param = param.detach().clone()
    ref_m = torch.zeros_like(ref_param, dtype=momentum_dtype or torch.float32)
    flipped = []
    for t, grad in enumerate(momentum_flipping_grads(tuple(param.shape), steps, seed=1), start=1):
        param.grad = grad.clone()
        opt.step()
        unrounded = lion_direction(ref_m, grad, betas)[1]
        ref_param, ref_m, c = lion_step(ref_param, ref_m, grad, lr, betas, wd, momentum_dtype)
        # signs of c this far from 0 cannot be turned by rounding (lerp vs the written-out formula)
        assert c.abs().min() > 1e-3, t
        torch.testing.assert_close(param.detach(), ref_param, rtol=1e-6, atol=1e-6, msg=_labelled(f"step {t}"))
        m = opt.state[param]["exp_avg"]
        assert m.dtype == (momentum_dtype or torch.float32)
        # fp32 arithmetic, then one rounding to the stored dtype, as the reference does
        torch.testing.assert_close(m, ref_m, rtol=1e-6, atol=0, msg=_labelled(f"step {t}"))
        if momentum_dtype is not None:  # the rounding is really exercised
            assert not torch.equal(ref_m.float(), unrounded)
        flipped.append(flipped_share(c, grad))
    # the case this test is for: from step 2 on, the momentum decides a good share of the signs
    assert flipped[0] == 0 and min(flipped[1:]) > 0.3, flipped


def test_lion_run_through_the_cli(tmp_path: Path):
    out = trainlab(*SMOKE, "--steps", "10", "--set", "optim.name=lion", "--set", "optim.momentum_dtype=bf16",
                   "--set", "optim.lr=3e-4", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert history(tmp_path / "r")[-1]["step"] == 10
    # Lion was the optimizer: one bf16 momentum per parameter and nothing else (AdamW would also
    # keep a step count and a second moment, in fp32)
    optimizer = torch.load(tmp_path / "r" / "checkpoints" / "step_00000010" / "state.pt",
                           weights_only=True)["optimizer"]
    shapes = sorted(tuple(w.shape) for w in final_weights(tmp_path / "r").values())
    assert sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values()) == shapes
    assert all(s.keys() == {"exp_avg"} and s["exp_avg"].dtype == torch.bfloat16 for s in optimizer["state"].values())


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
    lines = [line for line in out.stderr.splitlines() if line.startswith("[r (modadd-smoke)] ")]
    assert len(lines) == 2  # the first and the last, nothing in between within the hour
    assert all(" | eta " in line for line in lines), lines
    assert len(read_metrics(tmp_path / "r" / "metrics.csv")) == 40


def test_progress_bar_mode_runs(tmp_path: Path):
    out = trainlab(*SMOKE, "--steps", "10", "--set", "log.progress=bar", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "10/10" in out.stderr and "r (modadd-smoke)" in out.stderr and "eta 0m00s" in out.stderr


def test_the_first_progress_line_comes_after_the_first_steps_whatever_log_every_is(tmp_path: Path, monkeypatch):
    """A progress line with the measured rate and ETA as soon as FIRST_TIMING_S have passed (0 here:
    after the first step), long before the first log row (log.every=1000); it names the run
    directory, and a run in the default directory is named by that alone."""
    import trainlab.engine.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "FIRST_TIMING_S", 0.0)
    out = trainlab(*SMOKE, "--steps", "30", "--set", "log.every=1000", "--set", "eval.every=0",
                   "--set", "log.progress=plain", "--set", "log.plain_interval_s=0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[runs/modadd-smoke] step 1/30 | "), lines
    assert " step/s over the first step | eta " in lines[0] and "loss" not in lines[0], lines
    assert lines[1].startswith("[runs/modadd-smoke] step 30/30 | loss "), lines  # the only log row: the last
    assert len(lines) == 2, lines
    assert "sized for" not in out.stderr  # smoke runs anywhere


def test_a_preset_sized_for_a_gpu_says_so_with_its_measured_eta_on_a_cpu(tmp_path: Path, monkeypatch, capsys):
    import dataclasses

    import trainlab.engine.trainer as trainer_mod
    from trainlab.experiment import registry

    experiments = registry()
    assert experiments["sha256"].presets["gpu"].sized_for == "cuda"
    assert experiments["bitnet_lm"].presets["s1024"].sized_for == "cuda"
    assert not experiments["sha256"].presets["quick"].sized_for and not ModAdd.presets["quick"].sized_for

    class GpuSized(ModAdd):
        presets = {**ModAdd.presets, "smoke": dataclasses.replace(ModAdd.presets["smoke"], sized_for="cuda")}

    monkeypatch.setattr(trainer_mod, "FIRST_TIMING_S", 0.0)
    cfg = _modadd_cfg()
    Trainer(cfg, GpuSized(), tmp_path / "r", torch.device("cpu")).fit()
    said = [line for line in capsys.readouterr().err.splitlines() if "sized for" in line]
    assert len(said) == 1, said
    assert said[0].startswith("trainlab: modadd --preset smoke is sized for a CUDA GPU and runs on cpu here: "), said
    assert " step/s over its first step, about " in said[0] and " for the 39 steps left; presets for any " \
        "device: quick, grok" in said[0], said


def test_a_huge_eta_stays_readable():
    from trainlab.engine.progress import Progress
    from trainlab.formatting import format_duration

    assert [format_duration(h * 3600) for h in (64, 99.9, 100, 24 * 999)] == \
        ["64h00m00s", "99h54m00s", "4.2 days", "999.0 days"]
    assert [format_duration(d * 86400) for d in (1000, 365.25 * 3169.5, 365.25 * 2e6)] == \
        ["2.7 years", "3,170 years", "over a million years"]
    import io

    stream = io.StringIO()
    Progress("plain", 10**9, 0, "r", 0.0, stream=stream).early(1, 1, 0.01)
    assert stream.getvalue() == "[r] step 1/1000000000 | 0.01 step/s over the first step | eta 3,169 years\n"


def _corrupt(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_resume_past_corrupt_checkpoints_and_over_from_step_0_says_so_on_the_terminal(tmp_path: Path):
    run = [*SMOKE, "--set", "ckpt.every=10", "--set", "ckpt.keep=2", "--run-dir", "r"]
    trainlab(*run, "--steps", "20", cwd=tmp_path, check=True)
    ckpts = tmp_path / "r" / "checkpoints"
    _corrupt(ckpts / "step_00000020")
    out = trainlab(*run, "--steps", "30", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if line.startswith("trainlab: ")]
    assert "trainlab: resuming r at step 10 from its checkpoint step_00000010 (a newer one is corrupt: " \
           "step_00000020: model.safetensors checksum mismatch; set aside as *.corrupt, kept)" in said, said
    for step in (20, 30):
        _corrupt(ckpts / f"step_{step:08d}")
    out = trainlab(*run, "--steps", "40", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if "corrupt" in line]
    assert said == ["trainlab: every checkpoint of r is corrupt (step_00000030: model.safetensors checksum "
                    "mismatch and 1 more; set aside as *.corrupt, kept); starting over from step 0"], said
    events = read_events(tmp_path / "r" / "events.jsonl")
    assert [e["kind"] for e in events].count("checkpoint_corrupt") == 3 and events[-1]["kind"] == "finish"
    assert [e for e in events if e["kind"] in ("start", "resume")][-1]["kind"] == "start"


def test_training_memory_is_estimated_on_the_meta_device_as_the_optimizers_allocate_it():
    """The estimate against what the optimizer really holds after a step (its per-tensor step
    counters aside: a few bytes), for AdamW, Lion with bf16 momentum and GaLore; a model that
    cannot be built on meta gives no estimate and no refusal."""
    from trainlab.engine.memory import estimate_training_memory, refuse_if_it_cannot_fit
    from trainlab.optim import build_optimizer
    from trainlab.optim.galore import optimizer_state_bytes

    for sets in ([], [("optim.name", "lion"), ("optim.momentum_dtype", "bf16")], [("optim.galore_rank", "4")]):
        cfg = _modadd_cfg(*sets)
        need = estimate_training_memory(ModAdd(), cfg)
        model = ModAdd().build_model(cfg)
        params = [p for p in model.parameters()]
        assert need.params == sum(p.numel() for p in params)
        assert need.weights_bytes == sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
        assert need.grads_bytes == sum(p.numel() * 4 for p in params)
        opt = build_optimizer(cfg.optim, model, torch.device("cpu"))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        counters = 8 * len(params)  # at most a step count per tensor
        assert 0 <= optimizer_state_bytes(opt) - need.optimizer_bytes <= counters, sets

    class NotOnMeta(ModAdd):
        def build_model(self, cfg):
            width = int(torch.tensor([cfg.model.dim]).item())  # reads a value: meta has none
            return torch.nn.Linear(width, width)

    cfg = _modadd_cfg()
    assert estimate_training_memory(NotOnMeta(), cfg) is None
    refuse_if_it_cannot_fit(NotOnMeta(), cfg, torch.device("cpu"))  # no estimate: no refusal


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
