"""The table model (columns with their metric and uncertainty, cells, tables) and the reporting error."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from harness.errors import HarnessError
from harness.metrics import MetricSpec, metric

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
