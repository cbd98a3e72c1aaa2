"""Tables and plots from a real sqlite MLflow store filled with synthetic runs in the sweep's schema (the
report on a real sweep's store is in test_sweep)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import stored_runs

from harness import plots
from harness.cache import cache_dir
from harness.experiments import load_experiment
from harness.report import ReportError, blocksize_table, select_runs, to_markdown, write_report
from harness.tracking import (
    BASELINE_ID_TAG,
    BASELINE_TAG,
    CONFIG_ID_TAG,
    HASH_TAG,
    KIND_TAG,
    Run,
    RunRecord,
    Tracker,
    config_params,
    config_tags,
)

SETTING = {
    "model": "tiny-model",
    "corpus": "wikipedia",
    "protocol": "disjoint",
    "context_length": "256",
    "stride": "None",
    "eval_tokens": "2048",
    "bos": "True",
    "tasks": "piqa,boolq",
    "limit": "8",
    "seed": "0",
    "compute_dtype": "float32",
    "constant_dtype": "float32",
}
BASE_NMSE = {"int4": 0.0116, "nf4": 0.0085}
BASELINE_PPL = 20.0
TOKENS = 2047
PIVOT = {"rows": "format,double_quant", "cols": "block_size", "metric": "nmse"}


def config(fmt: str, block: int, dq: bool) -> tuple[dict[str, str], dict[str, float]]:
    """Params and metrics of one synthetic config: QLoRA's storage arithmetic, error growing with block."""
    bits = 4 + (8 / block + 32 / (block * 256) if dq else 32 / block)
    nmse = BASE_NMSE[fmt] * (1 + 0.1 * math.log2(block / 64)) * (1.002 if dq else 1.0)
    ppl = BASELINE_PPL * (1 + 10 * nmse)
    label = f"{fmt}-b{block}" + ("-dq" if dq else "")
    params = {
        **SETTING,
        "format": fmt,
        "block_size": str(block),
        "double_quant": "dynamic/256" if dq else "off",
        "label": label,
        "variant": fmt + ("-dq" if dq else ""),
        "config_hash": f"hash-{label}",
    }
    metrics = {
        "bits_per_param": bits,
        "nmse": nmse,
        "output_rel_err": math.sqrt(nmse) * 0.8,
        "ppl": ppl,
        "delta_ppl": ppl - BASELINE_PPL,  # a sweep logs it, paired with the base reference
        "kld_mean": nmse * 3,
        "top1_agreement": 1 - nmse * 4,
        **task_scores(nmse),
    }
    return params, metrics


def task_scores(nmse: float) -> dict[str, float]:
    """piqa's acc_norm (its primary) separates the formats beyond its stderr; boolq's stderr is too wide."""
    piqa, boolq = 0.70 - 8 * nmse, 0.60 - nmse
    return {
        "acc_piqa": piqa - 0.02,
        "acc_piqa_stderr": 0.005,
        "acc_norm_piqa": piqa,
        "acc_norm_piqa_stderr": 0.005,
        "acc_boolq": boolq,
        "acc_boolq_stderr": 0.02,
        "acc_avg": (piqa + boolq) / 2,
        "acc_avg_stderr": math.hypot(0.005, 0.02) / 2,
    }


def layers_table(scale: float) -> pd.DataFrame:
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    nmse = [scale * (1 + 0.3 * i) for i in range(len(names))]
    return pd.DataFrame(
        {"layer": names, "numel": 4096, "mse": [n * 0.02 for n in nmse], "nmse": nmse, "warning": ""}
    )


def child(
    tracker: Tracker, exp_id: str, parent: Run, params: dict[str, str], metrics: dict[str, float]
) -> None:
    tags = schema_tags(params)
    with tracker.run(exp_id, params["label"], tags, parent=parent) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        if "nmse" in metrics:
            csv = layers_table(metrics["nmse"]).to_csv(index=False)
            mlflow.MlflowClient(tracker.uri).log_text(run.id, csv, "layers.csv")
            mlflow.MlflowClient(tracker.uri).log_artifact(run.id, str(token_file(params["label"], metrics)))


