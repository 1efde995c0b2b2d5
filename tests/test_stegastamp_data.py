"""The StegaStamp experiment's images (data.py) and its text <-> secret bits codec (codec.py)."""

from __future__ import annotations

import importlib.util
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainlab.config import from_dict
from trainlab.errors import ConfigError, UsageError
from trainlab.experiments.stegastamp.codec import bits_to_text, layout_for, text_to_bits
from trainlab.experiments.stegastamp.data import (SHIPPED_PHOTOS, ImageStream, StegaStampDataConfig, image_split,
                                                  load_image)

# the optional dependencies (pip install 'trainlab[stegastamp]'); the rest runs without them
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
needs_bchlib = pytest.mark.skipif(importlib.util.find_spec("bchlib") is None, reason="bchlib not installed")


def run_config(data: StegaStampDataConfig | None = None, *, seed: int = 0, micro_batch: int = 8,
               image_size: int = 32, secret_size: int = 100):
    """The parts of a RunConfig that ImageStream reads."""
    return SimpleNamespace(model=SimpleNamespace(image_size=image_size, secret_size=secret_size),
                           train=SimpleNamespace(micro_batch=micro_batch, seed=seed),
                           data=data or StegaStampDataConfig())


@pytest.fixture(scope="module")
def shipped() -> ImageStream:
    pytest.importorskip("skimage")
    return ImageStream(run_config(), "cpu")


# ---- the shipped photographs -------------------------------------------------------------------
def test_shipped_photographs_split_into_disjoint_train_and_held_out_images(shipped):
    info = shipped.describe()
    assert info["val_names"] == ["chelsea.png", "coffee.png"]
    assert info["train_images"] == len(SHIPPED_PHOTOS) - 2 and info["val_images"] == 2
    assert not set(info["train_names"]) & set(info["val_names"])
    # the near-identical motorcycle frames are not split across train and validation
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= set(info["train_names"])
    assert info["train_pixels"] > 10**6 and info["val_pixels"] > 10**5


def test_batch_shapes_dtypes_and_range(shipped):
    batch = shipped.batch(0, 0, None)
    image, secret = batch["image"], batch["secret"]
    assert image.shape == (8, 3, 32, 32) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05  # real pictures, not a constant
    assert secret.shape == (8, 100) and secret.dtype == torch.float32
    assert set(secret.unique().tolist()) == {0.0, 1.0}
    assert isinstance(batch["seed"], int) and 0 <= batch["seed"] < 2**63


def test_batch_is_a_pure_function_of_seed_step_and_micro(shipped):
    again = ImageStream(run_config(), "cpu")
    torch.manual_seed(123)  # the global RNG must play no part
    np.random.seed(123)
    first = again.batch(5, 1, None)
    shipped.batch(99, 0, None)  # what ran before must not matter either
    second = shipped.batch(5, 1, 0.5)
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["secret"], second["secret"])
    assert first["seed"] == second["seed"]
    other_seed = ImageStream(run_config(seed=1), "cpu")
    for other in (shipped.batch(6, 1, None), shipped.batch(5, 0, None), other_seed.batch(5, 1, None)):
        assert not torch.equal(other["image"], first["image"])
        assert not torch.equal(other["secret"], first["secret"])
        assert other["seed"] != first["seed"]


def test_eval_batch_is_fixed(shipped):
    evaluation = shipped.eval_batch()
    assert evaluation["image"].shape == (64, 3, 32, 32) and evaluation["secret"].shape == (64, 100)
    assert shipped.eval_batch() is evaluation
    fresh = ImageStream(run_config(seed=7), "cpu").eval_batch()  # train.seed does not move it
    assert torch.equal(fresh["image"], evaluation["image"]) and torch.equal(fresh["secret"], evaluation["secret"])


