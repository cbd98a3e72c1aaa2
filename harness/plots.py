"""The report's figures, in one style: quality against bits/param, error against the theory, error per layer.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so that making
plots in a long sweep keeps no global figure state and needs no display. Constrained layout with legends
outside the axes keeps every label inside the canvas, whoever saves the figure (``save`` here, or MLflow's
``log_figure`` in the sweep).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from harness.metrics import gaussian_rate_distortion, lloyd_max_mse

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # TrueType in the PDF, so the text stays editable and searchable in a paper
}
MARKERS = "osD^vP*Xh<>p"
COLORS = [f"C{i}" for i in range(10)]
FRONTIER_COLOR = "0.25"


@contextmanager
def style() -> Iterator[None]:
    with matplotlib.rc_context(STYLE):
        yield


def format_styles(formats: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A (color, marker) per format, fixed by the order given, so every figure of a report agrees."""
    return {f: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, f in enumerate(formats)}


def save(fig: Figure, stem: Path) -> list[Path]:
    """PNG for review, PDF for the paper; both beside each other, byte-identical when saved again (the PDF
    carries no creation date)."""
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    with style():
        fig.savefig(png)
        fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]


def pareto_front(bits: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both bits/param and the (lower-is-better) value."""
    order = sorted(range(len(bits)), key=lambda i: (bits[i], values[i]))
    front, best = [], math.inf
    for i in order:
        if values[i] < best:
            front.append(i)
            best = values[i]
    return front


def quality_vs_bits(points: pd.DataFrame, ylabel: str, title: str, baseline: float | None = None) -> Figure:
    """Quality (lower is better) against bits/param: a marker per format, hollow with double quantization,
    with error bars where ``points`` has finite ``low``/``high``.

    ``points`` has columns format, label, double_quant (bool), bits, value, and optionally low, high.
    """
    with style():
        fig = Figure(figsize=(7.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        if {"low", "high"} <= set(points.columns):
            styles = format_styles(list(dict.fromkeys(points["format"])))
            for fmt, group in points.groupby("format", sort=False):
                below, above = group["value"] - group["low"], group["high"] - group["value"]
                ax.errorbar(
                    group["bits"], group["value"], yerr=[below, above], fmt="none",
                    ecolor=styles[fmt][0], elinewidth=0.8, capsize=2, alpha=0.7, zorder=2,
                )  # fmt: skip
        _scatter_formats(ax, points)
        bits, values = points["bits"].tolist(), points["value"].tolist()
        front = pareto_front(bits, values)
        fb, fv = [bits[i] for i in front], [values[i] for i in front]
        ax.step(fb, fv, where="post", color=FRONTIER_COLOR, linestyle="--", linewidth=1.0, zorder=1)
        for i in front:
            ax.annotate(
                points["label"].iloc[i],
                (bits[i], values[i]),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=7,
                color=FRONTIER_COLOR,
            )
        if baseline is not None and math.isfinite(baseline):
            ax.axhline(baseline, color="0.5", linestyle=":", linewidth=1.0)
        if max(values) > 10 * min(values) > 0:
            ax.set_yscale("log")
            ylabel += " (log scale)"
        ax.set_xlabel("bits per parameter (quantized layers, incl. constants)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        extra = [Line2D([], [], color=FRONTIER_COLOR, linestyle="--", label="Pareto frontier")]
        if baseline is not None and math.isfinite(baseline):
            extra.append(Line2D([], [], color="0.5", linestyle=":", label=f"unquantized ({baseline:.4g})"))
        _legend(ax, points, extra)
    return fig


def grouped_differences(points: pd.DataFrame, ylabel: str, title: str, zero: str) -> Figure:
    """A bar per series for each group, its difference from a reference with a 95 % interval; the zero line,
    labelled ``zero``, is the reference itself (round to nearest, for methods; the unquantized model, for
    LoRA recovery).

    ``points`` has columns group (e.g. ``nf4 b64``), series (e.g. the method), value, low, high.
    """
    groups = list(dict.fromkeys(points["group"]))
    methods = list(dict.fromkeys(points["series"]))
    styles = format_styles(methods)
    width = 0.8 / max(len(methods), 1)
    with style():
        fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 2.5), 3.8), layout="constrained")
        ax = fig.add_subplot()
        for k, method in enumerate(methods):
            rows = points[points["series"] == method].set_index("group").reindex(groups)
            x = np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width
            below, above = rows["value"] - rows["low"], rows["high"] - rows["value"]
            ax.bar(x, rows["value"], width=width * 0.9, color=styles[method][0], label=method)
            ax.errorbar(
                x, rows["value"], yerr=[below, above], fmt="none", ecolor="0.2", elinewidth=0.8, capsize=2
            )
        ax.axhline(0.0, color="0.3", linewidth=1.0, label=zero)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(
            frameon=False, fontsize=8, ncols=len(methods) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1)
        )
    return fig


def loss_curves(curves: Mapping[str, Sequence[float]], ylabel: str, title: str) -> Figure:
    """One line per config: its training loss at each optimizer step."""
    styles = format_styles(list(curves))
    with style():
        fig = Figure(figsize=(7.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        for label, values in curves.items():
            ax.plot(range(1, len(values) + 1), values, color=styles[label][0], linewidth=1.2, label=label)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8)
    return fig


def nmse_vs_bits(points: pd.DataFrame, title: str) -> Figure:
    """Weight nMSE against bits/param next to what a scalar quantizer of N(0, 1) can reach at best.

    Lloyd-Max is the optimal 2^b-level quantizer with no scale overhead; D = 2^(-2R) is Shannon's bound for
    any code. Both are for unit-variance Gaussian data, which nMSE (MSE / mean W²) is comparable to.
    """
    with style():
        fig = Figure(figsize=(7.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        _scatter_formats(ax, points)
        lo = max(1, math.floor(points["bits"].min()))
        hi = min(8, max(lo + 1, math.ceil(points["bits"].max())))
        levels = np.arange(lo, hi + 1)
        lloyd = [lloyd_max_mse(2 ** int(b)) for b in levels]
        ax.plot(levels, lloyd, color="0.3", marker="x", linestyle=":", linewidth=0.8, zorder=1)
        rates = np.linspace(lo, hi, 100)
        ax.plot(rates, [gaussian_rate_distortion(r) for r in rates], color="0.6", linestyle="--", zorder=1)
        ax.set_yscale("log")
        ax.set_xlabel("bits per parameter (quantized layers, incl. constants)")
        ax.set_ylabel("weight nMSE = MSE / mean(W²)  (log scale)")
        ax.set_title(title)
        extra = [
            Line2D([], [], color="0.3", marker="x", linestyle=":", label="Lloyd-Max, N(0,1), $2^b$ levels"),
            Line2D([], [], color="0.6", linestyle="--", label="Gaussian R(D) bound, $2^{-2R}$"),
        ]
        _legend(ax, points, extra)
    return fig


def layer_heatmap(tables: Mapping[str, pd.DataFrame], title: str) -> Figure:
    """Per-layer nMSE, layers × configs (one block size), on a shared log color scale."""
    layers = list(dict.fromkeys(name for t in tables.values() for name in t["layer"]))
    grid = np.array(
        [t.set_index("layer")["nmse"].reindex(layers).to_numpy(dtype=float) for t in tables.values()]
    ).T
    positive = grid[np.isfinite(grid) & (grid > 0)]
    names = _short_names(layers)
    with style():
        fig = Figure(figsize=(2.8 + 0.8 * len(tables), 1.6 + 0.13 * len(layers)), layout="constrained")
        ax = fig.add_subplot()
        norm = LogNorm(positive.min(), positive.max()) if positive.size else None
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", norm=norm)
        ax.grid(False)
        ax.set_xticks(range(len(tables)), list(tables), rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), names, fontsize=8 if len(layers) <= 40 else 6)
        ax.set_xlabel("config")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="weight nMSE (log scale)", shrink=min(1.0, 20 / max(len(layers), 1)))
    return fig


def layer_error_plot(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Per-layer weight nMSE of one config (a ``layers.csv`` table), log scale, colored by layer type.

    The dashed line is the numel-weighted nMSE over all layers, so outlier layers stand out at a glance.
    """
    nmse = table["nmse"].to_numpy(dtype=float)
    kinds = [name.rsplit(".", 1)[-1] for name in table["layer"]]
    colors = format_styles(list(dict.fromkeys(kinds)))
    with style():
        fig = Figure(figsize=(min(13.0, 5.5 + 0.06 * len(table)), 3.6), layout="constrained")
        ax = fig.add_subplot()
        ax.bar(range(len(table)), nmse, width=0.85, color=[colors[k][0] for k in kinds])
        ax.set_yscale("log")
        if {"mse", "numel"} <= set(table.columns):
            numel = table["numel"].to_numpy(dtype=float)
            power = table["mse"].to_numpy(dtype=float) / nmse
            overall = float(np.nansum(table["mse"] * numel) / np.nansum(power * numel))
            ax.axhline(overall, color="0.3", linestyle="--", linewidth=1.0)
        if len(table) <= 40:
            ax.set_xticks(range(len(table)), _short_names(list(table["layer"])), rotation=90, fontsize=7)
            ax.set_xlabel("layer")
        else:
            starts = _block_starts(list(table["layer"]))
            ax.set_xticks([i for i, _ in starts], [b for _, b in starts], fontsize=7)
            ax.set_xlabel("transformer block (layers in model order)")
        ax.set_ylabel("weight nMSE (log scale)")
        ax.set_xlim(-0.6, len(table) - 0.4)
        ax.set_title(title or "per-layer weight nMSE")
        handles = [Line2D([], [], color=c, linewidth=6, label=k) for k, (c, _) in colors.items()]
        if {"mse", "numel"} <= set(table.columns):
            handles.append(Line2D([], [], color="0.3", linestyle="--", label="all layers (numel-weighted)"))
        fig.legend(handles=handles, loc="outside right upper")
    return fig


def _scatter_formats(ax: matplotlib.axes.Axes, points: pd.DataFrame) -> None:
    styles = format_styles(list(dict.fromkeys(points["format"])))
    for (fmt, dq), group in points.groupby(["format", "double_quant"], sort=False):
        color, marker = styles[fmt]
        ax.scatter(
            group["bits"],
            group["value"],
            marker=marker,
            s=36,
            facecolors="none" if dq else color,
            edgecolors=color,
            linewidths=1.2,
            zorder=3,
        )


def _legend(ax: matplotlib.axes.Axes, points: pd.DataFrame, extra: list[Line2D]) -> None:
    styles = format_styles(list(dict.fromkeys(points["format"])))
    handles = [Line2D([], [], color=c, marker=m, linestyle="none", label=f) for f, (c, m) in styles.items()]
    if points["double_quant"].any():
        handles.append(
            Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="none", label="+ DQ")
        )
    ax.figure.legend(handles=handles + extra, loc="outside right upper")


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the prefix they all share (``model.layers.``), which only costs width."""
    if len(names) < 2:
        return names
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def _block_starts(names: list[str]) -> list[tuple[int, str]]:
    """(position, block number) where each transformer block begins, for sparse x ticks."""
    starts, last = [], None
    for i, name in enumerate(names):
        m = re.search(r"\.(\d+)\.", name)
        block = m[1] if m else None
        if block is not None and block != last:
            starts.append((i, block))
        last = block
    return starts


def sensitivity_heatmap(table: pd.DataFrame, title: str) -> Figure:
    """ΔKLD of each layer quantized alone, blocks × projection types (columns ``block``, ``part``,
    ``delta_kld``, ``delta_kld_se``); a symmetric-log colour scale, since noise makes some values dip below 0;
    a dot marks a cell whose ΔKLD is within 2 SE of 0."""
    grid = table.pivot_table(index="part", columns="block", values="delta_kld", aggfunc="first")
    values = grid.to_numpy(dtype=float)
    finite = np.abs(values[np.isfinite(values)])
    with style():
        fig = Figure(figsize=(2.5 + 0.22 * grid.shape[1], 1.4 + 0.3 * grid.shape[0]), layout="constrained")
        ax = fig.add_subplot()
        limit = float(finite.max()) if finite.size else 1.0
        threshold = max(float(np.percentile(finite, 10)), limit * 1e-3) if finite.size else 1e-6
        norm = SymLogNorm(threshold, vmin=-limit, vmax=limit)
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="RdBu_r", norm=norm)
        ax.grid(False)
        ax.set_xticks(range(grid.shape[1]), [str(int(b)) for b in grid.columns], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), list(grid.index))
        se = table.pivot_table(index="part", columns="block", values="delta_kld_se", aggfunc="first")
        unresolved = np.argwhere(np.abs(values) < 2 * se.reindex_like(grid).to_numpy(dtype=float))
        ax.scatter(unresolved[:, 1], unresolved[:, 0], s=8, c="k", marker="o", linewidths=0)
        ax.set_xlabel("block   (dot: |ΔKLD| < 2 SE, not resolved from 0)")
        ax.set_ylabel("projection")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="ΔKLD (nats, symlog)")
    return fig


def allocation_pareto(points: pd.DataFrame, title: str) -> Figure:
    """KLD to the base against stored bits/param (columns ``method``, ``bits_per_param``, ``kld_mean``,
    ``kld_mean_se``): uniform configs joined as a line, each allocation method its own marker, ±1 SE bars."""
    methods = list(dict.fromkeys(points["method"]))
    styles = format_styles(methods)
    with style():
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
        for method in methods:
            group = points[points["method"] == method].sort_values("bits_per_param")
            color, marker = styles[method]
            ax.errorbar(
                group["bits_per_param"],
                group["kld_mean"],
                yerr=group["kld_mean_se"],
                fmt=f"{marker}-" if method == "uniform" else marker,
                color=color,
                label=method,
                capsize=2,
                markersize=5,
                linewidth=1,
            )
            if method == "uniform":
                for _, row in group.iterrows():
                    ax.annotate(row["label"], (row["bits_per_param"], row["kld_mean"]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("bits/param (stored bytes of the quantized layers)")
        ax.set_ylabel("KLD to the base (nats, log scale)\nerror bars: ±1 SE, 64-token block bootstrap")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