DIFFICULTY = np.random.default_rng(0).standard_normal(TOKENS).cumsum() * 0.05  # shared by every config


def token_file(label: str, metrics: dict[str, float]) -> Path:
    """Per-token results around the logged means: the same text difficulty for every config, plus a little
    noise of its own, so that paired tests resolve int4 from nf4 but not nf4 from nf4 + DQ."""
    rng = np.random.default_rng(sum(map(ord, label)))
    nll = math.log(metrics["ppl"]) + DIFFICULTY - DIFFICULTY.mean() + 0.05 * rng.standard_normal(TOKENS)
    kld = rng.exponential(metrics["kld_mean"], TOKENS)
    top1 = rng.random(TOKENS) < metrics["top1_agreement"]
    path = Path(tempfile.mkdtemp()) / "tokens.npz"
    np.savez(path, nll=nll.astype(np.float32), kld=kld.astype(np.float32), top1_match=top1)
    return path


def schema_tags(params: dict[str, str]) -> dict[str, str]:
    """The tags a sweep sets on a config's run: the config hash and id, the baseline it is compared with."""
    baseline = params["format"] == "none"
    return {
        KIND_TAG: "config",
        HASH_TAG: params["config_hash"],
        CONFIG_ID_TAG: params["config_hash"],
        BASELINE_TAG: str(baseline).lower(),
        BASELINE_ID_TAG: "hash-baseline",
    }


def fail(
    tracker: Tracker, exp_id: str, parent: Run, params: dict[str, str], metrics: dict[str, float]
) -> None:
    """A run that logged something and then died: it must never reach a table."""
    with (
        pytest.raises(RuntimeError),
        tracker.run(exp_id, params["label"], {KIND_TAG: "config"}, parent) as run,
    ):
        run.set_tags(schema_tags(params))
        run.log_params(params)
        run.log_metrics(metrics)
        raise RuntimeError("out of memory")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id("synthetic")
    with tracker.run(exp_id, "sweep", {KIND_TAG: "sweep"}) as parent:
        parent.log_params({"experiment": "synthetic", "n_configs": 8})
        baseline = {**SETTING, "format": "none", "block_size": "None", "double_quant": "off"}
        baseline |= {"label": "baseline", "config_hash": "hash-baseline"}
        child(tracker, exp_id, parent, baseline, {"ppl": BASELINE_PPL, "delta_ppl": 0.0, **task_scores(0.0)})
        stale_params, stale = config("nf4", 64, False)
        child(tracker, exp_id, parent, stale_params, {**stale, "ppl": 99.0})  # superseded by the rerun below
        time.sleep(0.01)
        for fmt in ("int4", "nf4"):
            for block in (64, 128):
                for dq in (False, True):
                    child(tracker, exp_id, parent, *config(fmt, block, dq))
        params, metrics = config("nf4", 64, False)
        fail(tracker, exp_id, parent, params, {**metrics, "ppl": 1.0})
        fp4_params, fp4 = config("nf4", 32, False)
        fail(tracker, exp_id, parent, {**fp4_params, "format": "fp4", "label": "fp4-b32"}, fp4)
    # A second experiment where nothing but the format varies, and no run logged layers.csv.
    single = tracker.experiment_id("single")
    with tracker.run(single, "sweep", {KIND_TAG: "sweep"}) as parent:
        for fmt in ("int4", "nf4"):
            params, metrics = config(fmt, 64, False)
            with tracker.run(single, fmt, schema_tags(params), parent=parent) as run:
                run.log_params(params)
                run.log_metrics(metrics)
    failed = tracker.experiment_id("failed")
    with tracker.run(failed, "sweep", {KIND_TAG: "sweep"}) as parent:
        fail(tracker, failed, parent, *config("nf4", 64, False))
    return uri


@pytest.fixture(scope="module")
def report(store: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    paths = write_report("synthetic", store, out_dir=out, **PIVOT).paths
    return {p.name: p for p in paths}


def markdown_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[:1] + lines[2:]]


