"""Bootstrap confidence intervals over samples, and the paired bootstrap between two systems.

Every metric is expressed as a :class:`Statistic`: a per-sample matrix of *sufficient statistics* ``(n, k)`` and a
``reduce`` function that turns column sums into the metric. A resample is then a vector of counts ``w`` (how often
each sample was drawn), its statistics are ``w @ stats``, and ``B`` resamples are one matrix product — so corpus-level
metrics whose statistics add up (BLEU's n-gram counts and lengths, METEOR's match counts, CE's TP/FP/FN per label) are
recomputed *exactly* on every resample, and means of per-sample scores are the special case ``k = 1``. Metrics that do
not decompose (CIDEr-D's document frequencies come from the reference corpus) are bootstrapped as the mean of their
per-sample scores with the corpus-level parts held fixed; their ``method`` says so. ROC AUC decomposes too, once each
label's scores are grouped by value (:func:`macro_auroc_statistic`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

#: Reduce function: column sums ``(..., k)`` and the sample count ``n`` → metric value(s) of shape ``(...)``.
Reducer = Callable[[np.ndarray, int], np.ndarray]


@dataclasses.dataclass
class Statistic:
    """Per-sample sufficient statistics ``(n, k)`` and how to turn their sums into the metric."""

    stats: np.ndarray
    reduce: Reducer
    method: str = "exact"

    def __post_init__(self) -> None:
        stats = np.asarray(self.stats, dtype=np.float64)
        self.stats = stats[:, None] if stats.ndim == 1 else stats

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    def value(self) -> float:
        return float(self.reduce(self.stats.sum(axis=0), self.n))

    def subset(self, mask: np.ndarray) -> Statistic:
        return Statistic(self.stats[mask], self.reduce, self.method)


def mean_statistic(values: np.ndarray, method: str = "exact") -> Statistic:
    """The mean of per-sample values as a :class:`Statistic`."""
    return Statistic(np.asarray(values, dtype=np.float64), _mean, method)


def _mean(sums: np.ndarray, n: int) -> np.ndarray:
    return sums[..., 0] / max(n, 1)


def ratio_statistic(numerators: np.ndarray, denominators: np.ndarray, method: str = "exact") -> Statistic:
    """``sum(numerators) / sum(denominators)`` (e.g. a mean over the samples that have a score)."""
    return Statistic(np.stack([numerators, denominators], axis=1).astype(np.float64), _ratio, method)


def _ratio(sums: np.ndarray, n: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., 1] > 0, sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1), np.nan)


def macro_auroc_statistic(scores: np.ndarray, labels: np.ndarray, max_groups: int = 256) -> Statistic:
    """The macro ROC AUC over the columns of ``scores [n, L]`` against 0/1/NaN ``labels [n, L]``.

    AUROC is a Mann-Whitney count, so it decomposes once each label's scores are grouped by value: a study's
    statistics are one-hot rows "positive at score group k" and "negative at score group k" (none where its label is
    unknown). A resample's column sums are then weighted histograms of positives and negatives over the sorted
    groups, and the AUROC is ``sum_k P_k (N_below_k + N_k / 2) / (P N)`` with ties counted half. Labels with a single
    class in a resample are left out of its macro mean, as :func:`rrg3d.train.metrics.zero_shot_auroc` does.

    The statistics hold ``2 L K`` columns for ``K`` distinct scores per label, so a label with more than
    ``max_groups`` distinct scores has them merged into that many groups of neighbouring ranks (pairs inside a group
    count half: the AUROC moves by at most half the share of positive-negative pairs that fall inside a group);
    ``method`` then says ``binned``. Up to ``max_groups`` studies, or tied scores, the statistic is exact."""
    if max_groups < 2:
        raise ValueError(f"max_groups must be at least 2, got {max_groups}")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must both be [n, L]: {scores.shape} vs {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    known = ~np.isnan(labels)
    if not np.isin(labels[known], (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN")
    blocks, segments, start, binned = [], [], 0, False
    for j in range(scores.shape[1]):
        distinct, group = np.unique(scores[:, j], return_inverse=True)  # ascending score groups, ties together
        count = len(distinct)
        if count > max_groups:  # neighbouring ranks merged, monotone in the score
            group, count, binned = group * max_groups // count, max_groups, True
        onehot = np.eye(count)[group.reshape(-1)] * known[:, j, None]
        positive = np.nan_to_num(labels[:, j])[:, None]
        blocks.append(np.concatenate([onehot * positive, onehot * (1 - positive)], axis=1))
        segments.append((start, start + count, start + 2 * count))
        start += 2 * count
    stats = np.concatenate(blocks, axis=1) if blocks else np.zeros((scores.shape[0], 0))
    return Statistic(stats, lambda sums, n: _macro_auroc(sums, segments),
                     f"binned ({max_groups} score groups per label)" if binned else "exact")


def _macro_auroc(sums: np.ndarray, segments: list[tuple[int, int, int]]) -> np.ndarray:
    per_label = []
    for start, middle, end in segments:
        positives, negatives = sums[..., start:middle], sums[..., middle:end]
        below = np.cumsum(negatives, axis=-1) - negatives
        pairs = positives.sum(-1) * negatives.sum(-1)
        wins = (positives * (below + 0.5 * negatives)).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_label.append(np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan))
    if not per_label:
        return np.full(sums.shape[:-1], np.nan)
    stacked = np.stack(per_label, axis=-1)
    defined = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined.any(-1), np.where(defined, stacked, 0).sum(-1) / defined.sum(-1), np.nan)


def resample_weights(n: int, n_resamples: int, seed: int | None = 0) -> np.ndarray:
    """``(B, n)`` draw counts: row ``b`` says how often each sample appears in resample ``b``."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((n_resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(statistic: Statistic, n_resamples: int = 1000, seed: int | None = 0, level: float = 0.95,
                 weights: np.ndarray | None = None) -> dict[str, float | int | str]:
    """Percentile bootstrap interval of one metric: ``{"value", "low", "high", "level", "n_resamples", "method"}``."""
    if weights is None:
        weights = resample_weights(statistic.n, n_resamples, seed)
    values = np.asarray(statistic.reduce(weights @ statistic.stats, statistic.n), dtype=np.float64)
    low, high = _interval(values, level)
    return {"value": statistic.value(), "low": low, "high": high, "level": level,
            "n_resamples": int(weights.shape[0]), "method": statistic.method}


