"""Atomic checkpoints: an interrupted save leaves the previous checkpoint loadable; a corrupted
newest checkpoint is detected by checksum, named in an event, and the previous one is used;
loading never runs code from the file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import trainlab.engine.checkpoint as ckpt_mod
from conftest import assert_same_weights, final_weights, history, trainlab
from trainlab.engine.checkpoint import CheckpointStore, sha256_file
from trainlab.engine.logs import read_events
from trainlab.errors import UsageError


def _model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def _state(step: int) -> dict:
    return {"step": step, "blob": torch.arange(10) * step, "nested": {"a": [1, 2.5, "x"]}}


def test_save_and_load_roundtrip(tmp_path: Path):
    store = CheckpointStore(tmp_path, keep=2)
    model = _model()
    store.save(5, model, _state(5), {"loss": 1.0})
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    latest = store.latest_valid()
    state = CheckpointStore.load(latest, other, torch.device("cpu"))
    assert latest.step == 5 and state["step"] == 5 and torch.equal(state["blob"], torch.arange(10) * 5)
    assert_same_weights(model.state_dict(), other.state_dict())


def test_retention_keeps_last_k_and_best(tmp_path: Path):
    store = CheckpointStore(tmp_path, keep=2)
    model = _model()
    for step in (1, 2, 3, 4, 5):
        store.save(step, model, _state(step), {}, best=step == 2)
    assert [p.name for p in store.complete_dirs()] == ["step_00000002", "step_00000004", "step_00000005"]
    assert store.best_name() == "step_00000002"


def _break(folder: Path) -> None:
    """Flip one byte of the weights: the folder stays in place but no longer matches its manifest."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))


def _saved_step_marker(folder: Path) -> int:
    """Which save wrote this folder: each save below stores a distinct blob (state.pt is left intact)."""
    return int(torch.load(folder / "state.pt", weights_only=True)["blob"][1])


def test_best_json_never_names_a_checkpoint_that_is_gone_or_replaced(tmp_path: Path):
    events = []
    store = CheckpointStore(tmp_path, keep=1, on_event=events.append)
    model = _model()
    best_file = tmp_path / "best.json"
    # a newer best releases the old one to retention: it is pruned and best.json follows
    store.save(1, model, _state(1), {}, best=True)
    store.save(2, model, _state(2), {})
    assert [p.name for p in store.complete_dirs()] == ["step_00000001", "step_00000002"]
    store.save(3, model, _state(3), {}, best=True)
    assert [p.name for p in store.complete_dirs()] == ["step_00000003"] and store.best_name() == "step_00000003"
    # setting aside a later interval leaves best.json alone; an interval holding the best removes it
    store.save(4, model, _state(4), {})
    store.set_aside_from(4, "test: after the best")
    assert store.best_name() == "step_00000003"
    store.set_aside_from(3, "test: the best inside")
    assert not best_file.exists() and (tmp_path / "step_00000003.corrupt").is_dir()  # kept, not named
    # a corrupt best found on resume: set aside by latest_valid, and best.json goes with it
    store.save(5, model, _state(5), {}, best=True)
    _break(tmp_path / "step_00000005")
    assert store.latest_valid() is None and not best_file.exists()
    # an invalid best replaced by a new, not-best save of the same step: best.json must not name the new one
    store.save(6, model, _state(6), {}, best=True)
    _break(tmp_path / "step_00000006")
    store.save(6, model, _state(60), {})
    assert _saved_step_marker(tmp_path / "step_00000006") == 60 and store.best_name() is None
    assert [e["path"].rsplit("/", 1)[-1] for e in events if e["kind"] == "checkpoint_corrupt"] == \
        ["step_00000004", "step_00000003", "step_00000005", "step_00000006"]


def test_a_second_corrupt_checkpoint_of_the_same_step_is_set_aside_beside_the_first(tmp_path: Path):
    events = []
    store = CheckpointStore(tmp_path, keep=3, on_event=events.append)
    model = _model()
    store.save(1, model, _state(1), {})
    for marker in (20, 21, 22):  # step 2 saved, found corrupt and set aside, three times over
        store.save(2, model, _state(marker), {})
        _break(tmp_path / "step_00000002")
        assert store.latest_valid().step == 1
    names = ["step_00000002.corrupt", "step_00000002.corrupt-2", "step_00000002.corrupt-3"]
    assert [Path(e["moved_to"]).name for e in events if e["kind"] == "checkpoint_corrupt"] == names
    # each folder still holds what its own save wrote: no set-aside overwrote an earlier one
    assert [_saved_step_marker(tmp_path / name) for name in names] == [20, 21, 22]
    assert not (tmp_path / "step_00000002").exists()


def test_saving_over_an_invalid_folder_of_the_same_step_keeps_it_aside_and_writes_a_whole_one(tmp_path: Path):
    events = []
    store = CheckpointStore(tmp_path, keep=3, on_event=events.append)
    model = _model()
    store.save(5, model, _state(5), {})
    _break(tmp_path / "step_00000005")
    path = store.save(5, model, _state(50), {})  # e.g. a resumed run reaching step 5 again
    assert path == tmp_path / "step_00000005" and store.verify(path) is None
    assert _saved_step_marker(path) == 50
    assert _saved_step_marker(tmp_path / "step_00000005.corrupt") == 5  # the broken one kept aside
    assert events[-1]["kind"] == "checkpoint_corrupt" and "replaced by a new save" in events[-1]["reason"]
    # a whole folder of that step is not written again (a signal right after a periodic save)
    assert store.save(5, model, _state(51), {}) == path and _saved_step_marker(path) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005", "step_00000005.corrupt"]


