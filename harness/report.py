"""Paper-ready tables (LaTeX, Markdown, CSV) and plots of one experiment, read back from the MLflow store.

Every number comes from the latest FINISHED run of each config hash: reruns supersede older runs and failed
or killed runs never reach a table. Which layouts are written depends on which axes vary in the runs, so a
one-format experiment gets no block-size table and an experiment without double quantization no DQ table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from harness import plots
from harness.errors import HarnessError
from harness.evaluate.tasks import PRIMARY
from harness.metrics import MetricSpec, metric
from harness.stats import METHOD, Difference, paired_difference, ppl_difference
from harness.tracking import (
    BASELINE_ID_TAG,
    BASELINE_TAG,
    COMMIT_PARAM,
    CONFIG_ID_TAG,
    HASH_TAG,
    KIND_TAG,
    LAYERS_ARTIFACT,
    NUMERICS_TAG,
    TOKENS_ARTIFACT,
    Tracker,
    read_tokens,
    run_column,
)

DATATYPE_COLUMNS = (
    "bits_per_param",
    "nmse",
    "output_rel_err",
    "ppl",
    "delta_ppl",
    "kld_mean",
    "top1_agreement",
)
BLOCK_ORDER = ("channel", "tensor")


class ReportError(HarnessError, ValueError):
    """Nothing to report (unknown experiment, no finished runs) or a pivot that is ill-posed; one line."""


def metric_info(key: str) -> MetricSpec:
    """The declaration of a metric; a name the registry does not know (an old run's) is shown plainly."""
    try:
        return metric(key)
    except KeyError:
        return MetricSpec(key, key, "", None, "model", "", sig=4)


# ---- the table model and its three renderings ------------------------------------------------------------


@dataclass
class Column:
    metric: MetricSpec
    values: list[float]  # in display units (scaled)
    errors: list[float] | None = None  # ± one standard error, display units
    intervals: list[tuple[float, float]] | None = None  # 95 % interval, display units
    group: str = ""  # a spanning header above the column, e.g. the data type in the block-size table
    tied: set[int] | None = None  # rows a paired test cannot tell from the best; None: no per-token data
    marks: list[str] | None = None  # a note per cell, e.g. "≈" where the row above is not resolved

    @property
    def name(self) -> str:
        return f"{self.group} {self.metric.header}".strip()

    def best(self, skip: int) -> set[int]:
        """Rows holding the best shown value (ties all win), and those not resolved from it; the first
        ``skip`` reference rows never count."""
        if self.metric.better is None:
            return set()
        shown = {
            i: float(self.metric.text(v)) for i, v in enumerate(self.values) if i >= skip and math.isfinite(v)
        }
        if len(set(shown.values())) < 2:  # one value, or all equal: nothing stands out
            return set()
        target = (min if self.metric.better == "lower" else max)(shown.values())
        return {i for i, v in shown.items() if v == target} | {i for i in self.tied or () if i >= skip}


@dataclass(frozen=True)
class Cell:
    value: str
    uncertainty: str  # "± 0.02", "[61.9, 77.3]" or ""
    bold: bool
    mark: str


@dataclass
class Table:
    name: str  # file stem
    caption: str
    index: list[str]  # headers of the row-label columns
    rows: list[list[str]]
    columns: list[Column]
    reference_rows: int = 0  # leading rows (the unquantized baseline): set apart, never bold

    def cells(self) -> list[list[Cell]]:
        best = [c.best(self.reference_rows) for c in self.columns]
        out = []
        for r in range(len(self.rows)):
            row = []
            for c, column in enumerate(self.columns):
                value, text = column.values[r], column.metric.text
                unsigned = replace(column.metric, signed=False).text
                uncertainty = ""
                if column.errors and math.isfinite(column.errors[r]) and math.isfinite(value):
                    uncertainty = f"± {unsigned(column.errors[r])}"
                elif column.intervals and all(math.isfinite(v) for v in column.intervals[r]):
                    low, high = column.intervals[r]
                    uncertainty = f"[{text(low)}, {text(high)}]"
                mark = column.marks[r] if column.marks else ""
                row.append(Cell(text(value), uncertainty, r in best[c], mark))
            out.append(row)
        return out


def to_markdown(table: Table) -> str:
    header = [*table.index, *(c.name for c in table.columns)]
    lines = [
        f"Table: {table.caption}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":--"] * len(table.index) + ["--:"] * len(table.columns)) + "|",
    ]
    for labels, cells in zip(table.rows, table.cells(), strict=True):
        shown = []
        for cell in cells:
            text = f"**{cell.value}**" if cell.bold else cell.value
            shown.append(" ".join(p for p in (cell.mark, text, cell.uncertainty) if p))
        lines.append("| " + " | ".join([*(s.replace("|", r"\|") for s in labels), *shown]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The same table, numbers at full precision in display units; uncertainties in their own columns."""
    data: dict[str, list[object]] = {h: [row[i] for row in table.rows] for i, h in enumerate(table.index)}
    for column in table.columns:
        data[column.name] = column.values
        if column.errors is not None:
            data[f"{column.name} SE"] = column.errors
        if column.intervals is not None:
            data[f"{column.name} 95% low"] = [low for low, _ in column.intervals]
            data[f"{column.name} 95% high"] = [high for _, high in column.intervals]
    return pd.DataFrame(data).to_csv(index=False, float_format="%.10g")


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "×": r"$\times$",
    "−": r"$-$",
    "—": "---",
    "·": r"$\cdot$",
    "≈": r"$\approx$",
    "√": r"$\surd$",
    "Σ": r"$\Sigma$",
    "²": r"$^2$",
    "₁": r"$_1$",
    "₂": r"$_2$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: Table, label: str) -> str:
    """A booktabs ``table`` float: caption on top, ``\\label``, spanning group headers with cmidrules."""

    def number(text: str) -> str:
        return re.sub(r"(?<![\w.])-(?=\d)", "$-$", latex_escape(text))

    n_index = len(table.index)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        *([r"\setlength{\tabcolsep}{4pt}"] if n_index + len(table.columns) > 8 else []),
        rf"\caption{{{latex_escape(table.caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{'l' * n_index}{'r' * len(table.columns)}}}",
        r"\toprule",
    ]
    groups = _runs([c.group for c in table.columns])
    if any(g for g, _, _ in groups):
        spans = [rf"\multicolumn{{{b - a}}}{{c}}{{{latex_escape(g)}}}" if g else "" for g, a, b in groups]
        lines.append(" & ".join([""] * n_index + spans) + r" \\")
        rules = [rf"\cmidrule(lr){{{n_index + a + 1}-{n_index + b}}}" for g, a, b in groups if g]
        lines.append(" ".join(rules))
    header = [latex_escape(h) for h in table.index]
    for column in table.columns:
        top, bottom = latex_escape(column.metric.label), latex_escape(column.metric.subheader)
        header.append(
            rf"\begin{{tabular}}[b]{{@{{}}r@{{}}}}{top}\\{bottom}\end{{tabular}}" if bottom else top
        )
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    for r, (labels, cells) in enumerate(zip(table.rows, table.cells(), strict=True)):
        shown = []
        for cell in cells:
            text = rf"\textbf{{{number(cell.value)}}}" if cell.bold else number(cell.value)
            shown.append(" ".join(p for p in (latex_escape(cell.mark), text, number(cell.uncertainty)) if p))
        lines.append(" & ".join([*(latex_escape(s) for s in labels), *shown]) + r" \\")
        if r + 1 == table.reference_rows < len(table.rows):
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _runs(groups: list[str]) -> list[tuple[str, int, int]]:
    """Consecutive equal group names as (name, start, end) spans."""
    spans: list[tuple[str, int, int]] = []
    for i, g in enumerate(groups):
        if spans and spans[-1][0] == g:
            spans[-1] = (g, spans[-1][1], i + 1)
        else:
            spans.append((g, i, i + 1))
    return spans


# ---- reading the runs ------------------------------------------------------------------------------------


@dataclass
class Runs:
    """One model's slice of an experiment: its quantized configs in a stable order and its baseline."""

    experiment: str
    model: str
    quantized: pd.DataFrame
    baseline: pd.DataFrame  # zero or one row
    tokens: Callable[[str], dict[str, np.ndarray] | None] = lambda run_id: None  # a run's per-token results

    def metric(self, key: str, frame: pd.DataFrame | None = None, scale: float | None = None) -> list[float]:
        """A metric's values in display units (``scale`` defaults to the metric's own); NaN where missing."""
        frame = self.quantized if frame is None else frame
        column = f"metrics.{key}"
        if column not in frame:
            return [math.nan] * len(frame)
        factor = metric_info(key).scale if scale is None else scale
        return [float(v) * factor for v in frame[column]]

    def has(self, key: str) -> bool:
        return any(math.isfinite(v) for v in self.metric(key))

    def has_tokens(self) -> bool:
        return any(self.tokens(str(run_id)) is not None for run_id in self.quantized["run_id"])

    def series(self, frame: pd.DataFrame, name: str) -> list[np.ndarray | None]:
        """Each row's per-token ``name`` (nll, kld, top1_match), None where the run kept none."""
        out = []
        for run_id in frame["run_id"]:
            found = self.tokens(str(run_id)) if isinstance(run_id, str) else None
            out.append(found.get(name) if found else None)
        return out

    def column(self, key: str, frame: pd.DataFrame | None = None, group: str = "", skip: int = 0) -> Column:
        """A metric's column with its declared uncertainty (SE or 95 % interval) and, where the runs kept
        per-token results, the rows a paired test cannot tell from the best (rows before ``skip`` aside)."""
        frame = self.quantized if frame is None else frame
        spec = metric_info(key)
        values = self.metric(key, frame)
        errors = self.metric(spec.stderr, frame, spec.scale) if spec.stderr else None
        intervals = None
        if spec.interval:
            lows, highs = (self.metric(k, frame, spec.scale) for k in spec.interval)
            intervals = list(zip(lows, highs, strict=True)) if _any(lows) else None
        tied = None
        if spec.per_token and spec.better:
            tied = _unresolved_from_best(values, self.series(frame, spec.per_token), spec.better, skip)
        return Column(spec, values, errors if _any(errors) else None, intervals, group, tied)

    def varying(self, param: str) -> list[str]:
        """The distinct values a param takes among the quantized configs, in their order."""
        return list(dict.fromkeys(self.quantized[f"params.{param}"]))

    def setting(self) -> str:
        """Model, corpus, protocol, context and tokens, as the caption names them."""
        frame = pd.concat([self.baseline, self.quantized])

        def value(key: str) -> str:
            found = [str(v) for v in dict.fromkeys(frame.get(f"params.{key}", pd.Series(dtype=str)).dropna())]
            return "/".join(f"{int(v):,}" if v.isdigit() else v for v in found) or "?"

        parts = [self.model, f"{value('corpus')} corpus", f"{value('protocol')} protocol"]
        parts.append(f"context {value('context_length')}")
        if value("protocol") == "sliding":
            parts.append(f"stride {value('stride')}")
        parts.append(f"{value('eval_tokens')} tokens")
        ties = [v for v in self.metric("tie_fraction", frame, 1.0) if math.isfinite(v)]
        if ties and max(ties) > 0:  # the tie rule decides those weights: say which rule
            parts.append(f"ties rounded {value('rounding')} (up to {max(ties):.2%} of weights on a tie)")
        return ", ".join(parts)


def _any(values: list[float] | None) -> bool:
    return values is not None and any(math.isfinite(v) for v in values)


def _unresolved_from_best(
    values: list[float], series: list[np.ndarray | None], better: str, skip: int
) -> set[int] | None:
    """Rows whose paired difference from the best row's per-token series has a 95 % interval holding 0;
    None when any row lacks its series or the rows do not share their tokens."""
    rows = [i for i in range(skip, len(values)) if math.isfinite(values[i])]
    if len(rows) < 2 or any(series[i] is None for i in rows):
        return None
    if len({len(series[i]) for i in rows}) != 1:  # type: ignore[arg-type]
        return None
    best = (min if better == "lower" else max)(rows, key=lambda i: values[i])
    return {i for i in rows if i != best and not paired_difference(series[i], series[best]).resolved}


def select_runs(frame: pd.DataFrame, experiment: str, store: str = "the store") -> list[Runs]:
    """The latest FINISHED run per config, per model, from ``Tracker.runs``; ReportError if none.

    A config is its config id, so a rerun under a newer numerics version supersedes the older run. A run's
    ``delta_ppl`` and its interval are the ones it logged, paired token by token with the base reference."""
    if frame.empty:
        raise ReportError(f"no runs of experiment {experiment!r} in {store} (run `harness sweep` first)")
    configs = frame[_column(frame, run_column(KIND_TAG)) == "config"].sort_values("start_time")
    finished = configs[configs["status"] == "FINISHED"]
    if finished.empty:
        counts = ", ".join(f"{n} {s}" for s, n in configs["status"].value_counts().items())
        raise ReportError(
            f"experiment {experiment!r} has no FINISHED config runs ({counts or 'none at all'})"
        )
    ids = _column(finished, run_column(CONFIG_ID_TAG)).fillna(_column(finished, run_column(HASH_TAG)))
    latest = finished.loc[~ids.duplicated(keep="last")].assign(config_id=ids)
    is_baseline = _column(latest, run_column(BASELINE_TAG)) == "true"
    quantized = latest[~is_baseline]
    if quantized.empty:
        raise ReportError(f"experiment {experiment!r} has no FINISHED quantized runs, only the baseline")
    baselines = latest[is_baseline].set_index("config_id")
    format_order = {f: i for i, f in enumerate(dict.fromkeys(quantized["params.format"]))}

    def order(row: pd.Series) -> tuple[object, ...]:
        return (
            format_order[row["params.format"]],
            sort_key(row["params.block_size"]),
            sort_key(row["params.double_quant"]),
            str(row.get("params.label")),
        )

    out = []
    dtype = _column(quantized, "params.model_dtype").fillna("float32")  # runs before the dtype axis: fp32
    several = dtype.groupby(quantized["params.model"]).nunique() > 1
    for (model, model_dtype), group in quantized.groupby([quantized["params.model"], dtype], sort=False):
        rows = sorted(group.index, key=lambda i: order(group.loc[i]))
        named = set(_column(group, run_column(BASELINE_ID_TAG)))
        baseline = baselines[baselines.index.isin(named)].tail(1).reset_index()
        name = f"{model} in {model_dtype}" if several[model] else str(model)  # a slice per model dtype
        out.append(Runs(experiment, name, group.loc[rows], baseline))
    return out


def mixed_provenance(selected: list[Runs]) -> str | None:
    """One line naming the numerics versions and git commits when the selected runs span more than one."""
    frame = pd.concat([pd.concat([r.baseline, r.quantized]) for r in selected])
    spans = []
    for name, key in (
        ("numerics versions", run_column(NUMERICS_TAG)),
        ("git commits", run_column(COMMIT_PARAM, "params")),
    ):
        found = sorted(str(v) for v in dict.fromkeys(_column(frame, key).fillna("unknown")))
        if len(found) > 1:
            spans.append(f"{len(found)} {name} ({', '.join(found)})")
    if not spans:
        return None
    return f"the tabulated runs span {' and '.join(spans)}; rerun `harness sweep` to measure them all anew"


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column that may be absent (no run set that tag), as missing values."""
    return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)


def sort_key(value: object) -> tuple[int, float, str]:
    """ "off" first, then numbers ascending, then per channel and per tensor, then the rest alphabetically."""
    text = str(value)
    if text == "off":
        return (0, 0.0, "")
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return (1, float(text), "")
    if text in BLOCK_ORDER:
        return (2, float(BLOCK_ORDER.index(text)), "")
    return (3, 0.0, text)


# ---- the built-in layouts -------------------------------------------------------------------------------


def _notes(runs: Runs, columns: list[Column], extra: list[str] | None = None) -> str:
    """The caption's key: direction, what bold means, how each uncertainty was computed, the token count."""
    notes = ["↓/↑: lower/higher is better", *(extra or [])]
    tested = list(dict.fromkeys(c.metric.label for c in columns if c.tied is not None))
    if tested:
        notes.append(
            f"bold: the best quantized value; for {', '.join(tested)} also every value a paired test "
            f"cannot tell from it (the 95% interval of the per-token difference holds 0; {METHOD} on the "
            "same tokens)"
        )
    elif any(c.metric.better for c in columns):
        kept = runs.has_tokens()
        notes.append("bold: the best quantized value" + ("" if kept else " (no per-token results: untested)"))
    if any(c.intervals for c in columns):
        notes.append(f"[low, high]: 95% interval ({METHOD})")
    if any(c.errors for c in columns):
        notes.append(f"±: one standard error ({METHOD}; task accuracies: lm-eval's stderr)")
    tokens = [int(v) for v in runs.metric("tokens_scored") if math.isfinite(v)]
    if tokens:
        notes.append(f"{'/'.join(f'{n:,}' for n in dict.fromkeys(tokens))} scored tokens")
    return "; ".join(notes) + "."


def datatypes_table(runs: Runs) -> Table:
    """QLoRA Table 2's shape: a row per config, the unquantized baseline on top as a reference."""
    keys = [k for k in (*DATATYPE_COLUMNS, "acc_avg") if runs.has(k)]
    frame = pd.concat([runs.baseline, runs.quantized])
    columns = [runs.column(key, frame, skip=len(runs.baseline)) for key in keys]
    labels = [["unquantized"]] * len(runs.baseline) + [[str(v)] for v in runs.quantized["params.label"]]
    against = ["KLD and top-1 against the unquantized model"] if runs.has("kld_mean") else []
    caption = f"Data types on {runs.setting()}. " + _notes(runs, columns, against)
    return Table("datatypes", caption, ["Config"], labels, columns, reference_rows=len(runs.baseline))


def tasks_table(runs: Runs) -> Table | None:
    """Zero-shot accuracy: a row per config, a column per task (its primary score) and the suite average.

    lm-eval keeps no per-document scores here, so "not resolved from the best" is the unpaired z-test on
    lm-eval's standard errors; the configs answer the same documents, whose shared difficulty makes the paired
    test sharper, so this one errs towards calling differences unresolved."""
    found = [c.removeprefix("metrics.") for c in runs.quantized if _is_task(c)]
    named = dict.fromkeys(re.sub(r"^acc_(norm_)?", "", k) for k in found if k != "acc_avg")
    order = list(PRIMARY)  # the suite's order first, then any other task alphabetically
    tasks = sorted(named, key=lambda t: (order.index(t) if t in order else len(order), t))
    keys = [f"{PRIMARY.get(t, 'acc')}_{t}" for t in tasks]
    keys = [k for k in keys if runs.has(k)] + (["acc_avg"] if runs.has("acc_avg") else [])
    if not keys:
        return None
    frame = pd.concat([runs.baseline, runs.quantized])
    skip = len(runs.baseline)
    columns = []
    for key in keys:
        column = runs.column(key, frame, skip=skip)
        if column.errors is not None:
            column.tied = _within_errors(column.values, column.errors, column.metric.better, skip)
        columns.append(column)
    labels = [["unquantized"]] * skip + [[str(v)] for v in runs.quantized["params.label"]]
    limit = frame.get("params.limit", pd.Series(dtype=str)).dropna()
    limits = [v for v in dict.fromkeys(limit) if v != "None"]
    docs = f"the first {'/'.join(limits)} documents of each task" if limits else "every document of each task"
    primary = ", ".join(f"{t}: {PRIMARY.get(t, 'acc')}" for t in tasks)
    notes = [
        f"lm-eval 0.4.13 stock tasks, zero-shot, {docs}; the score shown per task: {primary}",
        "bold: the best quantized value and every value within 1.96·√(se₁² + se₂²) of it (unpaired z-test "
        "on lm-eval's standard errors: a difference it does not resolve may still be real)",
        "±: one standard error (lm-eval's; the average's: √(Σ se²)/n, the tasks taken as independent)",
    ]
    caption = f"Zero-shot accuracy (%) on {runs.model}, ↑: higher is better; " + "; ".join(notes) + "."
    return Table("tasks", caption, ["Config"], labels, columns, reference_rows=skip)


def _within_errors(values: list[float], errors: list[float], better: str | None, skip: int) -> set[int]:
    """Rows whose value is within 1.96 combined standard errors of the best row's."""
    rows = [i for i in range(skip, len(values)) if math.isfinite(values[i]) and math.isfinite(errors[i])]
    if len(rows) < 2 or better is None:
        return set()
    best = (min if better == "lower" else max)(rows, key=lambda i: values[i])
    return {
        i
        for i in rows
        if abs(values[i] - values[best]) <= 1.96 * math.hypot(errors[i], errors[best]) and i != best
    }


def blocksize_table(runs: Runs, key: str) -> Table:
    """Data type × block size: the chosen metric with the bits/param it costs beside it.

    The axis with more values runs down the page, so that a ten-block sweep and a six-variant grid both fit.
    """
    frame = runs.quantized.assign(variant=runs.quantized["params.variant"])
    blocks = sorted(dict.fromkeys(frame["params.block_size"]), key=sort_key)
    variants = list(dict.fromkeys(frame["variant"]))
    blocks_down = len(blocks) >= len(variants)
    down, across = (blocks, variants) if blocks_down else (variants, blocks)
    indexed = frame.set_index(
        ["params.block_size", "variant"] if blocks_down else ["variant", "params.block_size"]
    )
    bits = replace(metric_info("bits_per_param"), label="Bits")
    unresolved = _unresolved_steps(runs, frame, key, blocks)
    columns = []
    for group in across:
        cells = indexed.reindex([(row, group) for row in down])
        name = group if blocks_down else _block_name(group)
        column = runs.column(key, cells, group=name)
        pairs = [(row, group) if blocks_down else (group, row) for row in down]  # (block, variant)
        column.marks = ["≈" if pair in unresolved else "" for pair in pairs]
        columns += [column, Column(bits, runs.metric("bits_per_param", cells), group=name)]
    extra = ["bits: bits/param of the quantized layers, block constants included"]
    if unresolved:
        extra.append("≈: a paired test cannot tell it from the next smaller block size of the same data type")
    elif any(c.tied is not None for c in columns):
        extra.append("every step to the next smaller block size is resolved")
    caption = f"{metric_info(key).label} by block size and data type on {runs.setting()}. " + _notes(
        runs, columns, extra
    )
    rows = [[_block_name(row) if blocks_down else row] for row in down]
    return Table(f"blocksize-{key}", caption, ["Block" if blocks_down else "Data type"], rows, columns)


def _unresolved_steps(runs: Runs, frame: pd.DataFrame, key: str, blocks: list[str]) -> set[tuple[str, str]]:
    """(block, variant) cells whose per-token series a paired test cannot tell from the same variant's at
    the next smaller block size."""
    name = metric_info(key).per_token
    if name is None:
        return set()
    found = set()
    for variant, group in frame.groupby("variant", sort=False):
        ordered = group.iloc[
            sorted(range(len(group)), key=lambda i: blocks.index(group["params.block_size"].iloc[i]))
        ]
        series, sizes = runs.series(ordered, name), list(ordered["params.block_size"])
        for i in range(1, len(ordered)):
            a, b = series[i - 1], series[i]
            if a is not None and b is not None and len(a) == len(b) and not paired_difference(b, a).resolved:
                found.add((str(sizes[i]), str(variant)))
    return found


def _shown(label: str, unit: str, better: Literal["lower", "higher"], **display: Any) -> MetricSpec:
    """A column a table derives from two runs' metrics (a difference, a saving): shown, never logged."""
    return MetricSpec(label, label, unit, better, "model", "", **display)


def _block_name(block: str) -> str:
    return f"block {block}" if block.isdigit() else f"per {block}"


def doublequant_table(runs: Runs) -> Table | None:
    """Each DQ variant against the same format and block without DQ: bits saved, error added."""
    frame = runs.quantized
    same = [
        "params.format",
        "params.block_size",
        "params.constant_dtype",
        "params.compute_dtype",
        "params.rounding",
    ]
    same = [c for c in same if c in frame]
    off = frame[frame["params.double_quant"] == "off"].drop_duplicates(same).set_index(same)
    on = frame[frame["params.double_quant"] != "off"]
    pairs = [
        (i, off.index.get_loc(tuple(on.loc[i, same])))
        for i in on.index
        if tuple(on.loc[i, same]) in off.index
    ]
    if not pairs:
        return None
    with_dq = on.loc[[i for i, _ in pairs]]
    without = off.iloc[[j for _, j in pairs]]

    def delta(key: str, relative: bool = False) -> list[float]:
        a, b = runs.metric(key, with_dq), runs.metric(key, without)
        return [(x / y - 1) * 100 if relative else x - y for x, y in zip(a, b, strict=True)]

    saved = [-d for d in delta("bits_per_param")]
    columns = [
        Column(metric_info("bits_per_param"), runs.metric("bits_per_param", with_dq)),
        Column(_shown("Saved", "bits", "higher", decimals=3), saved),
        Column(_shown("Saved at 70B", "GB", "higher", decimals=2), [s * 70e9 / 8 / 1e9 for s in saved]),
    ]
    added = [
        ("nmse", _shown("ΔnMSE", "%", "lower", decimals=2, signed=True), True),
        ("output_rel_err", _shown("ΔOut. err.", "%", "lower", decimals=2, signed=True), True),
        ("ppl", _shown("ΔPPL", "", "lower", decimals=2, signed=True), False),
        ("kld_mean", _shown("ΔKLD", "nats", "lower", sig=2, signed=True), False),
    ]
    for key, spec, relative in added:
        if not runs.has(key):
            continue
        paired = _paired(runs, key, with_dq, without)
        errors = [d.se if d else math.nan for d in paired] if any(paired) else None
        columns.append(Column(spec, delta(key, relative), errors))
    rows = [[str(label)] for label in with_dq["params.label"]]
    extra = [
        "Δ: each against the same data type and block size without DQ",
        "ΔnMSE and Δoutput error in % of their value without DQ",
    ]
    caption = f"Double quantization (DQ) of the block constants on {runs.setting()}. " + _notes(
        runs, columns, extra
    )
    return Table("doublequant", caption, ["Config"], rows, columns)


def _paired(runs: Runs, key: str, a: pd.DataFrame, b: pd.DataFrame) -> list[Difference | None]:
    """Row by row, the paired difference of ``key`` between the runs of ``a`` and of ``b`` on the same
    tokens (ppl as exp of the mean NLL), or None without per-token results."""
    name = metric_info(key).per_token
    if name is None:
        return [None] * len(a)
    out: list[Difference | None] = []
    for x, y in zip(runs.series(a, name), runs.series(b, name), strict=True):
        if x is None or y is None or len(x) != len(y):
            out.append(None)
        else:
            out.append(ppl_difference(x, y) if key == "ppl" else paired_difference(x, y))
    return out


def pivot_table(runs: Runs, rows: str, cols: str, key: str) -> Table:
    """Any params (comma-separated) down and across; each cell must be exactly one config."""
    frame = runs.quantized
    row_fields, col_fields = _fields(frame, rows), _fields(frame, cols)
    fields = [f"params.{f}" for f in row_fields + col_fields]
    if frame.duplicated(fields).any():
        names = [c.removeprefix("params.") for c in frame if c.startswith("params.") and c not in fields]
        also = [n for n in names if n not in _NOT_AXES and frame[f"params.{n}"].nunique() > 1] or ["label"]
        raise ReportError(
            f"--rows {rows} --cols {cols} leave several runs per cell; add one of {', '.join(also)} to them"
        )
    metric = metric_info(key)

    def labels(fs: list[str]) -> list[tuple[str, ...]]:
        keys = dict.fromkeys(tuple(str(v) for v in r) for r in frame[[f"params.{f}" for f in fs]].to_numpy())
        return sorted(keys, key=lambda t: [sort_key(v) for v in t])

    row_keys, col_keys = labels(row_fields), labels(col_fields)
    indexed = frame.set_index(fields)
    columns = []
    for ck in col_keys:
        cells = indexed.reindex([(*rk, *ck) for rk in row_keys]).reset_index()
        columns.append(runs.column(key, cells, group=" / ".join(ck)))
    caption = (
        f"{metric.label} by {' / '.join(row_fields)} (rows) and {' / '.join(col_fields)} (columns) on "
        f"{runs.setting()}. " + _notes(runs, columns)
    )
    name = f"pivot-{key}-{'+'.join(row_fields)}-by-{'+'.join(col_fields)}"
    return Table(name, caption, row_fields, [list(rk) for rk in row_keys], columns)


_NOT_AXES = ("label", "variant", "config_hash", "git_commit")  # differ between runs, derived or provenance


def _fields(frame: pd.DataFrame, spec: str) -> list[str]:
    fields = [f.strip().removeprefix("params.") for f in spec.split(",") if f.strip()]
    known = sorted(c.removeprefix("params.") for c in frame if c.startswith("params."))
    for f in fields:
        if f not in known:
            raise ReportError(f"unknown field {f!r} for --rows/--cols; known: {', '.join(known)}")
    if not fields:
        raise ReportError(
            "--rows and --cols need at least one field each, e.g. --rows format --cols block_size"
        )
    return fields


def _is_task(column: str) -> bool:
    return column.startswith("metrics.acc_") and not column.endswith("_stderr")


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
    selected = select_runs(tracker.runs(experiment), experiment, tracker.uri)
    out = out_dir or Path.cwd() / "results" / experiment
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tokens = cache(partial(_tokens, tracker))
    for runs in selected:
        runs.tokens = tokens
        suffix = "" if len(selected) == 1 else f"-{_slug(runs.model)}"
        for table in tables(runs, rows, cols, metric):
            paths += write_table(
                table, out / f"{table.name}{suffix}", f"tab:{_slug(experiment)}-{table.name}{suffix}"
            )
        paths += write_plots(runs, out, suffix, lambda run_id: _layers_csv(tracker, run_id))
    tracker.log_report(experiment, [p for p in paths if p.suffix in (".png", ".md")])
    mixed = mixed_provenance(selected)
    return Report(paths, [mixed] if mixed else [])


def tables(runs: Runs, rows: str | None, cols: str | None, metric: str | None) -> list[Table]:
    """The built-in layouts whose axes vary in these runs, then the requested pivot."""
    if metric is not None and f"metrics.{metric}" not in runs.quantized:
        known = sorted(c.removeprefix("metrics.") for c in runs.quantized if c.startswith("metrics."))
        raise ReportError(f"unknown metric {metric!r}; this experiment has: {', '.join(known)}")
    key = metric or ("ppl" if runs.has("ppl") else "nmse")
    out = [datatypes_table(runs)]
    task_table = tasks_table(runs)
    out += [task_table] if task_table is not None else []
    if len(runs.varying("block_size")) >= 2:
        out.append(blocksize_table(runs, key))
    if "off" in runs.varying("double_quant") and len(runs.varying("double_quant")) >= 2:
        dq = doublequant_table(runs)
        out += [dq] if dq is not None else []
    if rows is not None and cols is not None:
        out.append(pivot_table(runs, rows, cols, key))
    return out


def write_table(table: Table, stem: Path, label: str) -> list[Path]:
    paths = [stem.with_suffix(".tex"), stem.with_suffix(".md"), stem.with_suffix(".csv")]
    for path, text in zip(paths, (to_latex(table, label), to_markdown(table), to_csv(table)), strict=True):
        path.write_text(text, encoding="utf-8")
    return paths


def write_plots(
    runs: Runs, out: Path, suffix: str, layers: Callable[[str], pd.DataFrame | None]
) -> list[Path]:
    """Quality and nMSE against bits/param, and the per-layer heatmap at one block size (64 if run)."""
    if not runs.has("bits_per_param"):
        return []
    frame = runs.quantized
    points = pd.DataFrame(
        {
            "format": frame["params.format"].to_numpy(),
            "label": frame["params.label"].to_numpy(),
            "double_quant": (frame["params.double_quant"] != "off").to_numpy(),
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
    if runs.has("nmse"):
        found = points.assign(value=runs.metric("nmse")).dropna(subset=["bits", "value"])
        paths += plots.save(
            plots.nmse_vs_bits(found, f"weight error vs bits/param ({where})"), out / f"nmse_vs_bits{suffix}"
        )
    blocks = frame["params.block_size"].astype(str)
    block = "64" if (blocks == "64").any() else blocks.mode().iloc[0]
    found_layers = {}
    for _, row in frame[blocks == block].iterrows():
        table = layers(str(row["run_id"]))
        if table is not None:
            found_layers[str(row["params.label"])] = table
    if found_layers:
        at = "each format's own block" if block == "None" else f"block {block}"
        fig = plots.layer_heatmap(found_layers, f"per-layer weight nMSE, {at} ({where})")
        paths += plots.save(fig, out / f"layer_heatmap{suffix}")
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


def _tokens(tracker: Tracker, run_id: str) -> dict[str, np.ndarray] | None:
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


# ---- pairwise comparison ---------------------------------------------------------------------------------


def compare(experiment: str, first: str, second: str, tracking_uri: str | None = None) -> str:
    """The paired difference ``first − second`` of two configs (by label) from their per-token results:
    mean NLL, PPL, mean KLD and top-1 agreement, each with its SE, 95 % interval and whether it is resolved.
    No model runs: everything comes from the runs' ``tokens.npz`` artifacts."""
    tracker = Tracker.of(tracking_uri)
    rows = {}
    for runs in select_runs(tracker.runs(experiment), experiment, tracker.uri):
        frame = pd.concat([runs.baseline.assign(**{"params.label": "baseline"}), runs.quantized])
        for _, row in frame.iterrows():
            rows.setdefault(str(row["params.label"]), []).append((runs.model, row))
    found = []
    for label in (first, second):
        if label not in rows:
            raise ReportError(f"no FINISHED config {label!r} in {experiment!r}; configs: {', '.join(rows)}")
        if len(rows[label]) > 1:
            models = ", ".join(model for model, _ in rows[label])
            raise ReportError(
                f"{label!r} was run on several models ({models}); compare within one experiment"
            )
        _, row = rows[label][0]
        tokens = _tokens(tracker, str(row["run_id"]))
        if tokens is None:
            raise ReportError(f"the run of {label!r} kept no per-token results ({TOKENS_ARTIFACT}); rerun it")
        found.append((str(row["params.model"]), tokens))  # one model in two dtypes pairs on its tokens
    (model_a, a), (model_b, b) = found
    if model_a != model_b or len(a["nll"]) != len(b["nll"]):
        raise ReportError(f"{first!r} and {second!r} were not evaluated on the same tokens")
    lines = [
        f"{first} − {second} on {model_a}, {len(a['nll']):,} scored tokens, paired ({METHOD}):",
        f"{'':<16}{'difference':>12}{'SE':>11}{'95% interval':>26}  resolved",
    ]
    measures = [("mean NLL (nats)", "nll", 1.0), ("PPL", "nll", 1.0)]
    measures += [("mean KLD (nats)", "kld", 1.0), ("top-1 (%)", "top1_match", 100.0)]
    for name, key, scale in measures:
        if key not in a or key not in b:
            continue
        d = ppl_difference(a[key], b[key]) if name == "PPL" else paired_difference(a[key], b[key])
        shown = f"[{d.ci_low * scale:+.4g}, {d.ci_high * scale:+.4g}]"
        verdict = "yes" if d.resolved else "no"
        lines.append(f"{name:<16}{d.mean * scale:>+12.4g}{d.se * scale:>11.3g}{shown:>26}  {verdict}")
    return "\n".join(lines)
