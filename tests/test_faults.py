"""Faults the engine must come back from: non-finite steps (skip, rollback, stop), and running out
of device memory (micro-batch halved, effective batch and step count kept)."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import VOLATILE, trainlab
from trainlab import Callback
from trainlab.config import resolve
from trainlab.engine.logs import read_events, read_rows
from trainlab.engine.trainer import Trainer, split_batch
from trainlab.errors import TrainingStopped
from trainlab.experiments.modadd import ModAdd
from trainlab.launch import run_watchers

# a learning rate that explodes after step 20: the weights blow up and the loss goes non-finite
BLOW_UP = 1e33
EXPLODE = ["run", "modadd", "--preset", "smoke", "--set", "ckpt.every=10", "--set", "train.clip=0",
           "--set", "schedule.phases=[{kind: constant, steps: 20, start: 1}, "
                    f"{{kind: constant, steps: 0, start: {BLOW_UP:g}}}]"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Runs in this process use one thread, as the CLI runs conftest starts do (OMP_NUM_THREADS=1):
    on a small shared machine more threads make these tiny models slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_skip_policy_keeps_going_and_never_hides_the_broken_steps(tmp_path: Path):
    out = trainlab(*EXPLODE, "--set", "train.nonfinite=skip", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = read_rows(tmp_path / "r" / "metrics.csv")
    assert any(not math.isfinite(r["loss"]) for r in rows)  # the broken steps are in metrics.csv
    assert rows[-1]["skipped_steps"] > 0 and rows[-1]["step"] == 40
    skipped = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "nonfinite_step_skipped"]
    assert len(skipped) == rows[-1]["skipped_steps"] and all(e["step"] > 20 for e in skipped)


def test_rollback_policy_retries_with_a_smaller_lr_then_stops_with_the_evidence(tmp_path: Path):
    # rows every 10 steps, checkpoints every 5: the checkpoint of step 25 lies inside the broken interval
    out = trainlab(*EXPLODE, "--set", "train.nonfinite=rollback", "--set", "health.rollback_max=2",
                   "--set", "log.every=10", "--set", "ckpt.every=5", "--set", "ckpt.keep=8", "--run-dir", "r",
                   cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "stopped after 2 rollbacks" in out.stderr
    events = read_events(tmp_path / "r" / "events.jsonl")
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert [e["lr_scale"] for e in rollbacks] == [0.5, 0.25]
    assert all(e["detector"] == "nonfinite" and e["step"] <= 20 for e in rollbacks)
    # the scaled LR is the one used: the rows of step 30 (its LR is that of 0-based step 29, in the
    # blow-up phase) show the peak LR x 1e33, then half and a quarter of it
    peak = resolve(ModAdd(), "smoke").optim.lr
    at_30 = [r["lr"] for r in read_rows(tmp_path / "r" / "metrics.csv") if r["step"] == 30]
    assert at_30 == pytest.approx([peak * BLOW_UP, peak * BLOW_UP * 0.5, peak * BLOW_UP * 0.25], rel=1e-7)
    set_aside = [e for e in events if e["kind"] == "checkpoint_corrupt"]
    assert set_aside and all("non-finite interval" in e["reason"] for e in set_aside)
    assert {Path(e["path"]).name for e in set_aside} == {"step_00000025"}
    assert not any(e["kind"] == "checkpoint" and e["step"] == 30 for e in events)  # never saved a broken state
    assert any(not math.isfinite(r["loss"]) for r in read_rows(tmp_path / "r" / "metrics.csv"))


class _LateAlarm(ModAdd):
    """modadd with one more train metric, `late`: 1 on the optimizer steps from `after` on (0-based),
    else 0.  A bound on it trips the collapse detector at a known row whatever the weights do, so the
    rollback below happens at the same place every time."""

    train_metrics = (*ModAdd.train_metrics, "late")
    after = 17  # steps 18-20 of the interval 16-20: its mean 0.6 leaves the bound [0, 0.5]

    def loss(self, model, batch, ctx):
        loss, metrics = super().loss(model, batch, ctx)
        return loss, {**metrics, "late": torch.tensor(float(ctx.step >= self.after))}


def _cosine_multiplier(cfg, step: int) -> float:
    """The LR multiplier of the 0-based optimizer step `step` >= warmup, written out from the schedule's
    definition (cosine from 1 to min_lr_ratio over the steps after the warmup), not taken from the engine."""
    warmup, total, floor = cfg.schedule.warmup, cfg.train.steps, cfg.schedule.min_lr_ratio
    return floor + (1 - floor) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def _measured(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in VOLATILE}


def test_health_rollback_reloads_the_checkpoint_and_retries_with_the_scaled_lr(tmp_path: Path):
    """A health alert at step 20 with policy rollback: reload step 15, retry at 0.5x, then 0.25x the
    LR, then stop.  Each retry must be what a run resumed from that checkpoint at the scaled LR gives."""
    cfg = resolve(_LateAlarm(), "smoke", None, [
        ("schedule.decay", "cosine"), ("ckpt.every", "5"), ("health.collapse", "rollback"),
        ("health.bounds", "{late: [0, 0.5]}"), ("health.rollback_max", "2")])
    cfg.log.progress = "off"
    factor = cfg.health.rollback_lr_factor
    with pytest.raises(TrainingStopped, match=r"stopped after 2 rollbacks \(health.rollback_max=2\)"):
        Trainer(cfg, _LateAlarm(), tmp_path / "r", torch.device("cpu"),
                callbacks=run_watchers(cfg, _LateAlarm(), tmp_path / "r")).fit()
    events = read_events(tmp_path / "r" / "events.jsonl")
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert [(e["step"], e["from_step"], Path(e["checkpoint"]).name) for e in rollbacks] == \
        [(15, 20, "step_00000015")] * 2
    tries = [r for r in read_rows(tmp_path / "r" / "metrics.csv") if r["step"] == 20]
    assert len(tries) == 3  # the first attempt at step 20 and one per rollback
    # the row of step 20 carries the LR of 0-based step 19: the schedule's value, then 0.5x and 0.25x
    scheduled = cfg.optim.lr * _cosine_multiplier(cfg, 19)
    assert [r["lr"] for r in tries] == pytest.approx([scheduled, scheduled * factor, scheduled * factor ** 2],
                                                     rel=1e-7)
    # each retry trained from the reloaded weights: a run resumed from the kept step-15 checkpoint
    # with optim.lr scaled by hand reaches exactly the same row 20
    for scale, retry in ((factor, tries[1]), (factor ** 2, tries[2])):
        ref_dir = tmp_path / f"resumed-x{scale:g}"
        shutil.copytree(tmp_path / "r" / "checkpoints" / "step_00000015", ref_dir / "checkpoints" / "step_00000015")
        ref_cfg = copy.deepcopy(cfg)
        ref_cfg.optim.lr = cfg.optim.lr * scale
        ref_cfg.health.collapse = "warn"
        Trainer(ref_cfg, _LateAlarm(), ref_dir, torch.device("cpu"), callbacks=run_watchers(ref_cfg, _LateAlarm(), ref_dir),
                stop_at=20).fit()
        resumed = read_rows(ref_dir / "metrics.csv")
        assert [r["step"] for r in resumed] == [20]
        assert _measured(retry) == _measured(resumed[0]), scale
    assert _measured(tries[1]) != _measured(tries[0])  # the comparison can tell the tries apart


class _RollbackOnce(Callback):
    """A callback that raises one alert at row `at` whose onset lies before it, as the divergence
    detector's does (its onset is the best step): the checkpoints in between are of the discarded run."""

    def __init__(self, at: int, onset: int):
        self.at, self.onset, self.done = at, onset, False

    def on_log_row(self, trainer, row):
        if row["step"] == self.at and not self.done:
            self.done = True
            trainer.request_rollback({"detector": "divergence", "step": self.at, "message": "test alert",
                                      "evidence": {"onset_step": self.onset}})


