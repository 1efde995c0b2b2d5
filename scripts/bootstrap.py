#!/usr/bin/env python3
"""Set up .venv for trainlab with only Python and pip, without pulling a multi-GB CUDA torch
onto a machine that does not need one.

- If the Python running this script already has torch (a user's own CUDA or ROCm build, say),
  the venv sees it (--system-site-packages) and it is used as it is.
- Otherwise torch==2.13.0 is installed first, pinned: on a machine whose pip holds that CPU wheel
  locally it comes from disk; elsewhere pip picks the wheel for the platform.  Only then is trainlab
  installed, so its `torch>=2.3` requirement is already met and pip fetches no other torch.

Usage: python3 scripts/bootstrap.py [--test]   (--test adds pytest and hypothesis)
Idempotent: a second run only checks what is there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH_PIN = "torch==2.13.0"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def has_module(python: str, name: str) -> bool:
    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="store_true", help="also install the test dependencies")
    args = parser.parse_args()
    python = str(VENV / "bin" / "python")
    if not Path(python).exists():
        system_torch = has_module(sys.executable, "torch")
        venv.EnvBuilder(with_pip=True, system_site_packages=system_torch).create(VENV)
        print(f"created {VENV} ({'using the torch already installed' if system_torch else 'own torch'})")
    quiet = [] if os.environ.get("TRAINLAB_VERBOSE_SETUP") else ["-q"]
    if not has_module(python, "torch"):
        run([python, "-m", "pip", "install", *quiet, TORCH_PIN])
    marker = VENV / ".trainlab-installed"
    extras = "[test]" if args.test else ""
    stamp = f"{extras}:{(ROOT / 'pyproject.toml').stat().st_mtime_ns}"
    if not marker.exists() or stamp not in marker.read_text().split():
        run([python, "-m", "pip", "install", *quiet, "-e", f"{ROOT}{extras}"])
        previous = marker.read_text().split() if marker.exists() else []
        marker.write_text("\n".join(previous + [stamp]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
