"""Which runs a table reads: the latest FINISHED run of each config, per model, with its baseline."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from harness.report.table import BLOCK_ORDER, Column, ReportError, metric_info
from harness.stats import unresolved_from_best
from harness.tracking import RunRecord

# A table's rows: one run each, None where a cell of a grid holds no run.
Rows = Sequence[RunRecord | None]

# ---- reading the runs ------------------------------------------------------------------------------------


@dataclass
class ModelRuns:
    """One model's slice of an experiment: its quantized configs in a stable order and its baseline."""

    experiment: str
    model: str
    quantized: list[RunRecord]
    baseline: list[RunRecord]  # zero or one
    per_token: Callable[[str], dict[str, np.ndarray] | None] = lambda run_id: None  # a run's, by run id

    @property
    def all(self) -> list[RunRecord]:
        """The baseline (if any) above the quantized configs, as the tables list them."""
        return [*self.baseline, *self.quantized]

    def labels(self) -> list[str]:
        """The row names of ``all``: "unquantized" for the baseline, each config's label."""
        return ["unquantized"] * len(self.baseline) + [r.label for r in self.quantized]

    def metric(self, key: str, rows: Rows | None = None, scale: float | None = None) -> list[float]:
        """A metric's values in display units (``scale`` defaults to the metric's own); NaN where missing."""
        rows = self.quantized if rows is None else rows
        factor = metric_info(key).scale if scale is None else scale
        return [r.metric(key) * factor if r is not None else math.nan for r in rows]

    def has(self, key: str) -> bool:
        return any(math.isfinite(v) for v in self.metric(key))

    def has_tokens(self) -> bool:
        return any(self.per_token(r.run_id) is not None for r in self.quantized)

    def series(self, rows: Rows, name: str) -> list[np.ndarray | None]:
        """Each row's per-token ``name`` (nll, kld, top1_match), None where the run kept none."""
        found = [self.per_token(r.run_id) if r is not None else None for r in rows]
        return [f.get(name) if f else None for f in found]

    def column(self, key: str, rows: Rows | None = None, group: str = "", skip: int = 0) -> Column:
        """A metric's column with its declared uncertainty (SE or 95 % interval) and, where the runs kept
        per-token results, the rows a paired test cannot tell from the best (rows before ``skip`` aside)."""
        rows = self.quantized if rows is None else rows
        spec = metric_info(key)
        values = self.metric(key, rows)
        errors = self.metric(spec.stderr, rows, spec.scale) if spec.stderr else None
        intervals = None
        if spec.interval:
            lows, highs = (self.metric(k, rows, spec.scale) for k in spec.interval)
            intervals = list(zip(lows, highs, strict=True)) if _any(lows) else None
        tied = None
        if spec.per_token and spec.better:
            tied = unresolved_from_best(values, self.series(rows, spec.per_token), spec.better, skip)
        return Column(spec, values, errors if _any(errors) else None, intervals, group, tied)

    def varying(self, field: str) -> list[str]:
        """The distinct values a field of the record takes among the quantized configs, in their order."""
        return list(dict.fromkeys(getattr(r, field) for r in self.quantized))

    def setting(self) -> str:
        """Model, corpus, protocol, context and tokens, as the caption names them."""

        def value(field: str) -> str:
            found = dict.fromkeys(getattr(r, field) for r in self.all)
            return "/".join(f"{v:,}" if isinstance(v, int) else str(v) for v in found if v is not None) or "?"

        parts = [self.model, f"{value('corpus')} corpus", f"{value('protocol')} protocol"]
        parts.append(f"context {value('context_length')}")
        if value("protocol") == "sliding":
            parts.append(f"stride {value('stride')}")
        parts.append(f"{value('eval_tokens')} tokens")
        if value("device") != "cpu":  # say where the runs ran, unless all on the CPU
            parts.append(f"run on {value('device')}")
        mapped = [
            r.params.get("placement", "?") for r in self.all if r.params.get("device_map", "none") != "none"
        ]
        if mapped:
            parts.append(f"placed by a device map ({'; '.join(dict.fromkeys(mapped))})")
        ties = [v for v in self.metric("tie_fraction", self.all, 1.0) if math.isfinite(v)]
        if ties and max(ties) > 0:  # the tie rule decides those weights: say which rule
            parts.append(f"ties rounded {value('rounding')} (up to {max(ties):.2%} of weights on a tie)")
        return ", ".join(parts)


def _any(values: list[float] | None) -> bool:
    return values is not None and any(math.isfinite(v) for v in values)


def select_runs(records: list[RunRecord], experiment: str, store: str = "the store") -> list[ModelRuns]:
    """The latest FINISHED run per config, per model and model dtype, from ``Tracker.records`` (oldest
    first); ReportError if none.

    A config is its config id, so a rerun under a newer numerics version supersedes the older run. A run's
    ``delta_ppl`` and its interval are the ones it logged, paired token by token with the base reference."""
    if not records:
        raise ReportError(f"no runs of experiment {experiment!r} in {store} (run `harness sweep` first)")
    finished = [r for r in records if r.status == "FINISHED"]
    if not finished:
        statuses: dict[str, int] = {}
        for r in records:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items(), key=lambda item: -item[1]))
        raise ReportError(f"experiment {experiment!r} has no FINISHED config runs ({counts})")
    latest = list({r.config_id: r for r in finished}.values())  # the newest run of each config id
    latest.sort(key=lambda r: r.start_time)
    quantized = [r for r in latest if not r.is_baseline]
    if not quantized:
        raise ReportError(f"experiment {experiment!r} has no FINISHED quantized runs, only the baseline")
    baselines = [r for r in latest if r.is_baseline]
    format_order = {f: i for i, f in enumerate(dict.fromkeys(r.format for r in quantized))}

    def order(r: RunRecord) -> tuple[object, ...]:
        return (format_order[r.format], sort_key(r.block_size), sort_key(r.double_quant), r.label)

    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in quantized:
        groups.setdefault((r.model, r.model_dtype), []).append(r)
    dtypes: dict[str, set[str]] = {}
    for model, model_dtype in groups:
        dtypes.setdefault(model, set()).add(model_dtype)
    out = []
    for (model, model_dtype), group in groups.items():
        named = {r.baseline_id for r in group}
        baseline = [r for r in baselines if r.config_id in named][-1:]
        name = f"{model} in {model_dtype}" if len(dtypes[model]) > 1 else model  # a slice per model dtype
        out.append(ModelRuns(experiment, name, sorted(group, key=order), baseline))
    return out


def mixed_provenance(selected: list[ModelRuns]) -> str | None:
    """One line naming the numerics versions and git commits when the selected runs span more than one."""
    records = [r for runs in selected for r in runs.all]
    spans = []
    for name, field in (("numerics versions", "numerics_version"), ("git commits", "git_commit")):
        found = sorted(dict.fromkeys(getattr(r, field) for r in records))
        if len(found) > 1:
            spans.append(f"{len(found)} {name} ({', '.join(found)})")
    if not spans:
        return None
    return f"the tabulated runs span {' and '.join(spans)}; rerun `harness sweep` to measure them all anew"


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