def test_rollback_sets_aside_the_checkpoints_of_the_discarded_run(tmp_path: Path):
    """Rolled back to step 10 from an alert at 20 with onset 12: the step-15 checkpoint of the discarded
    run must not survive, or the retry's save at step 15 keeps it (same step, whole) and a resume after
    a kill would continue the discarded run at the full LR."""
    cfg = resolve(ModAdd(), "smoke", None, [("train.steps", "20"), ("ckpt.every", "5"), ("ckpt.keep", "8")])
    cfg.log.progress = "off"
    Trainer(cfg, ModAdd(), tmp_path / "r", torch.device("cpu"), callbacks=[_RollbackOnce(20, 12)]).fit()
    ckpts = tmp_path / "r" / "checkpoints"
    [rollback] = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "rollback"]
    assert Path(rollback["checkpoint"]).name == "step_00000010"
    saved_by = {p.name: torch.load(p / "state.pt", weights_only=True) for p in sorted(ckpts.glob("step_*"))}
    assert {name: (s["rollbacks"], s["lr_scale"]) for name, s in saved_by.items()} == {
        "step_00000005": (0, 1.0), "step_00000010": (0, 1.0),
        "step_00000015.corrupt": (0, 1.0),  # the discarded run's, kept aside
        "step_00000015": (1, 0.5), "step_00000020": (1, 0.5)}


