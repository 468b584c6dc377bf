"""Clinical efficacy on constructed label arrays (hand-computed), with a labeler, per region; region recognition."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.evaluate.bootstrap import bootstrap_ci
from rrg3d.evaluate.clinical import (
    canonical_region,
    ce_statistics,
    clinical_efficacy,
    covered_regions,
    label_metrics,
    mentioned_regions,
    region_ce,
    region_prefix,
    region_recognition,
    sample_f1,
)
from rrg3d.text.labels import CTRATE_LABELS

REFERENCE = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
PREDICTED = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 0, 0]])


def test_micro_and_macro_by_hand():
    m = label_metrics(PREDICTED, REFERENCE, ["a", "b", "c"])
    # label a: TP 1 FP 1 FN 1 -> .5/.5/.5; b: TP 2 -> 1/1/1; c: TP 0 FP 1 FN 1 -> 0/0/0
    assert m["per_label"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2,
                                   "tp": 1, "fp": 1, "fn": 1}
    assert m["per_label"]["b"]["f1"] == 1.0 and m["per_label"]["c"]["f1"] == 0.0
    # micro: TP 3, FP 2, FN 2
    assert m["micro_precision"] == pytest.approx(0.6)
    assert m["micro_recall"] == pytest.approx(0.6)
    assert m["micro_f1"] == pytest.approx(0.6)
    assert m["macro_precision"] == pytest.approx(0.5)
    assert m["macro_recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.5)
    assert m["n"] == 4


def test_undefined_ratios_use_zero_division():
    reference = np.array([[1, 0], [0, 0]])
    predicted = np.array([[1, 0], [0, 0]])
    assert label_metrics(predicted, reference)["macro_f1"] == pytest.approx(0.5)  # label 2 never positive -> 0
    assert label_metrics(predicted, reference, zero_division=1.0)["macro_f1"] == pytest.approx(1.0)
    assert sample_f1(predicted, reference).tolist() == [1.0, 1.0]  # both normal counts as agreement


def test_ce_statistics_match_the_metrics_and_bootstrap_brackets_them():
    stats = ce_statistics(PREDICTED, REFERENCE)
    m = label_metrics(PREDICTED, REFERENCE)
    for key in ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "macro_precision", "macro_recall"):
        assert stats[f"ce.{key}"].value() == pytest.approx(m[key])
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 2, size=(300, 18))
    predicted = np.where(rng.random((300, 18)) < 0.8, reference, 1 - reference)
    ci = bootstrap_ci(ce_statistics(predicted, reference)["ce.macro_f1"], n_resamples=300, seed=0)
    assert ci["low"] <= ci["value"] <= ci["high"]


def test_clinical_efficacy_with_a_labeler(stub_labeler):
    references = ["Cardiomegaly. Small pleural effusion.", "No nodule. Emphysema.", "Normal study."]
    candidates = ["Cardiomegaly. No effusion.", "Lung nodule. Emphysema.", "Normal study."]
    result = clinical_efficacy(references, candidates, stub_labeler)
    assert result.predicted.shape == (3, len(CTRATE_LABELS))
    # TP: cardiomegaly, emphysema (2); FP: nodule (1); FN: effusion (1)
    assert result.metrics["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert result.metrics["per_label"]["Pleural effusion"]["fn"] == 1
    assert result.per_sample["ce.f1"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_region_recognition_by_hand():
    reference = [{"lungs", "heart"}, {"lungs"}, {"pleura"}]
    generated = [{"lungs"}, {"lungs", "heart"}, set()]
    m = region_recognition(reference, generated)
    assert m["per_region"]["lungs"]["f1"] == 1.0
    assert m["per_region"]["heart"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 1,
                                        "tp": 0, "fp": 1, "fn": 1}
    assert m["per_region"]["pleura"]["recall"] == 0.0
    assert m["micro_precision"] == pytest.approx(2 / 3) and m["micro_recall"] == pytest.approx(2 / 4)


def test_region_names_prefixes_and_mentions():
    assert canonical_region("Tra. & Bro.") == "trachea and bronchi" and canonical_region(" Lung ") == "lungs"
    assert region_prefix("The region 3 is heart. Normal size.") == ("heart", "Normal size.")
    assert region_prefix("Heart normal.") == (None, "Heart normal.")
    assert covered_regions({"region_0": "The region 0 is lung. Clear.", "heart": "", "pleura": "No effusion."}) == {
        "lungs", "pleura"}
    found = mentioned_regions("No pleural effusion. Thyroid normal. Mild bronchiectasis of the lower lobes.")
    assert found == {"pleura", "thyroid", "lungs"}
    assert "trachea and bronchi" in mentioned_regions("The trachea and main bronchi are patent.")


def test_region_level_ce(stub_labeler):
    references = [{"lungs": "Emphysema. Lung nodule.", "heart": "Cardiomegaly."}, {"lungs": "Atelectasis."}]
    generated = [{"lung": "The region 1 is lungs. Emphysema.", "heart": "Cardiomegaly."}, None]
    out = region_ce(references, generated, stub_labeler)
    assert out["heart"]["micro_f1"] == 1.0 and out["heart"]["n"] == 1
    # lungs: TP emphysema; FN nodule, atelectasis -> micro F1 = 2 / (2 + 2)
    assert out["lungs"]["micro_f1"] == pytest.approx(0.5) and out["lungs"]["n"] == 2
    assert out["all_regions"]["n"] == 3