@needs_skimage
def test_batch_time():
    stream = ImageStream(run_config(image_size=64), "cpu")
    for step in range(10):  # decode every training image into the cache
        stream.batch(step, 0, None)
    times = []
    for step in range(30):
        start = time.perf_counter()
        stream.batch(step, 0, None)
        times.append(time.perf_counter() - start)
    # about 3 ms on one core; the bound leaves room for a loaded machine
    assert np.median(times) < 0.05, f"median batch time {np.median(times) * 1e3:.1f} ms"


def test_missing_scikit_image_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(UsageError, match=r"pip install 'trainlab\[stegastamp\]'.*data\.path") as info:
        image_split(StegaStampDataConfig())
    assert "\n" not in str(info.value)


# ---- a user's folder ---------------------------------------------------------------------------
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (200, 200, 200), (10, 20, 30)]


def write_folder(root) -> list[tuple[int, int, int]]:
    """Six solid-colour images in several formats: a crop's colour tells which image it came from."""
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), COLOURS[0]).save(root / "a.png")
    Image.new("RGB", (50, 50), COLOURS[1]).save(root / "b.jpg", quality=95)
    Image.new("RGB", (36, 48), COLOURS[2]).save(root / "sub" / "c.bmp")
    Image.new("RGB", (64, 40), COLOURS[3]).save(root / "sub" / "d.webp", lossless=True)
    Image.new("L", (45, 45), 200).save(root / "grey.png")
    Image.new("RGBA", (30, 40), COLOURS[5] + (90,)).save(root / "alpha.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.png").write_bytes(b"never read")
    return COLOURS


def colours_of(images: torch.Tensor) -> set[int]:
    """Which COLOURS each crop shows (each crop is one solid colour)."""
    found = set()
    for crop in images:
        mean = crop.mean(dim=(1, 2)) * 255
        distance = torch.tensor([(mean - torch.tensor(c, dtype=torch.float32)).abs().max() for c in COLOURS])
        assert distance.min() < 6, f"crop colour {mean.tolist()} is none of the images'"
        found.add(int(distance.argmin()))
    return found


def test_user_folder_with_mixed_formats(tmp_path):
    write_folder(tmp_path)
    data = StegaStampDataConfig(path=str(tmp_path), val_images=2, eval_crops=16)
    stream = ImageStream(run_config(data, image_size=24, micro_batch=16), "cpu")
    info = stream.describe()
    assert info["train_images"] + info["val_images"] == 6
    assert not set(info["train_names"]) & set(info["val_names"])
    assert "sub/c.bmp" in info["train_names"] + info["val_names"]
    names = ["a.png", "b.jpg", "sub/c.bmp", "sub/d.webp", "grey.png", "alpha.png"]
    val_colours = {names.index(n) for n in info["val_names"]}
    train_colours = {names.index(n) for n in info["train_names"]}
    assert colours_of(stream.eval_batch()["image"]) == val_colours  # round-robin: every held-out image
    seen = set()
    for step in range(8):
        seen |= colours_of(stream.batch(step, 0, None)["image"])
    assert seen == train_colours  # training never reads a held-out image
    # the split is the folder's, not the run's
    assert ImageStream(run_config(data, seed=3), "cpu").describe()["val_names"] == info["val_names"]


def test_cache_bound_does_not_change_batches(tmp_path):
    write_folder(tmp_path)
    data = StegaStampDataConfig(path=str(tmp_path), val_images=1)
    small = ImageStream(run_config(StegaStampDataConfig(path=str(tmp_path), val_images=1, cache_images=2)), "cpu")
    large = ImageStream(run_config(data), "cpu")
    for step in range(4):
        assert torch.equal(small.batch(step, 0, None)["image"], large.batch(step, 0, None)["image"])
        assert len(small._cache) <= 2
    assert len(large._cache) == 5


def test_load_image_expands_greyscale_and_drops_alpha(tmp_path):
    write_folder(tmp_path)
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (3, 45, 45) and grey.dtype == torch.float32
    assert torch.allclose(grey, torch.full_like(grey, 200 / 255))
    rgba = load_image(tmp_path / "alpha.png")
    assert rgba.shape == (3, 40, 30)
    assert torch.allclose(rgba[:, 0, 0] * 255, torch.tensor([10.0, 20.0, 30.0]))


