"""Sweeps beyond one process, with real parts: a local Ray cluster, an MLflow tracking server on PostgreSQL
(``harness server``) on loopback, concurrent drivers, a killed worker, a server restart, and the UI in a real
headless Chromium. Experiments are tiny (a few layers of smollm2-135m, a few hundred tokens) to stay fast."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import stored_runs

from harness.executors import RayExecutor, set_threads, task_resources
from harness.experiments import load_experiment
from harness.liveness import pid_alive
from harness.server import Cluster
from harness.sweep import SweepOptions, run_sweep
from harness.tracking import Tracker

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


def tiny_experiment(folder: Path, name: str, formats: str = "[nf4, int4]", tokens: int = 256) -> Path:
    """A few seconds a config: the first two blocks' attention projections, a few hundred tokens."""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        "model: smollm2-135m\n"
        "layers: {include: ['model.layers.[01].self_attn.*']}\n"
        "data: {corpus: wikipedia, calibration_sequences: 1, calibration_length: 32}\n"
        f"eval: {{protocol: disjoint, context_length: 128, tokens: {tokens}, kld: true}}\n"
        f"grid: {{format: {formats}}}\n"
        "fixed: {block_size: 64}\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``harness server`` in a subprocess, with its own cache folder (so its own database)."""

    def __init__(self, cache: Path, port: int | None = None) -> None:
        self.cache, self.port = cache, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "HARNESS_CACHE": str(self.cache), "MLFLOW_TRACKING_URI": ""}
        command = [sys.executable, "-m", "harness.cli", "server", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # the URI comes first, once it answers
            if line.strip() == self.uri:
                threading.Thread(target=self.process.stdout.read, daemon=True).start()  # keep the pipe empty
                return
        raise AssertionError(f"harness server exited with {self.process.wait()}")

    def stop(self) -> None:
        assert self.process is not None
        # SIGTERM stops it as Ctrl-C does; SIGINT itself is ignored by processes started in the background
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cache = tmp_path_factory.mktemp("server-cache")
    running = Server(cache)
    running.start()
    yield running
    running.stop()
    cluster = Cluster.for_cache(cache)
    shutil.rmtree(cluster.data, ignore_errors=True)
    shutil.rmtree(cluster.socket_dir, ignore_errors=True)


def group_members(group: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(int(entry.name)) == group:
                    found.append(int(entry.name))
    return found


def test_a_server_killed_with_its_group_is_started_again_and_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Server(cache)
    first.start()
    assert first.process is not None
    cluster = Cluster.for_cache(cache)
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    mlflow_group = int((cache / "server" / "tracking.pgid").read_text())
    assert len(group_members(mlflow_group)) >= 2  # the MLflow server and the workers it started
    os.killpg(first.process.pid, signal.SIGKILL)  # the harness server's own group, as a terminal's kill does
    first.process.wait()
    second = Server(cache, port=first.port)  # the same port: nothing of the first may still hold it
    try:
        second.start()
        assert group_members(mlflow_group) == []
        assert int((cluster.data / "postmaster.pid").read_text().split()[0]) == postmaster  # adopted
        tracker = Tracker(second.uri)
        assert tracker.experiment_id("after-restart") == tracker.experiment_id("after-restart")
    finally:
        second.stop()
        shutil.rmtree(cluster.data, ignore_errors=True)
        shutil.rmtree(cluster.socket_dir, ignore_errors=True)
    deadline = time.monotonic() + 30  # pg_ctl's stop returns once the pid file is gone, just before the exit
    while pid_alive(postmaster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(postmaster) and not (cache / "server" / "tracking.pgid").exists()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the module: its workers stay warm between tests."""
    import ray

    ray.init(num_cpus=os.cpu_count(), object_store_memory=256 * 2**20, include_dashboard=False)
    yield
    ray.shutdown()


def children(uri: str, experiment: str) -> pd.DataFrame:
    frame = stored_runs(uri, experiment)
    return frame[frame["tags.harness.kind"] == "config"]


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return sorted(c for c in frame if c.startswith("metrics.") and not c.startswith("metrics.time_"))


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The tiny experiment swept by the local executor into sqlite, with 1 torch thread: as each of the 2
    Ray workers on 2 cores has (BLAS sums depend on the thread count)."""
    folder = tmp_path_factory.mktemp("local")
    path, uri = tiny_experiment(folder, "tiny", "[nf4, int4, fp4]"), f"sqlite:///{folder / 'mlflow.db'}"
    threads = torch.get_num_threads()
    set_threads(1)
    try:
        summary = run_sweep(load_experiment(str(path)), SweepOptions(tracking_uri=uri, progress=False))
    finally:
        set_threads(threads)
    assert not summary.failed
    return uri, path


def test_ray_sweep_on_the_server_equals_the_local_sweep(
    server: Server, ray_cluster: None, local_store: tuple[str, Path]
) -> None:
    local_uri, path = local_store
    summary = run_sweep(
        load_experiment(str(path)),
        SweepOptions(tracking_uri=server.uri, progress=False),
        RayExecutor(workers=2),
    )
    assert not summary.failed
    assert sorted(summary.finished) == ["baseline", "fp4-b64", "int4-b64", "nf4-b64"]
    remote, local = children(server.uri, "tiny"), children(local_uri, "tiny")
    assert (remote["status"] == "FINISHED").all() and remote["tags.harness.config_hash"].is_unique
    assert len(remote) == 4 and remote["tags.mlflow.parentRunId"].nunique() == 1
    assert remote["tags.harness.ray_task"].nunique() == 2  # two shards, each its own task
    assert (remote["params.torch_threads"] == "1").all()  # cores / workers
    assert remote["tags.mlflow.note.content"].str.contains("smollm2-135m").all()
    columns = metric_columns(local)
    assert "metrics.kld_mean" in columns and columns == metric_columns(remote)
    by_hash = [f.set_index("tags.harness.config_hash").sort_index()[columns] for f in (remote, local)]
    pd.testing.assert_frame_equal(by_hash[0], by_hash[1], check_exact=True)
    ledger = stored_runs(server.uri, "tiny.claims")  # the claims: a record, not a run left at work
    assert len(ledger) == 1 and ledger["status"].item() == "FINISHED"
    assert ledger.filter(like="params.claim.").notna().sum(axis=1).item() == 4


def test_a_killed_worker_is_retried_and_redoes_only_its_unfinished_config(
    server: Server, ray_cluster: None, tmp_path: Path
) -> None:
    path = tiny_experiment(tmp_path, "killed-worker", "[nf4, int4]", tokens=1024)
    killed: list[int] = []

    def kill_first_running_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            frame = stored_runs(server.uri, "killed-worker")
            if len(frame) and "tags.harness.ray_task" in frame:
                running = frame[(frame["status"] == "RUNNING") & frame["tags.harness.ray_task"].notna()]
                if len(running):
                    pid = int(running["tags.harness.pid"].iloc[0])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_running_worker)
    killer.start()
    summary = run_sweep(
        load_experiment(str(path)),
        SweepOptions(tracking_uri=server.uri, progress=False),
        RayExecutor(workers=1),
    )
    killer.join()
    assert killed, "no worker was seen running a config"
    assert not summary.failed and sorted(summary.finished) == ["baseline", "int4-b64", "nf4-b64"]
    child = children(server.uri, "killed-worker")
    assert "RUNNING" not in set(child["status"])
    finished = child[child["status"] == "FINISHED"]
    assert finished["tags.harness.config_hash"].is_unique and len(finished) == 3
    dead = child[child["tags.harness.pid"] == str(killed[0])]
    assert len(dead) == 1 and dead["status"].item() == "FAILED"
    assert dead["tags.harness.error"].item().startswith("worker died: Ray task")
    # the retry (same task id) redid the dead config, and only that one
    assert (finished["tags.mlflow.runName"] == dead["tags.mlflow.runName"].item()).sum() == 1
    assert finished["tags.harness.ray_task"].nunique() == 1


def sweep_process(uri: str, path: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "harness.cli", "sweep", str(path), "--tracking-uri", uri]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(processes: list[subprocess.Popen[str]]) -> list[str]:
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    return outputs


def test_concurrent_sweeps_on_one_server(server: Server, tmp_path: Path) -> None:
    """Two drivers of one experiment and three other experiments, all at once, on one server."""
    names = ["same", "other-a", "other-b", "other-c"]
    paths = {name: tiny_experiment(tmp_path, f"concurrent-{name}", "[nf4]") for name in names}
    outputs = finish([sweep_process(server.uri, paths[name]) for name in [names[0], *names]])
    assert not any("database is locked" in output for output in outputs)
    for name in names:
        child = children(server.uri, f"concurrent-{name}")
        assert sorted(child["status"]) == ["FINISHED", "FINISHED"], name  # baseline + nf4, nothing twice
        assert child["metrics.kld_mean"].notna().all() and child["metrics.ppl"].notna().all()
        assert child["metrics.bits_per_param"].notna().all()


def test_two_sweeps_at_once_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, "sqlite-race", "[nf4, int4]")
    finish([sweep_process(uri, path), sweep_process(uri, path)])
    child = children(uri, "sqlite-race")
    assert len(child) == 3 and set(child["status"]) == {"FINISHED"}  # baseline + 2, each run once
    assert child["tags.harness.config_hash"].is_unique


def test_the_sweep_survives_a_server_restart(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_experiment(tmp_path, "restart", "[nf4, int4]", tokens=512)
    # MLflow's client waits 0, 2, 4, 8, ... s between retries, not its default 0, 4, 8, 16, ...
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    process = sweep_process(server.uri, path)
    deadline = time.monotonic() + 240
    while not (len(frame := stored_runs(server.uri, "restart")) and (frame["status"] == "RUNNING").any()):
        assert time.monotonic() < deadline and process.poll() is None, "the sweep did not start a run"
        time.sleep(0.3)
    server.stop()
    server.start()
    output = process.communicate(timeout=600)[0]
    assert process.returncode in (0, 1), output  # went on, or failed a config cleanly
    again = sweep_process(server.uri, path)
    assert again.wait(timeout=600) == 0
    child = children(server.uri, "restart")
    assert "RUNNING" not in set(stored_runs(server.uri, "restart")["status"])
    finished = child[child["status"] == "FINISHED"]
    assert sorted(finished["tags.mlflow.runName"]) == ["baseline", "int4-b64", "nf4-b64"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by .ci/run")
def test_the_ui_lands_on_the_runs_with_their_metrics_and_plots(local_store: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    uri = local_store[0]
    child = children(uri, "tiny").set_index("tags.mlflow.runName")
    port = free_port()
    command = [sys.executable, "-m", "harness.cli", "ui", "tiny", "--tracking-uri", uri, "--port", str(port)]
    ui = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert ui.stdout is not None
        url = next(line.strip() for line in ui.stdout if line.startswith("http://"))
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "/runs?" in url
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url)
            sweep_row = page.get_by_role("gridcell", name=re.compile("sweep tiny"))
            expect(sweep_row).to_be_visible(timeout=60_000)
            expect(page.get_by_role("columnheader", name="kld_mean").first).to_be_visible()
            sweep_row.get_by_role("button").first.click()  # the one click MLflow's URL cannot make for us
            for label in child.index:
                expect(page.get_by_role("link", name=label, exact=True)).to_be_visible(timeout=30_000)
            for value in sorted({f"{v:g}" for v in child["metrics.bits_per_param"]}):  # 4.5 and 32
                expect(page.get_by_role("gridcell", name=value, exact=True).first).to_be_visible()
            for name in ("ppl", "kld_mean"):  # the table shows a metric's full value
                value = repr(float(child.loc["nf4-b64", f"metrics.{name}"]))
                expect(page.get_by_role("gridcell", name=value, exact=True)).to_be_visible()
            run_id = child.loc["nf4-b64", "run_id"]
            experiment_id = child.loc["nf4-b64", "experiment_id"]
            page.goto(
                f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/layer_nmse.png"
            )
            plot = page.get_by_role("img", name="layer_nmse.png")
            expect(plot).to_be_visible(timeout=60_000)
            assert plot.evaluate("image => image.naturalWidth") > 100  # the plot itself, not a broken icon
            browser.close()
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)


GPU_CLUSTER = """
import os, time
import ray
from harness.executors import task_resources

def visible_device():
    time.sleep(2)  # the two tasks overlap, so each holds a GPU of its own
    return os.environ["CUDA_VISIBLE_DEVICES"]

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
resources = task_resources(ray.cluster_resources(), 2)
print(resources)
print(sorted(ray.get([ray.remote(visible_device).options(**resources).remote() for _ in range(2)])))
ray.shutdown()
"""


def test_ray_tasks_ask_for_a_gpu_each_when_the_cluster_has_gpus() -> None:
    """A local cluster declaring 2 GPUs (Ray's resource API; no device needed), in a process of its own: each
    shard's task holds one, two run at once, and Ray tells each its own device through CUDA_VISIBLE_DEVICES.
    A CPU cluster: none."""
    assert task_resources({"CPU": 16.0}, 2) == {"num_cpus": 8, "num_gpus": 0}
    assert task_resources({"CPU": 16.0}, 2, [0.0]) == {"num_cpus": 8, "num_gpus": 0}
    spread = task_resources({"CPU": 64.0, "GPU": 12.0}, 4, [8.0, 4.0, 0.0])  # a device map: a node's GPUs
    assert spread == {"num_cpus": 16, "num_gpus": 4}
    done = subprocess.run([sys.executable, "-c", GPU_CLUSTER], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["{'num_cpus': 1, 'num_gpus': 1}", "['0', '1']"]
