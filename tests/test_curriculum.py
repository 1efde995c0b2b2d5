"""Curriculum promotion respects the minimum steps *in the phase* and the gate; its state survives
resume under both on_resume policies."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import history, trainlab
from trainlab.config import CurriculumConfig
from trainlab.engine.curriculum import Curriculum
from trainlab.engine.logs import read_events


def _cur(**kw) -> Curriculum:
    cfg = CurriculumConfig(name="rounds", values=[8, 16, 32], min_steps=[5, 3, 0], gates=[0.9, 0.9, 1.0],
                           window=2, **kw)
    return Curriculum(cfg, torch.device("cpu"))


def _steps(cur: Curriculum, values: list[float], start: int = 0) -> list[tuple[int, dict]]:
    promotions = []
    for i, v in enumerate(values):
        cur.observe(torch.tensor(v))
        event = cur.maybe_promote(start + i + 1)
        if event:
            promotions.append((start + i + 1, event))
    return promotions


def test_minimum_steps_count_within_the_phase():
    cur = _cur()
    promotions = _steps(cur, [1.0] * 20)
    # phase 0 needs 5 steps in phase; phase 1 needs 3 more steps *after* the promotion at step 5
    assert [s for s, _ in promotions] == [5, 8]
    assert cur.level == 32 and cur.is_last
    first = promotions[0][1]
    assert first["from_value"] == 8 and first["to_value"] == 16 and first["steps_in_phase"] == 5


def test_gate_holds_the_phase_until_the_running_mean_passes():
    cur = _cur()
    assert _steps(cur, [0.5] * 30) == []  # well past min_steps, below the gate
    assert cur.phase == 0
    promotions = _steps(cur, [1.0, 0.7], start=30)  # window of 2: mean 0.85 < 0.9
    assert promotions == []
    promotions = _steps(cur, [1.0], start=32)  # mean of (0.7, 1.0) = 0.85 still
    assert promotions == []
    promotions = _steps(cur, [1.0], start=33)  # mean of (1.0, 1.0)
    assert [s for s, _ in promotions] == [34]
    assert promotions[0][1]["running_mean"] == 1.0


def test_full_window_required_after_promotion():
    cfg = CurriculumConfig(values=[1, 2, 3], min_steps=[1, 1, 0], gates=[0.5, 0.5, 1.0], window=4)
    cur = Curriculum(cfg, torch.device("cpu"))
    promotions = _steps(cur, [1.0] * 12)
    assert [s for s, _ in promotions] == [4, 8]


def test_state_dict_roundtrip_and_on_resume_start():
    cur = _cur()
    _steps(cur, [1.0] * 6)
    state = cur.state_dict()
    resumed = _cur()
    resumed.load_state_dict(state)
    assert (resumed.phase, resumed.steps_in_phase, resumed.seen) == (cur.phase, cur.steps_in_phase, cur.seen)
    assert torch.equal(resumed.history, cur.history)
    restarted = _cur(on_resume="start")
    restarted.load_state_dict(state)
    assert restarted.phase == 0 and restarted.steps_in_phase == 0


CURRICULUM = ["--set", "curriculum.name=rounds", "--set", "curriculum.values=[8,16,32]",
              "--set", "curriculum.min_steps=[10,10,0]", "--set", "curriculum.gates=[0,0,1]",
              "--set", "curriculum.window=5", "--set", "log.every=5", "--set", "ckpt.every=5",
              "--set", "eval.every=0", "--set", "eval.at_end=false"]


def _phases(run_dir: Path) -> list[tuple[int, int]]:
    return [(row["step"], row["phase"]) for row in history(run_dir)]


def test_cli_curriculum_promotes_and_resumes_under_both_policies(tmp_path: Path):
    base = ["run", "modadd", "--preset", "smoke", *CURRICULUM]
    trainlab(*base, "--steps", "30", "--run-dir", "ref", cwd=tmp_path, check=True)
    promotions = [e for e in read_events(tmp_path / "ref" / "events.jsonl") if e["kind"] == "promotion"]
    assert [(e["step"], e["to_value"]) for e in promotions] == [(10, 16), (20, 32)]
    rows = history(tmp_path / "ref")
    assert rows[0]["rounds"] == 8 and rows[-1]["rounds"] == 32 and "gate_mean" in rows[0] and rows[0]["threshold"] == 0

    # stopped after 15 steps (in phase 1), then resumed to 30: on_resume=checkpoint keeps phase 1
    trainlab(*base, "--steps", "15", "--run-dir", "keep", cwd=tmp_path, check=True)
    trainlab(*base, "--steps", "30", "--run-dir", "keep", cwd=tmp_path, check=True)
    assert _phases(tmp_path / "keep") == _phases(tmp_path / "ref")
    resume = [e for e in read_events(tmp_path / "keep" / "events.jsonl") if e["kind"] == "resume"][0]
    assert resume["curriculum_phase"] == 1

    # on_resume=start (the SHA-256 curriculum): back to phase 0 at the resume, promoted again after 10 steps
    start = [*base, "--set", "curriculum.on_resume=start"]
    trainlab(*start, "--steps", "15", "--run-dir", "restart", cwd=tmp_path, check=True)
    trainlab(*start, "--steps", "30", "--run-dir", "restart", cwd=tmp_path, check=True)
    phases = dict(_phases(tmp_path / "restart"))
    # a row shows the phase its interval was trained in; the promotion follows the row at step 25
    assert phases[15] == 1 and phases[20] == 0 and phases[25] == 0 and phases[30] == 1
    events = read_events(tmp_path / "restart" / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "promotion"] == [10, 25]
