"""Paper-ready tables (LaTeX, Markdown, CSV) and plots of one experiment, read back from the MLflow store.

Every number comes from the latest FINISHED run of each config hash: reruns supersede older runs and failed
or killed runs never reach a table. Which layouts are written depends on which axes vary in the runs, so a
one-format experiment gets no block-size table and an experiment without double quantization no DQ table.

``table``: the table model; ``render``: Markdown, CSV, LaTeX; ``runs``: which runs a table reads;
``layouts``: the tables; ``export``: files and the sweep run's artifacts; ``compare``: two configs, paired.
"""

from harness.report.compare import compare
from harness.report.export import Report, write_report
from harness.report.layouts import (
    LAYOUTS,
    blocksize_table,
    datatypes_table,
    doublequant_table,
    pivot_table,
    register_layout,
    tasks_table,
)
from harness.report.render import to_csv, to_latex, to_markdown
from harness.report.runs import ModelRuns, select_runs
from harness.report.table import Column, ReportError, Table

__all__ = [
    "LAYOUTS",
    "Column",
    "ModelRuns",
    "Report",
    "ReportError",
    "Table",
    "blocksize_table",
    "compare",
    "datatypes_table",
    "doublequant_table",
    "pivot_table",
    "register_layout",
    "select_runs",
    "tasks_table",
    "to_csv",
    "to_latex",
    "to_markdown",
    "write_report",
]