def test_stop_policy_sets_aside_checkpoints_from_the_broken_interval(tmp_path: Path):
    out = trainlab(*EXPLODE, "--set", "log.every=20", "--set", "ckpt.keep=5", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 1 and "non-finite" in out.stderr
    kept = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert "step_00000010" in kept and "step_00000020" in kept
    assert "step_00000030" not in kept and "step_00000030.corrupt" in kept  # saved mid-interval, set aside


class _SmallMemory(ModAdd):
    """modadd whose 'device' holds at most `limit` samples per forward pass; `sizes` records the
    samples of every forward pass tried."""

    limit = 16

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def loss(self, model, batch, ctx):
        self.sizes.append(len(batch[1]))
        if len(batch[1]) > self.limit:
            raise torch.OutOfMemoryError(f"injected: {len(batch[1])} samples > {self.limit}")
        return super().loss(model, batch, ctx)


def _cfg(steps: int = 12, **sets):
    exp = ModAdd()
    overrides = [("train.micro_batch", "64"), ("train.steps", str(steps))] + [(k, v) for k, v in sets.items()]
    return resolve(exp, "smoke", None, overrides)


def test_out_of_memory_halves_the_micro_batch_and_keeps_steps_and_effective_batch(tmp_path: Path):
    cfg = _cfg()
    cfg.log.progress = "off"
    Trainer(cfg, _SmallMemory(), tmp_path / "oom", torch.device("cpu")).fit()
    events = read_events(tmp_path / "oom" / "events.jsonl")
    ooms = [e for e in events if e["kind"] == "out_of_memory"]
    assert [(e["micro_batch"], e["accum"], e["effective_batch"]) for e in ooms] == [(32, 2, 64), (16, 4, 64)]
    assert ooms[0]["step"] == 1
    rows = read_rows(tmp_path / "oom" / "metrics.csv")
    assert rows[-1]["step"] == 12
    # the same samples per step as a run that never ran out of memory: the same curve, to rounding
    ref_cfg = copy.deepcopy(cfg)
    Trainer(ref_cfg, ModAdd(), tmp_path / "ref", torch.device("cpu")).fit()
    ref = read_rows(tmp_path / "ref" / "metrics.csv")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
    # the split survives a resume: the extended run trains steps 13-16 in pieces of 16 samples from
    # its first step on (no new out-of-memory event, no piece of another size) and reaches step 16
    more = copy.deepcopy(cfg)
    more.train.steps = 16
    resumed = _SmallMemory()
    result = Trainer(more, resumed, tmp_path / "oom", torch.device("cpu")).fit()
    assert len([e for e in read_events(tmp_path / "oom" / "events.jsonl") if e["kind"] == "out_of_memory"]) == 2
    assert resumed.sizes == [16] * 4 * 4  # 4 steps x (1 micro-batch of 64 in 4 pieces)
    assert (result.state, result.step) == ("finished", 16)
    assert [r["step"] for r in read_rows(tmp_path / "oom" / "metrics.csv")][-1] == 16


def test_out_of_memory_below_one_sample_is_refused(tmp_path: Path):
    class NoMemory(ModAdd):
        def loss(self, model, batch, ctx):
            raise torch.OutOfMemoryError("injected: nothing fits")

    cfg = _cfg(steps=3)
    cfg.log.progress = "off"
    with pytest.raises(TrainingStopped, match="cannot be halved below 1"):
        Trainer(cfg, NoMemory(), tmp_path / "r", torch.device("cpu")).fit()


def test_split_batch_walks_structures_and_weights_uneven_pieces():
    batch = (torch.arange(8), {"y": torch.arange(8) * 2, "meta": "x"}, [torch.ones(8, 3)])
    pieces = split_batch(batch, 2, 8)
    assert [w for _, w in pieces] == [0.5, 0.5]
    (first, _), (second, _) = pieces
    assert torch.equal(second[0], torch.arange(4, 8))
    assert torch.equal(first[1]["y"], torch.tensor([0, 2, 4, 6])) and first[1]["meta"] == "x"
    assert second[2][0].shape == (4, 3)
    uneven = split_batch((torch.arange(3),), 4, 3)  # 3 samples in 4 parts: 3 pieces of one, none empty
    assert [len(p[0]) for p, _ in uneven] == [1, 1, 1] and sum(w for _, w in uneven) == 1.0
