"""Clip-stage metrics on hand-made cases with known answers, and against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rrg3d.train.metrics import average_ranks, binary_auroc, match_ranks, retrieval_recall, zero_shot_auroc


def test_perfect_retrieval():
    embeds = torch.randn(7, 16)
    result = retrieval_recall(embeds, embeds * 3.0)  # cosine: the scale does not matter
    assert result == {"image_to_text": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0},
                      "text_to_image": {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}}


def test_known_ranks():
    images = np.eye(3)
    texts = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.0, 0.8]])  # unit rows: similarity = texts.T
    # similarity[i, j] = image i . text j = [[1, .8, .6], [0, .6, 0], [0, 0, .8]]
    assert match_ranks(images @ texts.T).tolist() == [0, 0, 0]
    assert match_ranks((images @ texts.T).T).tolist() == [0, 1, 0]
    result = retrieval_recall(images, texts, ks=(1, 2, 10))
    assert result["image_to_text"] == {"R@1": 1.0, "R@2": 1.0, "R@10": 1.0}
    assert result["text_to_image"]["R@1"] == pytest.approx(2 / 3)
    assert result["text_to_image"]["R@2"] == 1.0 and result["text_to_image"]["R@10"] == 1.0  # k capped at N


def test_shuffled_pairs_match_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    texts[:5] = images[:5] + 0.01 * rng.normal(size=(5, 8))  # five near-perfect pairs
    result = retrieval_recall(images, texts, ks=(1, 5))
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = norm(images) @ norm(texts).T
    for key, matrix in (("image_to_text", sim), ("text_to_image", sim.T)):
        ranks = [list(np.argsort(-row)).index(i) for i, row in enumerate(matrix)]
        for k in (1, 5):
            assert result[key][f"R@{k}"] == pytest.approx(np.mean(np.array(ranks) < k))
    assert result["image_to_text"]["R@1"] >= 5 / 20


def test_collapsed_embeddings_do_not_score_as_perfect():
    same = np.ones((4, 3))
    result = retrieval_recall(same, same, ks=(1, 4))
    assert result["image_to_text"] == {"R@1": 0.0, "R@4": 1.0}


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError):
        retrieval_recall(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError):
        retrieval_recall(np.full((2, 2), np.nan), np.ones((2, 2)))


def _pairwise_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_known_values():
    labels = [0, 0, 1, 1]
    assert binary_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert binary_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert binary_auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    assert binary_auroc([0.1, 0.5, 0.5, 0.9], labels) == pytest.approx(0.875)
    assert binary_auroc([0.3, 0.7, 0.3, 0.7], labels) == 0.5
    assert binary_auroc([0.1, 0.2, 0.3], [1, 1, 1]) is None
    assert binary_auroc([0.1, 0.9, 0.5, 0.7], [0, 1, math.nan, math.nan]) == 1.0  # unknowns left out
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_matches_a_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 4, size=n).astype(float)  # many ties
        labels = rng.integers(0, 2, size=n)
        if labels.min() == labels.max():
            assert binary_auroc(scores, labels) is None
            continue
        assert binary_auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels))


def test_zero_shot_auroc_per_label_and_macro():
    probs = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.8, 0.5], [0.8, 0.2, 0.5], [0.9, 0.1, 0.5]])
    labels = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 1], [1, 1, math.nan]])
    result = zero_shot_auroc(probs, labels, names=["a", "b", "c"])
    assert result["per_label"] == {"a": 1.0, "b": 0.0, "c": None}
    assert result["macro"] == 0.5
    default = zero_shot_auroc(np.zeros((2, 18)), np.array([[0] * 18, [1] * 18]))
    assert list(default["per_label"])[2] == "Cardiomegaly" and default["macro"] == 0.5
    assert zero_shot_auroc(np.zeros((2, 2)), np.ones((2, 2))) == {"macro": None,
                                                                 "per_label": {"label_0": None, "label_1": None}}
    with pytest.raises(ValueError):
        zero_shot_auroc(np.zeros((2, 2)), np.ones((2, 2)), names=["only one"])
    with pytest.raises(ValueError):
        binary_auroc([0.1, 0.2], [0, 2])


def test_linear_probe_readout_reads_what_the_features_carry() -> None:
    from rrg3d.train.metrics import linear_probe_readout

    rng = np.random.default_rng(0)

    def split(n: int, informative: bool) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 6))
        signal = x[:, :3] if informative else rng.normal(size=(n, 3))
        return x, (signal + 0.3 * rng.normal(size=(n, 3)) > 0.5).astype(float)

    good = linear_probe_readout(split(400, True), split(100, True), split(100, True), steps=300)
    assert good["test_macro_auroc"] > 0.9 and good["test_micro_f1"] > 0.75
    assert 0.05 <= good["threshold"] <= 0.95 and good["val_micro_f1"] > 0.75
    assert set(good["test_per_label_auroc"]) == {"label_0", "label_1", "label_2"}
    labels = split(400, True)
    labels[1][:5, 0] = np.nan  # unknown labels are left out of the fit
    noise = linear_probe_readout(labels, split(100, False), split(100, False), steps=300)
    assert abs(noise["test_macro_auroc"] - 0.5) < 0.15 and noise["test_micro_f1"] < good["test_micro_f1"] - 0.3
    with pytest.raises(ValueError, match="feature rows"):
        linear_probe_readout((np.zeros((3, 2)), np.zeros((4, 1))), split(10, True), split(10, True))
