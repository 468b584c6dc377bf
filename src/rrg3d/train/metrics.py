"""Encoder metrics: image↔text retrieval recall and zero-shot abnormality AUROC (the ``clip`` stage's validation),
and the labels a frozen encoder's features support (a linear-probe readout).

All take tensors or arrays and return plain Python floats (JSON-ready).

* :func:`retrieval_recall` — pair ``i`` (image ``i``, text ``i``) is the match; cosine similarity; a match
  tied with other candidates counts as ranked *behind* them (a collapsed model scores 0, not 1).
* :func:`zero_shot_auroc` — per-label ROC AUC by the Mann–Whitney rank formula (average ranks for ties), so no
  scikit-learn is needed; unknown (NaN) labels are left out per label.
* :func:`linear_probe_readout` — a logistic-regression probe on frozen features, its decision threshold chosen on
  a validation split: the CE-F1 a linear reader of those features reaches — a reference for what the language
  model could read from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_numpy(values: Any, name: str, ndim: int = 2) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor (any device / dtype)
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def match_ranks(similarity: np.ndarray) -> np.ndarray:
    """0-based rank of the diagonal entry of each row (0 = best); ties with others count against the match."""
    diagonal = np.diag(similarity)[:, None]
    better = (similarity > diagonal).sum(axis=1)
    tied = (similarity == diagonal).sum(axis=1) - 1  # minus the match itself
    return better + tied


def retrieval_recall(image_embeds: Any, text_embeds: Any,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """``{"image_to_text": {"R@1": ..}, "text_to_image": {..}}`` for ``[N, E]`` paired embeddings (k capped at N)."""
    images = _as_numpy(image_embeds, "image_embeds")
    texts = _as_numpy(text_embeds, "text_embeds")
    if images.shape != texts.shape:
        raise ValueError(f"image and text embeddings differ in shape: {images.shape} vs {texts.shape}")
    if len(images) == 0:
        raise ValueError("retrieval_recall needs at least one pair")
    if not (np.isfinite(images).all() and np.isfinite(texts).all()):
        raise ValueError("embeddings contain NaN or infinite values")
    similarity = _normalize(images) @ _normalize(texts).T
    n = len(images)
    result: dict[str, dict[str, float]] = {}
    for direction, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranks = match_ranks(matrix)
        result[direction] = {f"R@{k}": float(np.mean(ranks < min(int(k), n))) for k in ks}
    return result


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1]
    ends = np.r_[starts[1:], len(values)]
    averaged = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(averaged, ends - starts)
    return ranks


def binary_auroc(scores: Any, labels: Any) -> float | None:
    """ROC AUC of ``scores`` for 0/1 ``labels`` (NaN labels left out); ``None`` when only one class remains."""
    scores = _as_numpy(scores, "scores", ndim=1)
    labels = _as_numpy(labels, "labels", ndim=1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in shape: {scores.shape} vs {labels.shape}")
    known = ~np.isnan(labels)
    scores, labels = scores[known], labels[known]
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN")
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = average_ranks(scores)
    u = ranks[labels == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def zero_shot_auroc(probs: Any, labels: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"macro": float | None, "per_label": {name: float | None}}`` for ``[N, L]`` scores and 0/1/NaN labels.

    A label is ``None`` when, after leaving out its unknown (NaN) entries, only one class remains; the macro
    average is over the others (``None`` when there are none). Names default to the CT-RATE labels when
    ``L == 18``, else ``label_0 ..``.
    """
    scores = _as_numpy(probs, "probs")
    truth = _as_numpy(labels, "labels")
    if scores.shape != truth.shape:
        raise ValueError(f"probs and labels differ in shape: {scores.shape} vs {truth.shape}")
    count = scores.shape[1]
    if names is None:
        from rrg3d.text.labels import CTRATE_LABELS

        names = CTRATE_LABELS if count == len(CTRATE_LABELS) else [f"label_{j}" for j in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} labels")
    per_label = {str(name): binary_auroc(scores[:, j], truth[:, j]) for j, name in enumerate(names)}
    defined = [v for v in per_label.values() if v is not None]
    return {"macro": float(np.mean(defined)) if defined else None, "per_label": per_label}


def linear_probe_readout(train: tuple[Any, Any], val: tuple[Any, Any], test: tuple[Any, Any], *,
                         weight_decay: float = 1e-3, steps: int = 500, lr: float = 1e-2, seed: int = 0,
                         names: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit one logistic probe per label on frozen ``(features [N, F], labels [N, L])`` pairs; report its test AUROC
    and the CE P/R/F1 of its thresholded predictions, with the one threshold that maximises micro-F1 on ``val``.

    Features are standardised with the training split's statistics; AdamW full-batch steps on the mean binary
    cross-entropy (unknown NaN labels are left out). The micro-F1 is the ceiling a report writer reading these
    features through a linear map would reach on the same labels — a bound that separates what the encoder carries
    from what the language model reads.
    """
    import torch

    from rrg3d.evaluate.clinical import label_metrics

    def tensors(pair: tuple[Any, Any], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(_as_numpy(pair[0], f"{name} features"), dtype=torch.float32)
        y = torch.as_tensor(_as_numpy(pair[1], f"{name} labels"), dtype=torch.float32)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: {len(x)} feature rows for {len(y)} label rows")
        return x, y

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (tensors(p, n) for p, n in
                                                            ((train, "train"), (val, "val"), (test, "test")))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
    known = ~torch.isnan(y_train)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x_train.shape[1], y_train.shape[1])
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x_train)[known], y_train[known])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        p_val, p_test = probe(x_val).sigmoid().numpy(), probe(x_test).sigmoid().numpy()

    def thresholded(p: np.ndarray, y: torch.Tensor, t: float) -> dict[str, Any]:
        truth = y.numpy()
        keep = ~np.isnan(truth).any(axis=1)  # CE counts need every label known
        return label_metrics(p[keep] >= t, truth[keep] == 1, names=names)

    thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2)
    threshold = float(max(thresholds, key=lambda t: thresholded(p_val, y_val, float(t))["micro_f1"]))
    scores = thresholded(p_test, y_test, threshold)
    auroc = zero_shot_auroc(p_test, y_test.numpy(), names)
    return {"test_macro_auroc": auroc["macro"], "test_per_label_auroc": auroc["per_label"],
            "threshold": threshold, "val_micro_f1": thresholded(p_val, y_val, threshold)["micro_f1"],
            "test_micro_f1": scores["micro_f1"], "test_macro_f1": scores["macro_f1"], "train_loss": loss.item()}