def test_latest_finished_run_per_hash(store: str) -> None:
    (runs,) = select_runs(Tracker(store).records("synthetic"), "synthetic")
    labels = [r.label for r in runs.quantized]
    assert labels == [f"{f}-b{b}{d}" for f in ("int4", "nf4") for b in (64, 128) for d in ("", "-dq")]
    (nf4,) = [r for r in runs.quantized if r.label == "nf4-b64"]
    assert nf4.metric("ppl") == pytest.approx(config("nf4", 64, False)[1]["ppl"])  # not 99 (old), 1 (FAILED)
    assert [r.label for r in runs.baseline] == ["baseline"]
    assert (nf4.format, nf4.block_size, nf4.double_quant, nf4.is_baseline) == ("nf4", "64", "off", False)


def test_layouts_written(report: dict[str, Path]) -> None:
    tables = ["datatypes", "tasks", "blocksize-nmse", "doublequant"]
    tables.append("pivot-nmse-format+double_quant-by-block_size")
    figures = ["ppl_vs_bits", "kld_vs_bits", "nmse_vs_bits", "layer_heatmap"]
    expected = {f"{t}.{ext}" for t in tables for ext in ("tex", "md", "csv")}
    expected |= {f"{f}.{ext}" for f in figures for ext in ("png", "pdf")}
    assert set(report) == expected
    assert all(p.stat().st_size > 0 for p in report.values())
    assert report["ppl_vs_bits.png"].read_bytes().startswith(b"\x89PNG")
    assert report["ppl_vs_bits.pdf"].read_bytes().startswith(b"%PDF")


def test_datatypes_table(report: dict[str, Path]) -> None:
    text = report["datatypes.md"].read_text()
    for part in ("tiny-model", "wikipedia corpus", "disjoint protocol", "context 256", "2,048 tokens"):
        assert part in text.splitlines()[0]
    header, baseline, *rows = markdown_rows(report["datatypes.md"])
    assert header == [
        "Config",
        "Bits/param ↓",
        "nMSE ↓",
        "Output err. (%) ↓",
        "PPL ↓",
        "ΔPPL ↓",
        "KLD (nats) ↓",
        "Top-1 (%) ↑",
        "Avg acc (%) ↑",
    ]
    assert baseline[:5] == ["unquantized", "—", "—", "—", "20.00"]  # a reference: never bold
    assert baseline[-1] == "65.0 ± 1.0"
    by_label = {r[0]: r for r in rows}
    assert by_label["nf4-b64"][2:5] == ["**0.00850**", "**7.38**", "**21.70**"]  # best error: bold
    assert by_label["int4-b64"][4] == "22.32"
    assert by_label["nf4-b128-dq"][1] == "**4.063**"  # fewest bits: bold, ties included
    assert by_label["int4-b128-dq"][1] == "**4.063**"
    assert by_label["nf4-b64-dq"][1] == "4.127"
    assert by_label["nf4-b64"][5] == "**+1.70**"
    assert by_label["nf4-b64"][8] == "**61.2** ± 1.0"
    # nf4 + DQ differs from nf4 by less than a paired test resolves: bold too; int4 is resolved: plain
    assert by_label["nf4-b64-dq"][4] == "**21.70**" and by_label["int4-b64-dq"][4] == "22.32"
    assert "for PPL, ΔPPL, KLD, Top-1 also every value a paired test cannot tell from it" in text


def test_tasks_table(report: dict[str, Path]) -> None:
    """A column per task, its primary score, in the suite's order, then the average; bold where a z-test on
    the stderrs cannot tell a value from the best."""
    text = report["tasks.md"].read_text()
    assert "the first 8 documents of each task" in text and "piqa: acc_norm, boolq: acc" in text
    header, baseline, *rows = markdown_rows(report["tasks.md"])
    assert header == ["Config", "piqa acc_norm (%) ↑", "boolq acc (%) ↑", "Avg acc (%) ↑"]
    assert baseline == ["unquantized", "70.0 ± 0.5", "60.0 ± 2.0", "65.0 ± 1.0"]
    by_label = {r[0]: r for r in rows}
    assert by_label["nf4-b64"][1:] == ["**63.2** ± 0.5", "**59.2** ± 2.0", "**61.2** ± 1.0"]
    # piqa: int4 trails nf4 by 2.5 points, five times the combined stderr; boolq's 0.4 is within it
    assert by_label["int4-b64"][1:3] == ["60.7 ± 0.5", "**58.8** ± 2.0"]
    assert by_label["nf4-b128"][1] == "**62.5** ± 0.5"  # 0.7 below the best: within 1.96·√2·0.5 = 1.4


