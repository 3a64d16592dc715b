"""Confidence intervals, paired model comparisons and seed aggregation for result records.

Resampling is clustered: a *unit* (normally the subject) is drawn with replacement and
all of its samples (studies, queries) enter the resample together. Several studies of
one subject are correlated, so resampling studies alone would understate the width of
an interval. For retrieval, the per-query values are aligned to studies and the unit of
each query is that study's subject.

Everything random takes a ``seed`` and is deterministic for a given seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

Statistic = Callable[[np.ndarray], float]

# Resamples are drawn in chunks of at most this many unit draws, which bounds the
# (resamples x units) index matrix at about 64 MB of int64.
_MAX_DRAWS_PER_CHUNK = 8_000_000


@dataclass(frozen=True)
class CI:
    """A statistic with its percentile bootstrap interval.

    ``n`` is the number of samples and ``n_units`` the number of distinct units.
    """

    value: float
    low: float
    high: float
    n: int
    n_units: int


@dataclass(frozen=True)
class PairedResult:
    """Mean difference ``a - b`` with its bootstrap interval and a two-sided p-value."""

    delta: float
    low: float
    high: float
    p_value: float
    n: int
    n_units: int
    method: str


def _as_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains {int(np.isnan(array).sum())} NaN values")
    return array


def _encode_units(units: Sequence | np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Return ``(unit_index (n,), n_units)``. ``None`` makes every sample its own unit."""
    if units is None:
        return np.arange(n), n
    array = np.asarray(units)
    if array.shape != (n,):
        raise ValueError(f"units must have shape ({n},), one unit per sample, got {array.shape}")
    _, unit_index = np.unique(array, return_inverse=True)
    return unit_index.reshape(n), int(unit_index.max()) + 1


def _validate_resampling(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _unit_draws(rng: np.random.Generator, n_resamples: int, n_units: int) -> Iterator[np.ndarray]:
    """Yield ``(chunk, n_units)`` arrays of unit indices drawn with replacement."""
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n_units)
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n_units, size=(min(chunk, n_resamples - start), n_units))


def _bootstrap_means(
    values: np.ndarray, unit_index: np.ndarray, n_units: int, n_resamples: int, seed: int
) -> np.ndarray:
    """Return ``(n_resamples,)`` cluster-bootstrap means, vectorised over resamples."""
    unit_sums = np.bincount(unit_index, weights=values, minlength=n_units)
    unit_counts = np.bincount(unit_index, minlength=n_units).astype(np.float64)
    rng = np.random.default_rng(seed)
    parts = [
        unit_sums[draws].sum(axis=1) / unit_counts[draws].sum(axis=1)
        for draws in _unit_draws(rng, n_resamples, n_units)
    ]
    return np.concatenate(parts)


def _bootstrap_generic(
    values: np.ndarray,
    unit_index: np.ndarray,
    n_units: int,
    statistic: Statistic,
    n_resamples: int,
    seed: int,
) -> np.ndarray:
    """Return ``(n_resamples,)`` cluster-bootstrap statistics, one call of ``statistic`` each.

    Draws the same units as :func:`_bootstrap_means` for the same seed.
    """
    order = np.argsort(unit_index, kind="stable")
    counts = np.bincount(unit_index, minlength=n_units)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    results = np.empty(n_resamples)
    position = 0
    for draws in _unit_draws(rng, n_resamples, n_units):
        for draw in draws:
            # Expand each drawn unit into its sample positions in `order`.
            lengths = counts[draw]
            offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            results[position] = statistic(values[order[np.repeat(starts[draw], lengths) + offsets]])
            position += 1
    return results


