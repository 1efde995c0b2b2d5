"""MLflow: the resolved config as params, a metric per metrics.csv row at its step, tags for the
experiment and preset, report.html and config.yaml as artifacts at the end.

The store is MLFLOW_TRACKING_URI when set, else a file store in run_dir/mlruns.  A file store,
not sqlite: mlflow-skinny (the extra) has no SQLAlchemy, which a sqlite store needs, and a file
store has no schema to migrate when it opens; MLflow 3 keeps file stores behind
MLFLOW_ALLOW_FILE_STORE, which is set for this process when the store is a file store and the
user has not set it.  Everything goes through one MlflowClient with its own tracking URI, never
the fluent mlflow.start_run() API and its process-wide active run, so two runs in one process
never mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from trainlab.errors import UsageError, brief
from trainlab.trackers import Tracker, blank_is_unset, flat_config, import_tracker_package, keep, read_kept

LOCAL_STORE = "mlruns"  # the default store, inside the run directory
KEPT = "mlflow"
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"
# what a check of a remote store may cost: one try, ten seconds (MLflow's defaults retry for minutes)
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# MLflow's own limits (mlflow.utils.validation): params per log_batch call, characters per value
PARAMS_PER_BATCH = 100
PARAM_VALUE_CHARS = 6000
ARTIFACTS = ("report.html", "config.yaml")
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "crashed": "FAILED"}


def configured_uri() -> str:
    blank_is_unset("MLFLOW_TRACKING_URI", ALLOW_FILE_STORE)
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def tracking_uri(run_dir: Path) -> str:
    return configured_uri() or "file:" + os.path.abspath(run_dir / LOCAL_STORE)


def file_store_path(uri: str) -> Path | None:
    """The directory of a file store URI ("file:/x", "file:///x", a plain path); None for others."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (a Windows drive letter is one letter)
        return Path(uri)
    return None


def allow_file_store(uri: str) -> None:
    """MLflow 3 opens a file store only with MLFLOW_ALLOW_FILE_STORE true; the user's own setting wins."""
    if file_store_path(uri) is not None:
        os.environ.setdefault(ALLOW_FILE_STORE, "true")


@contextlib.contextmanager
def _bounded_requests():
    """PROBE_ENV for the duration of a check, unless the user set those variables."""
    added = {k: v for k, v in PROBE_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def check_mlflow(run_dir: Path) -> None:
    """Refuse, before the run writes anything, an MLflow that cannot take this run's data."""
    import_tracker_package("mlflow", "log.mlflow", "mlflow", "mlflow-skinny")
    uri = configured_uri()
    where = f"MLFLOW_TRACKING_URI={uri}" if uri else "log.mlflow"
    store = file_store_path(uri) if uri else run_dir / LOCAL_STORE
    if store is not None:
        import mlflow.environment_variables as mlflow_env

        allow_file_store(uri or "file:")
        gate = getattr(mlflow_env, "MLFLOW_ALLOW_FILE_STORE", None)  # MLflow before 3.x has no such gate
        try:
            allowed = gate is None or gate.get()  # MLflow's own reading of the variable
        except ValueError as exc:
            raise UsageError(f"{ALLOW_FILE_STORE}={os.environ[ALLOW_FILE_STORE]}: {brief(exc)}") from None
        if not allowed:
            raise UsageError(f"{where}: a file store, which {ALLOW_FILE_STORE}={os.environ[ALLOW_FILE_STORE]} "
                             "refuses; unset it, or set MLFLOW_TRACKING_URI to a database or a tracking server")
        if not uri:
            # inside the run directory: check_usable() answers for it; only a file in the way is ours
            if store.exists() and not store.is_dir():
                raise UsageError(f"log.mlflow: {store} is in the way of the MLflow store (a file, not a "
                                 "directory); move it, or set MLFLOW_TRACKING_URI")
            return
        try:  # the store is created now rather than at the first step: the same directory, earlier
            store.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=store):
                pass
        except OSError as exc:
            raise UsageError(f"{where}: cannot write the MLflow store there ({brief(exc)}); point it at a "
                             "writable directory, or unset it for a store inside the run directory") from None
        return
    from mlflow import MlflowClient

    try:  # a database or a tracking server: one bounded request says whether it can be used
        with _bounded_requests():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 -- whatever the store says is the user's to fix
        raise UsageError(f"{where}: the MLflow store cannot be used ({type(exc).__name__}: {brief(exc)}); "
                         "fix the URI, or unset it for a store inside the run directory") from None


class MlflowTracker(Tracker):
    label = "MLflow"

    def __init__(self, cfg, run_dir: Path):
        super().__init__(run_dir)
        self.cfg = cfg
        self.client = None
        self.run_id: str | None = None

    def open(self, trainer) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(self.run_dir)
        allow_file_store(uri)
        self.client = client = MlflowClient(tracking_uri=uri)
        store = configured_uri() or "local"  # the local store moves with the run directory
        kept = read_kept(self.run_dir).get(KEPT, {})
        run = None
        if kept.get("run_id") and kept.get("store") == store:
            try:
                run = client.get_run(kept["run_id"])
            except MlflowException:
                run = None  # not in this store (deleted, or another server under the same URI): a new one
        params = {k: str(v)[:PARAM_VALUE_CHARS] for k, v in flat_config(self.cfg).items()}
        attempt = getattr(trainer, "attempt", 1)
        if run is None:
            run = client.create_run(self._experiment_id(), run_name=self.run_dir.name, tags={
                "trainlab.experiment": self.cfg.experiment, "trainlab.preset": self.cfg.preset or "",
                "trainlab.run_dir": os.path.abspath(self.run_dir), "mlflow.source.name": "trainlab"})
            # kept before anything is logged: a kill from here on still resumes into this run
            keep(self.run_dir, KEPT, {"run_id": run.info.run_id, "store": store})
            self.run_id = run.info.run_id
            self._log_params(params)
        else:
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            self.held = self._held_steps(run)
            had = run.data.params
            self._log_params({k: v for k, v in params.items() if k not in had})
            # MLflow params never change; a value changed on resume is recorded as a tag
            changed = [f"{k}: {had[k]} -> {v}" for k, v in params.items() if k in had and had[k] != v]
            if changed:
                client.set_tag(self.run_id, f"trainlab.config_changed_at_attempt_{attempt}",
                               "; ".join(changed)[:PARAM_VALUE_CHARS])
        client.set_tag(self.run_id, "trainlab.attempt", str(attempt))

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.log.project
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it in between
            return self.client.get_experiment_by_name(name).experiment_id

    def _held_steps(self, run) -> dict[str, int]:
        """The last step MLflow holds of each metric -- read back from the store, not from a file
        of ours: a kill between a log call and our note of it would otherwise lose or repeat a
        step, and a kill inside a log_batch may leave some metrics of a row and not others."""
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
                for key in run.data.metrics}

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])

    def send(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, result) -> None:
        if not isinstance(result.error, KeyboardInterrupt):  # a second Ctrl-C: the user asked to leave now
            for name in ARTIFACTS:  # the report is written by a callback before this one (launch.py)
                path = self.run_dir / name
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
        if result.reason:
            self.client.set_tag(self.run_id, "trainlab.end_reason", result.reason[:PARAM_VALUE_CHARS])
        self.client.set_terminated(self.run_id, STATUS.get(result.state, "FAILED"))
