"""Which runs a table reads: the latest FINISHED run of each config, per model, with its baseline."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.report.table import BLOCK_ORDER, Column, ReportError, metric_info
from harness.stats import unresolved_from_best
from harness.tracking import (
    BASELINE_ID_TAG,
    BASELINE_TAG,
    COMMIT_PARAM,
    CONFIG_ID_TAG,
    HASH_TAG,
    KIND_TAG,
    NUMERICS_TAG,
    run_column,
)

# ---- reading the runs ------------------------------------------------------------------------------------


@dataclass
class ModelRuns:
    """One model's slice of an experiment: its quantized configs in a stable order and its baseline."""

    experiment: str
    model: str
    quantized: pd.DataFrame
    baseline: pd.DataFrame  # zero or one row
    per_token: Callable[[str], dict[str, np.ndarray] | None] = lambda run_id: None  # a run's, by run id

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
        return any(self.per_token(str(run_id)) is not None for run_id in self.quantized["run_id"])

    def series(self, frame: pd.DataFrame, name: str) -> list[np.ndarray | None]:
        """Each row's per-token ``name`` (nll, kld, top1_match), None where the run kept none."""
        out = []
        for run_id in frame["run_id"]:
            found = self.per_token(str(run_id)) if isinstance(run_id, str) else None
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
            tied = unresolved_from_best(values, self.series(frame, spec.per_token), spec.better, skip)
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


def select_runs(frame: pd.DataFrame, experiment: str, store: str = "the store") -> list[ModelRuns]:
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
        out.append(ModelRuns(experiment, name, group.loc[rows], baseline))
    return out


def mixed_provenance(selected: list[ModelRuns]) -> str | None:
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
