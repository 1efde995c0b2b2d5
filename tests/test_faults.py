"""Faults the engine must come back from: non-finite steps (skip, rollback, stop), and running out
of device memory (micro-batch halved, effective batch and step count kept)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import trainlab
from trainlab.config import resolve
from trainlab.engine.logs import read_events, read_rows
from trainlab.engine.trainer import Trainer, split_batch
from trainlab.errors import TrainingStopped
from trainlab.experiments.modadd import ModAdd

# a learning rate that explodes after step 20: the weights blow up and the loss goes non-finite
EXPLODE = ["run", "modadd", "--preset", "smoke", "--set", "ckpt.every=10", "--set", "train.clip=0",
           "--set", "schedule.phases=[{kind: constant, steps: 20, start: 1}, {kind: constant, steps: 0, start: 1e33}]"]


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
    set_aside = [e for e in events if e["kind"] == "checkpoint_corrupt"]
    assert set_aside and all("non-finite interval" in e["reason"] for e in set_aside)
    assert {Path(e["path"]).name for e in set_aside} == {"step_00000025"}
    assert not any(e["kind"] == "checkpoint" and e["step"] == 30 for e in events)  # never saved a broken state
    assert any(not math.isfinite(r["loss"]) for r in read_rows(tmp_path / "r" / "metrics.csv"))


def test_stop_policy_sets_aside_checkpoints_from_the_broken_interval(tmp_path: Path):
    out = trainlab(*EXPLODE, "--set", "log.every=20", "--set", "ckpt.keep=5", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 1 and "non-finite" in out.stderr
    kept = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert "step_00000010" in kept and "step_00000020" in kept
    assert "step_00000030" not in kept and "step_00000030.corrupt" in kept  # saved mid-interval, set aside


class _SmallMemory(ModAdd):
    """modadd whose 'device' holds at most `limit` samples per forward pass."""

    limit = 16

    def loss(self, model, batch, ctx):
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
    # the split survives a resume: no new out-of-memory event when the run is extended
    more = copy.deepcopy(cfg)
    more.train.steps = 16
    Trainer(more, _SmallMemory(), tmp_path / "oom", torch.device("cpu")).fit()
    assert len([e for e in read_events(tmp_path / "oom" / "events.jsonl") if e["kind"] == "out_of_memory"]) == 2


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
