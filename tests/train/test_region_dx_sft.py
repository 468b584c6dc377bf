"""Region-guided generation with per-region diagnosis prompts, end to end on tiny phantoms: ``tiny_region_dx_sft``
fits the region classifier before the first step (exactly a fresh fit on the training studies), teacher-forces the
true region findings into the training slot lines, calibrates on validation, and generation lists the classifier's
calls in each slot line and records them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rrg3d.cli import main
from rrg3d.models.checkpoint import load_checkpoint
from rrg3d.models.region_classifier import RegionFindingClassifier, region_classifier_config
from rrg3d.models.regions import collate_regions
from rrg3d.train import train
from rrg3d.train.data import build_dataset, region_labels_of
from rrg3d.train.generator import region_classifier_inputs

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dx_checkpoint(tmp_path_factory, base_overrides):
    run = tmp_path_factory.mktemp("region_dx_sft") / "sft"
    result = train("tiny_region_dx_sft", [*base_overrides, "phases.0.steps=2", "data.max_val_samples=2",
                                          "train.save_every=0", f"run_dir={run}"])
    return result.final


def test_the_region_classifier_is_a_fresh_probe_fit_calibrated_on_validation(dx_checkpoint, phantoms, cache_dir):
    model = load_checkpoint(dx_checkpoint)
    classifier = model.vision.regions.classifier
    assert classifier is not None and classifier.fitted
    train_set = build_dataset(phantoms, "tiny", split="train", cache_dir=cache_dir, progress=False,
                              regions=model.region_settings)
    fresh = RegionFindingClassifier(model.region_settings.names, region_classifier_config({"histogram_bins": 8}))
    histograms, names, findings = region_classifier_inputs(train_set, 2)
    assert histograms.shape[1] == 8 and not torch.isnan(findings).all()
    fresh.fit(histograms, names, findings)
    for name, head in classifier.heads.items():  # never moved by training: the probe as fitted
        assert torch.equal(head.head[1].weight, fresh.heads[name].head[1].weight), name
    evals = (Path(dx_checkpoint).parent / "eval_log.csv").read_text().splitlines()
    assert "region_classifier_micro_f1" in evals[0] and "region_classifier_threshold" in evals[0]
    threshold = float(evals[-1].split(",")[evals[0].split(",").index("region_classifier_threshold")])
    assert classifier.threshold == pytest.approx(threshold)


def test_training_slot_lines_list_each_regions_true_findings(dx_checkpoint, phantoms, cache_dir):
    model = load_checkpoint(dx_checkpoint)
    dataset = build_dataset(phantoms, "tiny", split="train", cache_dir=cache_dir, progress=False,
                            regions=model.region_settings)
    items = [dataset[i] for i in range(2)]
    regions = collate_regions([item["regions"] for item in items])
    volumes = torch.stack([item["volume"] for item in items])
    tokens = model.report_batch(volumes, [item["report"] for item in items], regions=regions, true_share=1.0,
                                true_labels=torch.stack([item["labels"] for item in items]))
    text = model.tokenizer.decode(tokens["input_ids"][0], skip_special_tokens=False)
    record = next(json.loads(line) for line in Path(phantoms).read_text().splitlines()
                  if json.loads(line)["id"] == items[0]["id"])
    truth = region_labels_of(record, None)
    for slot, name in enumerate(regions.names[0]):
        listed = ", ".join(label.lower() for label in truth[name]) or "none"
        assert f"Region {slot + 1} (recognised: {name}; calls: {listed}):" in text


def test_generation_lists_the_classifiers_calls_and_records_them(tmp_path, dx_checkpoint, phantoms):
    out = tmp_path / "predictions.jsonl"
    assert main(["generate", str(phantoms), "--model", str(dx_checkpoint), "--out", str(out), "--max-new-tokens", "8",
                 "--quiet", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and not any(r.get("error") for r in records)
    for record in records:
        seen = record["meta"]["region_findings_classifier"]
        assert set(seen["regions"]) == set(record["regions"])
        for region in seen["regions"].values():
            called = [n for n, p in region["probabilities"].items() if p >= seen["threshold"]]
            assert region["called"] == called
    model = load_checkpoint(dx_checkpoint)
    dataset = build_dataset(phantoms, "tiny", split="test", progress=False, regions=model.region_settings)
    regions = collate_regions([dataset[0]["regions"]])
    prompt = model.region_instructions(None, regions)[0]
    calls = model.vision.regions.region_calls(regions)[0]
    for slot, called in enumerate(calls):
        assert f"calls: {', '.join(c.lower() for c in called) or 'none'}): <region_{slot}>" in prompt
