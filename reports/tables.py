"""Paper-ready tables from result records: Markdown, LaTeX (booktabs) and CSV.

Models are rows and metrics are columns. A cell shows the value with its 95% confidence
interval (``49.3 [45.1, 53.0]``) for one seed, or the mean and standard deviation over
seeds (``49.3 ± 1.2``) for several. Recall@k is shown in percent. The best value of each
column is bold, the header carries an arrow for the better direction, a dagger marks a
model whose paired test against the baseline gives p < 0.05, and the footnotes list the
metric signatures. Published numbers from a reference file appear as extra rows, without
confidence intervals, and are marked as measured on their own dataset.

This module reads result records only; it never touches model code.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.results import ResultRecord

REFERENCE_DIR = Path(__file__).parent / "reference"
SIGNIFICANCE = 0.05
FORMATS = ("md", "latex", "csv")


@dataclass
class Column:
    """One metric column: the records' ``(task, dataset, split, metric)`` and its display label."""

    task: str
    dataset: str
    split: str
    metric: str
    label: str
    higher_is_better: bool = True

    @property
    def percent(self) -> bool:
        return "R@" in self.metric


@dataclass
class Cell:
    """A cell's numbers in display units (percent for recall)."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    std: float | None = None
    n_seeds: int = 1
    p_value: float | None = None
    best: bool = False

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE


@dataclass
class Row:
    model: str
    cells: dict[int, Cell]
    published: bool = False


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]
    footnotes: list[str] = field(default_factory=list)


@dataclass
class Reference:
    """Published numbers: ``rows`` maps a model label to metric -> value (in ``unit``)."""

    name: str
    citation: str
    dataset: str
    note: str
    unit: str
    rows: dict[str, dict[str, float]]


def load_reference(name_or_path: str | Path) -> Reference:
    """Load a reference file by name (``brat_mskbrain``, shipped in ``reports/reference``) or by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = REFERENCE_DIR / f"{str(name_or_path).removesuffix('.yaml')}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"reference {name_or_path!r} not found; shipped references: {shipped}, or pass a YAML path")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [key for key in ("citation", "dataset", "rows") if key not in data]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    rows = {str(row["model"]): {str(k): float(v) for k, v in row["metrics"].items()} for row in data["rows"]}
    return Reference(
        name=str(data.get("name", path.stem)),
        citation=str(data["citation"]),
        dataset=str(data["dataset"]),
        note=str(data.get("note", "")),
        unit=str(data.get("unit", "percent")),
        rows=rows,
    )


def build_table(
    records: Sequence[ResultRecord],
    metrics: Sequence[str] | None = None,
    reference: Reference | None = None,
) -> Table:
    """Arrange records into a table: models (first-seen order) by metric columns.

    Args:
        records: result records of one or more runs.
        metrics: metric names to show, in this order (default: all, first-seen order).
        reference: published numbers to add as rows.
    """
    columns = _columns(records, metrics)
    models = list(dict.fromkeys(record.model for record in records))
    rows = []
    for model in models:
        cells = {}
        for index, column in enumerate(columns):
            selected = [r for r in records if r.model == model and _column_key(r) == _key(column)]
            if selected:
                cells[index] = _cell(selected, column)
        rows.append(Row(model, cells))
    _mark_best(columns, rows)
    if reference is not None:
        rows.extend(_reference_rows(reference, columns))
    return Table(columns, rows, _footnotes(records, columns, reference))


def _column_key(record: ResultRecord) -> tuple[str, str, str, str]:
    return (record.task, record.dataset, record.split, record.metric)


def _key(column: Column) -> tuple[str, str, str, str]:
    return (column.task, column.dataset, column.split, column.metric)


