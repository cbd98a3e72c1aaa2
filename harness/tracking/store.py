"""Runs in an MLflow store: a handle on one run, and the tracker that makes, ends, finds and reads them."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from harness.cache import building, cache_dir
from harness.liveness import pid_alive
from harness.metrics import metric
from harness.tracking.schema import (
    ERROR_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HASH_TAG,
    HOST_TAG,
    KIND_TAG,
    LAYERS_ARTIFACT,
    PARENT_TAG,
    PID_TAG,
    REPORT_FOLDER,
    RUN_NAME_TAG,
    TOKENS_ARTIFACT,
    RunRecord,
    default_tracking_uri,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from harness.measure import Measurement

# ---- runs ------------------------------------------------------------------------------------------------


class Run:
    """A handle on one run; everything logged goes through the tracker's client with the run's id."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Declared metrics only (``harness.metrics``): an undeclared name is a KeyError, not a new column."""
        self._log_batch([(name, value, 0) for name, value in metrics.items() if value is not None])

    def log_curve(self, name: str, values: Sequence[float]) -> None:
        """A declared metric's value at each step (0, 1, …); the run shows the last."""
        self._log_batch([(name, value, step) for step, value in enumerate(values)])

    def curve(self, name: str) -> list[float]:
        """A metric's value at each logged step, in step order (empty where the run logged none)."""
        history = self.client.get_metric_history(self.id, name)
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    def _log_batch(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name in dict.fromkeys(name for name, _, _ in points):
            metric(name)
        items = [Metric(name, float(value), now, step) for name, value, step in points]
        for start in range(0, len(items), 1000):  # MLflow's log_batch takes at most 1,000 metrics
            self.client.log_batch(self.id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, text, name)

    def log_figure(self, figure: Figure, name: str) -> None:
        self.client.log_figure(self.id, figure, name)

    def log_measurement(self, measurement: Measurement) -> None:
        """A config's numbers, its curves, its per-layer table, its per-token results, records and figures."""
        self.log_metrics(measurement.metrics)
        for name, values in measurement.curves.items():
            self.log_curve(name, values)
        if measurement.layers is not None:
            self.client.log_text(self.id, measurement.layers.to_csv(index=False), LAYERS_ARTIFACT)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / TOKENS_ARTIFACT
            np.savez_compressed(path, **{k: _compact(v) for k, v in measurement.per_token.items()})
            self.log_artifact(path)
        for name, record in measurement.records.items():
            self.client.log_dict(self.id, record, name)
        for name, figure in measurement.figures.items():
            self.log_figure(figure, name)


def _compact(values: np.ndarray) -> np.ndarray:
    return values if values.dtype == np.bool_ else values.astype(np.float32)


def read_tokens(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


_TRACKERS: dict[tuple[int, str], Tracker] = {}


class Tracker:
    """One store's client. ``Tracker.of`` gives the process's one tracker per store; constructing one directly
    makes a client of its own (a test reading a store a sweep writes)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bar shows progress
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        if self.uri.startswith("sqlite:///"):
            # MLflow creates a fresh sqlite store's tables when its client is made; two processes doing it
            # at once collide ("table ... already exists"), so that happens under a lock beside the file.
            database = Path(self.uri.removeprefix("sqlite:///"))
            database.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{database}.lock"):
                self.client = MlflowClient(self.uri)
        else:
            self.client = MlflowClient(self.uri)

    @classmethod
    def of(cls, tracking_uri: str | None = None) -> Tracker:
        """This process's tracker of a store (``None``: the default store of the working directory now)."""
        key = (os.getpid(), tracking_uri or default_tracking_uri())  # a forked child makes its own
        if key not in _TRACKERS:
            _TRACKERS[key] = cls(key[1])
        return _TRACKERS[key]

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created if missing; of two processes creating it at once, the one that
        loses the race uses the winner's."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(
                    name, self.artifact_location(name), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException:
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag was set
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    def artifact_location(self, name: str) -> str | None:
        if not self.uri.startswith("sqlite:///"):
            return None  # the server decides
        database = Path(self.uri.removeprefix("sqlite:///")).absolute()  # sqlite:///s.db is relative
        return (database.parent / "mlartifacts" / name).as_uri()

    def attach(self, run_id: str) -> Run:
        """A handle on an existing run, e.g. a sweep's parent run in a worker process."""
        return Run(self.client, run_id)

    def fail(self, run_id: str, reason: str) -> None:
        self.client.set_tag(run_id, ERROR_TAG, reason)
        self.client.set_terminated(run_id, "FAILED")

    def finished_runs(
        self, experiment_id: str, kind: str = "config"
    ) -> dict[str, tuple[str, dict[str, float]]]:
        """FINISHED runs of one kind by config hash: (run id, metrics), the latest where there are several."""
        runs = self.search(experiment_id, f"attributes.status = 'FINISHED' and tags.`{KIND_TAG}` = '{kind}'")
        runs.sort(key=lambda r: r.info.start_time)
        return {r.data.tags.get(HASH_TAG): (r.info.run_id, dict(r.data.metrics)) for r in runs}

    def running_hashes(self, experiment_id: str) -> set[str]:
        """Config hashes with a RUNNING run (after ``reap_stale``: held by a live owner)."""
        runs = self.search(experiment_id, f"attributes.status = 'RUNNING' and tags.`{KIND_TAG}` = 'config'")
        return {r.data.tags.get(HASH_TAG) for r in runs}

    def search(self, experiment_id: str, filter_string: str) -> list[Any]:
        return list(self.client.search_runs([experiment_id], filter_string=filter_string, max_results=50_000))

    def reap_stale(self, experiment_id: str) -> list[str]:
        """Mark FAILED every RUNNING run of this experiment whose process on this host no longer exists."""
        host = socket.gethostname()
        reaped = []
        for run in self.search(experiment_id, "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            pid = tags.get(PID_TAG, "")
            if tags.get(HOST_TAG) == host and pid.isdigit() and not pid_alive(int(pid)):
                self.fail(run.info.run_id, f"stale: process {pid} died while running")
                reaped.append(run.info.run_id)
        return reaped

    @contextlib.contextmanager
    def run(
        self, experiment_id: str, name: str, tags: Mapping[str, Any], parent: Run | None = None
    ) -> Iterator[Run]:
        """A run that always ends: FINISHED, FAILED with the error recorded, or KILLED on interrupt."""
        all_tags = {RUN_NAME_TAG: name, PID_TAG: os.getpid(), HOST_TAG: socket.gethostname(), **tags}
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
            self.fail(run.id, f"{type(exc).__name__}: {exc}"[:5000])
            raise
        self.client.set_terminated(run.id, "FINISHED")

    def records(self, experiment_name: str) -> list[RunRecord]:
        """The experiment's config runs, typed, oldest first; none for an experiment the store lacks."""
        found = self.client.get_experiment_by_name(experiment_name)
        if found is None:
            return []
        runs = self.search(found.experiment_id, f"tags.`{KIND_TAG}` = 'config'")
        return sorted((RunRecord.of(run) for run in runs), key=lambda r: r.start_time)

    def log_report(self, experiment_name: str, paths: list[Path]) -> None:
        """Attach exported tables and plots to the experiment's latest sweep run, beside its numbers."""
        found = self.client.get_experiment_by_name(experiment_name)
        sweeps = self.search(found.experiment_id, f"tags.`{KIND_TAG}` = 'sweep'") if found else []
        if not sweeps:
            return
        parent = Run(self.client, max(sweeps, key=lambda r: r.info.start_time).info.run_id)
        for path in paths:
            parent.log_artifact(path, REPORT_FOLDER)

    def download_artifact(self, run_id: str, path: str) -> Path:
        """A local copy of one artifact, kept in the cache (runs are immutable once finished) and built
        atomically there, so an interrupted download never leaves a partial file that a later call trusts."""
        from mlflow.exceptions import MlflowException

        entry = cache_dir() / "artifacts" / run_id / path
        with building(entry, marker=Path(path).name) as build:
            if build is not None:
                staging = build.parent / "download"
                staging.mkdir()
                try:
                    fetched = Path(self.client.download_artifacts(run_id, path, str(staging)))
                except (MlflowException, OSError) as exc:
                    raise FileNotFoundError(f"run {run_id} has no artifact {path!r}: {exc}") from None
                fetched.replace(build / Path(path).name)
        return entry / Path(path).name
