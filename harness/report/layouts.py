"""The layouts: the data-type table, the zero-shot table, block size, double quantization and any pivot.

Bold marks a best value and every value the paired tests cannot tell from it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Literal

import numpy as np

from harness.evaluate.tasks import PRIMARY
from harness.metrics import MetricSpec
from harness.report.runs import ModelRuns, Rows, sort_key
from harness.report.table import DATATYPE_COLUMNS, Column, ReportError, Table, metric_info
from harness.stats import (
    METHOD,
    Difference,
    paired_difference,
    ppl_difference,
    recovery_difference,
    unresolved_from_best,
)
from harness.tracking import RunRecord

# A layout turns one model's runs into a table, or None where those runs do not vary what it shows; ``metric``
# is the quality metric a table of one metric shows (``harness tables --metric``). ``tables`` writes every
# registered layout, in the order registered.
Layout = Callable[[ModelRuns, str], "Table | None"]
LAYOUTS: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    LAYOUTS.append(layout)
    return layout


# ---- the built-in layouts -------------------------------------------------------------------------------


def _notes(runs: ModelRuns, columns: list[Column], extra: list[str] | None = None) -> str:
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


@register_layout
def datatypes_table(runs: ModelRuns, metric: str) -> Table:
    """QLoRA Table 2's shape: a row per config, the unquantized baseline on top as a reference."""
    keys = [k for k in (*DATATYPE_COLUMNS, "acc_avg") if runs.has(k)]
    columns = [runs.column(key, runs.all, skip=len(runs.baseline)) for key in keys]
    labels = [[label] for label in runs.labels()]
    against = ["KLD and top-1 against the unquantized model"] if runs.has("kld_mean") else []
    caption = f"Data types on {runs.setting()}. " + _notes(runs, columns, against)
    return Table("datatypes", caption, ["Config"], labels, columns, reference_rows=len(runs.baseline))


@register_layout
def tasks_table(runs: ModelRuns, metric: str) -> Table | None:
    """Zero-shot accuracy: a row per config, a column per task (its primary score) and the suite average.

    lm-eval keeps no per-document scores here, so "not resolved from the best" is the unpaired z-test on
    lm-eval's standard errors; the configs answer the same documents, whose shared difficulty makes the paired
    test sharper, so this one errs towards calling differences unresolved."""
    found = dict.fromkeys(k for r in runs.quantized for k in r.metrics if _is_task(k))
    named = dict.fromkeys(re.sub(r"^acc_(norm_)?", "", k) for k in found if k != "acc_avg")
    order = list(PRIMARY)  # the suite's order first, then any other task alphabetically
    tasks = sorted(named, key=lambda t: (order.index(t) if t in order else len(order), t))
    keys = [f"{PRIMARY.get(t, 'acc')}_{t}" for t in tasks]
    keys = [k for k in keys if runs.has(k)] + (["acc_avg"] if runs.has("acc_avg") else [])
    if not keys:
        return None
    skip = len(runs.baseline)
    columns = []
    for key in keys:
        column = runs.column(key, runs.all, skip=skip)
        if column.errors is not None:
            column.tied = _within_errors(column.values, column.errors, column.metric.better, skip)
        columns.append(column)
    labels = [[label] for label in runs.labels()]
    limits = [str(v) for v in dict.fromkeys(r.limit for r in runs.all) if v is not None]
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


@register_layout
def blocksize_table(runs: ModelRuns, key: str) -> Table | None:
    """Data type × block size: the chosen metric with the bits/param it costs beside it.

    The axis with more values runs down the page, so that a ten-block sweep and a six-variant grid both fit.
    """
    if len(runs.varying("block_size")) < 2:
        return None
    blocks = sorted(runs.varying("block_size"), key=sort_key)
    variants = runs.varying("variant")
    blocks_down = len(blocks) >= len(variants)
    down, across = (blocks, variants) if blocks_down else (variants, blocks)
    indexed = {(r.block_size, r.variant): r for r in runs.quantized}
    bits = replace(metric_info("bits_per_param"), label="Bits")
    unresolved = _unresolved_steps(runs, key, blocks)
    columns = []
    for group in across:
        pairs = [(row, group) if blocks_down else (group, row) for row in down]  # (block, variant)
        cells = [indexed.get(pair) for pair in pairs]
        name = group if blocks_down else _block_name(group)
        column = runs.column(key, cells, group=name)
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


def _unresolved_steps(runs: ModelRuns, key: str, blocks: list[str]) -> set[tuple[str, str]]:
    """(block, variant) cells whose per-token series a paired test cannot tell from the same variant's at
    the next smaller block size."""
    name = metric_info(key).per_token
    if name is None:
        return set()
    found = set()
    for variant in runs.varying("variant"):
        ordered = sorted(
            (r for r in runs.quantized if r.variant == variant), key=lambda r: blocks.index(r.block_size)
        )
        series = runs.series(ordered, name)
        for i in range(1, len(ordered)):
            a, b = series[i - 1], series[i]
            if a is not None and b is not None and len(a) == len(b) and not paired_difference(b, a).resolved:
                found.add((ordered[i].block_size, variant))
    return found


