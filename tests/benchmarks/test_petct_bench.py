"""benchmarks/petct.py's own logic that its verdict depends on: the arms differ only in what they see (the same
diagnosis classifier on each arm's channels), and the classifier's calls are scored against the phantoms' truth."""

from __future__ import annotations

import json
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def petct(load_benchmark) -> ModuleType:
    return load_benchmark("petct")


def test_arms_share_the_diagnosis_classifier_and_differ_in_what_they_see(petct):
    from rrg3d.data.phantom.petrg import PHANTOM_REGIONS
    from rrg3d.models.config import load_model_config
    from rrg3d.models.vlm import VisionTower

    args = petct.build_parser().parse_args([])
    configs = {arm: petct.model_config(arm, args) for arm in petct.ARMS}
    heads = [config["vision"]["classifier"] for config in configs.values()]
    assert all(head == heads[0] for head in heads)
    assert heads[0]["reads"] == "all" and heads[0]["grid"] is False
    assert heads[0]["uptake_regions"] == list(PHANTOM_REGIONS)
    assert "branches" not in configs["ct"]["vision"] and configs["ct"]["preprocess"] == "tiny"
    assert "pet" in configs["petct"]["vision"]["branches"]
    assert configs["petct"]["prompt"]["style"] is None and configs["petct_style"]["prompt"]["style"]
    widths = {}
    for arm, config in configs.items():
        tower = VisionTower.from_config(load_model_config(config).vision, lm_dim=16)
        widths[arm] = tower.classifier.feature_mean.numel()
    blocks = args.histogram_blocks[0] * args.histogram_blocks[1] * args.histogram_blocks[2]
    assert widths["ct"] == blocks * args.histogram_bins  # the CT's histograms only
    assert widths["petct"] == widths["petct_style"] == 2 * blocks * args.histogram_bins  # + the PET's
    plain = petct.model_config("petct", petct.build_parser().parse_args(["--diagnosis", "none"]))
    assert not plain["vision"].get("classifier") and not plain["prompt"].get("findings")


def test_classifier_calls_are_scored_against_the_truth(petct, tmp_path):
    refs = [{"id": "a", "labels": {"Lymphadenopathy": 1, "Emphysema": 0},
             "petrg": {"mediastinal_nodes": {"pet": "marked_uptake", "ct": "enlarged_node"},
                       "lung": {"pet": "normal", "ct": "normal"}}},
            {"id": "b", "labels": {"Lymphadenopathy": 0, "Emphysema": 1},
             "petrg": {"mediastinal_nodes": {"pet": "normal", "ct": "normal"},
                       "lung": {"pet": "normal", "ct": "normal"}}}]
    calls = {"a": ["Lymphadenopathy", "Marked FDG uptake in mediastinal nodes", "Mild FDG uptake in lung"],
             "b": ["Lymphadenopathy"]}
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps({"id": i, "report": "", "meta": {"findings_classifier": {"called": c}}})
                                   + "\n" for i, c in calls.items()))
    scores = petct.classifier_calls(predictions, refs)
    # findings (labels the reference leaves out are unknown): 1 hit of 2 calls and 2 truths; uptake: 1 hit of 2 calls
    # (mild uptake in a normal lung is a false call) and 1 truth
    assert scores["findings_micro_f1"] == pytest.approx(2 * 1 / (2 + 2), abs=1e-4)
    assert scores["uptake_micro_f1"] == pytest.approx(2 * 1 / (2 + 1), abs=1e-4)
    predictions.write_text(json.dumps({"id": "a", "report": "", "meta": {}}) + "\n")
    assert petct.classifier_calls(predictions, refs[:1]) is None  # no classifier: nothing to score
