"""The one module that talks to MLflow: the run schema, experiments, parent/child runs, their end states, and
reading back.

Store: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the working directory
with artifacts in ``mlartifacts/`` beside it (MLflow 3's default layout; a server URI works the same way).

The run schema. A sweep is a parent run (``harness.kind=sweep``); each config is a child run
(``harness.kind=config``) tagged with its config hash (config + numerics version: what resume matches), its
config id (the config alone: what supersedes in a table), the numerics version and the baseline flag. Its
params are the config's fields flattened (``config_params``), the session's facts and the provenance; its
metrics are declared in ``harness.metrics``, and nothing undeclared is logged.

Every run ends in a terminal state: FINISHED, FAILED (the exception is recorded in the ``harness.error``
tag) or KILLED (Ctrl-C / SIGTERM). A run left RUNNING by a process that died (kill -9) is recognised by
its ``harness.pid``/``harness.host`` tags and marked FAILED by the next sweep (``reap_stale``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import harness
from harness import NUMERICS_VERSION
from harness.cache import building, cache_dir
from harness.liveness import pid_alive
from harness.metrics import metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from harness.experiments import RunConfig
    from harness.measure import Measurement

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
KIND_TAG = "harness.kind"  # "sweep" (parent) or "config" (child)
HASH_TAG = "harness.config_hash"
CONFIG_ID_TAG = "harness.config_id"
NUMERICS_TAG = "harness.numerics_version"
BASELINE_TAG = "harness.baseline"
BASELINE_ID_TAG = "harness.baseline_id"  # the config id of the baseline a config is compared with
ERROR_TAG = "harness.error"
PID_TAG = "harness.pid"
HOST_TAG = "harness.host"
COMMIT_PARAM = "git_commit"
LAYERS_ARTIFACT = "layers.csv"
TOKENS_ARTIFACT = "tokens.npz"  # per scored token: nll, base_nll, kld (float32), top1_match (bool)
REPORT_FOLDER = "report"  # where the tables and plots go among the parent sweep run's artifacts
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "lm_eval",
    "mlflow",
    "numpy",
    "numba",
    "bitsandbytes",
    "torchao",
)


STORE_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI or sqlite ./mlflow.db)"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def run_column(name: str, kind: str = "tags") -> str:
    """The column of a ``Tracker.runs`` frame holding a tag, param or metric."""
    return f"{kind}.{name}"


# ---- what a config's run records ------------------------------------------------------------------------


def config_params(config: RunConfig) -> dict[str, Any]:
    """Every config field as a flat MLflow param, plus the hash, the label and the variant."""
    dq = config.double_quant
    return {
        "config_hash": config.hash,
        "label": config.label,
        "variant": config.variant,
        "model": config.model,
        "format": config.format or "none",
        "block_size": config.block_size if config.block_size is not None else "none",
        "double_quant": f"{dq.code}/{dq.block_size}" if dq else "off",
        "dq_code": dq.code if dq else "none",
        "dq_block_size": dq.block_size if dq else 0,
        "constant_dtype": config.constant_dtype,
        "compute_dtype": config.compute_dtype,
        "rounding": config.rounding,
        "layers_include": ",".join(config.include) or "(all Linear in blocks)",
        "layers_exclude": ",".join(config.exclude) or "(none)",
        "corpus": config.data.corpus,
        "calibration_sequences": config.data.calibration_sequences,
        "calibration_length": config.data.calibration_length,
        "protocol": config.eval.protocol,
        "context_length": config.eval.context_length,
        "stride": config.eval.stride,
        "eval_tokens": config.eval.tokens,
        "bos": config.eval.bos,
        "kld": config.eval.kld,
        "kld_reference": config.eval.kld_reference,
        "kld_topk": config.eval.kld_topk,
        "tasks": ",".join(config.eval.tasks) or "(none)",
        "limit": config.eval.limit,
        "seed": config.seed,
        "memory_convention": "quantized linears as stored; every other parameter at its loaded dtype",
    }


def config_tags(config: RunConfig) -> dict[str, str]:
    """Tags a config's run is searched by: hash (resume), id (supersede), numerics version, the axes."""
    dq = "on" if config.double_quant else "off"
    return {
        KIND_TAG: "config",
        HASH_TAG: config.hash,
        CONFIG_ID_TAG: config.config_id,
        NUMERICS_TAG: NUMERICS_VERSION,
        BASELINE_TAG: str(config.is_baseline).lower(),
        BASELINE_ID_TAG: config.baseline().config_id,
        "model": config.model,
        "format": config.format or "none",
        "block_size": str(config.block_size if config.block_size is not None else "none"),
        "double_quant": dq,
    }


def sweep_tags() -> dict[str, str]:
    return {KIND_TAG: "sweep", NUMERICS_TAG: NUMERICS_VERSION}


