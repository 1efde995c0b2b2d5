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
from conftest import final_weights, history, trainlab
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
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_retention_keeps_last_k_and_best(tmp_path: Path):
    store = CheckpointStore(tmp_path, keep=2)
    model = _model()
    for step in (1, 2, 3, 4, 5):
        store.save(step, model, _state(step), {}, best=step == 2)
    assert [p.name for p in store.complete_dirs()] == ["step_00000002", "step_00000004", "step_00000005"]
    assert store.best_name() == "step_00000002"


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
    for a, b in zip(final_weights(tmp_path / "ref").values(), final_weights(tmp_path / "r").values()):
        assert torch.equal(a, b)


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
