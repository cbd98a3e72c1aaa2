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

Claims: before a config runs, its runner claims it in the experiment's ledger, a bookkeeping run in the
experiment ``NAME.claims`` whose params are the claims (``claim.HASH.N`` = the owner). The ledger is FINISHED
from the moment it is made (MLflow logs params to a finished run), so no run is ever shown at work that is
not. MLflow params are
write-once, so of two runners logging the same key one wins, whatever the store (sqlite, a server), and only
the winner runs the config. A claim whose run FINISHED means done; a claim whose owner (host, pid, Ray task)
died, or whose run FAILED or was KILLED, is superseded by the next generation ``N+1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from filelock import FileLock

import harness
from harness import NUMERICS_VERSION
from harness.cache import building, cache_dir
from harness.liveness import pid_alive, sigterm_as_interrupt, stop_group
from harness.metrics import metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from harness.experiments import RunConfig
    from harness.measure import Measurement

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
KIND_TAG = "harness.kind"  # "sweep" (parent) or "config" (child); "sensitivity", "allocate" and "allocation"
HASH_TAG = "harness.config_hash"
CONFIG_ID_TAG = "harness.config_id"
NUMERICS_TAG = "harness.numerics_version"
BASELINE_TAG = "harness.baseline"
BASELINE_ID_TAG = "harness.baseline_id"  # the config id of the baseline a config is compared with
ALLOCATION_METHOD_TAG = "harness.allocation_method"  # allocated, uniform, use_more_bits, random
BUDGET_TAG = "harness.budget_bits"
ERROR_TAG = "harness.error"
PID_TAG = "harness.pid"
HOST_TAG = "harness.host"
TASK_TAG = "harness.ray_task"  # the Ray task a run was made by (retries of a task keep its id)
CLAIM_TAG = "harness.claim"  # the ledger key a config's run was claimed under
LEDGER_TAG = "harness.ledger_run"  # on the claims experiment: the id of its ledger run
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI opens the runs table, not the GenAI overview
CLAIMS_SUFFIX = ".claims"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # a view of the runs table the UI restores from a URL
VIEW_KEY = "harness-runs"
UI_METRICS = ("bits_per_param", "ppl", "delta_ppl", "kld_mean", "top1_agreement")
UI_CLICKS = (
    "Click the + beside a sweep run to list its configs (MLflow cannot be told by a URL to expand it); on "
    "another page: Runs in the experiment's left bar, then that +."
)
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
        "double_quant": dq.text if dq else "off",
        "dq_code": dq.code if dq else "none",
        "dq_block_size": dq.block_size if dq else 0,
        "constant_dtype": config.constant_dtype,
        "model_dtype": config.model_dtype,
        "compute_dtype": config.compute_dtype,
        "rounding": config.rounding,
        "overrides": "; ".join(_rule_text(o) for o in config.overrides) or "(none)",
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
        "reference_dtype": config.eval.reference_dtype,
        "tasks": ",".join(config.eval.tasks) or "(none)",
        "limit": config.eval.limit,
        "seed": config.seed,
        "memory_convention": "quantized linears as stored; every other parameter at its loaded dtype",
    }


def _rule_text(rule: Any) -> str:
    dq = rule.double_quant
    return f"{rule.layers}={rule.format}-b{rule.block_size}{f'-{dq.label}' if dq else ''}"


def config_tags(config: RunConfig) -> dict[str, str]:
    """Tags a config's run is searched by: hash (resume), id (supersede), numerics version, the axes."""
    return _config_tags(config) | {KIND_TAG: "config"}


def allocation_tags(config: RunConfig, method: str, budget: float) -> dict[str, str]:
    """A config evaluated by ``harness allocate``: kept apart from the sweep's configs by its kind."""
    return _config_tags(config) | {
        KIND_TAG: "allocation",
        ALLOCATION_METHOD_TAG: method,
        BUDGET_TAG: str(budget),
    }