def test_csv_matches_markdown(report: dict[str, Path]) -> None:
    """The CSV holds the same table at full precision: every shown number is the CSV's, rounded."""
    for name in (
        "datatypes",
        "tasks",
        "blocksize-nmse",
        "doublequant",
        "pivot-nmse-format+double_quant-by-block_size",
    ):
        frame = pd.read_csv(report[f"{name}.csv"], dtype=str, keep_default_na=False)
        header, *rows = markdown_rows(report[f"{name}.md"])
        extra = (" SE", " 95% low", " 95% high")
        assert [c for c in frame.columns if not c.endswith(extra)] == header
        for i, row in enumerate(rows):
            for column, cell in zip(header, row, strict=True):
                shown, _, error = cell.replace("**", "").removeprefix("≈ ").partition(" ± ")
                shown, _, interval = shown.partition(" [")
                pairs = [(shown, frame.at[i, column])]
                if f"{column} SE" in frame:
                    pairs.append((error or "—", frame.at[i, f"{column} SE"]))
                if f"{column} 95% low" in frame:
                    low, _, high = interval.removesuffix("]").partition(", ")
                    pairs += [(low or "—", frame.at[i, f"{column} 95% low"])]
                    pairs += [(high or "—", frame.at[i, f"{column} 95% high"])]
                for text, value in pairs:
                    if text == "—":
                        assert value == "", (name, column)
                    elif re.fullmatch(r"[+-]?\d+(\.\d+)?", text) and column not in ("Block", "Config"):
                        digits = len(text.partition(".")[2])
                        assert float(text) == pytest.approx(float(value), abs=0.5001 * 10**-digits), (
                            name,
                            column,
                        )
                    else:
                        assert text == value, (name, column)


def test_blocksize_and_doublequant_tables(report: dict[str, Path]) -> None:
    header, *rows = markdown_rows(report["blocksize-nmse.md"])  # the metric asked for, beside bits/param
    assert header == ["Data type", *(f"block {b} {m}" for b in (64, 128) for m in ("nMSE ↓", "Bits ↓"))]
    assert [r[0] for r in rows] == ["int4", "int4-dq", "nf4", "nf4-dq"]  # 4 variants > 2 blocks: down
    assert rows[0][1:] == ["0.0116", "4.500", "0.0128", "4.250"]
    assert rows[2][1:] == ["**0.00850**", "4.500", "**0.00935**", "4.250"]
    assert rows[3][1:] == ["0.00852", "**4.127**", "0.00937", "**4.063**"]
    header, *rows = markdown_rows(report["doublequant.md"])
    assert header == [
        "Config",
        "Bits/param ↓",
        "Saved (bits) ↑",
        "Saved at 70B (GB) ↑",
        "ΔnMSE (%) ↓",
        "ΔOut. err. (%) ↓",
        "ΔPPL ↓",
        "ΔKLD (nats) ↓",
    ]
    nf4 = next(r for r in rows if r[0] == "nf4-b64-dq")
    assert nf4[1:] == [
        "4.127",
        "**0.373**",
        "**3.26**",
        "+0.20",
        "+0.10",
        "**+0.00** ± 0.04",  # paired SE from the per-token results
        "**+0.000051** ± 0.00080",
    ]
    assert all(r[4] == "+0.20" for r in rows)  # all equal: nothing bold


def test_blocksize_table_puts_the_longer_axis_down(store: str) -> None:
    (runs,) = select_runs(Tracker(store).records("synthetic"), "synthetic")
    runs.quantized = [r for r in runs.quantized if r.label in ("nf4-b64", "nf4-b128")]
    table = blocksize_table(runs, "ppl")
    assert table.index == ["Block"] and table.rows == [["block 64"], ["block 128"]]
    assert [(c.group, c.metric.label) for c in table.columns] == [("nf4", "PPL"), ("nf4", "Bits")]


