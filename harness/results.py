"""Result records: one JSON object per metric, plus the per-sample scores kept beside them.

A record carries everything needed to read it on its own (model, digest, task, dataset,
split, seed, confidence interval, signature, package versions), so tables and figures
are built from records alone. Per-sample scores (one row per query for retrieval) are
stored next to the records of each job, so confidence intervals, paired tests and new
tables never recompute a model output.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.io import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
JOB_RESULT_FILE = "result.jsonl"
PER_SAMPLE_PARQUET = "per_sample.parquet"
PER_SAMPLE_JSONL = "per_sample.jsonl.gz"

# Distributions whose versions every record carries; a missing one is recorded as None.
VERSIONED_PACKAGES = ("brat-harness", "torch", "monai", "transformers", "numpy", "pandas", "nnunetv2")


@dataclass
class ResultRecord:
    """One metric of one job (model x task x dataset x split x seed).

    ``value``, ``ci_low`` and ``ci_high`` are in the metric's own unit: recall@k is a
    fraction in [0, 1] (tables show it as a percentage), ranks are 1-based positions.
    ``delta_vs_baseline`` and ``p_value`` come from a paired test against the suite's
    baseline model on the same queries. Both are ``None`` for the baseline itself, and
    ``p_value`` is ``None`` for metrics without per-sample scores.
    """

    run_id: str
    suite: str
    job_hash: str
    config_hash: str
    model: str
    model_digest: str
    task: str
    dataset: str
    split: str
    metric: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float = 0.95
    n: int = 0
    n_units: int = 0
    seed: int = 0
    higher_is_better: bool = True
    signature: str = ""
    baseline: str | None = None
    delta_vs_baseline: float | None = None
    p_value: float | None = None
    versions: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict; NaN values become ``None``."""
        row = dataclasses.asdict(self)
        return {key: _json_number(value) for key, value in row.items()}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ResultRecord:
        """Build a record from a dict; a missing required field raises ``ValueError`` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if _is_required(f)}
        missing = sorted(required - set(row))
        if missing:
            raise ValueError(f"result record is missing the fields {missing}; got fields {sorted(row)}")
        return cls(**{key: value for key, value in row.items() if key in names})


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResultRecord))


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_signature(task: str, metric: str, n_resamples: int, unit: str, seed: int) -> str:
    """Format the reproducibility signature of a metric (see :func:`harness.stats.signature`).

    >>> format_signature("retrieval", "i2t/R@5", 1000, "subject", 0)
    'retrieval/i2t/R@5|boot:1000|unit:subject|seed:0'
    """
    from harness.stats import signature

    return signature(task, metric, int(n_resamples), unit, int(seed))


def package_versions(names: Sequence[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Return the installed version of each distribution in ``names`` (``None`` if absent)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_records(path: str | Path, records: Iterable[ResultRecord]) -> None:
    """Write records as JSON Lines, atomically (readers see the old or the complete new file)."""
    lines = [json.dumps(record.to_dict(), sort_keys=True, ensure_ascii=False) for record in records]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_records(path: str | Path) -> list[ResultRecord]:
    """Read records from a JSON Lines file, or from ``results.jsonl`` inside a run folder.

    Raises ``FileNotFoundError`` if there is no such file and ``ValueError`` naming the
    file and line for a line that is not a valid record.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no result records at {path}; run a suite first or pass a results.jsonl file")
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(ResultRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"{path}, line {line_number}: invalid result record: {error}") from error
    return records


def write_per_sample(job_dir: str | Path, frame) -> Path:
    """Write per-sample scores of a job as Parquet, or as gzipped JSON Lines without pyarrow.

    Args:
        job_dir: the job's folder.
        frame: a ``pandas.DataFrame`` with one row per sample (for retrieval: one per query).

    Returns:
        The path written.
    """
    job_dir = Path(job_dir)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        target = job_dir / PER_SAMPLE_JSONL
        with atomic_path(target) as tmp:
            with gzip.open(tmp, "wt", encoding="utf-8") as handle:
                frame.to_json(handle, orient="records", lines=True)
        return target
    target = job_dir / PER_SAMPLE_PARQUET
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)
    return target


def read_per_sample(job_dir: str | Path):
    """Read the per-sample scores written by :func:`write_per_sample` as a DataFrame."""
    import pandas as pd

    job_dir = Path(job_dir)
    if (job_dir / PER_SAMPLE_PARQUET).is_file():
        return pd.read_parquet(job_dir / PER_SAMPLE_PARQUET)
    if (job_dir / PER_SAMPLE_JSONL).is_file():
        return pd.read_json(job_dir / PER_SAMPLE_JSONL, orient="records", lines=True, compression="gzip")
    raise FileNotFoundError(f"no per-sample scores in {job_dir} ({PER_SAMPLE_PARQUET} or {PER_SAMPLE_JSONL})")
