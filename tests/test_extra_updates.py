"""An experiment's second optimizer on its own schedule (Experiment.extra_updates): the engine
keeps its parameters away from the main optimizer, steps it when due, logs its metrics averaged over
the steps it ran, and checkpoints its state so that a SIGKILL and a resume continue exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, final_weights, history, kill_then_resume, trainlab
from trainlab.engine.logs import read_events, read_rows

PAIR = str(Path(__file__).parent / "data" / "experiments" / "critic_pair.py") + ":EXPERIMENT"
RUN = ["run", PAIR, "--preset", "smoke", "--set", "model.critic_every=2", "--set", "model.critic_start=3"]


def _initial_weights(tmp_path: Path) -> dict:
    out = trainlab("run", PAIR, "--preset", "smoke", "--steps", "1", "--set", "model.critic_start=100",
                   "--run-dir", "init", cwd=tmp_path, check=True)
    assert out.returncode == 0
    return final_weights(tmp_path / "init")


def test_main_optimizer_leaves_the_critic_alone_until_its_schedule_starts(tmp_path: Path):
    """With the critic's start past the run's end, the main loss's gradient reaches the critic
    (fake_score depends on it) but the critic's weights stay those of step 0; the generator moves."""
    trainlab("run", PAIR, "--preset", "smoke", "--steps", "20", "--set", "model.critic_start=1000",
             "--run-dir", "late", cwd=tmp_path, check=True)
    init = _initial_weights(tmp_path)  # after 1 step: the critic has not moved, the generator has
    late = final_weights(tmp_path / "late")
    for name in late:
        if name.startswith("critic."):
            assert torch.equal(late[name], init[name]), name
    assert any(not torch.equal(late[n], init[n]) for n in late if n.startswith("generator."))
    # no critic step ran: its metric is absent from every row, not a zero
    assert all(row.get("critic_gap") in (None, "") for row in read_rows(tmp_path / "late" / "metrics.csv"))


def test_critic_trains_on_its_schedule_and_is_clipped(tmp_path: Path):
    trainlab(*RUN, "--steps", "20", "--run-dir", "run", cwd=tmp_path, check=True)
    weights = final_weights(tmp_path / "run")
    critic = [w for n, w in weights.items() if n.startswith("critic.")]
    assert max(float(w.abs().max()) for w in critic) <= 0.05 + 1e-7  # after_step's weight clipping
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    # due at steps 3, 5, 7, ... (0-based): the first row (steps 0-4) holds one critic step, the rest two or three
    assert all(isinstance(r["critic_gap"], float) for r in rows)
    import trainlab.engine.checkpoint as ck
    last = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    state = torch.load(last / ck.STATE_FILE, weights_only=True)
    assert set(state["extra_updates"]) == {"critic"}
    assert state["extra_updates"]["critic"]["optimizer"]["state"], "RMSProp's square averages are saved"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    trainlab(*RUN, "--run-dir", "ref", cwd=cwd, check=True)
    return cwd / "ref"


def test_sigkill_then_resume_is_exact_with_a_critic(reference: Path, tmp_path: Path):
    run_dir = tmp_path / "killed"
    kill_then_resume(RUN, run_dir, tmp_path, kill_at=25)  # past checkpoints 7..21, mid-interval of the next
    assert history(run_dir) == history(reference)
    assert_same_weights(final_weights(reference), final_weights(run_dir))


def test_resume_without_the_critic_state_would_differ(reference: Path, tmp_path: Path):
    """The exactness above is not luck: a resume that drops the critic's RMSProp state (an old
    checkpoint's shape) changes the history -- so the state saved is the state used."""
    import trainlab.engine.checkpoint as ck

    run_dir = tmp_path / "dropped"
    trainlab(*RUN, "--steps", "60", "--run-dir", str(run_dir), cwd=tmp_path, check=True)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    for later in ckpts[1:]:
        import shutil
        shutil.rmtree(later)
    first = ckpts[0]
    state = torch.load(first / ck.STATE_FILE, weights_only=True)
    del state["extra_updates"]
    torch.save(state, first / ck.STATE_FILE)
    manifest = (first / ck.MANIFEST)
    import json
    data = json.loads(manifest.read_text())
    data["files"][ck.STATE_FILE] = {"sha256": ck.sha256_file(first / ck.STATE_FILE),
                                    "bytes": (first / ck.STATE_FILE).stat().st_size}
    manifest.write_text(json.dumps(data))
    (run_dir / "status.json").unlink()
    trainlab(*RUN, "--steps", "60", "--run-dir", str(run_dir), cwd=tmp_path, check=True)
    events = read_events(run_dir / "events.jsonl")
    assert any(e["kind"] == "extra_update_not_in_checkpoint" for e in events)
    ref_last = history(reference)[-1]
    got = [r for r in history(run_dir) if r["step"] == ref_last["step"]][-1]
    assert got["loss"] != ref_last["loss"]