def _shown(label: str, unit: str, better: Literal["lower", "higher"], **display: Any) -> MetricSpec:
    """A column a table derives from two runs' metrics (a difference, a saving): shown, never logged."""
    return MetricSpec(label, label, unit, better, "model", "", **display)


def _block_name(block: str) -> str:
    return f"block {block}" if block.isdigit() else f"per {block}"


@register_layout
def doublequant_table(runs: ModelRuns, metric: str) -> Table | None:
    """Each DQ variant against the same format and block without DQ: bits saved, error added."""
    if "off" not in runs.varying("double_quant") or len(runs.varying("double_quant")) < 2:
        return None
    off: dict[tuple[str, ...], RunRecord] = {}
    for r in runs.quantized:
        if r.double_quant == "off":
            off.setdefault(_storage(r, with_dq=False), r)
    pairs = [
        (r, off[_storage(r, with_dq=False)])
        for r in runs.quantized
        if r.double_quant != "off" and _storage(r, with_dq=False) in off
    ]
    if not pairs:
        return None
    with_dq = [r for r, _ in pairs]
    without = [r for _, r in pairs]

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
    rows = [[r.label] for r in with_dq]
    extra = [
        "Δ: each against the same data type and block size without DQ",
        "ΔnMSE and Δoutput error in % of their value without DQ",
    ]
    caption = f"Double quantization (DQ) of the block constants on {runs.setting()}. " + _notes(
        runs, columns, extra
    )
    return Table("doublequant", caption, ["Config"], rows, columns)


def _storage(r: RunRecord, with_dq: bool = True) -> tuple[str, ...]:
    """What a config stores and computes with, apart from the method: configs alike in it are twins."""
    dq = (r.double_quant,) if with_dq else ()
    return (r.format, r.block_size, *dq, r.constant_dtype, r.compute_dtype, r.rounding)


def method_pairs(runs: ModelRuns) -> tuple[list[RunRecord], list[RunRecord]] | None:
    """Each RTN config followed by the other methods' configs of the same storage (format, block, DQ,
    dtypes, tie rule), and beside each row the RTN config it is compared with; None unless the runs hold
    RTN and another method."""
    methods = runs.varying("method")
    if "rtn" not in methods or len(methods) < 2:
        return None
    order: list[RunRecord] = []
    against: list[RunRecord] = []
    for rtn in (r for r in runs.quantized if r.method == "rtn"):
        twins = [r for r in runs.quantized if _storage(r) == _storage(rtn)]
        order += [rtn, *(r for r in twins if r is not rtn)]
        against += [rtn] * len(twins)
    return order, against


def method_differences(
    runs: ModelRuns, key: str, rows: list[RunRecord], base: list[RunRecord]
) -> list[Difference | None]:
    """``key`` of each row minus its RTN twin's, paired on the same tokens, in display units; None for RTN's
    own rows and where the runs kept no per-token results."""
    scale = metric_info(key).scale
    out: list[Difference | None] = []
    for row, rtn, d in zip(rows, base, _paired(runs, key, rows, base), strict=True):
        if row is rtn or d is None:
            out.append(None)
        else:
            out.append(
                Difference(d.mean * scale, d.se * scale, d.ci_low * scale, d.ci_high * scale, d.n_tokens)
            )
    return out


@register_layout
def methods_table(runs: ModelRuns, metric: str) -> Table | None:
    """Each method under round to nearest (RTN) of the same data type and block: PPL, KLD and top-1 with
    their differences from RTN, paired on the same tokens, the output error on held-out calibration positions
    and what the method cost."""
    pairs = method_pairs(runs)
    if pairs is None:
        return None
    rows, base = pairs
    columns = [runs.column(key, rows) for key in ("bits_per_param", "ppl") if runs.has(key)]
    shown = [("ppl", "ΔPPL", ""), ("kld_mean", "ΔKLD", "nats"), ("top1_agreement", "ΔTop-1", "%")]
    for key, label, unit in shown:
        if not runs.has(key):
            continue
        if key != "ppl":
            columns.append(runs.column(key, rows))
        paired = method_differences(runs, key, rows, base)
        delta = _shown(label, unit, metric_info(key).better or "lower", sig=2, signed=True)
        values = [d.mean if d else math.nan for d in paired]
        intervals = [(d.ci_low, d.ci_high) if d else (math.nan, math.nan) for d in paired]
        columns.append(Column(delta, values, intervals=intervals if any(paired) else None))
    columns += [
        runs.column(key, rows) for key in ("output_rel_err", "time_quantize_s", "fit_tokens") if runs.has(key)
    ]
    labels = [[r.label] for r in rows]
    extra = [
        "Δ: against round to nearest (rtn) of the same data type and block size, on the same tokens",
        "output error on held-out calibration positions, which no method fit on",
    ]
    caption = f"Quantization methods on {runs.setting()}. " + _notes(runs, columns, extra)
    return Table("methods", caption, ["Config"], labels, columns)


