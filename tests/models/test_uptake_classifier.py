"""FDG-uptake calls of the finding classifier (PET/CT diagnosis prompting): the uptake targets from per-region PETRG
status, the label matrix they extend, heads that read every modality or the histograms alone, and the prompt line."""

from __future__ import annotations

import math

import pytest
import torch

from rrg3d.models.classifier import (
    TARGET_NAMES,
    UPTAKE_TARGETS,
    ClassifierConfig,
    FindingClassifier,
    target_matrix,
    uptake_label,
    uptake_matrix,
)
from rrg3d.models.config import load_model_config
from rrg3d.text.labels import CTRATE_LABELS
from rrg3d.text.petrg import PETRG_REGIONS

PROMPT = "Findings the image classifier calls: {findings}."


def test_uptake_targets_come_from_the_regions_pet_status():
    row = uptake_matrix({"mediastinal_nodes": {"pet": "marked_uptake", "ct": "enlarged_node"},
                         "hilar_nodes": {"pet": "mild_uptake", "ct": "normal"},
                         "heart": {"pet": "physiological", "ct": "normal"}})
    assert len(row) == len(UPTAKE_TARGETS) == 2 * len(PETRG_REGIONS)
    value = dict(zip(UPTAKE_TARGETS, row, strict=True))
    assert value[("mediastinal_nodes", "marked_uptake")] == 1.0
    assert value[("mediastinal_nodes", "mild_uptake")] == 0.0
    assert value[("hilar_nodes", "mild_uptake")] == 1.0 and value[("hilar_nodes", "marked_uptake")] == 0.0
    assert value[("heart", "marked_uptake")] == 0.0 and value[("heart", "mild_uptake")] == 0.0  # known, not abnormal
    assert math.isnan(value[("brain", "marked_uptake")])  # not in the record: unknown, no loss
    assert all(math.isnan(v) for v in uptake_matrix(None))
    assert uptake_label("mediastinal_nodes", "marked_uptake") == "Marked FDG uptake in mediastinal nodes"
    assert TARGET_NAMES[:18] == tuple(CTRATE_LABELS) and len(TARGET_NAMES) == 18 + len(UPTAKE_TARGETS)


def test_config_checks_uptake_regions_reads_and_grid():
    config = ClassifierConfig(uptake_regions=["hilar_nodes", "lung"], histogram_bins=4)
    assert config.target_names[-4:] == ["Marked FDG uptake in hilar nodes", "Mild FDG uptake in hilar nodes",
                                        "Marked FDG uptake in lung", "Mild FDG uptake in lung"]
    with pytest.raises(ValueError, match="PETRG regions; unknown: \\['lungs'\\]"):
        ClassifierConfig(uptake_regions=["lungs"])
    with pytest.raises(ValueError, match="each region once"):
        ClassifierConfig(uptake_regions=["lung", "lung"])
    with pytest.raises(ValueError, match="reads must be one of"):
        ClassifierConfig(reads="pet")
    with pytest.raises(ValueError, match="nothing to read"):
        ClassifierConfig(grid=False)