def bootstrap_all(statistics: Mapping[str, Statistic], n_resamples: int = 1000, seed: int | None = 0,
                  level: float = 0.95) -> dict[str, dict[str, float | int | str]]:
    """CIs for many metrics over the *same* resamples (one weight matrix per sample count)."""
    cache: dict[int, np.ndarray] = {}
    out = {}
    for name, statistic in statistics.items():
        if statistic.n not in cache:
            cache[statistic.n] = resample_weights(statistic.n, n_resamples, seed)
        out[name] = bootstrap_ci(statistic, level=level, weights=cache[statistic.n])
    return out


def paired_bootstrap(a: Statistic, b: Statistic, n_resamples: int = 1000, seed: int | None = 0,
                     level: float = 0.95) -> dict[str, float | int | str]:
    """Paired bootstrap of ``metric(A) - metric(B)`` over the same samples (same rows, same resamples).

    ``p_value`` is two-sided: twice the smaller share of resamples on either side of zero (capped at 1).
    """
    if a.n != b.n:
        raise ValueError(f"paired bootstrap needs the same samples ({a.n} vs {b.n})")
    weights = resample_weights(a.n, n_resamples, seed)
    delta = np.asarray(a.reduce(weights @ a.stats, a.n) - b.reduce(weights @ b.stats, b.n), dtype=np.float64)
    finite = delta[np.isfinite(delta)]
    low, high = _interval(delta, level)
    p_value = float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0)))) if finite.size else float("nan")
    return {"a": a.value(), "b": b.value(), "delta": a.value() - b.value(), "low": low, "high": high,
            "p_value": p_value, "level": level, "n_resamples": n_resamples, "method": a.method}
