"""The per-region finding classifier: masked histograms on known geometry, per-region labels, per-region heads that
fit, call and calibrate, and the slot lines that carry the calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rrg3d.errors import ConfigError
from rrg3d.models.region_classifier import (
    RegionFindingClassifier,
    region_classifier_config,
    region_histograms,
    region_label_rows,
)
from rrg3d.models.regions import RegionBatch, RegionSettings, collate_regions, region_block
from rrg3d.text.labels import CTRATE_LABELS


def test_histograms_read_only_the_voxels_inside_each_mask():
    volume = torch.zeros(1, 4, 8, 8)
    volume[:, :2] = 0.15  # upper half 0.15 (bin 1 of 10), lower half 0.85 (bin 8)
    volume[:, 2:] = 0.85
    upper = np.zeros((4, 8, 8), dtype=bool)
    upper[:2] = True
    empty = np.zeros((4, 8, 8), dtype=bool)
    rows = region_histograms(volume, [upper, ~upper, empty], bins=10, value_range=(0.0, 1.0))
    assert rows.shape == (3, 10)
    assert int(rows[0].argmax()) == 1 and int(rows[1].argmax()) == 8  # bin centres 0.05 + 0.1 k
    assert rows[0].sum() == pytest.approx(1.0) and rows[1].sum() == pytest.approx(1.0)
    assert float(rows[2].abs().sum()) == 0.0  # an empty mask: no voxel, no share
    two = region_histograms(torch.cat([volume, 1 - volume]), [upper], bins=10, value_range=(0.0, 1.0))
    assert two.shape == (1, 20) and int(two[0, 10:].argmax()) == 8  # channel 2 (1 − volume) after 1
    with pytest.raises(ValueError, match="mask of shape"):
        region_histograms(volume, [upper[:2]], bins=4, value_range=(0.0, 1.0))


def test_region_label_rows_read_lists_mappings_and_mark_missing_regions_unknown():
    rows = region_label_rows(["lung", "heart", "bone"],
                             {"Lung": ["Emphysema"], "heart": {"Cardiomegaly": 1, "Pericardial effusion": 0}})
    lung, heart, bone = (np.array(r) for r in rows)
    assert lung[CTRATE_LABELS.index("Emphysema")] == 1 and np.nansum(lung) == 1 and not np.isnan(lung).any()
    assert heart[CTRATE_LABELS.index("Cardiomegaly")] == 1 and heart[CTRATE_LABELS.index("Pericardial effusion")] == 0
    assert math.isnan(heart[CTRATE_LABELS.index("Emphysema")])  # not said: unknown
    assert np.isnan(bone).all()
    with pytest.raises(ValueError, match="unknown abnormalities"):
        region_label_rows(["lung"], {"lung": ["Lung cancer"]})


def test_config_refuses_a_classifier_without_bins_or_with_unknown_keys():
    assert region_classifier_config({"histogram_bins": 8}).grid is False
    with pytest.raises(ConfigError, match="histogram_bins"):
        region_classifier_config({"hidden": 4})
    with pytest.raises(ConfigError, match="unknown keys"):
        region_classifier_config({"histogram_bins": 8, "uptake_regions": ["lung"]})
    with pytest.raises(ConfigError, match="mapping"):
        RegionSettings(classifier=[8])  # type: ignore[arg-type]


def _synthetic(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Lung slots whose emphysema shows as a high share of bin 0; heart slots whose cardiomegaly shows in bin 3."""
    histograms = torch.rand(2 * n, 4, generator=generator) * 0.2
    names = ["lung"] * n + ["heart"] * n
    labels = torch.zeros(2 * n, len(CTRATE_LABELS))
    present = torch.rand(2 * n, generator=generator) < 0.5
    emphysema, cardiomegaly = CTRATE_LABELS.index("Emphysema"), CTRATE_LABELS.index("Cardiomegaly")
    for i in range(2 * n):
        if present[i]:
            column, bin_ = (emphysema, 0) if names[i] == "lung" else (cardiomegaly, 3)
            labels[i, column] = 1
            histograms[i, bin_] += 0.7
    return histograms, names, labels


def test_each_region_head_learns_its_own_findings_and_calibrates_one_threshold():
    generator = torch.Generator().manual_seed(0)
    classifier = RegionFindingClassifier(["lung", "heart", "bone"], region_classifier_config({"histogram_bins": 4}))
    assert not any(p.requires_grad for p in classifier.parameters())  # a probe, never trained by gradient
    histograms, names, labels = _synthetic(40, generator)
    losses = classifier.fit(histograms, names, labels)
    assert set(losses) == {"lung", "heart"} and classifier.fitted
    assert not bool(classifier.heads["bone"].fitted)  # no bone slot: stays unfitted
    test_histograms, test_names, test_labels = _synthetic(20, generator)
    logits = classifier(test_histograms, test_names)
    threshold = classifier.calibrate(logits, test_labels)
    assert all(float(h.threshold) == threshold for h in classifier.heads.values())
    assert classifier.micro_f1(logits, test_labels) == 1.0
    calls = classifier.calls(logits)
    for row, name, truth in zip(calls, test_names, test_labels, strict=True):
        expected = [CTRATE_LABELS[i] for i in truth.nonzero().flatten().tolist()]
        assert row == expected, (name, row, expected)
    # a slot of a region whose head never saw data calls nothing; an unknown region raises
    assert classifier.calls(classifier(test_histograms[:1], ["bone"])) == [[]]
    with pytest.raises(ValueError, match="not among"):
        classifier(test_histograms[:1], ["liver"])
    assert classifier.named(test_labels[:2]) == calls[:2]


def test_slot_lines_carry_the_calls_beside_the_recognised_name():
    settings = RegionSettings(recognizer=True, classifier={"histogram_bins": 4})
    block = region_block(["lung", "heart"], settings, ["lung", "heart"], [["Emphysema", "Lung nodule"], []])
    lines = block.splitlines()
    assert lines[0] == "Region 1 (recognised: lung; calls: emphysema, lung nodule): <region_0>"
    assert lines[1] == "Region 2 (recognised: heart; calls: none): <region_1>"
    told = RegionSettings(alignment=False, recognizer=False)
    line = region_block(["heart"], told, calls=[["Cardiomegaly"]])
    assert line == "Region 1 (heart; calls: cardiomegaly): <region_0>"
    assert region_block(["heart"], told) == "Region 1 (heart): <region_0>"
    with pytest.raises(ValueError, match="call lists"):
        region_block(["heart"], told, calls=[[], []])


def test_region_batches_keep_histograms_and_findings_with_their_slots():
    items = [{"names": ["lung", "heart"], "label_ids": [1, 4], "texture": None, "geometry": None,
              "histograms": torch.tensor([[1.0], [2.0]]), "findings": torch.tensor([[1.0], [0.0]])},
             {"names": ["bone"], "label_ids": [7], "texture": None, "geometry": None,
              "histograms": torch.tensor([[3.0]]), "findings": torch.tensor([[float("nan")]])}]
    batch = collate_regions(items)
    assert batch.histograms.flatten().tolist() == [1.0, 2.0, 3.0]
    swapped = batch.permuted([[1, 0], [0]])
    assert swapped.names == [["heart", "lung"], ["bone"]]
    assert swapped.histograms.flatten().tolist() == [2.0, 1.0, 3.0]
    assert swapped.findings.flatten()[:2].tolist() == [0.0, 1.0]
    plain = collate_regions([{k: v for k, v in item.items() if k not in ("histograms", "findings")} for item in items])
    assert isinstance(plain, RegionBatch) and plain.histograms is None and plain.findings is None
