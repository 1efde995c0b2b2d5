"""Using a trained StegaStamp run: hide a short text in an image file, read it back.

    trainlab use RUN_DIR hide PHOTO.jpg "hello" --out hidden.png
    trainlab use RUN_DIR reveal hidden.png        (also after the PNG was re-saved as JPEG)

The image is cropped to its central square and resized to the run's model.image_size (the size the
encoder was trained at); the PNG written has that size.  The text is BCH-protected where the secret
has room (codec.layout_for: 7 bytes + BCH t=5 at 100 bits, as the reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from trainlab.errors import UsageError


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every trainlab usage error
        raise UsageError(f"{self.prog}: {message}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here; allowed: auto, cpu")
    return torch.device(name)


def square_crop(image: torch.Tensor, size: int, path: Path) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [1, 3, size, size]: the central square, resized (antialiased) to
    `size`; an image smaller than `size` on either side is refused (upscaling would blur the code)."""
    _, h, w = image.shape
    if min(h, w) < size:
        raise UsageError(f"{path}: {w}x{h} pixels is too small: this run's encoder works at {size}x{size}, so "
                         f"both sides must be at least {size}")
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top:top + side, left:left + side].unsqueeze(0)
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return crop.clamp(0, 1)


def _trained(run_dir: Path, cfg, checkpoint: str, device: torch.device):
    from trainlab.engine.checkpoint import load_trained_model
    from trainlab.experiment import get_experiment

    model, ckpt = load_trained_model(run_dir, get_experiment("stegastamp"), cfg, device, which=checkpoint)
    return model, ckpt


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                        help="which of the run's checkpoints (default: the newest)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")


def hide(run_dir: Path, cfg, argv: list[str]) -> int:
    from PIL import Image

    from trainlab.experiments.stegastamp import psnr
    from trainlab.experiments.stegastamp.codec import bits_to_text, layout_for, text_to_bits
    from trainlab.experiments.stegastamp.data import load_image

    parser = _ArgumentParser(prog=f"trainlab use {run_dir} hide", description="hide TEXT in IMAGE, write a PNG")
    parser.add_argument("image", type=Path)
    parser.add_argument("text")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (not overwritten unless --force)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _common(parser)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        raise UsageError(f"--out {args.out}: exists; give another path or --force to overwrite it")
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out}: must end in .png (a lossless file keeps the hidden bits exact)")
    size, bits = cfg.model.image_size, cfg.model.secret_size
    secret = text_to_bits(args.text, bits)  # refuses a text too long, before any model is built
    cover = square_crop(load_image(args.image), size, args.image)
    device = _device(args.device)
    model, ckpt = _trained(run_dir, cfg, args.checkpoint, device)
    with torch.no_grad():
        encoded, _ = model.encode(secret.unsqueeze(0).to(device), cover.to(device))
        pixels = (encoded[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        written = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).unsqueeze(0).to(device)
        check = bits_to_text(model.decoder(written)[0], logits=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(args.out, format="PNG")
    layout = layout_for(bits)
    readback = (f"reads back as {check.text!r}" + (f" ({check.corrected} bits corrected)" if check.corrected else "")
                if check.ok else "does NOT read back from the written PNG (the model is not trained enough)")
    print(f"wrote {args.out} ({size}x{size}): {len(args.text.encode())} bytes in a {bits}-bit secret "
          f"({layout.describe()}), PSNR {float(psnr(written, cover.to(device))):.1f} dB against the cropped cover; "
          f"{readback}; checkpoint {ckpt.path.name}")
    return 0 if check.ok and check.text == args.text else 1


def reveal(run_dir: Path, cfg, argv: list[str]) -> int:
    from trainlab.experiments.stegastamp.codec import bits_to_text
    from trainlab.experiments.stegastamp.data import load_image

    parser = _ArgumentParser(prog=f"trainlab use {run_dir} reveal", description="read the text hidden in IMAGE")
    parser.add_argument("image", type=Path)
    _common(parser)
    args = parser.parse_args(argv)
    image = square_crop(load_image(args.image), cfg.model.image_size, args.image)
    device = _device(args.device)
    model, _ = _trained(run_dir, cfg, args.checkpoint, device)
    with torch.no_grad():
        logits = model.decoder(image.to(device))[0]
    decoded = bits_to_text(logits, logits=True)
    if not decoded.ok:
        print(f"{args.image}: no message recovered (more wrong bits than the code corrects, or no message hidden); "
              f"best guess {decoded.text!r}")
        return 1
    corrected = f" ({decoded.corrected} bits corrected)" if decoded.corrected else ""
    print(f"{decoded.text}")
    print(f"{args.image}: recovered{corrected}", file=sys.stderr)
    return 0
