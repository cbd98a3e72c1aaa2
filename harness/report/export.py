"""Writing an experiment's tables and plots to files, and attaching them to its sweep run."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import numpy as np
import pandas as pd

from harness import plots
from harness.report.layouts import LAYOUTS, method_differences, method_pairs, pivot_table
from harness.report.render import to_csv, to_latex, to_markdown
from harness.report.runs import ModelRuns, mixed_provenance, select_runs
from harness.report.table import Column, ReportError, Table, metric_info
from harness.stats import ppl_difference
from harness.tracking import (
    LAYERS_ARTIFACT,
    TOKENS_ARTIFACT,
    Tracker,
    read_tokens,
)

# ---- writing -----------------------------------------------------------------------------------------------


@dataclass
class Report:
    paths: list[Path]
    warnings: list[str] = field(default_factory=list)


def write_report(
    experiment: str,
    tracking_uri: str | None,
    rows: str | None = None,
    cols: str | None = None,
    metric: str | None = None,
    out_dir: Path | None = None,
) -> Report:
    """Write the layouts the runs support, the pivot if asked, and the plots; return the paths written.

    ``out_dir`` defaults to ``results/<experiment>/`` in the working directory. ``metric`` picks the
    block-size table's and the pivot's metric (default PPL, else nMSE); ``rows``/``cols`` are params,
    comma-separated for several. The PNGs and Markdown tables are also logged to the latest parent sweep
    run, beside its numbers. Rerunning on the same store rewrites byte-identical files.
    """
    if (rows is None) != (cols is None):
        raise ReportError("--rows and --cols go together, e.g. --rows format --cols block_size")
    tracker = Tracker.of(tracking_uri)
    selected = select_runs(tracker.records(experiment), experiment, tracker.uri)
    out = out_dir or Path.cwd() / "results" / experiment
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tokens = cache(partial(run_tokens, tracker))
    for runs in selected:
        runs.per_token = tokens
        suffix = "" if len(selected) == 1 else f"-{_slug(runs.model)}"
        for table in tables(runs, rows, cols, metric):
            paths += write_table(
                table, out / f"{table.name}{suffix}", f"tab:{_slug(experiment)}-{table.name}{suffix}"
            )
        paths += write_plots(runs, out, suffix, lambda run_id: _layers_csv(tracker, run_id))
        paths += recovery_plots(runs, out, suffix, lambda run_id, name: tracker.attach(run_id).curve(name))
    tracker.log_report(experiment, [p for p in paths if p.suffix in (".png", ".md")])
    mixed = mixed_provenance(selected)
    return Report(paths, [mixed] if mixed else [])


def tables(runs: ModelRuns, rows: str | None, cols: str | None, metric: str | None) -> list[Table]:
    """Every registered layout whose axes vary in these runs, then the requested pivot."""
    known = sorted({key for r in runs.quantized for key in r.metrics})
    if metric is not None and metric not in known:
        raise ReportError(f"unknown metric {metric!r}; this experiment has: {', '.join(known)}")
    key = metric or ("ppl" if runs.has("ppl") else "nmse")
    out = [table for layout in LAYOUTS if (table := layout(runs, key)) is not None]
    if rows is not None and cols is not None:
        out.append(pivot_table(runs, rows, cols, key))
    return out


def write_table(table: Table, stem: Path, label: str) -> list[Path]:
    paths = [stem.with_suffix(".tex"), stem.with_suffix(".md"), stem.with_suffix(".csv")]
    for path, text in zip(paths, (to_latex(table, label), to_markdown(table), to_csv(table)), strict=True):
        path.write_text(text, encoding="utf-8")
    return paths


def write_plots(
    runs: ModelRuns, out: Path, suffix: str, layers: Callable[[str], pd.DataFrame | None]
) -> list[Path]:
    """Quality and nMSE against bits/param, and the per-layer heatmap at one block size (64 if run)."""
    if not runs.has("bits_per_param"):
        return []
    points = pd.DataFrame(
        {
            "format": [r.format for r in runs.quantized],
            "label": [r.label for r in runs.quantized],
            "double_quant": [r.double_quant != "off" for r in runs.quantized],
            "bits": runs.metric("bits_per_param"),
        }
    )
    where = f"{runs.experiment}, {runs.model}"
    paths = []
    for key, ylabel, name in (
        ("ppl", "perplexity (token-level)", "ppl_vs_bits"),
        ("kld_mean", "mean KL divergence to unquantized (nats)", "kld_vs_bits"),
    ):
        if runs.has(key):
            low, high = _interval95(runs.column(key))
            found = points.assign(value=runs.metric(key), low=low, high=high).dropna(subset=["bits", "value"])
            base = runs.metric(key, runs.baseline)
            reference = base[0] if key == "ppl" and base else None
            bars = "\nbars: 95% interval, block bootstrap" if np.isfinite(found["low"]).any() else ""
            fig = plots.quality_vs_bits(
                found, ylabel + bars, f"{metric_info(key).label} vs bits/param ({where})", reference
            )
            paths += plots.save(fig, out / f"{name}{suffix}")
    pairs = method_pairs(runs)
    if pairs is not None and runs.has("kld_mean"):
        rows, base = pairs
        differences = method_differences(runs, "kld_mean", rows, base)
        kept = [(row, d) for row, d in zip(rows, differences, strict=True) if d is not None]
        if kept:
            found = pd.DataFrame(
                {
                    "group": [f"{r.format} b{r.block_size}" for r, _ in kept],
                    "series": [r.method for r, _ in kept],
                    "value": [d.mean for _, d in kept],
                    "low": [d.ci_low for _, d in kept],
                    "high": [d.ci_high for _, d in kept],
                }
            )
            ylabel = "ΔKLD against round to nearest (nats)\nbars: paired 95% interval, block bootstrap"
            title = f"methods against round to nearest ({where})"
            fig = plots.grouped_differences(found, ylabel, title, zero="round to nearest")
            paths += plots.save(fig, out / f"methods_kld{suffix}")
    if runs.has("nmse"):
        found = points.assign(value=runs.metric("nmse")).dropna(subset=["bits", "value"])
        paths += plots.save(
            plots.nmse_vs_bits(found, f"weight error vs bits/param ({where})"), out / f"nmse_vs_bits{suffix}"
        )
    blocks = runs.varying("block_size")
    block = "64" if "64" in blocks else pd.Series([r.block_size for r in runs.quantized]).mode().iloc[0]
    found_layers = {}
    for r in runs.quantized:
        if r.block_size == block and (table := layers(r.run_id)) is not None:
            found_layers[r.label] = table
    if found_layers:
        at = "each format's own block" if block == "None" else f"block {block}"
        fig = plots.layer_heatmap(found_layers, f"per-layer weight nMSE, {at} ({where})")
        paths += plots.save(fig, out / f"layer_heatmap{suffix}")
    return paths


def recovery_plots(
    runs: ModelRuns, out: Path, suffix: str, curve: Callable[[str, str], list[float]]
) -> list[Path]:
    """ΔPPL against the unquantized model before and after LoRA, paired on the same tokens, per config (the
    unquantized row's after is the 16-bit LoRA target), and every config's training-loss curve."""
    if not runs.has("lora_ppl"):
        return []
    labels = runs.labels()
    points = []
    for label, series in zip(labels, (runs.per_token(r.run_id) for r in runs.all), strict=True):
        if series is None or "base_nll" not in series:
            continue
        for name, key in (("before LoRA", "nll"), ("after LoRA", "lora_nll")):
            d = ppl_difference(series[key], series["base_nll"])
            points.append(
                {"group": label, "series": name, "value": d.mean, "low": d.ci_low, "high": d.ci_high}
            )
    where = f"{runs.experiment}, {runs.model}"
    paths: list[Path] = []
    if points:
        ylabel = "ΔPPL against the unquantized model\nbars: paired 95% interval, block bootstrap"
        fig = plots.grouped_differences(
            pd.DataFrame(points), ylabel, f"LoRA recovery ({where})", zero="the unquantized model"
        )
        paths += plots.save(fig, out / f"recovery_ppl{suffix}")
    logged = zip(labels, (curve(r.run_id, "lora_train_loss") for r in runs.all), strict=True)
    if curves := {label: values for label, values in logged if values}:
        fig = plots.loss_curves(curves, "training loss (nats/token)", f"LoRA training ({where})")
        paths += plots.save(fig, out / f"recovery_loss{suffix}")
    return paths


def _interval95(column: Column) -> tuple[list[float], list[float]]:
    """A column's 95 % interval: the logged one, else ± 1.96 standard errors, else NaN."""
    if column.intervals:
        return [lo for lo, _ in column.intervals], [hi for _, hi in column.intervals]
    errors = column.errors or [math.nan] * len(column.values)
    return (
        [v - 1.96 * e for v, e in zip(column.values, errors, strict=True)],
        [v + 1.96 * e for v, e in zip(column.values, errors, strict=True)],
    )


def run_tokens(tracker: Tracker, run_id: str) -> dict[str, np.ndarray] | None:
    """The run's per-token results, or None for a run that kept none (its differences go untested)."""
    try:
        return read_tokens(tracker.download_artifact(run_id, TOKENS_ARTIFACT))
    except FileNotFoundError:
        return None


def _layers_csv(tracker: Tracker, run_id: str) -> pd.DataFrame | None:
    """The run's per-layer table, or None for a run that logged none (the heatmap then leaves it out)."""
    try:
        path = tracker.download_artifact(run_id, LAYERS_ARTIFACT)
    except FileNotFoundError:
        return None
    return pd.read_csv(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")
