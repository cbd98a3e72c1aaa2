"""The one module that talks to MLflow: experiments, parent/child runs, their end states, and reading back.

Store: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the project directory
with artifacts in ``mlartifacts/`` beside it (MLflow 3's default layout; a server URI works the same way).

Every run ends in a terminal state: FINISHED, FAILED (the exception is recorded in the ``harness.error``
tag) or KILLED (Ctrl-C / SIGTERM). A run left RUNNING by a process that died (kill -9) is recognised by
its ``harness.pid``/``harness.host`` tags and marked FAILED by the next sweep (``reap_stale``).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.assets import cache_dir
from harness.liveness import pid_alive

PROJECT_DIR = Path(__file__).resolve().parents[1]
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
KIND_TAG = "harness.kind"  # "sweep" (parent) or "config" (child)
HASH_TAG = "harness.config_hash"
ERROR_TAG = "harness.error"


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


class Run:
    """A handle on one run; everything logged goes through MlflowClient with the run's id."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), folder)

    def log_table(self, frame: pd.DataFrame, name: str) -> None:
        self.client.log_text(self.id, frame.to_csv(index=False), name)


class Tracker:
    def __init__(self, tracking_uri: str | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def finished_hashes(self, experiment_id: str) -> set[str]:
        runs = self._search(experiment_id, f"attributes.status = 'FINISHED' and tags.`{KIND_TAG}` = 'config'")
        return {r.data.tags.get(HASH_TAG) for r in runs}

    def finished_metric(self, experiment_id: str, config_hash: str, key: str) -> float:
        """``key`` of the latest FINISHED run of a config (NaN if none): e.g. a skipped baseline's ppl."""
        runs = self._search(
            experiment_id, f"attributes.status = 'FINISHED' and tags.`{HASH_TAG}` = '{config_hash}'"
        )
        latest = max(runs, key=lambda r: r.info.start_time, default=None)
        return float(latest.data.metrics.get(key, math.nan)) if latest else math.nan

    def _search(self, experiment_id: str, filter_string: str) -> list[Any]:
        return list(self.client.search_runs([experiment_id], filter_string=filter_string, max_results=50_000))

    def reap_stale(self, experiment_id: str) -> list[str]:
        """Mark FAILED every RUNNING run of this experiment whose process on this host no longer exists."""
        host = socket.gethostname()
        reaped = []
        for run in self._search(experiment_id, "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            pid = tags.get("harness.pid", "")
            if tags.get("harness.host") == host and pid.isdigit() and not pid_alive(int(pid)):
                self.client.set_tag(run.info.run_id, ERROR_TAG, f"stale: process {pid} died while running")
                self.client.set_terminated(run.info.run_id, "FAILED")
                reaped.append(run.info.run_id)
        return reaped

    @contextlib.contextmanager
    def run(
        self, experiment_id: str, name: str, tags: Mapping[str, Any], parent: Run | None = None
    ) -> Iterator[Run]:
        """A run that always ends: FINISHED, FAILED with the error recorded, or KILLED on interrupt."""
        all_tags = {
            RUN_NAME_TAG: name,
            "harness.pid": os.getpid(),
            "harness.host": socket.gethostname(),
            **tags,
        }
        if parent is not None:
            all_tags[PARENT_TAG] = parent.id
        created = self.client.create_run(
            experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=name
        )
        run = Run(self.client, created.info.run_id)
        try:
            yield run
        except (KeyboardInterrupt, SystemExit):
            self.client.set_terminated(run.id, "KILLED")
            raise
        except BaseException as exc:
            run.set_tags({ERROR_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
            self.client.set_terminated(run.id, "FAILED")
            raise
        self.client.set_terminated(run.id, "FINISHED")

    def runs(self, experiment_name: str) -> pd.DataFrame:
        """All runs of an experiment as a frame (params.*, metrics.*, tags.*, status, run_id...)."""
        import mlflow

        found = self.client.get_experiment_by_name(experiment_name)
        if found is None:
            return pd.DataFrame()
        return mlflow.search_runs([found.experiment_id], max_results=100_000)

    def download_artifact(self, run_id: str, path: str) -> Path:
        """A local copy of one artifact, kept under the cache (runs are immutable once finished).

        The download lands in a temporary directory first and is renamed into place, so an interrupted
        download never leaves a partial file that a later call would trust.
        """
        from mlflow.exceptions import MlflowException

        destination = cache_dir() / "artifacts" / run_id
        local = destination / path
        if local.exists():
            return local
        destination.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=destination, prefix=".partial-") as staging:
            try:
                fetched = Path(self.client.download_artifacts(run_id, path, staging))
            except (MlflowException, OSError) as exc:
                raise FileNotFoundError(f"run {run_id} has no artifact {path!r}: {exc}") from None
            local.parent.mkdir(parents=True, exist_ok=True)
            fetched.replace(local)
        return local

    def ui_command(self, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            self.uri,
            "--host",
            host,
            "--port",
            str(port),
        ]


def serve_ui(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> int:
    command = Tracker(tracking_uri).ui_command(host, port)
    print(f"MLflow UI on http://{host}:{port}  (store: {command[4]}); Ctrl-C to stop", flush=True)
    return subprocess.call(command)
