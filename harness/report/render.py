"""Renderers of a table: Markdown, CSV and LaTeX (booktabs); each caption names the statistical method."""

from __future__ import annotations

import re

import pandas as pd

from harness.report.table import Table


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
