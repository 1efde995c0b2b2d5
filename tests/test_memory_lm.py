"""memory_lm through its real entry points: a smoke run's metrics (bits per byte and per character, the
learned lambdas and their retention after 1,024 bytes, recall by distance with its intervals), the
ablation's network, the user's own non-ASCII text, config errors, exact resume after SIGKILL, the sweep's
conclusion rules, and preflight telling an early drop toward the byte frequencies from learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, final_weights, history, kill_then_resume, trainlab
from trainlab.engine.logs import read_events, read_metrics
from trainlab.experiments.memory_lm.ablation import Arm, Recall, _compare, newcombe_difference
from trainlab.health.preflight import _learning_claim
from trainlab.sweep.report import PointResult

SMOKE = ["run", "memory_lm", "--preset", "smoke"]
TURKISH = ("Türkçe metin öğrenmek için çok güzel bir dil. Şu anda ğüşıöç harfleri iki bayt tutar. " * 60 + "\n") * 8


def arrays(run_dir: Path, name: str) -> list[dict]:
    return [r for r in read_events(run_dir / "eval_arrays.jsonl") if r["name"] == name]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("smoke")
    trainlab(*SMOKE, "--run-dir", str(cwd / "run"), cwd=cwd, check=True)
    return cwd / "run"


def test_smoke_run_logs_bits_per_byte_lambdas_and_recall_with_intervals(smoke_run):
    rows = [r for r in read_metrics(smoke_run / "metrics.csv") if r.get("val_bpb") is not None]
    assert [r["step"] for r in rows] == [10, 20, 30]
    last = rows[-1]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2), rel=1e-5)
    assert last["val_bpb"] < 8.0  # below the uniform guess over 256 bytes after 30 steps
    assert last["val_bpc"] == pytest.approx(last["val_bpb"], rel=0.02)  # English: almost one byte per character
    # the Phase 8 form: lambda = lambda_min + (1 - lambda_min) sigmoid(logit), logged as learned
    lam = arrays(smoke_run, "decay_lambda")[-1]
    ret = arrays(smoke_run, "retention_1024")[-1]
    assert lam["shape"] == [2, 2] == ret["shape"]
    for lv, rv in zip(lam["values"], ret["values"]):
        assert 0.99 <= lv < 1.0
        assert rv == pytest.approx(lv ** 1024, rel=1e-3, abs=1e-6)
    # the horizon 1 / (1 - lambda) keeps what six decimals of lambda lose; retention = (1 - 1/horizon)^1024
    horizon = arrays(smoke_run, "memory_horizon")[-1]["values"]
    for h, rv in zip(horizon, ret["values"]):
        assert h >= 100  # lambda >= lambda_min = 0.99
        assert rv == pytest.approx((1 - 1 / h) ** 1024, rel=1e-4)
    assert last["memory_horizon_min"] == pytest.approx(min(horizon), rel=1e-5)
    assert last["decay_lambda_min"] == pytest.approx(min(lam["values"]), abs=1e-6)
    assert last["retention_1024_max"] == pytest.approx(max(ret["values"]), rel=1e-3, abs=1e-6)
    # recall at 0.5 and 2 windows (the smoke preset's distances), 8 probes each, with Wilson intervals
    table = arrays(smoke_run, "recall")[-1]
    assert table["shape"] == [2, 9]
    for i, multiple in enumerate((0.5, 2.0)):
        row = table["values"][9 * i: 9 * i + 9]
        mult, distance, trials, exact, lo, hi, char, clo, chi = row
        # the shortest probe is key + 15 bytes of template: half a window of 32 is raised to 19 bytes
        assert mult == multiple and distance == max(19, 32 * multiple) and trials == 8
        assert lo <= exact <= hi and clo <= char <= chi
        assert last[f"recall_exact_{'half_w' if multiple == 0.5 else '2w'}"] == pytest.approx(exact, abs=1e-6)
    samples = [json.loads(line) for line in (smoke_run / "samples.jsonl").read_text().splitlines()]
    assert {"greedy", "sampled", "prompt", "recall"} <= set(samples[-1])
    assert [a["distance"] for a in samples[-1]["recall"]] == [19, 64]
    assert all(len(a["key"]) == 4 for a in samples[-1]["recall"])
    start = next(e for e in read_events(smoke_run / "events.jsonl") if e["kind"] == "start")
    assert start["params"] > 0


def test_memory_off_is_the_same_network_without_memory_parameters(tmp_path, smoke_run):
    proc = trainlab(*SMOKE, "--set", "model.memory=off", "--set", "train.steps=10", "--run-dir", str(tmp_path / "off"),
                    cwd=tmp_path, check=True)
    on = next(e for e in read_events(smoke_run / "events.jsonl") if e["kind"] == "start")
    off = next(e for e in read_events(tmp_path / "off" / "events.jsonl") if e["kind"] == "start")
    # the count is said at the start, with the effective batch
    assert (f"trainlab: starting off: {off['params']:,} parameters ({off['params_embedding']:,} in embeddings), "
            "effective batch 4 x 1 = 4, fp32 on cpu") in proc.stderr.splitlines()
    assert on["params"] - off["params"] == 2 * 2 * 2  # a decay and a gate logit per head, 2 heads x 2 layers
    row = [r for r in read_metrics(tmp_path / "off" / "metrics.csv") if r.get("val_bpb") is not None][-1]
    assert row.get("decay_lambda_min") is None and not arrays(tmp_path / "off", "decay_lambda")
    assert row.get("recall_exact_2w") is not None  # the recall test runs without memory too: the ablation


def test_non_ascii_user_text_trains_and_counts_characters(tmp_path):
    corpus = tmp_path / "turkish.txt"
    corpus.write_text(TURKISH, encoding="utf-8")
    trainlab(*SMOKE, "--set", f"data.path={corpus}", "--set", "data.split_block=1024", "--set", "train.steps=10",
             "--run-dir", str(tmp_path / "run"), cwd=tmp_path, check=True)
    row = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r.get("val_bpb") is not None][-1]
    raw = TURKISH.encode("utf-8")
    assert len(raw) > len(TURKISH) * 1.05  # really two-byte letters
    assert row["val_bpc"] > row["val_bpb"] * 1.03  # bits per character > bits per byte where letters are 2 bytes


@pytest.mark.parametrize("setting, key", [
    ("model.heads=3", "model.heads"),
    ("data.recall_multiples=[3]", "data.recall_multiples"),
    ("model.lambda_min=1.0", "model.lambda_min"),
    ("data.path=/no/such/corpus.txt", "data.path"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, setting, key):
    proc = trainlab(*SMOKE, "--set", setting, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_sigkill_and_rerun_gives_the_uninterrupted_history(tmp_path, smoke_run):
    args = [*SMOKE, "--set", "ckpt.every=5"]
    trainlab(*args, "--run-dir", str(tmp_path / "whole"), cwd=tmp_path, check=True)
    kill_then_resume(args, tmp_path / "killed", tmp_path, kill_at=17)
    assert history(tmp_path / "killed") == history(tmp_path / "whole")
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed"))


def test_sweep_on_off_writes_the_ablation_table_and_a_conclusion(tmp_path):
    proc = trainlab("sweep", "memory_lm", "--preset", "smoke", "--steps", "10", "--grid", "model.memory=on,off",
                    "--sweep-dir", str(tmp_path / "sweep"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    (conclusion,) = summary["conclusions"]
    assert conclusion["rule"] in {"1", "2", "3", "4", "5"}
    assert any("positive control" in n for n in conclusion["numbers"])
    assert any("held-out bits per byte" in n for n in conclusion["numbers"])
    (table,) = summary["tables"]
    assert [r[1] for r in table["rows"]] == ["on", "off"]
    assert "recall 2 window" in table["headers"]
    report = (tmp_path / "sweep" / "sweep_report.md").read_text()
    assert "memory\\_lm's own sweep rules" in report and "power law" not in report


# ------------------------------------------------------------------ the ablation's rules on hand-made numbers

def _arm(memory: bool, recall: dict[float, tuple[int, int]], bpb: float = 2.0) -> Arm:
    point = PointResult("on" if memory else "off", {}, Path("."), "finished", 10, 10, None, "val_loss", None,
                        [], [], None, None)
    return Arm(point, memory, bpb, [bpb + 0.01 * i for i in range(8)],
               {m: Recall(k, n, int(64 * m)) for m, (k, n) in recall.items()}, receptive_field=60, window=64)


@pytest.mark.parametrize("on, off, rule", [
    ({0.5: (40, 48), 2: (30, 48), 4: (20, 48)}, {0.5: (40, 48), 2: (2, 48), 4: (0, 48)}, "1"),  # helps
    ({0.5: (40, 48), 2: (0, 48), 4: (0, 48)}, {0.5: (40, 48), 2: (20, 48), 4: (1, 48)}, "2"),  # hurts
    ({0.5: (40, 200), 2: (1, 200), 4: (0, 200)}, {0.5: (40, 200), 2: (1, 200), 4: (1, 200)}, "3"),  # no help seen
    ({0.5: (2, 48), 2: (0, 48), 4: (0, 48)}, {0.5: (2, 48), 2: (0, 48), 4: (0, 48)}, "4"),  # control fails
    ({0.5: (20, 24), 2: (3, 24), 4: (2, 24)}, {0.5: (20, 24), 2: (1, 24), 4: (1, 24)}, "5"),  # too few trials
])
def test_ablation_rules(on, off, rule):
    c = _compare("lambda_min=0.99", [(_arm(True, on, 1.9), _arm(False, off, 2.0))])
    assert c.rule == rule, c.verdict
    assert any("paired 95 % t interval over the 8 evaluation sequences" in n for n in c.numbers)
    # every sequence 0.1 bits/byte lower with memory: the verdict ends with it
    assert c.verdict.endswith("the memory lowers held-out bits per byte: -0.1000 [-0.1000, -0.1000] bits/byte, "
                              "over the evaluation text only, one seed")


def test_ablation_pools_recall_and_judges_bits_per_byte_over_seeds():
    pairs = [(_arm(True, {0.5: (30, 35), 2: (20, 35)}, bpb), _arm(False, {0.5: (30, 35), 2: (0, 35)}, 2.0))
             for bpb in (2.05, 2.04, 2.06)]
    c = _compare("all points", pairs)
    assert c.rule == "1" and "over 3 seeds" in c.verdict
    assert "the memory raises held-out bits per byte (worse): +0.0500" in c.verdict
    assert any(n.startswith("2 window (128 bytes): on 60/105") for n in c.numbers), c.numbers


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80, method 10: 0.2000 [0.0524, 0.3339]
    d, lo, hi = newcombe_difference(56, 70, 48, 80)
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (0.2, 0.0524, 0.3339)


# ------------------------------------------------------------------ preflight: an early drop is not learning

def _rows(losses):
    return [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]


def test_a_fall_that_stays_above_the_byte_frequencies_is_a_warning_not_learning():
    falling_to_frequencies = [5.5 - 1.0 * (1 - math.exp(-i / 10)) + 0.01 * ((i * 7) % 3) for i in range(60)]
    claim, outcome, details = _learning_claim(_rows(falling_to_frequencies), math.log(256), context_free=3.3)
    assert claim.verdict == "warn" and outcome == "frequencies only", claim.value
    assert details["context_free"] == 3.3
    below = [5.5 - 3.0 * (1 - math.exp(-i / 10)) + 0.01 * ((i * 7) % 3) for i in range(60)]
    claim, outcome, _ = _learning_claim(_rows(below), math.log(256), context_free=3.3)
    assert claim.verdict == "pass" and outcome == "learning"


def test_preflight_refuses_three_steps_and_tells_a_drop_toward_the_frequencies_from_learning(tmp_path):
    three = trainlab("preflight", "memory_lm", "--preset", "smoke", "--steps", "3", "--run-dir",
                     str(tmp_path / "three"), cwd=tmp_path)
    assert three.returncode == 2 and "--steps 3" in three.stderr and not (tmp_path / "three").exists()
    proc = trainlab("preflight", "memory_lm", "--preset", "smoke", "--steps", "20", "--run-dir",
                    str(tmp_path / "pre"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "pre" / "preflight.json").read_text())
    assert result["verdict"] == "UNCERTAIN"
    learning = next(c for c in result["claims"] if c["name"] == "learning signal")
    # 20 steps of the smoke model fall from ln 256 = 5.55 but stay above the text's byte entropy (3.29 nats)
    assert learning["verdict"] == "warn" and "output frequencies" in learning["value"]
    assert "context-free level 3.29" in learning["evidence"]
    disk = next(c for c in result["claims"] if c["name"] == "checkpoint disk")
    assert disk["verdict"] == "pass" and "per checkpoint; ckpt.keep 2 retains at most 2" in disk["value"]


def test_memory_off_points_pair_whatever_their_unused_memory_knobs_but_not_across_seeds():
    from trainlab.experiments.memory_lm.ablation import _pairing_key

    def point(**values):
        return PointResult("p", {k.replace("__", "."): v for k, v in values.items()}, Path("."), "finished", 1, 1,
                           None, "val_loss", None, [], [], None, None)

    on = point(model__memory="on", model__lambda_min="0.99", model__decay_init="8", train__seed="1")
    off = point(model__memory="off", model__lambda_min="0.995", model__decay_init="0", train__seed="1")
    other_seed = point(model__memory="off", model__lambda_min="0.99", model__decay_init="8", train__seed="2")
    assert _pairing_key(on) == _pairing_key(off) != _pairing_key(other_seed)
