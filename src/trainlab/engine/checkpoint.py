"""Atomic checkpoints with a manifest of checksums, retention, and loading that never runs code.

Layout: checkpoints/step_00000500/{model.safetensors, state.pt, manifest.json}.
- model.safetensors: the weights (safetensors: no pickle at all).
- state.pt: optimizer, scaler, curriculum, RNG states, metric accumulators, step -- plain
  tensors and containers, read back with torch.load(weights_only=True), which refuses any
  pickled object that would run code.
- manifest.json: sha256 and size of both files, written last.

A save writes into checkpoints/.tmp-step_X-PID/, fsyncs every file and the folder, then renames
the folder into place (atomic on POSIX) and fsyncs the parent.  A kill at any moment leaves either
the complete new checkpoint or none; leftover .tmp folders are swept at the next start.  A
checkpoint whose files do not match its manifest is renamed *.corrupt (kept, never deleted) and
the previous one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from trainlab.errors import TrainingStopped, UsageError, brief

FORMAT = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Replace a small text file atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT as such, or an error from a writer that hides the errno (torch.save raises a
    RuntimeError from its C++ stream) while the filesystem has next to nothing left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def unused_sibling(path: Path, name: str) -> Path:
    """path's sibling called `name`, or `name-2`, `name-3`, ... whichever does not exist yet."""
    target, n = path.with_name(name), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{name}-{n}")
    return target


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    def __init__(self, root: Path, keep: int, on_event: Callable[[dict], None] = lambda e: None):
        self.root = root
        self.keep = keep
        self.on_event = on_event
        # (folder name, what was wrong) of every broken checkpoint latest_valid() set aside, newest
        # first: the trainer says on the terminal what a resume skipped
        self.found_broken: list[tuple[str, str]] = []

    # ---- saving -------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, state: dict, info: dict, best: bool = False) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        if final.exists() and self.verify(final) is None:
            return final  # this exact step is already saved (e.g. a signal right after a save)
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            return self._save_into(tmp, final, step, model, state, info, best)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
            if _disk_full(exc, self.root):
                previous = self.complete_dirs()
                kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
                raise TrainingStopped(f"disk full while writing checkpoint {final.name} in {self.root} "
                                      f"({type(exc).__name__}); {kept}; free space and rerun to resume") from None
            raise

    def _save_into(self, tmp: Path, final: Path, step: int, model: nn.Module, state: dict, info: dict,
                   best: bool) -> Path:
        tmp.mkdir()
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        files = {}
        for name in (MODEL_FILE, STATE_FILE):
            fsync_file(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": files, "info": info}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # an invalid leftover at this step: keep it aside, never delete
            self._set_aside(final, "replaced by a new save of the same step")
        os.rename(tmp, final)
        fsync_dir(self.root)
        if best:
            write_atomic(self.root / "best.json", json.dumps({"step": step, "path": final.name, "info": info}))
        self._retain()
        return final

    def _retain(self) -> None:
        """Keep the newest `keep` checkpoints and the best; delete older complete ones."""
        steps = self.complete_dirs()
        protected = {p.name for p in steps[-self.keep:]}
        best = self.best_name()
        if best:
            protected.add(best)
        for path in steps:
            if path.name not in protected:
                shutil.rmtree(path, ignore_errors=True)

    def best_name(self) -> str | None:
        try:
            return json.loads((self.root / "best.json").read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- finding and verifying ------------------------------------------------------------
    def complete_dirs(self) -> list[Path]:
        """Checkpoint folders (renamed into place), oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")
                and p.name[5:].isdigit()]
        return sorted(dirs, key=lambda p: int(p.name[5:]))

    def sweep_incomplete(self) -> None:
        """Remove temp folders of saves that a kill interrupted (never renamed into place)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                self.on_event({"kind": "checkpoint_incomplete_removed", "path": str(p)})

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint is whole; else what is wrong with it."""
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "manifest.json missing"
        except (OSError, ValueError) as exc:
            return f"manifest.json unreadable ({exc.__class__.__name__})"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return "manifest.json has an unknown format"
        for name in (MODEL_FILE, STATE_FILE):
            entry = manifest.get("files", {}).get(name)
            file = path / name
            if not entry or not file.is_file():
                return f"{name} missing"
            if file.stat().st_size != entry.get("bytes"):
                return f"{name} is {file.stat().st_size} bytes, manifest says {entry.get('bytes')}"
            if sha256_file(file) != entry.get("sha256"):
                return f"{name} checksum mismatch"
        return None

    def _set_aside(self, path: Path, reason: str) -> None:
        target = unused_sibling(path, f"{path.name}.corrupt")
        os.rename(path, target)
        # best.json must not name a folder that is gone, nor one a later save of the same step puts there
        if self.best_name() == path.name:
            (self.root / "best.json").unlink(missing_ok=True)
        self.on_event({"kind": "checkpoint_corrupt", "path": str(path), "reason": reason,
                       "moved_to": str(target)})

    def set_aside_from(self, step: int, reason: str) -> None:
        """Set aside (keep, never delete) every checkpoint of `step` or later."""
        for path in self.complete_dirs():
            if int(path.name[5:]) >= step:
                self._set_aside(path, reason)

    def latest_valid(self, before_step: int | None = None) -> Checkpoint | None:
        """The newest whole checkpoint (older than `before_step` if given); broken newer ones are set
        aside with an event each."""
        for path in reversed(self.complete_dirs()):
            if before_step is not None and int(path.name[5:]) >= before_step:
                continue
            problem = self.verify(path)
            if problem is None:
                manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
                return Checkpoint(path=path, step=int(manifest["step"]), manifest=manifest)
            self._set_aside(path, problem)
            self.found_broken.append((path.name, problem))
        return None

    # ---- loading ------------------------------------------------------------------------
    @staticmethod
    def load(ckpt: Checkpoint, model: nn.Module, map_location: torch.device) -> dict:
        """Load weights into `model` and return the state dict.  Never unpickles code."""
        check_shapes(ckpt.path / MODEL_FILE, model)
        missing, unexpected = load_model(model, str(ckpt.path / MODEL_FILE), strict=False, device=str(map_location))
        if missing or unexpected:
            raise UsageError(f"checkpoint {ckpt.path} does not fit this model: "
                             f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        try:
            return torch.load(ckpt.path / STATE_FILE, map_location=map_location, weights_only=True)
        except Exception as exc:  # weights_only refuses any object that is not plain data
            raise UsageError(f"checkpoint {ckpt.path}: {STATE_FILE} holds data that a safe load refuses "
                             f"({brief(exc, 160)})") from None


def check_shapes(weights_file: Path, model: nn.Module) -> None:
    """Refuse a checkpoint from a different model, naming the mismatched tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatched = []
    with safe_open(str(weights_file), framework="pt") as fh:
        for key in fh.keys():
            if key in expected:
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != expected[key]:
                    mismatched.append(f"{key} {list(shape)} vs model {list(expected[key])}")
    if mismatched:
        shown = "; ".join(mismatched[:4]) + (f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else "")
        raise UsageError(f"checkpoint {weights_file.parent} does not fit this model: {shown}")


def load_trained_model(run_dir: Path, experiment, cfg, device: torch.device, which: str = "latest"):
    """(model in eval mode, checkpoint) of a run directory's newest whole checkpoint, or its best
    (`which` = "best", ckpt.best_metric); UsageError of one line when the run has none."""
    store = CheckpointStore(run_dir / "checkpoints", keep=1 << 30)
    if which == "best":
        name = store.best_name()
        if name is None:
            raise UsageError(f"run directory {run_dir}: no best checkpoint (ckpt.best_metric was not set); "
                             "use the latest")
        path = store.root / name
        problem = store.verify(path)
        if problem:
            raise UsageError(f"run directory {run_dir}: its best checkpoint {name} is broken: {problem}")
        ckpt = Checkpoint(path=path, step=int(name[5:]), manifest={})
    else:
        ckpt = store.latest_valid()
        if ckpt is None:
            raise UsageError(f"run directory {run_dir}: no whole checkpoint in {store.root} (trained yet?)")
    model = experiment.build_model(cfg).to(device)
    store.load(ckpt, model, device)
    return model.eval(), ckpt