def _config_tags(config: RunConfig) -> dict[str, str]:
    dq = "on" if config.double_quant else "off"
    return {
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


def config_note(config: RunConfig) -> str:
    """The one line a child run's description says about its config."""
    if config.is_baseline:
        quant = "unquantized baseline"
    else:
        dq = config.double_quant
        quant = (
            f"{config.format} block {config.block_size}, double quant "
            f"{dq.text if dq else 'off'}, constants {config.constant_dtype}, "
            f"compute {config.compute_dtype}, rounding {config.rounding}"
        )
    kld = (
        f", KLD vs {config.eval.reference_dtype} base ({config.eval.kld_reference})"
        if config.eval.kld
        else ""
    )
    return (
        f"{config.model} in {config.model_dtype}: {quant}; {config.data.corpus}, {config.eval.protocol} "
        f"context {config.eval.context_length}, {config.eval.tokens} tokens{kld}; hash {config.hash}"
    )


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

    def log_text(self, text: str, name: str) -> None:
        self._client.log_text(self.id, text, name)

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


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: a process on a host, in a Ray task when run by one, for one sweep (its parent run).

    ``nonce`` tells two attempts of one Ray task apart even when a retry reuses the pid."""

    host: str
    pid: int
    task: str  # "" outside Ray
    sweep: str
    nonce: str

    @classmethod
    def here(cls, sweep: str, task: str = "") -> Owner:
        return cls(socket.gethostname(), os.getpid(), task, sweep, uuid.uuid4().hex[:8])

    def encode(self) -> str:
        return " ".join((self.host, str(self.pid), self.task or "-", self.sweep, self.nonce))

    @classmethod
    def decode(cls, value: str) -> Owner:
        host, pid, task, sweep, nonce = value.split(" ")
        return cls(host, int(pid), "" if task == "-" else task, sweep, nonce)

    def describe(self) -> str:
        task = f"Ray task {self.task} " if self.task else ""
        return f"{task}process {self.pid} on {self.host}"


def process_alive(owner: Owner) -> bool:
    """Whether the owner may still be running: dead only when it is a process of this host that is gone.
    An owner on another host is presumed alive (a distributed executor knows more, see ``executors``)."""
    return owner.host != socket.gethostname() or pid_alive(owner.pid)


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
                self._client = MlflowClient(self.uri)
        else:
            self._client = MlflowClient(self.uri)

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

        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return self._client.create_experiment(
                    name, self._artifact_location(name), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException:
                found = self._client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag was set
            self._client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    def _artifact_location(self, name: str) -> str | None:
        if not self.uri.startswith("sqlite:///"):
            return None  # the server decides
        return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()

    def ledger(self, name: str) -> str:
        """The id of the claims ledger of experiment ``name``, made once whatever the races: it is built in
        an experiment of a unique temporary name and appears under ``NAME.claims`` by a rename, which only
        one process can win (names are unique); a loser deletes its copy and uses the winner's."""
        from mlflow.exceptions import MlflowException

        claims = name + CLAIMS_SUFFIX
        found = self._client.get_experiment_by_name(claims)
        if found is None:
            staging = f"{claims}.{uuid.uuid4().hex}"
            staging_id = self._client.create_experiment(staging, self._artifact_location(staging))
            ledger = self._client.create_run(staging_id, run_name="claims", tags={KIND_TAG: "claims"})
            self._client.set_terminated(ledger.info.run_id, "FINISHED")  # a record, never a run at work
            self._client.set_experiment_tag(staging_id, LEDGER_TAG, ledger.info.run_id)
            try:
                self._client.rename_experiment(staging_id, claims)
            except MlflowException:
                self._client.delete_experiment(staging_id)
            found = self._client.get_experiment_by_name(claims)
            if found is None:
                raise RuntimeError(f"the claims experiment {claims!r} could not be created")
        ledger_id = found.tags[LEDGER_TAG]
        if self._client.get_run(ledger_id).info.status == "RUNNING":  # a store made before ledgers ended
            self._client.set_terminated(ledger_id, "FINISHED")
        return ledger_id

    def claim(
        self,
        ledger: str,
        experiment_id: str,
        config_hash: str,
        owner: Owner,
        alive: Callable[[Owner], bool] = process_alive,
        redo_finished: bool = False,
    ) -> str | None:
        """Claim a config for ``owner``: the claim's key, or None when the config is done (a FINISHED run;
        with ``redo_finished``, one of this same sweep) or held by an owner that is alive.

        A claim's RUNNING run whose owner died is marked FAILED on the way, with the reason."""
        from mlflow.exceptions import MlflowException

        prefix = f"claim.{config_hash}."
        while True:
            claims = {
                int(k.removeprefix(prefix)): v
                for k, v in self._client.get_run(ledger).data.params.items()
                if k.startswith(prefix)
            }
            generation = max(claims, default=-1)
            if generation >= 0:
                key, holder = f"{prefix}{generation}", Owner.decode(claims[generation])
                made = self._search(experiment_id, f"tags.`{CLAIM_TAG}` = '{key}'")
                statuses = {r.info.status: r.info.run_id for r in made}
                if "FINISHED" in statuses:
                    if not redo_finished or holder.sweep == owner.sweep:
                        return None
                elif "RUNNING" in statuses or not statuses:  # at work, or about to make its run
                    if alive(holder):
                        return None
                    if "RUNNING" in statuses:
                        self._fail(statuses["RUNNING"], f"worker died: {holder.describe()}")
            key = f"{prefix}{generation + 1}"
            with contextlib.suppress(MlflowException):  # lost the race: the key holds the winner
                self._client.log_param(ledger, key, owner.encode())
            if self._client.get_run(ledger).data.params.get(key) == owner.encode():
                return key

    def attach(self, run_id: str) -> Run:
        """A handle on an existing run, e.g. a sweep's parent run in a worker process."""
        return Run(self._client, run_id)

    def _fail(self, run_id: str, reason: str) -> None:
        self._client.set_tag(run_id, ERROR_TAG, reason)
        self._client.set_terminated(run_id, "FAILED")

    def finished_hashes(self, experiment_id: str) -> set[str]:
        return set(self.finished_runs(experiment_id))

    def finished_runs(
        self, experiment_id: str, kind: str = "config"
    ) -> dict[str, tuple[str, dict[str, float]]]:
        """FINISHED runs of one kind by config hash: (run id, metrics), the latest where there are several."""
        runs = self._search(experiment_id, f"attributes.status = 'FINISHED' and tags.`{KIND_TAG}` = '{kind}'")
        runs.sort(key=lambda r: r.info.start_time)
        return {r.data.tags.get(HASH_TAG): (r.info.run_id, dict(r.data.metrics)) for r in runs}

    def running_hashes(self, experiment_id: str) -> set[str]:
        """Config hashes with a RUNNING run (after ``reap_stale``: held by a live owner)."""
        runs = self._search(experiment_id, f"attributes.status = 'RUNNING' and tags.`{KIND_TAG}` = 'config'")
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
                self._fail(run.info.run_id, f"stale: process {pid} died while running")
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
            self._fail(run.id, f"{type(exc).__name__}: {exc}"[:5000])
            raise
        self._client.set_terminated(run.id, "FINISHED")

    def runs(self, experiment_name: str) -> pd.DataFrame:
        """All runs of an experiment as a frame (params.*, metrics.*, tags.*, status, run_id...)."""
        import mlflow

        found = self._client.get_experiment_by_name(experiment_name)
        if found is None:
            return pd.DataFrame()
        mlflow.set_tracking_uri(self.uri)  # search_runs reads the global store; trackers of others set it too
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

    def landing_view(self, experiment_name: str, ui_uri: str) -> str:
        """The URL of the experiment's runs table with the sweeps expanded and the key metrics as columns.

        MLflow's UI restores a view shared as the experiment tag ``mlflow.sharedViewState.KEY`` (its Share
        button), so the view is written there and the URL names its key."""
        import json

        found = self._client.get_experiment_by_name(experiment_name)
        if found is None:
            raise ValueError(f"no experiment {experiment_name!r} in {self.uri}: run `harness sweep` first")
        sweeps = self._search(found.experiment_id, f"tags.`{KIND_TAG}` = 'sweep'")
        view = {
            "runsExpanded": {run.info.run_id: True for run in sweeps},
            "selectedColumns": [
                "attributes.`Description`",
                *(f"metrics.`{name}`" for name in UI_METRICS),
            ],
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
        }
        key = VIEW_KEY
        self._client.set_experiment_tag(found.experiment_id, f"{VIEW_TAG_PREFIX}{key}", json.dumps(view))
        query = f"viewStateShareKey={key}&workflowType=machine_learning"  # the sidebar in model-training mode
        return f"{ui_uri}/#/experiments/{found.experiment_id}/runs?{query}"

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


def serve_ui(
    experiment: str, tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000
) -> int:
    """Open the experiment's runs: on the tracking server itself for an http(s) store, else on an MLflow UI
    started here over the local store (until Ctrl-C)."""
    tracker = Tracker.of(tracking_uri)
    if tracker.uri.startswith(("http://", "https://")):
        print(f"{tracker.landing_view(experiment, tracker.uri.rstrip('/'))}\n{UI_CLICKS}", flush=True)
        return 0
    ui_uri = f"http://{host}:{port}"
    with (
        sigterm_as_interrupt(),
        subprocess.Popen(tracker.ui_command(host, port), start_new_session=True) as process,
    ):
        try:
            wait_until_serving(ui_uri, process)
            url = tracker.landing_view(experiment, ui_uri)
            print(f"MLflow UI (store: {tracker.uri}), Ctrl-C to stop:\n{url}\n{UI_CLICKS}", flush=True)
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_group(process)


def wait_until_serving(uri: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Wait for an MLflow server's ``/health``; RuntimeError if its process ends or it does not answer."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the MLflow server for {uri} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server for {uri} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def is_server_process(cmdline: bytes) -> bool:
    """Whether a process's ``/proc/PID/cmdline`` is an MLflow server's or one of its workers'."""
    return b"mlflow" in cmdline


def server_command(backend_store_uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    """An MLflow tracking server that also serves the artifacts, stored under ``artifacts``."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
    ]