def one_line_error(exc_info, *needles: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_folder_and_a_file_instead_of_a_folder(tmp_path):
    with pytest.raises(ConfigError) as info:
        image_split(StegaStampDataConfig(path=str(tmp_path / "nope")))
    one_line_error(info, "data.path", "nope", "does not exist", "jpg")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        image_split(StegaStampDataConfig(path=str(tmp_path / "x.png")))
    one_line_error(info, "x.png", "is not a folder")


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError) as info:
        image_split(StegaStampDataConfig(path=str(tmp_path)))
    one_line_error(info, str(tmp_path), "holds no image files", "png")


def test_corrupt_image_file(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"this is no JPEG at all" * 10)
    with pytest.raises(UsageError) as info:
        ImageStream(run_config(StegaStampDataConfig(path=str(tmp_path))), "cpu")
    one_line_error(info, "broken.jpg", "cannot be read as an image", "not a known image format")


def test_truncated_images(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for ext in ("png", "jpg"):
        Image.fromarray(noise).save(tmp_path / f"full.{ext}")
        whole = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(whole[: len(whole) // 2])
    # a PNG's chunks are checked when the stream is built; a JPEG's header is whole, so its pixels
    # fail on decoding
    with pytest.raises(UsageError) as info:
        ImageStream(run_config(StegaStampDataConfig(path=str(tmp_path), val_images=1)), "cpu")
    one_line_error(info, "cut.png", "cannot be read as an image")
    (tmp_path / "cut.png").unlink()
    stream = ImageStream(run_config(StegaStampDataConfig(path=str(tmp_path), val_images=1)), "cpu")
    with pytest.raises(UsageError) as info:
        for step in range(20):
            stream.eval_batch()
            stream.batch(step, 0, None)
    one_line_error(info, "cut.jpg", "cannot be read as an image", "truncated")
    with pytest.raises(UsageError) as info:
        load_image(tmp_path / "cut.jpg")
    one_line_error(info, "cut.jpg", "cannot be read as an image")
    with pytest.raises(UsageError) as info:
        load_image(tmp_path / "absent.png")
    one_line_error(info, "absent.png", "no such file")


def test_too_few_images(tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "only.png")
    Image.new("RGB", (20, 20), (4, 5, 6)).save(tmp_path / "second.png")
    with pytest.raises(ConfigError) as info:
        image_split(StegaStampDataConfig(path=str(tmp_path)))  # 2 held out + 1 for training
    one_line_error(info, "holds 2 images, fewer than the 3 needed", "data.val_images=2")
    with pytest.raises(ConfigError) as info:
        image_split(StegaStampDataConfig(path=str(tmp_path), val_images=1, min_images=4))
    one_line_error(info, "fewer than the 4 needed", "data.min_images=4")
    assert len(image_split(StegaStampDataConfig(path=str(tmp_path), val_images=1)).train) == 1


def test_crop_scale_bounds():
    with pytest.raises(ConfigError, match=r"data.crop_scale.*least <= most"):
        from_dict(StegaStampDataConfig, {"crop_scale": [0.9, 0.5]}, "data")
    with pytest.raises(ConfigError, match=r"data.crop_scale"):
        from_dict(StegaStampDataConfig, {"crop_scale": [0.0, 0.5]}, "data")
    assert from_dict(StegaStampDataConfig, {"crop_scale": [0.5, 0.5]}, "data").crop_scale == (0.5, 0.5)


# ---- the codec ---------------------------------------------------------------------------------
@needs_bchlib
def test_layouts():
    reference = layout_for(100)  # tancik/StegaStamp encode_image.py: 7 + 5 bytes, BCH(t=5, poly 137), 4 pad
    assert (reference.data_bytes, reference.ecc_bits, reference.t, reference.pad_bits, reference.prim_poly) == \
        (7, 40, 5, 4, 137)
    assert [(lay.data_bytes, lay.ecc_bits, lay.t, lay.pad_bits) for lay in map(layout_for, (32, 64, 256))] == \
        [(1, 24, 4, 0), (4, 32, 5, 0), (26, 40, 5, 8)]
    raw = layout_for(12)  # no code leaves a data byte
    assert (raw.data_bytes, raw.t, raw.ecc_bits, raw.pad_bits) == (1, 0, 0, 4)
    for size in (16, 24, 32, 48, 64, 100, 128, 256, 1000):
        lay = layout_for(size)
        assert 8 * lay.data_bytes + lay.ecc_bits + lay.pad_bits == size
        assert lay.codeword_bits <= 2**lay.m - 1  # fits one codeword


@needs_bchlib
@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_round_trip_and_t_errors_corrected(size):
    lay = layout_for(size)
    rng = np.random.default_rng(size)
    codeword_bits = lay.codeword_bits
    for trial in range(20):
        text = "".join(chr(c) for c in rng.integers(32, 127, rng.integers(0, lay.max_text_bytes + 1)))
        bits = text_to_bits(text, size)
        assert bits.shape == (size,) and bits.dtype == torch.float32
        assert bits_to_text(bits).text == text and bits_to_text(bits).corrected == 0
        flipped = bits.clone()
        where = torch.from_numpy(rng.choice(codeword_bits, lay.t, replace=False))
        flipped[where] = 1 - flipped[where]
        decoded = bits_to_text(flipped)
        assert (decoded.text, decoded.corrected, decoded.ok) == (text, lay.t, True)


@needs_bchlib
@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_more_than_t_errors_never_pass_for_the_original(size):
    """Beyond t errors BCH either reports failure or miscorrects to another codeword: it can never
    return the original text as read correctly (the code's distance is more than 2t)."""
    lay = layout_for(size)
    rng = np.random.default_rng(1000 + size)
    codeword_bits = lay.codeword_bits
    refused = 0
    for trial in range(30):
        text = "".join(chr(c) for c in rng.integers(32, 127, lay.max_text_bytes))
        bits = text_to_bits(text, size)
        where = torch.from_numpy(rng.choice(codeword_bits, lay.t + 1, replace=False))
        bits[where] = 1 - bits[where]
        decoded = bits_to_text(bits)
        assert not (decoded.ok and decoded.text == text)
        refused += not decoded.ok
    assert refused > 0


@needs_bchlib
def test_bits_in_other_forms():
    bits = text_to_bits("hi!", 100)
    assert bits_to_text(bits.bool()).text == "hi!"
    assert bits_to_text(bits * 0.8 + 0.1).text == "hi!"  # probabilities
    assert bits_to_text((bits - 0.5) * 8, logits=True).text == "hi!"
    assert bits_to_text(bits.numpy()).text == "hi!"


@needs_bchlib
def test_raw_layout_without_ecc():
    decoded = bits_to_text(text_to_bits("A", 12))
    assert (decoded.text, decoded.corrected, decoded.ok) == ("A", None, True)


@needs_bchlib
def test_text_too_long_and_nul_refused():
    with pytest.raises(UsageError) as info:
        text_to_bits("12345678", 100)
    assert str(info.value) == ("text of 8 bytes does not fit a 100-bit secret: at most 7 bytes "
                               "(56 data bits + 40 BCH bits)")
    with pytest.raises(UsageError, match="text of 8 bytes"):
        text_to_bits("çççç", 100)  # 4 characters, 8 UTF-8 bytes
    with pytest.raises(UsageError, match="NUL"):
        text_to_bits("a\x00b", 100)


@needs_bchlib
def test_non_ascii_round_trip():
    assert bits_to_text(text_to_bits("çay", 100)).text == "çay"
    assert bits_to_text(text_to_bits("çaylar", 100)).text == "çaylar"  # 7 bytes: the whole room
    assert bits_to_text(text_to_bits("", 100)).text == ""
    assert bits_to_text(text_to_bits("Grüße, 世界", 256)).text == "Grüße, 世界"
