"""What a sweep is: one target, shared options, a grid of config values; each grid point a run.

A sweep is given on the command line (`--grid model.hidden=256,512 --grid optim.lr=1e-3,3e-3`) or as
a sweep YAML:

    target: bitnet_lm          # an experiment name or a run-config YAML
    preset: original
    set: {optim.weight_decay: 0.1}   # or a list of "key=value"
    steps: 10000
    grid:
      model.hidden: [256, 512, 768, 1024]
    parallel: 4
    nproc_per_point: 2         # optional: each point a torchrun job of 2 data-parallel ranks

Every point's config is resolved before anything starts, so a bad grid key or value is refused
(exit 2) with nothing written.  The sweep directory keeps sweep.json; a rerun with the same grid
skips finished points and resumes interrupted ones, a rerun with another grid is refused.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trainlab.errors import UsageError, brief

MANIFEST = "sweep.json"
SWEEP_KEYS = {"target", "preset", "set", "steps", "grid", "parallel", "nproc_per_point", "device", "backend", "gpus"}


@dataclass
class Point:
    name: str  # also the run directory's name inside the sweep directory
    values: dict[str, str]  # grid key -> value as --set takes it

    @property
    def sets(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


@dataclass
class SweepSpec:
    target: str
    preset: str | None
    sets: list[str]
    steps: int | None
    grid: list[tuple[str, list[str]]]
    device: str = "auto"
    parallel: int = 1
    backend: str = "local"
    gpus: list[str] = field(default_factory=list)
    nproc_per_point: int = 1  # ranks of each point's torchrun job (`trainlab run --nproc N`)

    def points(self) -> list[Point]:
        keys = [k for k, _ in self.grid]
        out, seen = [], set()
        for combo in itertools.product(*(values for _, values in self.grid)):
            values = dict(zip(keys, combo))
            name = point_name(values)
            if name in seen:
                name = f"{name}_{len(out)}"
            seen.add(name)
            out.append(Point(name, values))
        return out

    def identity(self) -> dict:
        """What makes two sweeps the same sweep (steps, parallel, nproc_per_point and backend may change on a
        rerun: they say how the points run, not what they compute)."""
        return {"target": self.target, "preset": self.preset, "sets": self.sets,
                "grid": [[k, list(v)] for k, v in self.grid]}


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def point_name(values: dict[str, str]) -> str:
    """hidden-256_lr-0.0015: the last part of each key and its value, safe as a directory name."""
    parts = []
    for key, value in values.items():
        text = re.sub(r"[^\w.+-]", "_", str(value))
        parts.append(f"{key.rsplit('.', 1)[-1]}-{text}")
    return "_".join(parts)


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise UsageError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid model.hidden=256,512")
        grid.append((key, choices))
    return check_grid(grid, "--grid")


def check_grid(grid: list[tuple[str, list[str]]], where: str) -> list[tuple[str, list[str]]]:
    keys = [k for k, _ in grid]
    for key in keys:
        if keys.count(key) > 1:
            raise UsageError(f"{where}: key {key} appears twice; give each key once with all its values")
    for key, values in grid:
        if len(set(values)) != len(values):
            raise UsageError(f"{where} {key}: repeated value in {','.join(values)}")
    return grid


def load_sweep_file(path: str) -> dict:
    """The options of a sweep YAML, checked for shape; the values are checked later like CLI ones."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"sweep file {path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"sweep file {path}: not valid YAML ({brief(exc, 200)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"sweep file {path}: expected a mapping with target and grid")
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise UsageError(f"sweep file {path}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(SWEEP_KEYS))}")
    if not isinstance(data.get("target"), str):
        raise UsageError(f"sweep file {path}: needs 'target:' naming an experiment or a config YAML")
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise UsageError(f"sweep file {path}: needs 'grid:' mapping keys to lists of values")
    parsed = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
            raise UsageError(f"sweep file {path}: grid {key} must be a non-empty list of plain values")
        parsed.append((str(key), [_value_text(v) for v in values]))
    sets = data.get("set") or []
    if isinstance(sets, dict):
        sets = [f"{k}={_value_text(v)}" for k, v in sets.items()]
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise UsageError(f"sweep file {path}: 'set' must be a mapping or a list of key=value strings")
    out = dict(data, grid=check_grid(parsed, f"sweep file {path}: grid"), set=sets)
    for key, kind in (("steps", int), ("parallel", int), ("nproc_per_point", int)):
        if key in out and (not isinstance(out[key], kind) or isinstance(out[key], bool) or out[key] < 1):
            raise UsageError(f"sweep file {path}: {key} must be a positive integer, got {out[key]!r}")
    for key, allowed in (("device", ("auto", "cpu", "cuda", "mps")), ("backend", ("local", "ray"))):
        if key in out and out[key] not in allowed:
            raise UsageError(f"sweep file {path}: {key} {out[key]!r} is not one of {', '.join(allowed)}")
    if "preset" in out and out["preset"] is not None and not isinstance(out["preset"], str):
        raise UsageError(f"sweep file {path}: preset must be a name, got {out['preset']!r}")
    gpus = out.get("gpus", [])
    if not isinstance(gpus, list):
        raise UsageError(f"sweep file {path}: gpus must be a list of GPU indices")
    out["gpus"] = [str(g) for g in gpus]
    return out


def is_sweep_file(target: str) -> bool:
    """A YAML with a top-level `grid:` is a sweep file; any other YAML is a run config."""
    if not target.endswith((".yaml", ".yml")) or not Path(target).is_file():
        return False
    try:
        data = yaml.safe_load(Path(target).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "grid" in data


def write_manifest(sweep_dir: Path, spec: SweepSpec, points: list[Point]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = {**spec.identity(), "steps": spec.steps, "points": [asdict(p) for p in points]}
    (sweep_dir / MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_manifest(sweep_dir: Path) -> dict | None:
    path = sweep_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"sweep directory {sweep_dir}: {MANIFEST} is unreadable ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("points"), list):
        raise UsageError(f"sweep directory {sweep_dir}: {MANIFEST} is not a trainlab sweep manifest")
    return record


def check_same_sweep(sweep_dir: Path, spec: SweepSpec) -> None:
    old = read_manifest(sweep_dir)
    if old is None:
        return
    new = spec.identity()
    differs = [k for k in new if old.get(k) != new[k]]
    if differs:
        raise UsageError(f"sweep directory {sweep_dir} holds another sweep (its {', '.join(differs)} differ); "
                         "rerun it with the same target, preset, --set and --grid, or pick another --sweep-dir")
