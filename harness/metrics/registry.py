"""The metric registry: one declaration per metric, as lm-eval's ``register_metric``: name, unit, direction,
how per-layer values combine into the model's number, display precision and a one-line definition. Logging
refuses undeclared names; layer aggregation, tables, plots and the README's metric table all read these
declarations (``harness.metrics.declared`` holds them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

Better = Literal["lower", "higher"]
Aggregation = Literal["numel_weighted", "max", "sum", "model"]
Scope = Literal["config", "sweep"]
AGGREGATIONS: dict[str, str] = {
    "numel_weighted": "mean, weighted by parameters",
    "max": "worst layer",
    "sum": "sum",
    "model": "—",
}
TASK = "<task>"  # a placeholder in a family's name: one declaration covers every lm-eval task


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str  # a table's column header
    unit: str
    better: Better | None
    aggregation: Aggregation  # how per-layer values combine; "model" = measured on the model as a whole
    definition: str
    decimals: int | None = None  # fixed decimals; None = ``sig`` significant digits
    sig: int = 3
    scale: float = 1.0  # shown × scale: 100 for a share shown in %, 1e-6 for bytes shown in MB
    signed: bool = False
    stderr: str | None = None  # the metric holding this one's standard error
    interval: tuple[str, str] | None = None  # the metrics holding its 95 % interval (low, high)
    per_token: str | None = None  # the per-token series whose mean it orders by: two runs compare paired
    scope: Scope = "config"  # a config's run, or the sweep's parent run

    @property
    def layer_column(self) -> str | None:
        """The per-layer column this metric aggregates (``nmse_max`` aggregates ``nmse``)."""
        if self.aggregation == "model":
            return None
        return self.name.removesuffix("_max") if self.aggregation == "max" else self.name

    @property
    def header(self) -> str:
        return " ".join(p for p in (self.label, self.subheader) if p)

    @property
    def subheader(self) -> str:
        """Unit and direction: the second header line in LaTeX, so that columns stay narrow."""
        unit = f"({self.unit})" if self.unit else ""
        arrow = {"lower": "↓", "higher": "↑", None: ""}[self.better]
        return " ".join(p for p in (unit, arrow) if p)

    def text(self, value: float) -> str:
        """``value`` (already scaled) at this metric's precision; an em dash when missing or non-finite."""
        if not math.isfinite(value):
            return "—"
        digits = self.decimals
        if digits is None:
            digits = 0 if value == 0 else max(0, min(8, self.sig - 1 - math.floor(math.log10(abs(value)))))
        return f"{value:+.{digits}f}" if self.signed else f"{value:.{digits}f}"


METRICS: dict[str, MetricSpec] = {}


def register_metric(
    name: str,
    label: str,
    unit: str,
    better: Better | None,
    aggregation: Aggregation,
    definition: str,
    **display: Any,
) -> MetricSpec:
    if name in METRICS:
        raise ValueError(f"metric {name!r} is declared twice")
    METRICS[name] = MetricSpec(name, label, unit, better, aggregation, definition, **display)
    return METRICS[name]


def metric(name: str) -> MetricSpec:
    """The declaration of ``name``; for ``acc_piqa`` and the like, its family's, with the task filled in."""
    if name in METRICS:
        return METRICS[name]
    matches = []
    for spec in METRICS.values():
        head, found, tail = spec.name.partition(TASK)
        if found and len(name) > len(head) + len(tail) and name.startswith(head) and name.endswith(tail):
            matches.append((len(head) + len(tail), spec, name[len(head) : len(name) - len(tail)]))
    if not matches:
        raise KeyError(f"undeclared metric {name!r}; declare it with harness.metrics.register_metric")
    _, spec, task = max(
        matches, key=lambda m: m[0]
    )  # the most specific family: acc_norm_<task> over acc_<task>
    return replace(
        spec,
        name=name,
        label=spec.label.replace(TASK, task),
        stderr=spec.stderr.replace(TASK, task) if spec.stderr else None,
    )


def aggregate(layers: pd.DataFrame) -> dict[str, float]:
    """Each declared per-layer metric over the rows of a ``layer_table``, by its declared aggregation."""
    numel = layers["numel"].to_numpy(dtype=np.float64)
    out = {}
    for spec in METRICS.values():
        column = spec.layer_column
        if column is None or column not in layers:
            continue
        values = layers[column].to_numpy(dtype=np.float64)
        if spec.aggregation == "numel_weighted":
            out[spec.name] = float((values * numel).sum() / numel.sum())
        elif spec.aggregation == "max":
            out[spec.name] = float(values.max())
        else:
            out[spec.name] = float(values.sum())
    return out


def markdown_table() -> str:
    """The registry as the README shows it (a test keeps the two equal)."""
    lines = ["| Metric | Shown in | Better | Over layers | Definition |", "|:--|:--|:--|:--|:--|"]
    for spec in METRICS.values():
        better = {"lower": "lower", "higher": "higher", None: "—"}[spec.better]
        where = " (sweep run)" if spec.scope == "sweep" else ""
        definition = spec.definition.replace("|", r"\|")
        lines.append(
            f"| `{spec.name}`{where} | {spec.unit or '—'} | {better} | {AGGREGATIONS[spec.aggregation]} "
            f"| {definition} |"
        )
    return "\n".join(lines) + "\n"
