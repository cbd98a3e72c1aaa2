"""The MLflow UI and tracking server: their command lines, a landing view of an experiment's runs, and
waiting for a server to answer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness.liveness import sigterm_as_interrupt, stop_group
from harness.tracking.schema import KIND_TAG, UI_CLICKS, UI_METRICS, VIEW_KEY, VIEW_TAG_PREFIX
from harness.tracking.store import Tracker

# worker processes of the UI and the server (each imports MLflow): one per core, at most MLflow's default 4
WORKERS = min(4, os.cpu_count() or 1)


def landing_view(tracker: Tracker, experiment_name: str, ui_uri: str) -> str:
    """The URL of the experiment's runs table with the sweeps expanded and the key metrics as columns.

    MLflow's UI restores a view shared as the experiment tag ``mlflow.sharedViewState.KEY`` (its Share
    button), so the view is written there and the URL names its key."""
    import json

    found = tracker.client.get_experiment_by_name(experiment_name)
    if found is None:
        raise ValueError(f"no experiment {experiment_name!r} in {tracker.uri}: run `harness sweep` first")
    sweeps = tracker.search(found.experiment_id, f"tags.`{KIND_TAG}` = 'sweep'")
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
    tracker.client.set_experiment_tag(found.experiment_id, f"{VIEW_TAG_PREFIX}{key}", json.dumps(view))
    query = f"viewStateShareKey={key}&workflowType=machine_learning"  # the sidebar in model-training mode
    return f"{ui_uri}/#/experiments/{found.experiment_id}/runs?{query}"


def ui_command(tracker: Tracker, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracker.uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(WORKERS),
    ]


def serve_ui(
    experiment: str, tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000
) -> int:
    """Open the experiment's runs: on the tracking server itself for an http(s) store, else on an MLflow UI
    started here over the local store (until Ctrl-C)."""
    tracker = Tracker.of(tracking_uri)
    if tracker.uri.startswith(("http://", "https://")):
        print(f"{landing_view(tracker, experiment, tracker.uri.rstrip('/'))}\n{UI_CLICKS}", flush=True)
        return 0
    ui_uri = f"http://{host}:{port}"
    with (
        sigterm_as_interrupt(),
        subprocess.Popen(ui_command(tracker, host, port), start_new_session=True) as process,
    ):
        try:
            wait_until_serving(ui_uri, process)
            url = landing_view(tracker, experiment, ui_uri)
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
        "--workers",
        str(WORKERS),
    ]