def _columns(records: Sequence[ResultRecord], metrics: Sequence[str] | None) -> list[Column]:
    keys = list(dict.fromkeys(_column_key(record) for record in records))
    if metrics:
        unknown = [m for m in metrics if m not in {key[3] for key in keys}]
        if unknown:
            raise ValueError(f"metrics {unknown} are not in the records; available: {sorted({key[3] for key in keys})}")
        keys = [key for metric in metrics for key in keys if key[3] == metric]
    several_sources = len({key[:3] for key in keys}) > 1
    columns = []
    for task, dataset, split, metric in keys:
        higher = next(r.higher_is_better for r in records if _column_key(r) == (task, dataset, split, metric))
        label = f"{dataset}/{split} {metric}" if several_sources else metric
        columns.append(Column(task, dataset, split, metric, label, higher))
    return columns


def _cell(records: list[ResultRecord], column: Column) -> Cell:
    scale = 100.0 if column.percent else 1.0
    values = [r.value * scale for r in records]
    p_values = [r.p_value for r in records if r.p_value is not None]
    # Across seeds a model is marked only if every seed's paired test is significant.
    p_value = max(p_values) if len(p_values) == len(records) and p_values else None
    if len(records) == 1:
        record = records[0]
        return Cell(
            value=values[0],
            ci_low=None if record.ci_low is None else record.ci_low * scale,
            ci_high=None if record.ci_high is None else record.ci_high * scale,
            p_value=p_value,
        )
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return Cell(value=mean, std=std, n_seeds=len(values), p_value=p_value)


def _mark_best(columns: list[Column], rows: list[Row]) -> None:
    for index, column in enumerate(columns):
        values = [row.cells[index].value for row in rows if index in row.cells]
        if len(values) < 2 or max(values) - min(values) < 1e-9:
            continue  # nothing to single out when every model has the same value
        best = max(values) if column.higher_is_better else min(values)
        for row in rows:
            if index in row.cells and math.isclose(row.cells[index].value, best, rel_tol=0, abs_tol=1e-9):
                row.cells[index].best = True


def _reference_rows(reference: Reference, columns: list[Column]) -> list[Row]:
    rows = []
    for model, metrics in reference.rows.items():
        cells = {}
        for index, column in enumerate(columns):
            if column.metric in metrics:
                value = metrics[column.metric]
                if reference.unit != "percent" and column.percent:
                    value *= 100.0
                cells[index] = Cell(value=value)
        rows.append(Row(model, cells, published=True))
    return rows


def _footnotes(records: Sequence[ResultRecord], columns: list[Column], reference: Reference | None) -> list[str]:
    notes = []
    levels = sorted({r.ci_level for r in records})
    notes.append(
        f"Values: {', '.join(f'{100 * lvl:.0f}%' for lvl in levels) or '95%'} bootstrap confidence interval in brackets for one seed; "
        "mean ± standard deviation over seeds otherwise. Recall@k in percent. Bold: best in column."
    )
    baselines = sorted({r.baseline for r in records if r.baseline})
    if baselines:
        notes.append(f"†: paired bootstrap test against the baseline {', '.join(baselines)} gives p < {SIGNIFICANCE} (with several seeds: in every seed).")
    signatures = sorted({_signature_pattern(r.signature) for r in records if r.signature})
    if signatures:
        notes.append("Signatures: " + "; ".join(signatures) + ".")
    if reference is not None:
        notes.append(
            f"Rows marked (published) are from {reference.citation}, measured on {reference.dataset}, "
            f"a different dataset: {reference.note}."
        )
    return notes


def _signature_pattern(signature: str) -> str:
    """Replace the metric part of a signature by ``*`` so one line covers a task's metrics."""
    head, sep, rest = signature.partition("|")
    task = head.split("/", 1)[0]
    return f"{task}/*{sep}{rest}"


# ----------------------------------------------------------------------------- rendering


