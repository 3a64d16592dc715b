"""Forest-style figures from result records: one metric, one point with its CI per model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from harness.io import atomic_path
from harness.results import ResultRecord
from reports.tables import Reference, build_table

logger = logging.getLogger(__name__)


def forest_plot(
    records: Sequence[ResultRecord],
    path: str | Path,
    metric: str | None = None,
    reference: Reference | None = None,
) -> list[Path]:
    """Draw ``metric`` (default: the first metric in the records) per model, with CIs.

    One seed shows the 95% confidence interval as the error bar, several seeds the
    standard deviation; published reference numbers are hollow markers without bars.
    Writes ``path`` with the suffixes ``.png`` and ``.pdf`` and returns both paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no result records to plot")
    metric = metric or records[0].metric
    table = build_table(records, [metric], reference)
    column = table.columns[0]
    rows = [row for row in table.rows if 0 in row.cells]

    figure, axis = plt.subplots(figsize=(6.0, 0.45 * len(rows) + 1.2))
    for position, row in enumerate(reversed(rows)):
        cell = row.cells[0]
        if cell.std is not None:
            low, high = cell.value - cell.std, cell.value + cell.std
        else:
            low, high = cell.ci_low, cell.ci_high
        error = None if low is None else [[cell.value - low], [high - cell.value]]
        face = "white" if row.published else "black"
        axis.errorbar(cell.value, position, xerr=error, fmt="o", color="black", markerfacecolor=face, capsize=3)
    axis.set_yticks(range(len(rows)), [row.model for row in reversed(rows)])
    unit = " (%)" if column.percent else ""
    direction = "higher is better" if column.higher_is_better else "lower is better"
    axis.set_xlabel(f"{column.label}{unit}, {direction}")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()

    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        target = base.with_suffix(suffix)
        with atomic_path(target) as tmp:
            figure.savefig(tmp, dpi=200, format=suffix[1:])
        written.append(target)
    plt.close(figure)
    logger.info("wrote forest plot of %s to %s", metric, ", ".join(map(str, written)))
    return written