def test_an_uptake_head_reads_its_columns_of_the_target_matrix():
    head = FindingClassifier(4, ClassifierConfig(labels=["Lung nodule"], uptake_regions=["hilar_nodes"]))
    assert head.labels == ["Lung nodule", "Marked FDG uptake in hilar nodes", "Mild FDG uptake in hilar nodes"]
    labels = torch.zeros(2, 18)
    labels[:, CTRATE_LABELS.index("Lung nodule")] = torch.tensor([1.0, 0.0])
    uptake = torch.tensor([uptake_matrix({"hilar_nodes": {"pet": "marked_uptake"}}), uptake_matrix(None)])
    matrix = target_matrix({"labels": labels, "uptake": uptake})
    assert matrix.shape == (2, len(TARGET_NAMES))
    targets = head.targets(matrix)
    assert targets[0].tolist() == [1.0, 1.0, 0.0]
    assert targets[1, 0] == 0.0 and torch.isnan(targets[1, 1:]).all()
    with pytest.raises(ValueError, match=f"{len(TARGET_NAMES)} columns"):
        head.targets(labels)  # the abnormalities alone say nothing of uptake
    assert target_matrix({"labels": labels}) is labels  # no uptake columns: the labels as they are
    plain = FindingClassifier(4)
    assert plain.targets(labels).shape == (2, 18) and plain.targets(matrix).shape == (2, 18)
    # the loss skips the unknown uptake of the second study
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = head.loss(logits, matrix)
    known = ~torch.isnan(targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    torch.testing.assert_close(loss, expected)


def test_a_histogram_only_head_ignores_the_encoder_grid():
    head = FindingClassifier(8, ClassifierConfig(histogram_bins=4, grid=False, uptake_regions=["lung"]),
                             in_channels=2)
    assert head.grids == 0
    volumes = torch.rand(3, 2, 4, 8, 8)
    features = head.features(None, volumes)
    assert features.shape == (3, 2 * 4)
    torch.testing.assert_close(head.features(torch.randn(3, 2, 2, 2, 8), volumes), features)
    assert head(None, volumes).shape == (3, 18 + 2)
    with_grid = FindingClassifier([8, 6], ClassifierConfig(histogram_bins=4, reads="all"), in_channels=2)
    assert with_grid.features([torch.randn(3, 2, 2, 2, 8), torch.randn(3, 2, 2, 2, 6)], volumes).shape == (
        3, 2 * (8 + 6) + 2 * 4)
    with pytest.raises(ValueError, match="reads 2 encoder grid"):
        with_grid.features(torch.randn(3, 2, 2, 2, 8), volumes)


def _petct_config(reads: str, grid: bool = True):
    config = load_model_config("tiny_petrg3d").to_dict()
    config["vision"]["classifier"] = {"hidden": 0, "histogram_bins": 4, "reads": reads, "grid": grid,
                                      "uptake_regions": ["mediastinal_nodes", "lung"]}
    config["prompt"]["findings"] = PROMPT
    config["prompt"]["style"] = None
    return load_model_config(config)


def _petct_tower(reads: str, grid: bool = True):
    from rrg3d.models.vlm import VisionTower

    torch.manual_seed(0)
    return VisionTower.from_config(_petct_config(reads, grid).vision, lm_dim=32).eval()


@pytest.mark.parametrize("grid", [True, False])
def test_a_petct_head_that_reads_all_sees_the_pet(grid):
    volumes = torch.rand(2, 2, 32, 64, 64)
    hotter = volumes.clone()
    hotter[:, 1, 10:14, 20:30, 20:30] = 1.0  # a hot spot on the PET channel only
    every = _petct_tower("all", grid)
    ct = _petct_tower("ct", grid)
    assert not torch.equal(every.classifier_features(volumes), every.classifier_features(hotter))
    torch.testing.assert_close(ct.classifier_features(volumes), ct.classifier_features(hotter))
    width = every.classifier_features(volumes).shape[1]
    dim = int(every.encoder.out_dim)
    assert width == (2 * 2 * dim if grid else 0) + 2 * 4  # mean + max of two grids (shared encoder), 2 histograms
    assert every.finding_logits(volumes).shape == (2, 18 + 4)
    with torch.no_grad():
        _, logits = every.encode(volumes)
        torch.testing.assert_close(logits, every.finding_logits(volumes))  # one path for training and generation


def test_the_diagnosis_line_lists_uptake_calls_and_teacher_forcing_uses_the_true_uptake():
    pytest.importorskip("transformers")
    from rrg3d.models.vlm import ReportGenerator

    model = ReportGenerator.from_config(_petct_config("all", grid=False), seed=0)
    volumes = torch.rand(1, 2, 32, 64, 64)
    labels = torch.zeros(1, 18)
    labels[0, CTRATE_LABELS.index("Lymphadenopathy")] = 1.0
    uptake = torch.tensor([uptake_matrix({"mediastinal_nodes": {"pet": "marked_uptake"},
                                          "lung": {"pet": "normal"}})])
    batch = model.report_batch(volumes, ["A report."], true_labels=target_matrix({"labels": labels,
                                                                                  "uptake": uptake}),
                               true_share=1.0)
    prompt = model.tokenizer.decode(batch["input_ids"][0])
    assert "Findings the image classifier calls: lymphadenopathy, marked FDG uptake in mediastinal nodes." in prompt