def provenance() -> dict[str, str]:
    """Package versions and the git commit, so a number can be traced to the code that made it."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[f"version.{package}"] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[f"version.{package}"] = "not installed"
    return {**versions, "version.harness": metadata.version("harness"), COMMIT_PARAM: git_commit()}


def git_commit() -> str:
    """HEAD of the checkout the package runs from ("-dirty" with uncommitted changes); "unknown" when the
    package is installed rather than run from a checkout."""
    package = Path(harness.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")) / "harness" != package:
            return "unknown"  # e.g. installed into a venv that lies inside some other repository
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return f"{git('rev-parse', 'HEAD')}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- runs ------------------------------------------------------------------------------------------------


class Run:
    """A handle on one run; everything logged goes through the tracker's client with the run's id."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self.id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Declared metrics only (``harness.metrics``): an undeclared name is a KeyError, not a new column."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name in metrics:
            metric(name)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        self._client.log_batch(self.id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._client.log_artifact(self.id, str(path), folder)

    def log_figure(self, figure: Figure, name: str) -> None:
        self._client.log_figure(self.id, figure, name)

    def log_measurement(self, measurement: Measurement) -> None:
        """A config's numbers, its per-layer table, its per-token results, records and figures."""
        self.log_metrics(measurement.metrics)
        if measurement.layers is not None:
            self._client.log_text(self.id, measurement.layers.to_csv(index=False), LAYERS_ARTIFACT)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / TOKENS_ARTIFACT
            np.savez_compressed(path, **{k: _compact(v) for k, v in measurement.tokens.items()})
            self.log_artifact(path)
        for name, record in measurement.records.items():
            self._client.log_dict(self.id, record, name)
        for name, figure in measurement.figures.items():
            self.log_figure(figure, name)


def _compact(values: np.ndarray) -> np.ndarray:
    return values if values.dtype == np.bool_ else values.astype(np.float32)


def read_tokens(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


class Tracker:
    def __init__(self, tracking_uri: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bar shows progress
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self._client = MlflowClient(self.uri)

    def experiment_id(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
        return self._client.create_experiment(name, artifact_location=location)

    def finished_hashes(self, experiment_id: str) -> set[str]:
        runs = self._search(experiment_id, f"attributes.status = 'FINISHED' and tags.`{KIND_TAG}` = 'config'")
        return {r.data.tags.get(HASH_TAG) for r in runs}

    def _search(self, experiment_id: str, filter_string: str) -> list[Any]:
        return list(
            self._client.search_runs([experiment_id], filter_string=filter_string, max_results=50_000)
        )

    def reap_stale(self, experiment_id: str) -> list[str]:
        """Mark FAILED every RUNNING run of this experiment whose process on this host no longer exists."""
        host = socket.gethostname()
        reaped = []
        for run in self._search(experiment_id, "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            pid = tags.get(PID_TAG, "")
            if tags.get(HOST_TAG) == host and pid.isdigit() and not pid_alive(int(pid)):
                self._client.set_tag(run.info.run_id, ERROR_TAG, f"stale: process {pid} died while running")
                self._client.set_terminated(run.info.run_id, "FAILED")
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
        created = self._client.create_run(
            experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=name
        )
        run = Run(self._client, created.info.run_id)
        try:
            yield run
        except (KeyboardInterrupt, SystemExit):
            self._client.set_terminated(run.id, "KILLED")
            raise
        except BaseException as exc:
            run.set_tags({ERROR_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
            self._client.set_terminated(run.id, "FAILED")
            raise
        self._client.set_terminated(run.id, "FINISHED")

    def runs(self, experiment_name: str) -> pd.DataFrame:
        """All runs of an experiment as a frame (params.*, metrics.*, tags.*, status, run_id...)."""
        import mlflow

        found = self._client.get_experiment_by_name(experiment_name)
        if found is None:
            return pd.DataFrame()
        return mlflow.search_runs([found.experiment_id], max_results=100_000)

    def log_report(self, experiment_name: str, paths: list[Path]) -> None:
        """Attach exported tables and plots to the experiment's latest sweep run, beside its numbers."""
        frame = self.runs(experiment_name)
        if frame.empty or run_column(KIND_TAG) not in frame:
            return
        sweeps = frame[frame[run_column(KIND_TAG)] == "sweep"].sort_values("start_time")
        if sweeps.empty:
            return
        parent = Run(self._client, str(sweeps["run_id"].iloc[-1]))
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
                    fetched = Path(self._client.download_artifacts(run_id, path, str(staging)))
                except (MlflowException, OSError) as exc:
                    raise FileNotFoundError(f"run {run_id} has no artifact {path!r}: {exc}") from None
                fetched.replace(build / Path(path).name)
        return entry / Path(path).name

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
