"""The StegaStamp experiment through the real entry points: a smoke run logs its figures and is
watched for the StegaStamp readiness report's red flags; `trainlab use RUN hide/reveal` round-trips a
text on a model trained here (also through a JPEG re-save); bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("kornia")
pytest.importorskip("bchlib")

from PIL import Image  # noqa: E402

from conftest import trainlab  # noqa: E402
from trainlab.engine.logs import read_events, read_rows  # noqa: E402

# Trains in seconds to a decoder that reads 16 bits back from a 32x32 image: no perturbation but
# noise (which keeps the decoder from reading the rounding of 8-bit pixels), the secret alone.
TINY = ["--preset", "smoke", "--steps", "1000", "--set", "model.secret_size=16", "--set", "model.secret_grid=8",
        "--set", "model.secret_upsample=4", "--set", "model.width=0.25", "--set", "train.micro_batch=8",
        "--set", "model.critic=false", "--set", "model.perturb.off=[warp,blur,contrast,brightness,hue,saturation,jpeg]",
        "--set", "model.perturb.ramp=0", "--set", "schedule.loss_weights={secret: [[0, 1.0]]}",
        "--set", "optim.lr=1e-3", "--set", "eval.every=0", "--set", "ckpt.every=0", "--set", "log.every=100"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("smoke")
    out = trainlab("run", "stegastamp", "--preset", "smoke", "--run-dir", "run", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("tiny")
    out = trainlab("run", "stegastamp", *TINY, "--run-dir", "run", cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr
    return cwd / "run"


def test_smoke_run_logs_every_figure_and_is_watched_for_the_red_flags(smoke: Path):
    rows = read_rows(smoke / "metrics.csv")
    last = rows[-1]
    for name in ("secret_loss", "bit_acc", "l2_loss", "perceptual_loss", "residual_abs_mean", "critic_gap",
                 "val_bit_acc", "val_bit_acc_jpeg", "val_bit_acc_warp", "val_bit_acc_all", "val_exact",
                 "val_within5", "val_psnr", "val_ssim", "val_residual_abs_mean", "val_residual_max"):
        assert isinstance(last.get(name), (int, float)), (name, last.get(name))
    assert 0 <= last["val_bit_acc"] <= 1 and last["val_psnr"] > 0
    config = (smoke / "config.yaml").read_text()
    assert "loss_metric: secret_loss" in config and "residual_abs_mean" in config
    # the critic trained on its own optimizer from its start step (the smoke preset: 10)
    assert [r for r in rows if r["step"] <= 10 and isinstance(r.get("critic_gap"), (int, float))] == []
    assert isinstance(rows[-1]["critic_gap"], (int, float))
    # the detectors the run's end judged include the stuck one (on secret_loss) and the bounds
    check = json.loads((smoke / "check.json").read_text())
    assert {"stuck", "collapse"} <= {c["name"] for c in check["claims"]}


def test_an_l2_weight_far_too_high_is_caught(tmp_path: Path):
    """The StegaStamp readiness report's 'residuals -> 0: encoder collapsed': with the L2 weight at 1000
    from the first step the residual is squeezed to nothing and the bounds detector names it."""
    out = trainlab("run", "stegastamp", "--preset", "smoke", "--steps", "60", "--set", "model.critic=false",
                   "--set", "schedule.loss_weights={secret: [[0, 1.0]], l2: [[0, 1000.0]]}",
                   "--set", "health.warmup_fraction=0", "--run-dir", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    alerts = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e.get("kind") == "alert"]
    bounds = [a for a in alerts if a["detector"] == "collapse" and a["evidence"].get("metric") == "residual_abs_mean"]
    assert bounds, alerts
    assert bounds[0]["evidence"]["value"] < 0.01


def test_hide_and_reveal_round_trip_also_through_jpeg(trained: Path, tmp_path: Path):
    cover = tmp_path / "cover.png"
    # a photograph-like cover larger than the model's 32 pixels: the command crops and resizes it
    from trainlab.experiments.stegastamp.data import SHIPPED_PHOTOS, _shipped_folder

    Image.open(_shipped_folder() / SHIPPED_PHOTOS[0]).convert("RGB").resize((48, 40)).save(cover)
    hidden = tmp_path / "hidden.png"
    out = trainlab("use", str(trained), "hide", str(cover), "A", "--out", str(hidden), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert Image.open(hidden).size == (32, 32)
    back = trainlab("use", str(trained), "reveal", str(hidden), cwd=tmp_path)
    assert back.returncode == 0, back.stdout + back.stderr
    assert back.stdout.strip() == "A"
    again = trainlab("use", str(trained), "hide", str(cover), "A", "--out", str(hidden), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr  # nothing overwritten
    jpeg = tmp_path / "resaved.jpg"
    Image.open(hidden).save(jpeg, quality=95)
    back = trainlab("use", str(trained), "reveal", str(jpeg), cwd=tmp_path)
    assert back.returncode == 0 and back.stdout.strip() == "A", back.stdout + back.stderr


@pytest.mark.parametrize("args,needle", [
    (["hide", "{small}", "A", "--out", "x.png"], "too small"),
    (["hide", "{cover}", "far too long", "--out", "x.png"], "does not fit a 16-bit secret"),
    (["hide", "{cover}", "A", "--out", "x.jpg"], "must end in .png"),
    (["conceal", "{cover}"], "has no command 'conceal'"),
    (["reveal", "{missing}"], "missing.png"),
])
def test_use_refuses_bad_input_in_one_line(trained: Path, tmp_path: Path, args, needle):
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    Image.new("RGB", (64, 64), (120, 80, 40)).save(tmp_path / "cover.png")
    paths = {"small": str(tmp_path / "small.png"), "cover": str(tmp_path / "cover.png"),
             "missing": str(tmp_path / "missing.png")}
    out = trainlab("use", str(trained), *[a.format(**paths) for a in args], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_use_on_a_run_of_another_experiment_is_refused(tmp_path: Path):
    trainlab("run", "modadd", "--preset", "smoke", "--steps", "5", "--run-dir", "m", cwd=tmp_path, check=True)
    out = trainlab("use", "m", "hide", "x.png", "A", "--out", "y.png", cwd=tmp_path)
    assert out.returncode == 2 and "is a modadd run" in out.stderr, out.stderr


@pytest.mark.parametrize("sets,needle", [
    (["loss.perceptual=lpips"], "loss.lpips_weights"),
    (["loss.perceptual=lpips", "loss.lpips_weights=/nonexistent/alex.pth"], "no file"),
    (["schedule.loss_weights={secret: [[0, 1]], mse: [[0, 1]]}"], "not a loss of stegastamp"),
    (["model.critic=false"], "schedule.loss_weights.critic"),
    (["data.path=/nonexistent/photos"], "/nonexistent/photos"),
])
def test_bad_config_is_one_line(tmp_path: Path, sets, needle):
    args = [a for s in sets for a in ("--set", s)]
    out = trainlab("run", "stegastamp", "--preset", "smoke", *args, "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_sigkill_and_resume_is_exact_with_the_critic(tmp_path: Path):
    """The critic's RMSProp state and the perturbations' draws survive a SIGKILL: the resumed run's
    history and weights are those of a run never stopped."""
    from conftest import assert_same_weights, final_weights, history, kill_then_resume

    run = ["run", "stegastamp", "--preset", "smoke", "--steps", "40", "--set", "ckpt.every=10",
           "--set", "eval.every=20"]
    trainlab(*run, "--run-dir", "ref", cwd=tmp_path, check=True)
    # past the checkpoints at 10 and 20 (the critic trains from 10)
    kill_then_resume(run, tmp_path / "killed", tmp_path, kill_at=25)
    assert history(tmp_path / "killed") == history(tmp_path / "ref")
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed"))


def test_preflight_does_not_count_the_critic_as_dead_layers(tmp_path: Path):
    """The critic gets its gradients in its own step (an ExtraUpdate), not in the main one that
    preflight's gradient probe watches; with its loss weight at 0 the main loss never reaches it, and
    it must not read as 'layers without gradient'."""
    out = trainlab("preflight", "stegastamp", "--preset", "smoke", "--steps", "20",
                   "--set", "schedule.loss_weights={secret: [[0, 1.0]]}", "--run-dir", "pf", cwd=tmp_path)
    assert out.returncode in (0, 1), out.stderr
    claims = {c["name"]: c for c in json.loads((tmp_path / "pf" / "preflight.json").read_text())["claims"]}
    assert claims["layers without gradient"]["verdict"] == "pass", claims["layers without gradient"]