def test_save_interrupted_midway_leaves_previous_loadable(tmp_path: Path, monkeypatch):
    events = []
    store = CheckpointStore(tmp_path, keep=3, on_event=events.append)
    model = _model()
    store.save(10, model, _state(10), {})

    def killed(*args, **kwargs):  # the process dies after the weights were written
        raise KeyboardInterrupt("simulated kill during torch.save")

    monkeypatch.setattr(ckpt_mod.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save(20, model, _state(20), {})
    monkeypatch.undo()
    assert any(p.name.startswith(".tmp-step_00000020") for p in tmp_path.iterdir())
    latest = store.latest_valid()
    assert latest.step == 10
    assert CheckpointStore.load(latest, _model(), torch.device("cpu"))["step"] == 10
    store.sweep_incomplete()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert events and events[-1]["kind"] == "checkpoint_incomplete_removed"


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest"])
def test_corrupted_newest_is_detected_and_previous_used(tmp_path: Path, damage: str):
    events = []
    store = CheckpointStore(tmp_path, keep=3, on_event=events.append)
    model = _model()
    store.save(1, model, _state(1), {})
    newest = store.save(2, model, _state(2), {})
    target = newest / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    else:
        (newest / "manifest.json").unlink()
    latest = store.latest_valid()
    assert latest.step == 1
    assert events[-1]["kind"] == "checkpoint_corrupt"
    assert events[-1]["path"].endswith("step_00000002")
    assert (tmp_path / "step_00000002.corrupt").is_dir()  # kept aside, never deleted


def test_corrupted_newest_in_a_real_run(tmp_path: Path):
    base = ["run", "modadd", "--preset", "smoke", "--set", "ckpt.every=10", "--set", "model.dropout=0.1"]
    trainlab(*base, "--steps", "30", "--run-dir", "ref", cwd=tmp_path, check=True)
    trainlab(*base, "--steps", "20", "--run-dir", "r", cwd=tmp_path, check=True)
    weights = tmp_path / "r" / "checkpoints" / "step_00000020" / "state.pt"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    out = trainlab(*base, "--steps", "30", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    events = read_events(tmp_path / "r" / "events.jsonl")
    corrupt = [e for e in events if e["kind"] == "checkpoint_corrupt"]
    assert corrupt and corrupt[0]["path"].endswith("step_00000020") and "checksum" in corrupt[0]["reason"]
    resume = [e for e in events if e["kind"] == "resume"][-1]
    assert resume["step"] == 10
    assert history(tmp_path / "r") == history(tmp_path / "ref")
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "r"))


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_pickled_code_in_state_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = CheckpointStore(tmp_path / "ck", keep=2)
    model = _model()
    path = store.save(3, model, _state(3), {})
    evil = path / "state.pt"
    with open(evil, "wb") as fh:  # a payload torch.load(weights_only=False) would execute
        pickle.dump({"step": 3, "x": _Exploit()}, fh)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"sha256": sha256_file(evil), "bytes": evil.stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    latest = store.latest_valid()
    assert latest.step == 3  # the checksums match: only the safe loader stands in the way
    with pytest.raises(UsageError, match="safe load refuses"):
        CheckpointStore.load(latest, _model(), torch.device("cpu"))
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_of_another_shape_names_the_tensors(tmp_path: Path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save(1, _model(width=4), _state(1), {})
    with pytest.raises(UsageError) as info:
        CheckpointStore.load(store.latest_valid(), _model(width=8), torch.device("cpu"))
    message = str(info.value)
    assert "0.weight [4, 3] vs model [8, 3]" in message and "2.weight" in message


def test_disk_full_stops_cleanly_and_the_previous_checkpoint_survives(tmp_path: Path):
    """A real full filesystem: a 700 KiB tmpfs holds three smoke checkpoints, not a fourth."""
    import shutil
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        run = ["run", "modadd", "--preset", "smoke", "--set", "ckpt.every=5", "--set", "ckpt.keep=3"]
        out = trainlab(*run, "--run-dir", str(mnt / "r"), cwd=tmp_path)
        assert out.returncode == 1, out.stderr
        assert "disk full while writing checkpoint step_00000020" in out.stderr
        assert "the previous checkpoint step_00000015 is intact" in out.stderr and "Traceback" not in out.stderr
        store = CheckpointStore(mnt / "r" / "checkpoints", keep=3)
        assert not [p for p in (mnt / "r" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        assert store.latest_valid().step == 15
        shutil.copytree(mnt / "r", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    again = trainlab(*run, "--run-dir", "moved", cwd=tmp_path)  # space again: it resumes from step 15
    assert again.returncode == 0, again.stderr
    resume = [e for e in read_events(tmp_path / "moved" / "events.jsonl") if e["kind"] == "resume"]
    assert resume and resume[-1]["step"] == 15
