"""Images for the StegaStamp experiment: the colour photographs shipped inside scikit-image, or a
folder of the user's own, split once into training and held-out images, and batches of random
resized crops with random secrets that are a pure function of (train.seed, step, micro).

Split: whole images are held out (crops of one photograph on both sides would leak).  For the
shipped photographs the held-out ones are named below; for a user's folder a generator seeded with
SPLIT_SEED permutes the sorted file list.  Neither depends on train.seed, so runs with different
seeds are scored on the same images.

Every file's header is read when the stream is built (a wrong folder fails at once, cheaply); the
pixels are decoded on first use and kept, as uint8 tensors at a working resolution, in an LRU cache.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainlab.config import knob
from trainlab.engine.state import step_seed
from trainlab.errors import ConfigError, UsageError, brief

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SHIPPED = "scikit-image's sample photographs"
# The colour photographs among scikit-image's data files (the rest are greyscale, synthetic test
# patterns, a colour chart, a logo and a silhouette).  Listed in the order in which they are held
# out: chelsea (a cat) and coffee (a cup on a table) first, as ordinary photographs of everyday
# scenes -- what a user hides a secret in -- whose kind the training set still covers (astronaut,
# rocket, the motorcycle); the unusual domains (a deep-sky image, a retina, a micrograph) stay in
# training so the encoder sees their statistics.  The two motorcycle frames are a stereo pair, nearly
# the same picture: they come last, so they are split up only when all but one image is held out.
SHIPPED_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "hubble_deep_field.jpg",
                  "retina.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png")
SPLIT_SEED = 0  # the user-folder split's permutation; fixed so that it is not train.seed's
# Aspect ratios of the crops, log-uniform in [3/4, 4/3] (torchvision's RandomResizedCrop default).
CROP_ASPECT = (3 / 4, 4 / 3)
# The working resolution keeps the smallest crop at least this many times the output side, so the
# crop is still a (antialiased) downscale and nothing is lost by decoding at reduced size.
WORKING_MARGIN = 2.0


@dataclass
class StegaStampDataConfig:
    path: str = knob("", "a folder of your own images (jpg, jpeg, png, bmp, webp; searched recursively, hidden "
                         "entries skipped); empty = the 9 colour photographs shipped inside scikit-image "
                         "(pip install 'trainlab[stegastamp]')")
    val_images: int = knob(2, "whole images held out for validation (a fixed split, independent of train.seed)",
                           ge=1)
    eval_crops: int = knob(64, "fixed held-out crops (with fixed secrets) in the evaluation batch", ge=1)
    min_images: int = knob(2, "the least number of images accepted (at least one training image besides the "
                              "held-out ones)", ge=2)
    crop_scale: tuple[float, float] = knob((0.25, 1.0), "area share of an image a random crop covers: (least, most)",
                                           gt=0, le=1)
    cache_images: int = knob(256, "decoded images kept in memory (least recently used ones are dropped)", ge=1)
    eval_seed: int = knob(0, "seed of the fixed evaluation crops and secrets", ge=0)

    def check(self, prefix: str) -> None:
        lo, hi = self.crop_scale
        if lo > hi:
            raise ConfigError(f"{prefix}.crop_scale", f"(least, most) with least <= most; got ({lo}, {hi})")


# ---- reading images ----------------------------------------------------------------------------
def _open_error(path: Path, exc: BaseException) -> UsageError:
    from PIL import UnidentifiedImageError

    # PIL's own message for an unknown format repeats the whole path
    why = "not a known image format" if isinstance(exc, UnidentifiedImageError) else brief(exc, 80)
    return UsageError(f"{path} cannot be read as an image ({why}); allowed: "
                      f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)} files")


def _decode(path: Path, short_side: int | None = None) -> torch.Tensor:
    """uint8 [3, H, W] RGB (alpha dropped, greyscale expanded, EXIF rotation applied); with
    `short_side`, reduced so that its shorter side is at most that."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if short_side is not None and min(im.size) > short_side:
                scale = short_side / min(im.size)
                target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                im.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale where that is enough
            im = ImageOps.exif_transpose(im).convert("RGB")
            if short_side is not None and min(im.size) > short_side:
                scale = short_side / min(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.Resampling.LANCZOS)
            pixels = np.array(im, dtype=np.uint8)  # a copy: writable, owned by the tensor
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; allowed: an image file "
                         f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise all three on broken files
        raise _open_error(path, exc) from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as float32 [3, H, W] in [0, 1], RGB, at full resolution."""
    return _decode(Path(path)).float().div_(255)


@dataclass(frozen=True)
class ImageFile:
    path: Path
    name: str  # relative to the folder searched
    width: int
    height: int


def _header(path: Path, name: str) -> ImageFile:
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            im.verify()  # PNG: walks the chunks and their checksums without decoding the pixels
    except (OSError, ValueError, SyntaxError) as exc:
        raise _open_error(path, exc) from None
    return ImageFile(path, name, width, height)


def _shipped_folder() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("data.path", "empty (scikit-image's sample photographs) needs scikit-image: "
                                       "pip install 'trainlab[stegastamp]', or give data.path, a folder of "
                                       "your own images") from None
    return Path(os.path.dirname(skimage.data.__file__))


def _folder_images(path: str) -> list[tuple[Path, str]]:
    root = Path(path).expanduser()
    allowed = f"a folder of {', '.join(e[1:] for e in IMAGE_EXTENSIONS)} images, or empty for {SHIPPED}"
    if not root.exists():
        raise ConfigError("data.path", f"{path} does not exist; allowed: {allowed}")
    if not root.is_dir():
        raise ConfigError("data.path", f"{path} is not a folder; allowed: {allowed}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if not name.startswith(".") and file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file():
                found.append((file, file.relative_to(root).as_posix()))
    if not found:
        raise ConfigError("data.path", f"folder {path} holds no image files; allowed: {allowed}")
    return found


@dataclass(frozen=True)
class ImageSplit:
    source: str  # the folder, or SHIPPED
    train: tuple[ImageFile, ...]
    val: tuple[ImageFile, ...]


def image_split(data: StegaStampDataConfig) -> ImageSplit:
    """The images' headers, checked, and the fixed train/validation split (ConfigError/UsageError
    on a bad folder, an unreadable file or too few images)."""
    if data.path:
        files = [_header(p, n) for p, n in _folder_images(data.path)]
        held = set(np.random.default_rng(SPLIT_SEED).permutation(len(files))[:data.val_images].tolist())
        source = data.path
    else:
        folder = _shipped_folder()
        files = [_header(folder / n, n) for n in SHIPPED_PHOTOS if (folder / n).is_file()]
        held = set(range(min(data.val_images, len(files))))
        source = SHIPPED
    need = max(data.min_images, data.val_images + 1)
    if len(files) < need:
        raise ConfigError("data.path", f"{source} holds {len(files)} images, fewer than the {need} needed "
                                       f"(data.min_images={data.min_images}, data.val_images={data.val_images} "
                                       "held out plus at least one for training); add images or hold out fewer")
    return ImageSplit(source, tuple(f for i, f in enumerate(files) if i not in held),
                      tuple(f for i, f in enumerate(files) if i in held))


# ---- batches -----------------------------------------------------------------------------------
class ImageStream:
    """The StegaStamp experiment's data: batch() gives {"image": float32 [B, 3, S, S] in [0, 1],
    "secret": float32 [B, secret_size] of 0/1, "seed": an int for the perturbations' generator},
    all on the device and a pure function of (train.seed, step, micro); eval_batch() the same keys
    for the fixed held-out crops."""

    def __init__(self, cfg, device: torch.device | str):
        self.device = torch.device(device)
        self.data: StegaStampDataConfig = cfg.data
        self.image_size = int(cfg.model.image_size)
        self.secret_size = int(cfg.model.secret_size)
        self.micro_batch = int(cfg.train.micro_batch)
        self.seed = int(cfg.train.seed)
        self.split = image_split(self.data)
        # the smallest crop (least area share, widest aspect) keeps WORKING_MARGIN x the output side
        least_side = math.sqrt(self.data.crop_scale[0] / CROP_ASPECT[1])
        self.working_short_side = math.ceil(WORKING_MARGIN * self.image_size / least_side)
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._eval: dict | None = None

    def _pixels(self, file: ImageFile) -> torch.Tensor:
        cached = self._cache.get(file.path)
        if cached is not None:
            self._cache.move_to_end(file.path)
            return cached
        pixels = _decode(file.path, self.working_short_side)
        self._cache[file.path] = pixels
        if len(self._cache) > self.data.cache_images:
            self._cache.popitem(last=False)
        return pixels

    def _crops(self, files: tuple[ImageFile, ...], picks: np.ndarray, rng: np.random.Generator) -> dict:
        n = len(picks)
        lo, hi = self.data.crop_scale
        area = rng.uniform(lo, hi, n)
        aspect = np.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]), n))
        where = rng.random((n, 2))
        flip = rng.random(n) < 0.5
        secret = rng.integers(0, 2, (n, self.secret_size), dtype=np.uint8)
        perturbation_seed = int(rng.integers(0, 2**63 - 1))
        size = (self.image_size, self.image_size)
        out = torch.empty((n, 3) + size, dtype=torch.uint8)
        for i in range(n):
            pixels = self._pixels(files[picks[i]])
            height, width = pixels.shape[1:]
            target = area[i] * height * width
            # a crop wider or taller than the image is clipped to it (torchvision re-draws up to 10
            # times instead: the drawn numbers would then depend on the image sizes)
            w = min(width, max(1, round(math.sqrt(target * aspect[i]))))
            h = min(height, max(1, round(math.sqrt(target / aspect[i]))))
            top, left = int(where[i, 0] * (height - h + 1)), int(where[i, 1] * (width - w + 1))
            crop = pixels[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
            # uint8 antialiased bilinear: half the time of converting a large crop to float first
            resized = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)
            out[i] = resized[0].flip(-1) if flip[i] else resized[0]
        image = out.to(self.device).float().div_(255)
        return {"image": image, "secret": torch.from_numpy(secret).to(self.device).float(),
                "seed": perturbation_seed}

    def batch(self, step: int, micro: int, level: float | None = None) -> dict:
        rng = np.random.default_rng(step_seed(self.seed, step, micro))
        picks = rng.integers(0, len(self.split.train), self.micro_batch)
        return self._crops(self.split.train, picks, rng)

    def eval_batch(self) -> dict:
        if self._eval is None:
            rng = np.random.default_rng(self.data.eval_seed)
            # round-robin, so every held-out image weighs the same in the validation metrics
            picks = np.arange(self.data.eval_crops) % len(self.split.val)
            self._eval = self._crops(self.split.val, picks, rng)
        return self._eval

    def describe(self) -> dict:
        train, val = self.split.train, self.split.val
        return {
            "source": self.split.source,
            "train_images": len(train),
            "val_images": len(val),
            "train_names": [f.name for f in train],
            "val_names": [f.name for f in val],
            "train_pixels": sum(f.width * f.height for f in train),
            "val_pixels": sum(f.width * f.height for f in val),
            "eval_crops": self.data.eval_crops,
            "image_size": self.image_size,
            "working_short_side": self.working_short_side,
        }
