"""benchmarks/regions.py's own logic that its verdict depends on: with diagnosis prompting the global arm gets a
block-histogram classifier and every region arm a per-region one (the CT-CLIP encoder's config stays without either),
and the calls are scored against the truth."""

from __future__ import annotations

import json
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def regions(load_benchmark) -> ModuleType:
    return load_benchmark("regions")


def test_every_arm_gets_a_classifier_on_what_it_sees(regions):
    from rrg3d.models.config import load_model_config
    from rrg3d.models.vlm import VisionTower

    args = regions.build_parser().parse_args([])
    assert args.diagnosis == "regions"
    configs = {arm: regions.model_config(arm, args.diagnosis, args.histogram_bins) for arm in regions.ARMS}
    assert configs["global"]["vision"]["classifier"]["histogram_blocks"] == [2, 2, 2]
    assert configs["global"]["prompt"]["findings"] and not configs["global"]["vision"]["regions"].get("classifier")
    for arm in set(regions.ARMS) - {"global"}:
        assert not configs[arm]["vision"].get("classifier") and not configs[arm]["prompt"].get("findings")
        assert configs[arm]["vision"]["regions"]["classifier"] == {"histogram_bins": args.histogram_bins}
    tower = VisionTower.from_config(load_model_config(configs["full"]).vision, lm_dim=16)
    assert tower.regions.classifier is not None and tower.regions.classifier.width == args.histogram_bins
    global_tower = VisionTower.from_config(load_model_config(configs["global"]).vision, lm_dim=16)
    assert global_tower.classifier.feature_mean.numel() == 8 * args.histogram_bins
    # the shared CT-CLIP encoder is pretrained from the plain global config, whatever the diagnosis setting
    plain = regions.model_config("global")
    assert not plain["vision"].get("classifier")
    assert plain["vision"]["encoder"] == configs["global"]["vision"]["encoder"]


def test_classifier_calls_are_scored_against_the_truth(regions, tmp_path):
    references = tmp_path / "refs.jsonl"
    references.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "split": "test", "report": "x", "images": {"ct": "a.nii.gz"},
         "labels": {"Emphysema": 1, "Cardiomegaly": 1}},
        {"id": "b", "split": "test", "report": "y", "images": {"ct": "b.nii.gz"}, "labels": {"Emphysema": 0}}]))
    region_records = [
        {"id": "a", "meta": {"region_findings_classifier": {"threshold": 0.5, "regions": {
            "lung": {"called": ["Emphysema"]}, "heart": {"called": ["Emphysema"]}}}}},
        {"id": "b", "meta": {"region_findings_classifier": {"threshold": 0.5, "regions": {
            "lung": {"called": ["Lung nodule"]}}}}}]
    scores = regions.classifier_calls(region_records, references)
    # the union over regions: a calls {Emphysema} (1 hit, cardiomegaly missed), b calls a nodule it lacks
    assert scores["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.5)
    global_records = [{"id": "a", "meta": {"findings_classifier": {"called": ["Emphysema", "Cardiomegaly"]}}},
                      {"id": "b", "meta": {"findings_classifier": {"called": []}}}]
    assert regions.classifier_calls(global_records, references)["micro_f1"] == pytest.approx(1.0)
    assert regions.classifier_calls([{"id": "a", "meta": {}}], references) is None
