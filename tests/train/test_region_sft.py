"""Region-guided generation end to end on tiny phantoms: train ``tiny_region_sft`` a few steps, generate grounded
reports (from the manifest's masks and from ``--masks``), evaluate them; the regions come from the masks alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rrg3d.cli import main
from rrg3d.errors import ConfigError
from rrg3d.models.checkpoint import load_checkpoint, read_manifest
from rrg3d.train import train

pytest.importorskip("transformers")


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def region_checkpoint(tmp_path_factory, base_overrides):
    run = tmp_path_factory.mktemp("region_sft") / "sft"
    result = train("tiny_region_sft", [*base_overrides, "phases.0.steps=3", "data.max_val_samples=3",
                                       "train.save_every=0", f"run_dir={run}"])
    return result.final


def test_region_model_trains_and_its_checkpoint_records_the_regions(region_checkpoint):
    rows = (Path(region_checkpoint).parent / "train_log.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 steps
    # validated over two batches (3 studies, batch 2), each with its own regions
    evals = (Path(region_checkpoint).parent / "eval_log.csv").read_text().splitlines()
    assert len(evals) == 2 and "val_loss" in evals[0] and "image_gain" not in evals[0]
    meta = read_manifest(region_checkpoint)
    regions = meta["model"]["vision"]["regions"]
    assert regions["alignment"] is True and len(regions["names"]) == 10 and regions["texture_size"] == [16, 32, 32]
    model = load_checkpoint(region_checkpoint)
    assert model.region_settings is not None and model.vision.regions.geometry_encoder is not None
    assert regions["recognizer"] is True and model.vision.regions.recognizer is not None
    trained = model.trainable_parameters()
    assert trained["regions"] == 0  # loaded for inference: everything frozen


def test_generate_writes_grounded_reports_from_masks_alone(tmp_path, region_checkpoint, phantoms):
    # references stripped of their region reports: which regions are reported must not depend on them
    stripped = tmp_path / "stripped.jsonl"
    records = _jsonl(phantoms)
    with open(stripped, "w", encoding="utf-8") as handle:
        for record in records:
            record = {k: v for k, v in record.items() if k not in ("region_reports", "report", "sections")}
            record["images"] = {"ct": str(Path(phantoms).parent / record["images"]["ct"]), "pet": None}
            record["masks"]["path"] = str(Path(phantoms).parent / record["masks"]["path"])
            handle.write(json.dumps(record) + "\n")
    outputs = {}
    for name, manifest in (("full", phantoms), ("stripped", stripped)):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(manifest), "--model", str(region_checkpoint), "--out", str(out),
                     "--max-new-tokens", "12", "--quiet", "--no-progress"]) == 0
        outputs[name] = {r["id"]: r for r in _jsonl(out)}
    assert len(outputs["full"]) == 8
    for study_id, record in outputs["full"].items():
        other = outputs["stripped"][study_id]
        assert record["regions"] == other["regions"] and record["report"] == other["report"]
        assert set(record["regions"]) <= set(record["region_recognition"]) | set(record["regions"])
        assert record["meta"]["regions_dropped"] == other["meta"]["regions_dropped"]
        mask = tmp_path / record["masks"]["path"]
        assert mask.is_file() and record["masks"]["labels"]["1"] == "lung"
        assert set(record["regions"]).isdisjoint(record["meta"]["regions_dropped"])


def test_generate_reads_a_masks_folder_and_refuses_missing_masks(tmp_path, region_checkpoint, phantoms):
    scan = Path(phantoms).parent / "vols" / "phantom_00001.nii.gz"
    out = tmp_path / "pred.jsonl"
    # a bare scan without masks: recorded as failed, not a crash
    assert main(["generate", str(scan), "--model", str(region_checkpoint), "--out", str(out), "--quiet",
                 "--max-new-tokens", "4", "--no-progress"]) == 2
    assert "has no label map" in _jsonl(out)[0]["error"]
    assert main(["generate", str(scan), "--model", str(region_checkpoint), "--out", str(out), "--quiet",
                 "--max-new-tokens", "4", "--no-progress", "--masks", str(Path(phantoms).parent / "seg")]) == 0
    record = next(r for r in _jsonl(out) if not r.get("error"))
    assert record["id"] == "phantom_00001" and record["regions"]["lung"] == 1


def test_evaluate_scores_region_recognition_per_slot(tmp_path, phantoms):
    """Region metrics from grounded predictions: recognition per region shown, region CE, merged-report CE."""
    records = [r for r in _jsonl(phantoms) if r["split"] == "train"][:3]
    predictions = tmp_path / "pred.jsonl"
    with open(predictions, "w", encoding="utf-8") as handle:
        for k, record in enumerate(records):
            recognized = {name: name for name in record["region_reports"]}
            if k == 0:
                recognized["pleura"] = "lung"  # one slot misrecognised: a pleura FN and a lung FP
            handle.write(json.dumps({"id": record["id"], "report": " ".join(record["region_reports"].values()),
                                     "region_reports": record["region_reports"], "region_recognition": recognized,
                                     "regions": {"lung": 1}}) + "\n")
    refs = tmp_path / "refs.jsonl"
    with open(refs, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"id": record["id"], "report": record["report"],
                                     "region_reports": record["region_reports"]}) + "\n")
    out = tmp_path / "eval"
    assert main(["evaluate", str(predictions), "--refs", str(refs), "--out", str(out), "--bootstrap", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    recognition = metrics["region_recognition"]
    assert recognition["per_region"]["pleura"]["recall"] == pytest.approx(2 / 3)
    assert recognition["per_region"]["lungs"]["precision"] == pytest.approx(3 / 4)
    assert recognition["per_region"]["heart"]["f1"] == 1.0 and recognition["slots"] == 30
    assert metrics["ce_regions"]["all_regions"]["micro_f1"] == pytest.approx(1.0)


def test_region_settings_refusals(tmp_path, base_overrides):
    with pytest.raises(ConfigError, match="augment"):
        train("tiny_region_sft", [*base_overrides, "data.augment.enabled=true", f"run_dir={tmp_path / 'a'}"])
    spec = {"name": "x", "vision": {"encoder": {"name": "resnet3d"}, "regions": {"names": ["lung"] * 2}}}
    from rrg3d.models.config import ModelConfig

    with pytest.raises(ConfigError, match="each region once"):
        ModelConfig.from_dict(spec)
    torch.manual_seed(0)


def test_generate_segments_the_scan_itself(tmp_path, region_checkpoint, phantoms):
    """--segment rules: the label map comes from the weight-free segmenter run on the scan, and is written beside."""
    scan = Path(phantoms).parent / "vols" / "phantom_00001.nii.gz"
    out = tmp_path / "pred.jsonl"
    assert main(["generate", str(scan), "--model", str(region_checkpoint), "--out", str(out), "--quiet",
                 "--max-new-tokens", "4", "--no-progress", "--segment", "rules"]) == 0
    record = _jsonl(out)[0]
    assert record["meta"]["mask_source"] == "segment:rules"
    assert "lung" in record["regions"] and (tmp_path / record["masks"]["path"]).is_file()
