"""Bootstrap CIs: contain the estimate, narrow with n, are seedable; the paired bootstrap."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from rrg3d.evaluate.bootstrap import (
    Statistic,
    bootstrap_all,
    bootstrap_ci,
    mean_statistic,
    paired_bootstrap,
    ratio_statistic,
)
from rrg3d.evaluate.nlg import bleu_from_stats


def _scores(n, seed=0, shift=0.0):
    return np.clip(np.random.default_rng(seed).normal(0.5 + shift, 0.15, n), 0, 1)


def test_ci_contains_the_estimate_and_narrows_with_n():
    small = bootstrap_ci(mean_statistic(_scores(40)), n_resamples=1000, seed=0)
    large = bootstrap_ci(mean_statistic(_scores(4000)), n_resamples=1000, seed=0)
    for ci in (small, large):
        assert ci["low"] < ci["value"] < ci["high"]
        assert ci["n_resamples"] == 1000 and ci["level"] == 0.95
    assert (large["high"] - large["low"]) < 0.25 * (small["high"] - small["low"])


def test_seeded_and_exact_for_a_corpus_metric():
    rng = np.random.default_rng(3)
    stats = np.zeros((200, 10))
    stats[:, 0] = rng.integers(150, 250, 200)
    stats[:, 1] = rng.integers(150, 250, 200)
    stats[:, 2:6] = stats[:, [0]] - np.arange(4)
    stats[:, 6:10] = np.floor(stats[:, 2:6] * rng.uniform(0.1, 0.5, (200, 1)) ** np.arange(1, 5))
    statistic = Statistic(stats, functools.partial(bleu_from_stats, order=4))
    a = bootstrap_ci(statistic, n_resamples=500, seed=7)
    b = bootstrap_ci(statistic, n_resamples=500, seed=7)
    c = bootstrap_ci(statistic, n_resamples=500, seed=8)
    assert a == b and a != c
    assert a["low"] < a["value"] < a["high"]
    # the statistic is recomputed from summed n-gram counts, not averaged per sample
    assert a["value"] == pytest.approx(float(bleu_from_stats(stats.sum(0), 200)))


def test_ratio_statistic_ignores_missing_values_and_all_share_resamples():
    values = np.array([1.0, 2.0, np.nan, 4.0])
    valid = ~np.isnan(values)
    statistic = ratio_statistic(np.where(valid, values, 0), valid.astype(float))
    assert statistic.value() == pytest.approx(7 / 3)
    out = bootstrap_all({"x": statistic, "y": mean_statistic(np.ones(4))}, n_resamples=100, seed=0)
    assert out["y"]["low"] == out["y"]["high"] == 1.0


def test_paired_bootstrap():
    a = _scores(300, seed=1)
    same = paired_bootstrap(mean_statistic(a), mean_statistic(a.copy()), n_resamples=500)
    assert same["delta"] == 0 and same["low"] == same["high"] == 0 and same["p_value"] == 1.0
    better = paired_bootstrap(mean_statistic(a + 0.05), mean_statistic(a), n_resamples=500)
    assert better["delta"] == pytest.approx(0.05) and better["low"] > 0 and better["p_value"] < 0.01
    noisy = paired_bootstrap(mean_statistic(_scores(300, seed=2)), mean_statistic(_scores(300, seed=3)),
                             n_resamples=500)
    assert noisy["low"] < noisy["delta"] < noisy["high"] and noisy["p_value"] > 0.01
    with pytest.raises(ValueError):
        paired_bootstrap(mean_statistic(a), mean_statistic(a[:10]))


def test_macro_auroc_statistic_is_exact_on_the_data_and_on_every_resample():
    from rrg3d.evaluate.bootstrap import macro_auroc_statistic, resample_weights
    from rrg3d.train.metrics import zero_shot_auroc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (60, 5)).astype(float)
    scores = np.round(labels * 0.6 + rng.normal(0, 0.5, labels.shape), 1)  # rounded: many ties
    labels[:7, 1] = np.nan  # unknown entries are left out
    labels[:, 4] = 1.0  # a single class: undefined, left out of the macro mean
    statistic = macro_auroc_statistic(scores, labels)
    assert statistic.value() == pytest.approx(zero_shot_auroc(scores, labels, names=list("abcde"))["macro"])
    for counts in resample_weights(60, 5, seed=1):  # a resample equals the AUROC of the drawn (repeated) studies
        drawn = np.repeat(np.arange(60), counts.astype(int))
        expected = zero_shot_auroc(scores[drawn], labels[drawn], names=list("abcde"))["macro"]
        assert float(statistic.reduce(counts @ statistic.stats, 60)) == pytest.approx(expected)
    ci = bootstrap_ci(statistic, n_resamples=500, seed=0)
    assert ci["low"] < ci["value"] < ci["high"] and ci["method"] == "exact"
    chance = macro_auroc_statistic(rng.normal(size=labels.shape), labels)
    paired = paired_bootstrap(statistic, chance, n_resamples=500, seed=0)
    assert paired["delta"] > 0.2 and paired["low"] > 0 and paired["p_value"] < 0.01
    with pytest.raises(ValueError, match="NaN or infinite"):
        macro_auroc_statistic(np.full((3, 1), np.nan), np.ones((3, 1)))


def test_macro_auroc_statistic_bins_many_distinct_scores_into_rank_groups():
    from rrg3d.evaluate.bootstrap import macro_auroc_statistic
    from rrg3d.train.metrics import zero_shot_auroc

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (2000, 3)).astype(float)
    scores = labels * 0.8 + rng.normal(0, 1, labels.shape)  # 2000 distinct scores per label
    binned = macro_auroc_statistic(scores, labels, max_groups=200)
    assert binned.stats.shape == (2000, 3 * 2 * 200) and binned.method.startswith("binned")
    exact = zero_shot_auroc(scores, labels, names=list("abc"))["macro"]
    assert binned.value() == pytest.approx(exact, abs=2.5e-3)  # at most half a group's share of the pairs
    assert macro_auroc_statistic(scores[:150], labels[:150], max_groups=200).method == "exact"