def test_blocksize_table_marks_an_unresolved_step(store: str) -> None:
    (runs,) = select_runs(Tracker(store).records("synthetic"), "synthetic")
    labels = {r.run_id: r.label for r in runs.quantized}
    rng = np.random.default_rng(1)
    shared = DIFFICULTY + 3
    same = {"nf4-b64": 0.0, "nf4-b128": 0.0001, "int4-b64": 0.2, "int4-b128": 0.3}  # nf4: a step of nothing

    def tokens(run_id: str) -> dict[str, np.ndarray] | None:
        offset = same.get(labels[run_id])
        return None if offset is None else {"nll": shared + offset + 0.05 * rng.standard_normal(TOKENS)}

    runs.per_token = tokens
    runs.quantized = [r for r in runs.quantized if r.label in same]
    table = blocksize_table(runs, "ppl")
    marks = {(column.group, row[0]): mark for column in table.columns if column.marks
             for row, mark in zip(table.rows, column.marks, strict=True)}  # fmt: skip
    assert marks == {
        ("nf4", "block 64"): "",
        ("nf4", "block 128"): "≈",
        ("int4", "block 64"): "",
        ("int4", "block 128"): "",
    }
    assert "≈: a paired test cannot tell it from the next smaller block size" in table.caption
    assert "≈ " in to_markdown(table)


def test_generic_pivot(report: dict[str, Path]) -> None:
    header, *rows = markdown_rows(report["pivot-nmse-format+double_quant-by-block_size.md"])
    assert header == ["format", "double_quant", "64 nMSE ↓", "128 nMSE ↓"]
    assert rows[2] == ["nf4", "off", "**0.00850**", "**0.00935**"]
    assert [r[:2] for r in rows] == [
        ["int4", "off"],
        ["int4", "dynamic/256"],
        ["nf4", "off"],
        ["nf4", "dynamic/256"],
    ]


def test_latex(report: dict[str, Path], tmp_path: Path) -> None:
    tex = {name: p.read_text() for name, p in report.items() if name.endswith(".tex")}
    body = tex["datatypes.tex"]
    assert r"\toprule" in body and r"\label{tab:synthetic-datatypes}" in body and r"\caption{" in body
    assert r"{@{}r@{}}PPL\\$\downarrow$\end{tabular}" in body  # label over unit and arrow
    assert r"Top-1\\(\%) $\uparrow$" in body and r"$\Delta$PPL" in body
    assert r"\textbf{21.70}" in body and r"$\pm$ 1.0" in body
    assert r"double\_quant" in tex["pivot-nmse-format+double_quant-by-block_size.tex"]
    assert r"\cmidrule(lr){2-3}" in tex["blocksize-nmse.tex"]
    assert not re.search(r"[^\x00-\x7f]", "".join(tex.values())), "non-ASCII left in the LaTeX"
    if shutil.which("pdflatex") is None:
        if os.environ.get("CI"):
            pytest.fail(
                "pdflatex is missing in CI (apt-get install texlive-latex-base texlive-latex-recommended)"
            )
        pytest.skip("pdflatex not installed")
    document = tmp_path / "tables.tex"
    inputs = "\n".join(
        rf"\input{{{p.as_posix()}}}" for name, p in sorted(report.items()) if name.endswith(".tex")
    )
    document.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        + inputs
        + "\n\\end{document}\n"
    )
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "tables.pdf").stat().st_size > 0


def test_plots_logged_to_parent_run(store: str, report: dict[str, Path]) -> None:
    runs = stored_runs(store, "synthetic")
    parent = runs.loc[runs[f"tags.{KIND_TAG}"] == "sweep", "run_id"].iloc[0]
    logged = {Path(a.path).name for a in mlflow.MlflowClient(store).list_artifacts(parent, "report")}
    assert {"ppl_vs_bits.png", "layer_heatmap.png", "datatypes.md"} <= logged


def test_layouts_follow_what_varies(store: str, tmp_path: Path) -> None:
    paths = {p.name for p in write_report("single", store, out_dir=tmp_path).paths}
    # one block size, no DQ, no baseline; its runs scored tasks
    assert {p for p in paths if p.endswith(".md")} == {"datatypes.md", "tasks.md"}
    assert "layer_heatmap.png" not in paths  # no run logged layers.csv
    assert "ppl_vs_bits.png" in paths


