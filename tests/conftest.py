"""Shared helpers: run the real CLI in a subprocess, read run directories back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainlab.engine.logs import read_metrics

# Columns that measure the machine, not the run: they differ between two identical runs.
VOLATILE = {"attempt", "elapsed_s", "samples_per_s", "tokens_per_s", "ram_gb", "peak_ram_gb", "dev_mem_gb", "peak_dev_mem_gb"}


def cli_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRAINLAB_FAULTS", None)
    return env


def trainlab(*args: str, cwd: Path, timeout: float = 120, check: bool = False,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`env`: variables set on top of cli_env() for this one command."""
    proc = subprocess.run([sys.executable, "-m", "trainlab", *args], cwd=cwd, env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainlab {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def spawn(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainlab", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def history(run_dir: Path) -> list[dict]:
    """The true metric history with the machine-dependent columns removed."""
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in read_metrics(run_dir / "metrics.csv")]


def final_weights(run_dir: Path) -> dict:
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    steps = [p for p in steps if p.name[5:].isdigit()]
    return load_file(str(steps[-1] / "model.safetensors"))


def assert_same_weights(expected: dict, actual: dict) -> None:
    """Two name -> tensor maps hold the same weights: the same non-empty set of names, and each
    tensor equal bit for bit in dtype, shape and value.  (zip() over two dicts' values would pass
    on an empty or a shorter side, and pairs tensors by position, not by name.)"""
    assert expected, "no weights to compare: the expected side is empty"
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not extra, f"different tensor names: missing {missing[:4]}, unexpected {extra[:4]}"
    differ = [k for k in expected if expected[k].dtype != actual[k].dtype or not torch.equal(expected[k], actual[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:4]}"


@pytest.fixture
def tmp_cwd(tmp_path: Path) -> Path:
    return tmp_path