def format_cell(cell: Cell | None, *, latex: bool = False) -> str:
    """Format a cell's numbers: ``49.3 [45.1, 53.0]``, ``49.3 ± 1.2`` or ``20.5``."""
    if cell is None:
        return "--" if latex else "–"
    text = f"{cell.value:.1f}"
    if cell.std is not None:
        text += f" $\\pm$ {cell.std:.1f}" if latex else f" ± {cell.std:.1f}"
    elif cell.ci_low is not None and cell.ci_high is not None:
        text += f" [{cell.ci_low:.1f}, {cell.ci_high:.1f}]"
    if cell.best:
        text = f"\\textbf{{{text}}}" if latex else f"**{text}**"
    if cell.significant:
        text += "$^\\dagger$" if latex else "†"
    return text


def _header(column: Column, *, latex: bool) -> str:
    if latex:
        arrow = r"$\uparrow$" if column.higher_is_better else r"$\downarrow$"
        return f"{_latex_escape(column.label)} {arrow}"
    arrow = "↑" if column.higher_is_better else "↓"
    return f"{column.label} {arrow}"


def render_markdown(table: Table) -> str:
    """Render a GitHub-flavoured Markdown table followed by its footnotes."""
    lines = ["| Model | " + " | ".join(_header(c, latex=False) for c in table.columns) + " |"]
    lines.append("|---|" + "---|" * len(table.columns))
    for row in table.rows:
        cells = [format_cell(row.cells.get(i)) for i in range(len(table.columns))]
        lines.append(f"| {row.model} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(table.footnotes)
    return "\n".join(lines) + "\n"


def render_latex(table: Table, caption: str = "Image-report retrieval results.", label: str = "tab:results") -> str:
    """Render a booktabs table (``\\toprule``, ``\\midrule``, ``\\bottomrule``; no vertical rules)."""
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_latex_escape(caption)}}}",
        f"\\label{{{label}}}",
        "\\begin{tabular}{l" + "c" * len(table.columns) + "}",
        "\\toprule",
        "Model & " + " & ".join(_header(c, latex=True) for c in table.columns) + " \\\\",
        "\\midrule",
    ]
    published_started = False
    for row in table.rows:
        if row.published and not published_started:
            lines.append("\\midrule")
            published_started = True
        cells = [format_cell(row.cells.get(i), latex=True) for i in range(len(table.columns))]
        lines.append(f"{_latex_escape(row.model)} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.footnotes:
        lines.append("\\par\\smallskip\\footnotesize " + " ".join(_latex_escape(n, keep_math=True) for n in table.footnotes))
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """Render one row per model with value, CI bounds, std, seeds and p-value per metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["model", "source"]
    for column in table.columns:
        name = f"{column.label} (%)" if column.percent else column.label
        header += [name, f"{name} ci_low", f"{name} ci_high", f"{name} std", f"{name} n_seeds", f"{name} p_value"]
    writer.writerow(header)
    for row in table.rows:
        line: list[Any] = [row.model, "published" if row.published else "this run"]
        for index in range(len(table.columns)):
            cell = row.cells.get(index)
            if cell is None:
                line += [""] * 6
                continue
            line += [_number(cell.value), _number(cell.ci_low), _number(cell.ci_high), _number(cell.std), cell.n_seeds, _number(cell.p_value, 4)]
        writer.writerow(line)
    return buffer.getvalue()


def render(table: Table, fmt: str) -> str:
    """Render ``table`` as ``md``, ``latex`` or ``csv``."""
    renderers = {"md": render_markdown, "latex": render_latex, "csv": render_csv}
    if fmt not in renderers:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {FORMATS}")
    return renderers[fmt](table)


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str, keep_math: bool = False) -> str:
    text = text.replace("†", "$^\\dagger$").replace("±", "$\\pm$") if keep_math else text
    if keep_math:
        # Escape only outside the $...$ spans inserted above.
        parts = text.split("$")
        return "$".join(part if i % 2 else "".join(_LATEX_SPECIAL.get(ch, ch) for ch in part) for i, part in enumerate(parts))
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
