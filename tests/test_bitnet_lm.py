"""bitnet_lm: the collapse metric, the corpus and its split, the model, the two-stage schedule,
width-scaled LR, and real runs of the tiny preset through the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import final_weights, history, trainlab
from trainlab.config import ScheduleConfig, resolve
from trainlab.engine import schedules
from trainlab.engine.logs import read_events, read_metrics
from trainlab.engine.trainer import Trainer
from trainlab.errors import ConfigError
from trainlab.experiments.bitnet_lm import EXPERIMENT, distinct_predictions
from trainlab.experiments.bitnet_lm.data import CORPUS_FILE, BPETokenizer, read_text, split_text, tokenized_corpus
from trainlab.experiments.bitnet_lm.model import BitLM, BitLMModelConfig, resolved_shape

SMOKE = ["run", "bitnet_lm", "--preset", "smoke"]


# ------------------------------------------------------------------ the collapse metric

def test_distinct_predictions_counts_argmax_tokens_of_a_hand_made_batch():
    vocab = 6
    logits = torch.full((2, 3, vocab), -1.0)
    argmax = [[3, 3, 5], [0, 3, 5]]  # three different tokens predicted
    for b in range(2):
        for t in range(3):
            logits[b, t, argmax[b][t]] = 2.0
    value = distinct_predictions(logits, vocab)
    assert value.shape == () and value.item() == 3.0
    # one token everywhere: the seed's degenerate decoding
    assert distinct_predictions(torch.zeros(4, 8, vocab).index_fill_(-1, torch.tensor([2]), 1.0), vocab).item() == 1.0


# ------------------------------------------------------------------ corpus and split

def test_embedded_corpus_is_the_documented_snapshot():
    data = gzip.decompress(CORPUS_FILE.read_bytes())
    notice = (CORPUS_FILE.parent / "NOTICE").read_text()
    assert hashlib.sha256(data).hexdigest() in notice
    assert f"{len(data):,}" in notice
    text = data.decode("utf-8")
    assert text.count(" the ") > 5000  # English prose, not code or noise


def test_split_is_fixed_by_its_seed_disjoint_and_complete():
    text = "".join(f"block {i:04d} " + "x" * 89 for i in range(200))  # 200 blocks of 100
    train, val = split_text(text, 0.1, 100, seed=3)
    assert (train, val) == split_text(text, 0.1, 100, seed=3)
    assert split_text(text, 0.1, 100, seed=4) != (train, val)
    assert len(train) + len(val) == len(text)
    val_blocks = {val[i:i + 100] for i in range(0, len(val), 100)}
    train_blocks = {train[i:i + 100] for i in range(0, len(train), 100)}
    assert len(val_blocks) == 20 and not (val_blocks & train_blocks)


def test_user_text_file_and_folder(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second file ", encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("first file ", encoding="utf-8")
    (tmp_path / "docs" / ".git").mkdir()
    (tmp_path / "docs" / ".git" / "index").write_bytes(b"\xff\x00 binary")  # hidden entries are skipped
    (tmp_path / "docs" / ".cache.bin").write_bytes(b"\xff\x00 binary")
    assert read_text(str(tmp_path / "docs")) == "first file \n\nsecond file "
    (tmp_path / "one.txt").write_text("héllo", encoding="utf-8")
    assert read_text(str(tmp_path / "one.txt")) == "héllo"
    (tmp_path / "long.txt").write_text("ünïcode text, " * 400, encoding="utf-8")
    corpus = tokenized_corpus(str(tmp_path / "long.txt"), "bytes", 4096, 0.2, 512, 0)
    assert len(corpus.train) + len(corpus.val) == len(("ünïcode text, " * 400).encode("utf-8"))


@pytest.mark.parametrize("setup,needle", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"\xff\xfe bad bytes" * 100), "is not UTF-8"),
    (lambda p: p.write_text("too short", encoding="utf-8"), "at least two blocks"),
])
def test_bad_corpus_paths_exit_2_with_one_line(tmp_path: Path, setup, needle):
    path = tmp_path / "corpus.txt"
    setup(path)
    proc = trainlab(*SMOKE, "--set", f"data.path={path}", "--run-dir", "r", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_bits_per_byte_of_byte_tokens_is_nats_over_ln2():
    corpus = tokenized_corpus("embedded", "bytes", 4096, 0.05, 8192, 0)
    assert corpus.vocab_size == 256
    assert corpus.bits_per_byte_factor("val") == pytest.approx(1 / math.log(2))


def test_bpe_is_deterministic_and_reports_bits_per_byte(tmp_path: Path):
    pytest.importorskip("tokenizers")
    text = read_text("embedded")[:200_000]
    a, b = BPETokenizer(text, 400, 8192), BPETokenizer(text, 400, 8192)
    sample = text[5000:6000]
    assert a.encode(sample) == b.encode(sample)
    assert a.vocab_size == 400 and a.decode(a.encode(sample)) == sample
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    corpus = tokenized_corpus(str(tmp_path / "t.txt"), "bpe", 400, 0.05, 8192, 0)
    # BPE tokens hold more than a byte each, so nats per token convert with tokens/bytes < 1
    assert corpus.bits_per_byte_factor("train") < 1 / math.log(2)


def test_bpe_without_tokenizers_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match="tokenizers package"):
        BPETokenizer("some text " * 100, 300, 256)


# ------------------------------------------------------------------ the model

def test_model_is_causal_and_shapes_follow_the_width():
    torch.manual_seed(0)
    cfg = BitLMModelConfig(hidden=64, layers=2, heads=2)
    model = BitLM(cfg, vocab_size=256, max_seq_len=16).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 256, (2, 6))  # change only the future of position 9
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 16, 256)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert resolved_shape(BitLMModelConfig(hidden=256)) == (4, 4)
    assert resolved_shape(BitLMModelConfig(hidden=512)) == (6, 8)
    assert resolved_shape(BitLMModelConfig(hidden=768)) == (8, 12)
    assert resolved_shape(BitLMModelConfig(hidden=1024)) == (8, 16)
    for name, shape in (("s256", (4, 4)), ("s512", (6, 8)), ("s768", (8, 12)), ("s1024", (8, 16))):
        model_cfg = EXPERIMENT.presets[name].overrides["model"]
        assert (model_cfg["layers"], model_cfg["heads"]) == shape


# ------------------------------------------------------------------ schedule and LR scaling

def test_two_stage_schedule_holds_the_peak_then_decays_with_weight_decay_off():
    cfg = ScheduleConfig(warmup=10, decay="cosine", min_lr_ratio=0.1, two_stage_at=0.5)
    total = 100
    assert schedules.lr_multiplier(cfg, 0, total) == 0.0
    assert schedules.lr_multiplier(cfg, 10, total) == 1.0
    assert schedules.lr_multiplier(cfg, 49, total) == 1.0
    assert schedules.lr_multiplier(cfg, 50, total) == 1.0  # stage 2 starts from the peak...
    assert schedules.lr_multiplier(cfg, 75, total) < 1.0  # ...and decays
    assert schedules.lr_multiplier(cfg, 200, total) == pytest.approx(0.1)
    assert [schedules.weight_decay_multiplier(cfg, s, total) for s in (0, 49, 50, 99)] == [1, 1, 0, 0]
    stage_one_only = ScheduleConfig(warmup=10, two_stage_at=1.0)
    assert schedules.lr_multiplier(stage_one_only, 99, total) == 1.0
    assert schedules.weight_decay_multiplier(stage_one_only, 99, total) == 1.0


def test_two_stage_with_explicit_phases_is_refused(tmp_path: Path):
    proc = trainlab(*SMOKE, "--set", "schedule.phases=[{kind: constant}]", "--run-dir", "r", cwd=tmp_path)
    assert proc.returncode == 2 and "two_stage_at" in proc.stderr


def test_run_logs_weight_decay_off_in_stage_two_and_sqrt_lr_scale(tmp_path: Path):
    proc = trainlab(*SMOKE, "--set", "optim.lr_scale=sqrt", "--set", "model.hidden=64", "--run-dir", "r",
                    cwd=tmp_path, check=True)
    assert proc.returncode == 0
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    by_step = {r["step"]: r for r in rows}
    assert by_step[10]["weight_decay"] == pytest.approx(0.1) and by_step[30]["weight_decay"] == 0.0
    peak = 3e-3 * math.sqrt(256 / 64)  # the smoke preset's LR, doubled for a model 4x narrower than 256
    assert max(r["lr"] for r in rows) == pytest.approx(peak)
    scaled = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "lr_scaled"]
    assert scaled and scaled[0]["peak_lr"] == pytest.approx(peak) and scaled[0]["width"] == 64


# ------------------------------------------------------------------ real runs

def test_smoke_run_logs_metrics_samples_and_the_collapse_alert(tmp_path: Path):
    proc = trainlab(*SMOKE, "--run-dir", "r", cwd=tmp_path, check=True)
    run = tmp_path / "r"
    rows = read_metrics(run / "metrics.csv")
    evals = [r for r in rows if isinstance(r.get("distinct_preds"), (int, float))]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        assert 1 <= r["distinct_preds"] <= 256 and r["distinct_targets"] > 10
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-5)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10, 20, 30]
    assert all(s["prompt"] and isinstance(s["greedy"], str) and isinstance(s["sampled"], str) for s in samples)
    events = read_events(run / "events.jsonl")
    start = next(e for e in events if e["kind"] == "start")
    assert start["params"] > start["params_embedding"] == 256 * 32
    # 30 steps of a 32-wide model predict one or two distinct bytes: the collapse detector says so
    alerts = [e for e in events if e["kind"] == "alert" and e.get("detector") == "collapse"]
    assert alerts and "distinct_preds" in alerts[0]["message"], [e["kind"] for e in events]
    assert "distinct_preds" in proc.stdout
    assert "## Samples" in (run / "report.md").read_text()  # the report shows what the model wrote


def test_resume_is_exact(tmp_path: Path):
    exp = EXPERIMENT
    cfg = resolve(exp, "smoke", None, [("data.sample_tokens", "4")], None)
    Trainer(cfg, exp, tmp_path / "ref", torch.device("cpu")).fit()
    Trainer(cfg, exp, tmp_path / "cut", torch.device("cpu"), stop_at=20).fit()
    Trainer(cfg, exp, tmp_path / "cut", torch.device("cpu")).fit()
    assert history(tmp_path / "cut") == history(tmp_path / "ref")
    samples = [(tmp_path / d / "samples.jsonl").read_text().splitlines() for d in ("ref", "cut")]
    strip = [[{k: v for k, v in json.loads(s).items() if k != "time"} for s in lines] for lines in samples]
    assert strip[0] == strip[1]


def test_compiled_training_step_matches_eager_and_checkpoints_plain_keys(tmp_path: Path):
    common = [*SMOKE, "--steps", "10", "--set", "eval.every=0", "--set", "data.sample_tokens=0"]
    trainlab(*common, "--run-dir", "eager", cwd=tmp_path, check=True)
    trainlab(*common, "--set", "train.compile=true", "--run-dir", "compiled", cwd=tmp_path, check=True, timeout=300)
    eager, compiled = (read_metrics(tmp_path / d / "metrics.csv") for d in ("eager", "compiled"))
    assert [r["step"] for r in eager] == [r["step"] for r in compiled]
    for a, b in zip(eager, compiled):  # inductor's fused kernels round differently, no more
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    keys = final_weights(tmp_path / "compiled").keys()
    assert keys == final_weights(tmp_path / "eager").keys() and not any("_orig_mod" in k for k in keys)
