"""The task interface and the registry of evaluation tasks.

A task turns an encoder and a dataset split into metrics with confidence intervals and
per-sample scores. Task packages (``tasks.retrieval``, ...) register an instance in
:data:`TASKS` from their plugin module; the harness core never imports them by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.registry import Registry

if TYPE_CHECKING:
    import pandas as pd

    from harness.cache import EmbeddingCache
    from harness.encoders import Encoder


@dataclass
class EvalDataset:
    """A dataset as tasks see it.

    Attributes:
        name: the suite's name for the dataset.
        manifest: path of the manifest file.
        frame: manifest rows (``study_id``, ``subject_id``, ``split``, image paths by
            sequence, ``report``, labels), with absolute image paths.
        digest: sha256 of the manifest file; the dataset's identity in job hashes.
    """

    name: str
    manifest: Path
    frame: pd.DataFrame
    digest: str

    def split_rows(self, split: str) -> pd.DataFrame:
        """Return the rows of one split; an unknown split raises ``ValueError`` listing the splits."""
        splits = sorted(self.frame["split"].astype(str).unique())
        if split not in splits:
            raise ValueError(f"dataset {self.name!r} ({self.manifest}) has no split {split!r}; splits: {splits}")
        return self.frame[self.frame["split"].astype(str) == split].reset_index(drop=True)


@dataclass
class MetricValue:
    """One metric computed by a task, before the runner adds the job's identity to it.

    ``n`` counts samples (for retrieval: queries) and ``n_units`` the resampling units
    (subjects) behind the confidence interval.
    """

    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    n_units: int
    higher_is_better: bool
    unit: str = "subject"
    n_resamples: int = 0


@dataclass
class TaskOutput:
    """Result of :meth:`Task.run`: metric values and one row of scores per sample."""

    metrics: list[MetricValue]
    per_sample: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleValues:
    """Per-sample values of one metric, keyed so two models' values can be paired.

    ``frame`` has the columns ``key`` (identical for the same sample across models),
    ``unit`` (the resampling unit, e.g. subject id) and ``value``.
    """

    frame: pd.DataFrame


class Task(ABC):
    """An evaluation task family (retrieval, linear probe, segmentation, report generation)."""

    name: str = ""
    #: Parameters accepted in a suite's ``params`` mapping, with their defaults.
    default_params: Mapping[str, Any] = {}

    def check_params(self, params: Mapping[str, Any]) -> list[str]:
        """Return one message per invalid parameter (empty if all are valid)."""
        unknown = sorted(set(params) - set(self.default_params))
        return [f"unknown parameter {key!r}; allowed: {sorted(self.default_params)}" for key in unknown]

    @abstractmethod
    def run(
        self,
        encoder: Encoder,
        dataset: EvalDataset,
        split: str,
        params: Mapping[str, Any],
        seed: int,
        cache: EmbeddingCache,
    ) -> TaskOutput:
        """Evaluate ``encoder`` on one split of ``dataset``."""

    def sample_values(self, per_sample: pd.DataFrame, metric: str) -> SampleValues | None:
        """Return the per-sample values whose mean is ``metric``, for paired tests.

        ``None`` means the metric is not a mean over samples (a median, for example),
        so no paired test is run for it. The default has no per-sample form.
        """
        return None


TASKS: Registry[Task] = Registry("task")


def get_task(name: str) -> Task:
    """Return the task registered as ``name``, loading plugins first."""
    from harness.plugins import load_plugins

    load_plugins()
    return TASKS.get(name)
