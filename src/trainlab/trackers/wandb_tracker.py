"""Weights & Biases: the flattened config, a history row per metrics.csv row at its step.

Offline unless WANDB_MODE says otherwise: a training machine may have no network, and a run must
never wait for one.  The files go to run_dir/wandb; `wandb sync` uploads them later.  Nothing
else is collected (no system-metrics sampler, no console capture): trainlab's rows are the data.

Resume: wandb.init(id=the kept id, resume="allow").  W&B refuses a step lower than the last one it
holds, so that last step is read back when the run opens -- from the server (run.starting_step)
when online; offline, where each attempt writes a new offline-run-* directory under the same id,
from the earlier attempts' .wandb transaction logs, read with W&B's own reader (`wandb-core leet
inspect --json`, what `wandb leet inspect` runs).  A kill loses what W&B had not flushed to
that log yet (it flushes every 15 s); those steps come from metrics.csv when the run resumes.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import subprocess
from pathlib import Path

from trainlab.errors import UsageError, brief
from trainlab.trackers import Tracker, blank_is_unset, flat_config, import_tracker_package, keep, read_kept

KEPT = "wandb"
WANDB_DIR = "wandb"  # wandb.init(dir=run_dir) puts its files here
DEFAULT_MODE = "offline"
READ_TIMEOUT_S = 60  # reading back a transaction log: W&B's reader is a local binary
# Online, a network that does not answer costs at most these (W&B's defaults: 90 s; no limit at the end,
# where what was not uploaded stays in the run's .wandb file for `wandb sync`)
INIT_TIMEOUT_S = 60
FINISH_TIMEOUT_S = 60


def wandb_mode() -> str:
    blank_is_unset("WANDB_MODE")
    return os.environ.get("WANDB_MODE", "").strip() or DEFAULT_MODE


def check_wandb() -> None:
    import_tracker_package("wandb", "log.wandb", "wandb", "wandb")
    import wandb

    try:
        wandb.Settings(mode=wandb_mode())
    except Exception as exc:  # noqa: BLE001 -- W&B's own validation says what it allows
        raise UsageError(f"WANDB_MODE={os.environ.get('WANDB_MODE')}: W&B refuses it ({brief(exc, 200)}); "
                         f"unset it for {DEFAULT_MODE}, or leave log.wandb false") from None


def new_run_id() -> str:
    """A W&B run id (its alphabet and length), drawn from `secrets`: the trainer seeds `random`,
    which would hand two runs of one seed the same id."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def offline_logs(run_dir: Path, run_id: str) -> list[Path]:
    """The .wandb files of the offline attempts of W&B run `run_id`, oldest first."""
    return sorted(p / f"run-{run_id}.wandb" for p in (run_dir / WANDB_DIR).glob(f"offline-run-*-{run_id}")
                  if (p / f"run-{run_id}.wandb").is_file())


def read_records(path: Path) -> list[dict]:
    """Every record of a .wandb transaction log, as W&B's own reader prints them (JSON lines)."""
    from wandb.util import get_core_path

    out = subprocess.run([get_core_path(), "leet", "inspect", "--no-observability", "--json",
                          "--run-file", str(path), str(path.parent.parent)],
                         capture_output=True, text=True, timeout=READ_TIMEOUT_S, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def history_steps(path: Path) -> list[int]:
    return [int(r["history"]["item"]["_step"]) for r in read_records(path) if r.get("type") == "history"]


class WandbTracker(Tracker):
    label = "W&B"

    def __init__(self, cfg, run_dir: Path):
        super().__init__(run_dir)
        self.cfg = cfg
        self.run = None

    def open(self, trainer) -> None:
        import wandb

        mode = wandb_mode()
        run_id = read_kept(self.run_dir).get(KEPT, {}).get("id") or new_run_id()
        earlier = offline_logs(self.run_dir, run_id)  # before this attempt adds its own
        keep(self.run_dir, KEPT, {"id": run_id})  # before init: a kill from here on still resumes into it
        settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, finish_timeout=FINISH_TIMEOUT_S,
                                  x_disable_stats=True, console="off", silent=True)
        self.run = wandb.init(mode=mode, dir=str(self.run_dir), id=run_id, resume="allow", project=self.cfg.log.project,
                              name=self.run_dir.name, config=flat_config(self.cfg), allow_val_change=True,
                              tags=[t for t in (self.cfg.experiment, self.cfg.preset) if t],
                              settings=settings, reinit="create_new")
        if mode == "offline":
            self.held_all = max((max(history_steps(p), default=0) for p in earlier), default=0)
        elif self.run.resumed:
            self.held_all = max(self.run.starting_step - 1, 0)  # the next step the server expects, less one

    def send(self, step: int, values: dict[str, float]) -> None:
        # commit=True: with an explicit step W&B otherwise keeps the row open until the next step,
        # and a kill would lose it even after a flush
        self.run.log(values, step=step, commit=True)
        self.held_all = step

    def close(self, result) -> None:
        self.run.summary.update({"trainlab.state": result.state, "trainlab.reason": result.reason})
        self.run.finish(exit_code=0 if result.state == "finished" else 1)
