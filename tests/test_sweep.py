"""The sweep end to end on the real offline smollm2-135m and a real MLflow store: logging, resume, failures,
Ctrl-C/SIGTERM (KILLED), kill -9 (stale RUNNING reaped and redone), and an MLflow tracking server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import stored_runs, tiny_experiment

from harness import NUMERICS_VERSION, experiments, runner, tracking
from harness.experiments import load_experiment
from harness.report import select_runs, write_report
from harness.sweep import SweepOptions, run_sweep
from harness.tracking import Tracker

pytestmark = pytest.mark.integration

# Small budgets: the whole pipeline, in seconds per config.
QUICK = [
    "eval.tokens=256",
    "eval.context_length=128",
    "eval.limit=4",
    "data.calibration_sequences=1",
    "data.calibration_length=64",
]


def runs(uri: str, experiment: str = "smoke") -> pd.DataFrame:
    return stored_runs(uri, experiment)


def children(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["tags.harness.kind"] == "config"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real smoke sweep into a fresh sqlite store, shared by the checks below."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_sweep(load_experiment("smoke", QUICK), SweepOptions(tracking_uri=uri, progress=False))
    assert not summary.failed, summary.describe()
    # three 4-bit configs on Q4_1 layers: the source-precision warning is said once, not once per config
    assert sum("re-quantizes that grid" in str(w.message) for w in caught) == 1
    return uri


def test_smoke_sweep_logs_every_config(store: str) -> None:
    frame = runs(store)
    parent = frame[frame["tags.harness.kind"] == "sweep"]
    assert len(parent) == 1 and parent["status"].item() == "FINISHED"
    child = children(frame).set_index("tags.mlflow.runName")
    assert set(child.index) == {"baseline", "nf4-b64", "nf4-b64-dq", "int4-b64"}
    assert (child["status"] == "FINISHED").all()
    ledger = runs(store, "smoke.claims")
    assert ledger["status"].tolist() == ["FINISHED"]  # the claims ledger is never left RUNNING
    assert (child["tags.mlflow.parentRunId"] == parent["run_id"].item()).all()
    base, nf4, dq, int4 = (child.loc[k] for k in ("baseline", "nf4-b64", "nf4-b64-dq", "int4-b64"))
    assert base["metrics.kld_mean"] < 1e-4 and base["metrics.top1_agreement"] == 1.0
    assert (child["tags.harness.numerics_version"] == NUMERICS_VERSION).all()
    assert (child.drop("baseline")["tags.harness.baseline_id"] == base["tags.harness.config_id"]).all()
    assert nf4["metrics.bits_per_param"] == 4.5
    assert 4.126 < dq["metrics.bits_per_param"] < 4.128
    for row in (nf4, dq, int4):
        assert row["metrics.kld_mean"] > 0 and 0 < row["metrics.top1_agreement"] < 1
        # paired with the unquantized model on the same tokens, from the base reference
        assert row["metrics.delta_ppl"] == pytest.approx(row["metrics.ppl"] - base["metrics.ppl"], abs=1e-3)
        assert (
            row["metrics.delta_ppl_ci95_low"] < row["metrics.delta_ppl"] < row["metrics.delta_ppl_ci95_high"]
        )
        assert row["metrics.ppl_ci95_low"] < row["metrics.ppl"] < row["metrics.ppl_ci95_high"]
        assert row["metrics.kld_mean_se"] > 0 and row["metrics.kld_p999"] <= row["metrics.kld_max"]
        assert row["metrics.tokens_scored"] == base["metrics.tokens_scored"] == 255
        assert 0 < row["metrics.nmse"] < 0.05 and 0 <= row["metrics.acc_piqa"] <= 1
    assert int4["metrics.nmse"] > nf4["metrics.nmse"]  # NF4 beats int4 on near-Gaussian weights
    assert nf4["params.protocol"] == "disjoint" and nf4["params.format"] == "nf4"
    assert nf4["params.git_commit"] and nf4["params.version.torch"].startswith("2.13")
    assert nf4["tags.format"] == "nf4" and nf4["tags.double_quant"] == "off"
    table = pd.read_csv(Tracker(store).download_artifact(nf4["run_id"], "layers.csv"))
    assert len(table) == 210 and set(table["source_precision"]) == {"Q4_1"}


def test_smoke_in_fp32_is_its_own_config(store: str, tmp_path: Path) -> None:
    """The GGUF-backed smoke model runs in bf16 by default; ``--set model_dtype=float32`` gives new configs
    with their own hashes, their own fp32 baseline and 32-bit storage (in a store of their own, so that the
    shared one keeps a single model dtype for the report tests)."""
    from harness.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [arg for o in [*QUICK, "eval.tasks=[]", "model_dtype=float32"] for arg in ("--set", o)]
    assert main(["sweep", "smoke", "--tracking-uri", uri, "--limit", "1", *overrides]) == 0
    fp32 = children(runs(uri)).set_index("tags.mlflow.runName")
    bf16 = children(runs(store)).set_index("tags.mlflow.runName")
    assert set(fp32.index) == {"baseline-fp32", "nf4-b64-fp32"} and (fp32["status"] == "FINISHED").all()
    quantized, base = fp32.loc["nf4-b64-fp32"], fp32.loc["baseline-fp32"]
    assert quantized["params.model_dtype"] == quantized["params.compute_dtype"] == "float32"
    narrow = bf16.loc["nf4-b64"]
    assert narrow["params.model_dtype"] == narrow["params.compute_dtype"] == "bfloat16"
    assert narrow["params.declared_dtype"] == "bfloat16"
    assert "general.file_type" in narrow["params.declared_dtype_rule"]
    assert not set(fp32["tags.harness.config_hash"]) & set(bf16["tags.harness.config_hash"])
    assert base["metrics.bits_per_param"] == 32.0 and bf16.loc["baseline", "metrics.bits_per_param"] == 16.0
    assert base["metrics.kld_mean"] < 1e-6
    assert quantized["metrics.ppl"] != narrow["metrics.ppl"]


def test_resume_skips_finished_and_force_redoes(store: str) -> None:
    before = len(runs(store))
    again = run_sweep(load_experiment("smoke", QUICK), SweepOptions(tracking_uri=store, progress=False))
    assert not again.finished and len(again.skipped) == 4
    assert len(runs(store)) == before  # no new runs, not even a parent
    forced = run_sweep(
        load_experiment("smoke", QUICK), SweepOptions(tracking_uri=store, progress=False, force=True, limit=1)
    )
    assert forced.finished == ["baseline", "nf4-b64"]


def test_same_config_gives_identical_metrics(store: str) -> None:
    child = children(runs(store))
    finished = child[(child["status"] == "FINISHED") & (child["tags.mlflow.runName"] == "nf4-b64")]
    assert len(finished) == 2  # the first sweep and the forced redo
    for metric in ("metrics.ppl", "metrics.kld_mean", "metrics.nmse", "metrics.top1_agreement"):
        assert finished[metric].nunique() == 1, metric


def test_a_failing_config_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, "failing", "{format: [nf4, int4]}")
    measure = runner.measure

    def broken_for_int4(session, config):  # type: ignore[no-untyped-def]
        if config.format == "int4":
            raise RuntimeError("simulated failure in int4")
        return measure(session, config)

    monkeypatch.setattr(runner, "measure", broken_for_int4)
    summary = run_sweep(load_experiment(str(path)), SweepOptions(tracking_uri=uri, progress=False))
    assert [label for label, _ in summary.failed] == ["int4-b64-fp32"]
    child = children(runs(uri, "failing")).set_index("tags.mlflow.runName")
    assert child.loc["int4-b64-fp32", "status"] == "FAILED"
    assert child.loc["int4-b64-fp32", "tags.harness.error"] == "RuntimeError: simulated failure in int4"
    assert (child.drop("int4-b64-fp32")["status"] == "FINISHED").all()

    monkeypatch.setattr(runner, "measure", measure)
    retry = run_sweep(load_experiment(str(path)), SweepOptions(tracking_uri=uri, progress=False))
    assert retry.finished == ["int4-b64-fp32"] and "baseline-fp32" in retry.skipped
    child = children(runs(uri, "failing"))
    redone = child[(child["tags.mlflow.runName"] == "int4-b64-fp32") & (child["status"] == "FINISHED")]
    base = child[child["tags.mlflow.runName"] == "baseline-fp32"]
    # Δ as the run logged it, paired with the base reference the earlier sweep's baseline was measured on
    [selected] = select_runs(Tracker(uri).records("failing"), "failing")
    (int4,) = [r for r in selected.quantized if r.label == "int4-b64-fp32"]
    assert int4.metric("delta_ppl") == redone["metrics.delta_ppl"].item()
    assert int4.metric("delta_ppl") == pytest.approx(
        redone["metrics.ppl"].item() - base["metrics.ppl"].item()
    )


def test_a_run_from_an_older_numerics_version_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, "older", "{format: [nf4]}")
    first = run_sweep(load_experiment(str(path)), SweepOptions(tracking_uri=uri, progress=False))
    assert first.finished == ["baseline-fp32", "nf4-b64-fp32"]
    for module in (experiments.config, tracking.schema):
        monkeypatch.setattr(module, "NUMERICS_VERSION", "next")
    again = run_sweep(load_experiment(str(path)), SweepOptions(tracking_uri=uri, progress=False))
    assert again.finished == ["baseline-fp32", "nf4-b64-fp32"] and not again.skipped  # nothing reused
    child = children(runs(uri, "older"))
    assert sorted(child["tags.harness.numerics_version"]) == sorted([NUMERICS_VERSION] * 2 + ["next"] * 2)
    [selected] = select_runs(Tracker(uri).records("older"), "older")  # the newer run supersedes the older
    assert [r.numerics_version for r in selected.quantized] == ["next"]


def test_a_sweep_tokenizes_each_models_corpus_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight's tokenizer and tokens serve every session of the model, in each model dtype: the
    sweep loads no tokenizer again and tokenizes nothing again."""
    import transformers

    from harness import data
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    path = tiny_experiment(tmp_path, "once", "{format: [nf4], model_dtype: [float32, bfloat16]}")
    loads: list[str] = []
    load, split = transformers.AutoTokenizer.from_pretrained, data.token_splits
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda *args, **kwargs: loads.append("tokenizer") or load(*args, **kwargs),
    )
    monkeypatch.setattr(
        data, "token_splits", lambda *args, **kwargs: loads.append("tokens") or split(*args, **kwargs)
    )
    assert main(["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    finished = children(runs(f"sqlite:///{tmp_path / 'm.db'}", "once"))
    assert len(set(finished["tags.mlflow.runName"])) == 4 and set(finished["status"]) == {"FINISHED"}
    assert loads == ["tokenizer", "tokens"]


def start_sweep(uri: str, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "harness.cli", "sweep", "smoke", "--tracking-uri", uri, *extra]
    for override in [*QUICK, "eval.tasks=[]"]:
        args += ["--set", override]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_running_child(uri: str, process: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        frame = runs(uri)
        if len(frame) and ((frame["tags.harness.kind"] == "config") & (frame["status"] == "RUNNING")).any():
            return
        time.sleep(0.3)
    raise AssertionError("no child run started in time")


def test_sigterm_marks_the_run_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_sweep(uri)
    wait_for_running_child(uri, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    frame = runs(uri)
    assert "RUNNING" not in set(frame["status"])
    assert (frame["status"] == "KILLED").sum() == 2  # the config in progress and its parent sweep


def test_kill_9_leaves_a_stale_run_that_the_next_sweep_reaps_and_redoes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = start_sweep(uri, "--limit", "1")
    wait_for_running_child(uri, process)
    process.kill()
    process.wait()
    stale = runs(uri)
    assert (stale["status"] == "RUNNING").sum() == 2  # nobody could clean up
    summary = run_sweep(
        load_experiment("smoke", [*QUICK, "eval.tasks=[]"]),
        SweepOptions(tracking_uri=uri, progress=False, limit=1),
    )
    assert len(summary.reaped) == 2 and not summary.failed
    frame = runs(uri)
    assert "RUNNING" not in set(frame["status"])
    reaped = frame[frame["run_id"].isin(summary.reaped)]
    assert (reaped["status"] == "FAILED").all()
    assert reaped["tags.harness.error"].str.startswith("stale: process").all()
    finished = children(frame)[children(frame)["status"] == "FINISHED"]
    assert sorted(finished["tags.mlflow.runName"]) == ["baseline", "nf4-b64"]  # redone, no duplicates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_logs_to_an_mlflow_server(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        summary = run_sweep(
            load_experiment("smoke", [*QUICK, "eval.tasks=[]"]),
            SweepOptions(tracking_uri=uri, progress=False, limit=1),
        )
        assert summary.finished == ["baseline", "nf4-b64"]
        frame = runs(uri)
        assert set(frame["status"]) == {"FINISHED"} and len(frame) == 3
        assert mlflow.get_tracking_uri() == uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_report_from_a_real_sweep_is_byte_reproducible(store: str, tmp_path: Path) -> None:
    first = write_report("smoke", store, out_dir=tmp_path / "a")
    second = write_report("smoke", store, out_dir=tmp_path / "b")
    names = sorted(p.name for p in first.paths)
    assert names == sorted(p.name for p in second.paths)
    assert {
        "datatypes.md",
        "datatypes.tex",
        "doublequant.csv",
        "ppl_vs_bits.pdf",
        "layer_heatmap.png",
    } <= set(names)
    for a, b in zip(sorted(first.paths), sorted(second.paths), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    table = (tmp_path / "a" / "datatypes.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["unquantized", "nf4-b64", "nf4-b64-dq", "int4-b64"]
    [selected] = select_runs(Tracker(store).records("smoke"), "smoke")  # Δppl has one source: the logged
    logged = children(runs(store)).set_index("run_id")["metrics.delta_ppl"]
    shown = {r.run_id: r.metric("delta_ppl") for r in selected.quantized}
    assert shown == {k: logged[k] for k in shown} and min(shown.values()) > 0
    assert [r.metric("delta_ppl") for r in selected.baseline] == [0.0]


def test_only_tracking_talks_to_mlflow() -> None:
    package = Path(__file__).parents[1] / "harness"
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] == "tracking":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "mlflow" in line:  # the name of the package, as imported; "MLflow" in prose is fine
                assert line.strip().startswith("#"), f"{path.name}:{number}: {line.strip()}"


def test_a_ledger_left_running_by_an_older_store_is_ended(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ledger = tracking.ledger(tracker, "old")
    assert runs(tracker.uri, "old.claims")["status"].tolist() == ["FINISHED"]
    tracker.client.update_run(ledger, status="RUNNING")  # as every ledger was before they ended at once
    assert tracking.ledger(tracker, "old") == ledger
    assert runs(tracker.uri, "old.claims")["status"].tolist() == ["FINISHED"]


def test_compare_pairs_two_configs_on_their_tokens(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`harness compare` from the runs' per-token artifacts alone: its mean KLD difference is the difference
    of the two runs' logged means (the same tokens), with a block-bootstrap interval around it."""
    from harness.cli import main

    assert main(["compare", "smoke", "nf4-b64", "int4-b64", "--tracking-uri", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("nf4-b64 − int4-b64 on smollm2-135m, 255 scored tokens, paired (")
    assert "block bootstrap" in lines[0]
    kld = next(line for line in lines if line.startswith("mean KLD"))
    difference, se = (float(v) for v in kld.split()[3:5])
    child = children(runs(store)).set_index("tags.mlflow.runName")["metrics.kld_mean"]
    assert difference == pytest.approx(child["nf4-b64"] - child["int4-b64"], abs=1e-4)
    assert se > 0 and kld.split()[-1] in ("yes", "no")
    args = ["compare", "smoke", "nf4-b64", "int4-b64", "--tracking-uri", store, "--model"]
    assert main([*args, "smollm2-135m"]) == 0 and capsys.readouterr().out.splitlines() == lines
    assert main([*args, "gemma-3-270m"]) == 2  # not run on that model
    assert "no FINISHED config 'nf4-b64'" in capsys.readouterr().err
