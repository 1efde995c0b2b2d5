"""`trainlab run sha256`: the seed's CSV columns, a curriculum promoted through tiny gates, exact
resume (also with the shared-memory loader), multi mode, Lion + GaLore, and the per-bit map."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import assert_same_weights, final_weights, history, spawn, trainlab
from trainlab.engine.logs import read_events, read_header, read_rows

SEED_COLUMNS = ["step", "loss", "accuracy", "threshold", "ram_gb", "phase", "rounds"]
SMOKE = ["run", "sha256", "--preset", "smoke"]


def _kill_at(run_dir: Path, proc, step: int) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        rows = read_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
        if rows and rows[-1]["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            return True
        time.sleep(0.005)
    raise AssertionError("no progress")


def test_smoke_writes_seed_columns_promotes_and_maps_bits(tmp_path: Path):
    out = trainlab(*SMOKE, "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    header = read_header(tmp_path / "r" / "metrics.csv")
    assert all(c in header for c in SEED_COLUMNS), header
    events = read_events(tmp_path / "r" / "events.jsonl")
    promotions = [(e["step"], e["from_value"], e["to_value"]) for e in events if e["kind"] == "promotion"]
    assert promotions == [(5, 1, 2), (10, 2, 4)]
    rows = history(tmp_path / "r")
    assert [r["rounds"] for r in rows][:3] == [1, 2, 4] and rows[0]["accuracy"] == rows[0]["acc"]
    # the bit accuracy of each state word a..h: acc is their mean (each word holds 32 of the 256 bits)
    words = [f"acc_word_{w}" for w in "abcdefgh"]
    assert all(c in header for c in words), header
    for r in rows:
        assert sum(r[w] for w in words) / 8 == pytest.approx(r["acc"], abs=1e-6)
    arrays = [json.loads(line) for line in (tmp_path / "r" / "eval_arrays.jsonl").read_text().splitlines()]
    maps = [a for a in arrays if a["name"] == "bit_acc_map"]
    assert maps and maps[0]["shape"] == [8, 32] and all(0 <= v <= 1 for v in maps[0]["values"])
    assert {a.get("tag") for a in maps} >= {"phase_end_0", "phase_end_1"}  # a map at the end of each phase
    # learning beyond the coin flip at 1-4 rounds: the shifted registers are copies
    assert rows[-1]["val_acc"] > 0.6


def test_sigkill_resume_is_exact_with_both_loaders(tmp_path: Path):
    for loader in ("device", "shm"):
        run = [*SMOKE, "--steps", "120", "--set", f"data.loader={loader}", "--set", "ckpt.every=7",
               "--set", "model.dim=48", "--set", "curriculum.min_steps=[30,30,0]"]
        trainlab(*run, "--run-dir", f"ref-{loader}", cwd=tmp_path, check=True)
        proc = spawn(*run, "--run-dir", f"k-{loader}", cwd=tmp_path)
        assert _kill_at(tmp_path / f"k-{loader}", proc, 45), "finished before the kill"
        out = trainlab(*run, "--run-dir", f"k-{loader}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert history(tmp_path / f"k-{loader}") == history(tmp_path / f"ref-{loader}"), loader
        assert_same_weights(final_weights(tmp_path / f"ref-{loader}"), final_weights(tmp_path / f"k-{loader}"))


def test_seed_preset_is_the_seed_document_setting(tmp_path: Path):
    out = trainlab("config", "sha256", "--preset", "original", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    import yaml

    cfg = yaml.safe_load(out.stdout)
    assert (cfg["train"]["micro_batch"], cfg["train"]["accum"], cfg["train"]["clip"]) == (2, 32, 1.0)
    assert cfg["train"]["precision"] == "fp16" and cfg["ckpt"]["every"] == 500
    assert cfg["optim"]["name"] == "lion" and cfg["optim"]["momentum_dtype"] == "bf16"
    assert cfg["curriculum"]["values"] == [8, 16, 32, 64]
    assert cfg["curriculum"]["min_steps"] == [500, 2000, 5000, 0]
    assert cfg["curriculum"]["gates"] == [0.95, 0.95, 0.95, 1.0]
    assert cfg["memory"]["host_ceiling_gb"] == 10.0


def test_rounds_outside_sha256_are_refused(tmp_path: Path):
    out = trainlab(*SMOKE, "--set", "curriculum.values=[8,65,64]", "--run-dir", "x", cwd=tmp_path)
    assert out.returncode == 2 and "curriculum.values[1]" in out.stderr and not (tmp_path / "x").exists()


def test_preflight_names_the_words_at_chance_and_is_not_ready_below_the_gate(tmp_path: Path):
    """The quick preset's stall, on the smoke model at 8 rounds (the quick preflight itself takes
    about 30 s): words a and e -- the two the round function computes -- sit at chance, so bit
    accuracy can reach at most about (6 + 2 x 0.5) / 8 and the 0.95 gate is never passed, while
    the loss falls."""
    out = trainlab("preflight", "sha256", "--preset", "smoke", "--steps", "60", "--planned-steps", "100000",
                   "--set", "curriculum.values=[8,16]", "--set", "curriculum.gates=[0.95,1.0]",
                   "--set", "curriculum.min_steps=[0,0]", "--set", "log.progress=off", "--run-dir", "pf", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    saved = json.loads((tmp_path / "pf" / "preflight.json").read_text())
    claims = {c["name"]: c for c in saved["claims"]}
    assert saved["parts"]["at_chance"] == ["acc_word_a", "acc_word_e"]
    assert claims["learning signal"]["value"].startswith("learning")
    assert saved["verdict"] == "NOT READY" and saved["reasons"][0].startswith(
        "gate 0.95 on acc not reached: acc can reach at most 0.87"), saved["reasons"]
    assert "while 2 of 8 parts sit at chance 0.5 (acc_word_a, acc_word_e)" in saved["reasons"][0]
    assert saved["learning"]["projection"]["lower_bound"] == pytest.approx(2 * 0.6931471805599453 / 8)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"trainlab: preflight NOT READY: {saved['reasons'][0]}"), last