@register_layout
def recovery_table(runs: ModelRuns, metric: str) -> Table | None:
    """QLoRA's question after finetuning: each config before and after LoRA adapters trained on its quantized
    base, the 16-bit LoRA target, and the share of the quantization gap the adapters close."""
    if not runs.has("lora_ppl"):
        return None
    skip = len(runs.baseline)
    keys = ("bits_per_param", "ppl", "lora_ppl", "recovery_vs_base", "recovery_vs_lora16", "kld_mean")
    columns = [runs.column(key, runs.all, skip=skip) for key in (*keys, "lora_kld_mean") if runs.has(key)]
    series = [runs.per_token(r.run_id) for r in runs.all]
    pairs = [None if s is None else np.stack([s["nll"], s["lora_nll"]]) for s in series]
    found = [s for s in series[skip:] if s is not None]
    for k, column in enumerate(columns):
        if (name := _RECOVERY_REFERENCE.get(column.metric.name)) is not None and found:
            # every row is measured against the same base reference and the same 16-bit target
            differ = partial(recovery_difference, reference=found[0][name])
            columns[k] = replace(
                column, tied=unresolved_from_best(column.values, pairs, "higher", skip, differ)
            )
    labels = [[label] for label in runs.labels()]
    recipe = runs.quantized[0].lora
    extra = [
        "after LoRA: adapters of rank {} trained {} steps × {} rows of {} tokens on each config's base; the "
        "unquantized row's is the 16-bit LoRA target".format(
            *(recipe.get(k, "?") for k in ("rank", "steps", "batch", "sequence_length"))
        ),
        "recovered: (ΔPPL before − ΔPPL after) / ΔPPL before, against the unquantized model (vs base) or "
        "the 16-bit LoRA target (vs lora16), with paired intervals on the same tokens",
        "KLD after LoRA: against the unquantized model without adapters",
    ]
    caption = f"LoRA recovery on {runs.setting()}. " + _notes(runs, columns, extra)
    return Table("recovery", caption, ["Config"], labels, columns, reference_rows=skip)


_RECOVERY_REFERENCE = {"recovery_vs_base": "base_nll", "recovery_vs_lora16": "lora16_nll"}  # per-token series


def _paired(runs: ModelRuns, key: str, a: Rows, b: Rows) -> list[Difference | None]:
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


def pivot_table(runs: ModelRuns, rows: str, cols: str, key: str) -> Table:
    """Any params (comma-separated) down and across; each cell must be exactly one config."""
    row_fields, col_fields = _fields(runs, rows), _fields(runs, cols)

    def cell(r: RunRecord, fields: list[str]) -> tuple[str, ...]:
        return tuple(r.params.get(f, "nan") for f in fields)

    indexed: dict[tuple[str, ...], RunRecord] = {}
    for r in runs.quantized:
        if indexed.setdefault(cell(r, row_fields + col_fields), r) is not r:
            names = sorted(
                {n for q in runs.quantized for n in q.params} - {*row_fields, *col_fields, *_NOT_AXES}
            )
            also = [n for n in names if len({q.params[n] for q in runs.quantized if n in q.params}) > 1]
            raise ReportError(
                f"--rows {rows} --cols {cols} leave several runs per cell; add one of "
                f"{', '.join(also or ['label'])} to them"
            )
    metric = metric_info(key)

    def labels(fs: list[str]) -> list[tuple[str, ...]]:
        keys = dict.fromkeys(cell(r, fs) for r in runs.quantized)
        return sorted(keys, key=lambda t: [sort_key(v) for v in t])

    row_keys, col_keys = labels(row_fields), labels(col_fields)
    columns = []
    for ck in col_keys:
        cells = [indexed.get((*rk, *ck)) for rk in row_keys]
        columns.append(runs.column(key, cells, group=" / ".join(ck)))
    caption = (
        f"{metric.label} by {' / '.join(row_fields)} (rows) and {' / '.join(col_fields)} (columns) on "
        f"{runs.setting()}. " + _notes(runs, columns)
    )
    name = f"pivot-{key}-{'+'.join(row_fields)}-by-{'+'.join(col_fields)}"
    return Table(name, caption, row_fields, [list(rk) for rk in row_keys], columns)


_NOT_AXES = ("label", "variant", "config_hash", "git_commit")  # differ between runs, derived or provenance


def _fields(runs: ModelRuns, spec: str) -> list[str]:
    fields = [f.strip().removeprefix("params.") for f in spec.split(",") if f.strip()]
    known = sorted({name for r in runs.quantized for name in r.params})
    for f in fields:
        if f not in known:
            raise ReportError(f"unknown field {f!r} for --rows/--cols; known: {', '.join(known)}")
    if not fields:
        raise ReportError(
            "--rows and --cols need at least one field each, e.g. --rows format --cols block_size"
        )
    return fields


def _is_task(key: str) -> bool:
    return key.startswith("acc_") and not key.endswith("_stderr")