@pytest.mark.parametrize(
    ("experiment", "kwargs", "message"),
    [
        ("nope", {}, "no runs of experiment 'nope' in sqlite:"),
        ("failed", {}, "no FINISHED config runs (1 FAILED)"),
        ("single", {"metric": "bogus"}, "unknown metric 'bogus'"),
        ("single", {"rows": "format"}, "--rows and --cols go together"),
        ("single", {"rows": "format", "cols": "colour"}, "unknown field 'colour'"),
        (
            "synthetic",
            {"rows": "format", "cols": "block_size"},
            "several runs per cell; add one of double_quant",
        ),
    ],
)
def test_errors(store: str, tmp_path: Path, experiment: str, kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ReportError, match=re.escape(message)) as caught:
        write_report(experiment, store, out_dir=tmp_path, **kwargs)
    assert "\n" not in str(caught.value)


def test_layer_error_plot(tmp_path: Path) -> None:
    table = layers_table(0.01)
    fig = plots.layer_error_plot(table, "nf4-b64: per-layer weight nMSE")
    (png, pdf) = plots.save(fig, tmp_path / "layers")
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    assert fig.axes[0].get_yscale() == "log"


def test_damaged_downloads_are_fetched_again(
    store: str, report: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per-token results are downloaded into the cache once; a damaged copy is replaced, not believed."""
    (runs,) = select_runs(Tracker(store).records("synthetic"), "synthetic")
    damaged = []
    for run_id in (r.run_id for r in runs.quantized):
        copy = cache_dir() / "artifacts" / str(run_id) / "tokens.npz" / "tokens.npz"
        copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
        damaged.append(copy)
    capsys.readouterr()
    paths = {p.name: p for p in write_report("synthetic", store, out_dir=tmp_path, **PIVOT).paths}
    assert capsys.readouterr().err.count("building it again") == len(damaged)
    for name in ("datatypes.md", "blocksize-nmse.md", "doublequant.md"):
        assert paths[name].read_text() == report[name].read_text()


def test_a_record_reads_back_what_a_config_logged() -> None:
    """``RunRecord.of`` inverts ``config_params``/``config_tags`` on every axis a table reads, as MLflow
    stores them (text)."""
    configs = [*load_experiment("default").configs, *load_experiment("recovery-smoke").configs]
    configs = [c.resolved("bfloat16") for c in configs]
    configs.append(configs[0].baseline())
    assert any(c.double_quant for c in configs) and any(c.is_baseline for c in configs)
    for c in configs:
        logged = {k: str(v) for k, v in config_params(c).items()}
        entity = SimpleNamespace(
            info=SimpleNamespace(run_id="r", status="FINISHED", start_time=1),
            data=SimpleNamespace(params=logged, tags=config_tags(c), metrics={"ppl": 3.0}),
        )
        r = RunRecord.of(entity)
        dq = c.double_quant
        assert (r.config_id, r.is_baseline, r.baseline_id) == (
            c.config_id,
            c.is_baseline,
            c.baseline().config_id,
        )
        assert (r.label, r.variant, r.model, r.model_dtype, r.method, r.device) == (
            c.label,
            c.variant,
            c.model,
            c.model_dtype,
            c.method,
            c.device,
        )
        assert r.format == (c.format or "none") and r.block_size == str(c.block_size or "none")
        assert r.double_quant == (dq.text if dq else "off")
        assert (r.constant_dtype, r.compute_dtype, r.rounding) == (
            c.constant_dtype,
            c.compute_dtype,
            c.rounding,
        )
        assert (r.corpus, r.protocol, r.context_length) == (
            c.data.corpus,
            c.eval.protocol,
            c.eval.context_length,
        )
        assert (r.stride, r.eval_tokens, r.limit) == (c.eval.stride, c.eval.tokens, c.eval.limit)
        assert r.lora.get("rank") == (str(c.recovery.rank) if c.recovery else None)
        assert (r.metric("ppl"), math.isnan(r.metric("kld_mean"))) == (3.0, True)