def bootstrap_ci(
    per_sample_values: Sequence[float] | np.ndarray,
    units: Sequence | np.ndarray | None = None,
    statistic: Statistic = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI:
    """Compute a statistic and its cluster-bootstrap percentile interval.

    Each resample draws ``n_units`` units with replacement and takes every sample of each
    drawn unit. ``statistic=np.mean`` runs vectorised over resamples. Any other callable
    is called once per resample on the ``(n_resampled,)`` values.

    Args:
        per_sample_values: ``(n,)`` values, such as per-query hit@5.
        units: ``(n,)`` unit label of each sample (subject ids). ``None`` makes every
            sample its own unit.
        statistic: maps a 1-D array to a float.
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the interval.
        seed: seed of the resampling generator.

    Returns:
        :class:`CI` whose ``value`` is ``statistic`` on all samples.

    Example:
        >>> ci = bootstrap_ci([1.0, 0.0, 1.0, 1.0], units=["a", "a", "b", "c"], seed=0)
        >>> ci.value, ci.n, ci.n_units
        (0.75, 4, 3)
    """
    values = _as_values(per_sample_values, "per_sample_values")
    _validate_resampling(n_resamples, confidence)
    unit_index, n_units = _encode_units(units, values.size)

    if statistic is np.mean:
        distribution = _bootstrap_means(values, unit_index, n_units, n_resamples, seed)
    else:
        distribution = _bootstrap_generic(values, unit_index, n_units, statistic, n_resamples, seed)
    alpha = 1 - confidence
    low, high = np.percentile(distribution, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return CI(float(statistic(values)), float(low), float(high), values.size, n_units)


def _sign_flip_p_value(
    differences: np.ndarray, unit_index: np.ndarray, n_units: int, n_resamples: int, seed: int
) -> float:
    """Return the two-sided sign-flip (approximate randomisation) p-value of the mean difference.

    Under the null hypothesis the two models are exchangeable within a subject, so the
    sign of each subject's summed difference is flipped at random. The statistic is the
    sample-weighted mean difference, the same quantity as the reported ``delta``.
    """
    unit_sums = np.bincount(unit_index, weights=differences, minlength=n_units)
    n = differences.size
    observed = abs(unit_sums.sum() / n)
    # Ties with the observed value count as extreme. The tolerance absorbs summation order.
    threshold = observed - 1e-12 * max(1.0, observed)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    extreme = 0
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n_units)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(size, n_units))
        extreme += int((np.abs(signs @ unit_sums / n) >= threshold).sum())
    return (extreme + 1) / (n_resamples + 1)


def paired_test(
    values_a: Sequence[float] | np.ndarray,
    values_b: Sequence[float] | np.ndarray,
    units: Sequence | np.ndarray | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "permutation",
    confidence: float = 0.95,
) -> PairedResult:
    """Compare two models on the same samples: mean difference, interval and p-value.

    The interval of ``delta = mean(a - b)`` is a paired cluster bootstrap over units.
    The two-sided p-value, smoothed as ``(count + 1) / (n_resamples + 1)``, comes from

    - ``method="permutation"``: sign flips of each unit's differences (approximate
      randomisation);
    - ``method="bootstrap"``: the bootstrap distribution shifted to the null,
      counting resamples with ``|delta* - delta| >= |delta|``.

    Args:
        values_a, values_b: ``(n,)`` per-sample values of the two models, aligned.
        units: ``(n,)`` unit labels (subject ids), or ``None`` for one unit per sample.
        n_resamples: resamples for the interval and for the p-value.
        seed: seed of all random draws.
        method: ``"permutation"`` or ``"bootstrap"``.
        confidence: coverage of the interval.

    Returns:
        :class:`PairedResult`.
    """
    a = _as_values(values_a, "values_a")
    b = _as_values(values_b, "values_b")
    if a.shape != b.shape:
        raise ValueError(f"values_a and values_b must be aligned, got {a.size} and {b.size} samples")
    if method not in ("permutation", "bootstrap"):
        raise ValueError(f"method must be 'permutation' or 'bootstrap', got {method!r}")
    _validate_resampling(n_resamples, confidence)
    differences = a - b
    unit_index, n_units = _encode_units(units, differences.size)

    distribution = _bootstrap_means(differences, unit_index, n_units, n_resamples, seed)
    alpha = 1 - confidence
    low, high = np.percentile(distribution, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    delta = float(differences.mean())
    if method == "permutation":
        p_value = _sign_flip_p_value(differences, unit_index, n_units, n_resamples, seed)
    else:
        threshold = abs(delta) - 1e-12 * max(1.0, abs(delta))
        extreme = int((np.abs(distribution - delta) >= threshold).sum())
        p_value = (extreme + 1) / (n_resamples + 1)
    return PairedResult(delta, float(low), float(high), p_value, differences.size, n_units, method)


def aggregate_seeds(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Return the mean and sample standard deviation (``ddof=1``) over seeds (std 0 for one seed)."""
    array = _as_values(values, "values")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def signature(task: str, metric: str, n_resamples: int, unit: str, seed: int, **extra: object) -> str:
    """Return the identifier of how a reported number was computed.

    Extra fields are appended in sorted key order.

    Example:
        >>> signature("retrieval", "i2t/R@5", 1000, "subject", 0)
        'retrieval/i2t/R@5|boot:1000|unit:subject|seed:0'
        >>> signature("probe", "auroc", 1000, "subject", 1, split="test")
        'probe/auroc|boot:1000|unit:subject|seed:1|split:test'
    """
    fields = {"task": task, "metric": metric, "unit": unit, **{k: str(v) for k, v in extra.items()}}
    for name, value in fields.items():
        if "|" in str(value) or (name in ("task", "metric", "unit") and not value):
            raise ValueError(f"signature field {name} must be non-empty and contain no '|', got {value!r}")
    parts = [f"{task}/{metric}", f"boot:{n_resamples}", f"unit:{unit}", f"seed:{seed}"]
    parts += [f"{key}:{extra[key]}" for key in sorted(extra)]
    return "|".join(parts)
