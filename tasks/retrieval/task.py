"""Image-report retrieval: image-to-report (``i2t``) and report-to-image (``t2i``) over a pool.

The pool is the whole split, or ``n_pools`` random subsets of ``pool_size`` studies
drawn with the job's seed, whose metrics are averaged over draws. Each study's views are
scored against each report's sentence embeddings with the encoder's own scorer (or the
``scorer`` parameter), using the blocked scorers of :mod:`harness.scoring`. Recall@k
and ranks come from :func:`tasks.retrieval.metrics.retrieval_metrics`, where ties count
against the model. Confidence intervals bootstrap subjects: all queries of a resampled
subject enter or leave together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from harness.extract import extract_embeddings
from harness.tasks import EvalDataset, MetricValue, SampleValues, Task, TaskOutput

logger = logging.getLogger(__name__)

DIRECTIONS = ("i2t", "t2i")
KS = (1, 5, 10)


class RetrievalTask(Task):
    """Image-report retrieval with recall@k, median and mean rank, and subject-level CIs."""

    name = "retrieval"
    default_params: Mapping[str, Any] = {
        "pool_size": None,  # studies per pool; None = the whole split
        "n_pools": 1,  # random pools drawn when pool_size is set
        "scorer": None,  # pva | colbert | cosine; None = the encoder's own scorer
        "block_size": 128,  # studies x reports per scoring block
        "n_resamples": 1000,  # bootstrap resamples of subjects
    }

    def check_params(self, params: Mapping[str, Any]) -> list[str]:
        problems = super().check_params(params)
        pool_size = params.get("pool_size")
        if pool_size is not None and (isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 2):
            problems.append(f"pool_size must be an integer >= 2 or null (got {pool_size!r})")
        for key in ("n_pools", "block_size", "n_resamples"):
            value = params.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{key} must be a positive integer (got {value!r})")
        return problems

    def run(self, encoder, dataset: EvalDataset, split: str, params: Mapping[str, Any], seed: int, cache) -> TaskOutput:
        """Retrieve within pools of one split; see the module docstring for the protocol."""
        settings = {**self.default_params, **params}
        problems = self.check_params(params)
        if problems:
            raise ValueError(f"invalid retrieval parameters: {'; '.join(problems)}")
        rows = dataset.split_rows(split)
        pools = draw_pools(len(rows), settings["pool_size"], settings["n_pools"], seed)

        embeddings = extract_embeddings(encoder, rows.to_dict("records"), cache)
        _check_sentences(embeddings.sentences, dataset, split)
        scorer_name = settings["scorer"] or encoder.scorer
        views = torch.from_numpy(embeddings.views)
        sentences = [torch.from_numpy(array) for array in embeddings.sentences]

        frames = [
            _score_pool(views, sentences, pool, index, scorer_name, settings["block_size"], rows)
            for index, pool in enumerate(pools)
        ]
        per_sample = pd.concat(frames, ignore_index=True)
        metrics = summarise(per_sample, settings["n_resamples"], seed)
        logger.info(
            "retrieval on %s/%s: %d studies, %d pool(s) of %d, scorer %s",
            dataset.name, split, len(rows), len(pools), len(pools[0]), scorer_name,
        )
        return TaskOutput(metrics, per_sample, {"scorer": scorer_name, "n_pools": len(pools), "pool_size": len(pools[0])})

    def sample_values(self, per_sample: pd.DataFrame, metric: str) -> SampleValues | None:
        """Return per-query hits (for ``R@k``) or ranks (for ``MnR``); ``None`` for the median rank ``MdR``."""
        direction, _, name = metric.partition("/")
        if direction not in DIRECTIONS:
            return None
        if name.startswith("R@"):
            column = f"hit@{name[2:]}"
        elif name == "MnR":
            column = "rank"
        else:
            return None
        rows = per_sample[per_sample["direction"] == direction]
        frame = pd.DataFrame(
            {
                "key": rows["pool"].astype(str) + ":" + rows["study_id"].astype(str),
                "unit": rows["subject_id"].astype(str).to_numpy(),
                "value": rows[column].astype(float).to_numpy(),
            }
        )
        return SampleValues(frame.reset_index(drop=True))


def draw_pools(n_studies: int, pool_size: int | None, n_pools: int, seed: int) -> list[np.ndarray]:
    """Return the sorted study indices of each pool: the whole split, or seeded random subsets."""
    if n_studies < 2:
        raise ValueError(f"retrieval needs at least 2 studies in the split, got {n_studies}")
    if pool_size is None:
        return [np.arange(n_studies)]
    if pool_size > n_studies:
        raise ValueError(f"pool_size {pool_size} is larger than the split ({n_studies} studies); lower pool_size or use null for the whole split")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_studies, size=pool_size, replace=False)) for _ in range(n_pools)]


def _check_sentences(sentences: list[np.ndarray], dataset: EvalDataset, split: str) -> None:
    empty = [index for index, array in enumerate(sentences) if array.shape[0] == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} reports in {dataset.manifest} (split {split!r}) have no sentences, "
            f"first at split row {empty[0]}; fill or drop empty reports before retrieval"
        )


def _score_pool(
    views: torch.Tensor, sentences: list[torch.Tensor], pool: np.ndarray, pool_index: int,
    scorer_name: str, block_size: int, rows: pd.DataFrame,
) -> pd.DataFrame:
    """Score one pool and return one row per query and direction."""
    from harness.scoring import SCORERS, pad_sentences
    from tasks.retrieval.metrics import retrieval_metrics

    padded, mask = pad_sentences([sentences[i] for i in pool])
    scores = SCORERS.get(scorer_name)(views[torch.from_numpy(pool)], padded, mask, block_size)
    per_query = retrieval_metrics(scores, ks=KS).per_query
    frames = []
    for direction in DIRECTIONS:
        ranks = np.asarray(per_query[f"{direction}/rank"], dtype=np.int64)
        frame = pd.DataFrame(
            {
                "pool": pool_index,
                "study_id": rows["study_id"].to_numpy()[pool],
                "subject_id": rows["subject_id"].to_numpy()[pool],
                "direction": direction,
                "rank": ranks,
            }
        )
        for k in KS:
            frame[f"hit@{k}"] = (ranks <= k).astype(np.int8)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summarise(per_sample: pd.DataFrame, n_resamples: int, seed: int) -> list[MetricValue]:
    """Compute R@k, median and mean rank per direction, with subject-bootstrap CIs.

    R@k and the mean rank are means over all queries of all pools, which equals the mean
    over pools of the per-pool values because every pool has the same size. The median
    rank is the mean over pools of each pool's median.

    NOTE: with several pools the median rank's interval bootstraps the median of all
    pools' ranks together, not the mean of per-pool medians; with one pool they agree.
    """
    from harness.stats import bootstrap_ci

    metrics = []
    for direction in DIRECTIONS:
        rows = per_sample[per_sample["direction"] == direction]
        units = rows["subject_id"].astype(str).to_numpy()
        for k in KS:
            ci = bootstrap_ci(rows[f"hit@{k}"].to_numpy(float), units, n_resamples=n_resamples, seed=seed)
            metrics.append(_metric(f"{direction}/R@{k}", ci, True, n_resamples))
        ci = bootstrap_ci(rows["rank"].to_numpy(float), units, n_resamples=n_resamples, seed=seed)
        metrics.append(_metric(f"{direction}/MnR", ci, False, n_resamples))
        metrics.append(_median_rank(rows, direction, n_resamples, seed))
    return metrics


def _median_rank(rows: pd.DataFrame, direction: str, n_resamples: int, seed: int) -> MetricValue:
    from harness.stats import bootstrap_ci

    units = rows["subject_id"].astype(str).to_numpy()
    ci = bootstrap_ci(rows["rank"].to_numpy(float), units, n_resamples=n_resamples, seed=seed, statistic=np.median)
    value = float(rows.groupby("pool")["rank"].median().mean())
    return MetricValue(
        metric=f"{direction}/MdR", value=value, ci_low=ci.low, ci_high=ci.high, n=int(ci.n), n_units=int(ci.n_units),
        higher_is_better=False, n_resamples=n_resamples,
    )


def _metric(name: str, ci: Any, higher_is_better: bool, n_resamples: int) -> MetricValue:
    return MetricValue(
        metric=name, value=float(ci.value), ci_low=float(ci.low), ci_high=float(ci.high), n=int(ci.n),
        n_units=int(ci.n_units), higher_is_better=higher_is_better, n_resamples=n_resamples,
    )
