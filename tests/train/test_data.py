"""The training dataset: on-the-fly vs cached reads, cache reuse and refusal, splits, labels, failures, workers."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rrg3d.errors import RRG3DError
from rrg3d.preprocess.presets import load_preset
from rrg3d.train.data import (
    LABEL_NAMES,
    ReportDataset,
    build_dataset,
    collate_reports,
    labels_vector,
    preset_shape,
)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    return generate_phantoms(PhantomConfig(n=6, seed=0, shape=(32, 64, 64)), out, workers=1, progress=False)


@pytest.fixture(scope="module")
def cache_root(phantoms, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    build_dataset(phantoms, "tiny", cache_dir=root, progress=False)
    return root


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _absolute(records: list[dict], base: Path) -> list[dict]:
    """Records with absolute image/mask paths, so that they can be written to a manifest elsewhere."""
    out = []
    for record in records:
        record = json.loads(json.dumps(record))
        record["images"] = {k: (str(base / v) if v else v) for k, v in record["images"].items()}
        if record.get("masks"):
            record["masks"]["path"] = str(base / record["masks"]["path"])
        out.append(record)
    return out


def test_on_the_fly_and_cache_give_identical_items(phantoms, cache_root):
    live = build_dataset(phantoms, "tiny", progress=False)
    cached = build_dataset(phantoms, "tiny", cache_dir=cache_root, progress=False)
    assert live.mode == "on_the_fly" and cached.mode == "cache"
    assert cached.manifest == cache_root / "tiny" / "manifest.jsonl"
    assert live.ids == cached.ids == [f"phantom_{i:05d}" for i in range(6)]
    for i in range(len(live)):
        a, b = live[i], cached[i]
        assert a["volume"].dtype == torch.float32 and a["volume"].shape == (1, 32, 64, 64)
        assert torch.equal(a["volume"], b["volume"])
        assert torch.isfinite(b["volume"]).all()
        assert a["report"] == b["report"] and a["report"].startswith("Findings:")
        assert torch.equal(a["labels"], b["labels"])


def test_a_cache_made_with_the_preset_is_read_as_is(cache_root, monkeypatch, tmp_path):
    import rrg3d.preprocess.batch as batch

    def refuse(*args, **kwargs):
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(batch, "process_record", refuse)
    cache_manifest = cache_root / "tiny" / "manifest.jsonl"
    for cache_dir in (None, tmp_path):  # even with a cache_dir: the manifest already is a cache
        dataset = build_dataset(cache_manifest, load_preset("tiny"), cache_dir=cache_dir, progress=False)
        assert dataset.mode == "cache" and dataset.manifest == cache_manifest and len(dataset) == 6
    assert not (tmp_path / "tiny").exists()
    assert dataset[0]["volume"].shape == (1, 32, 64, 64)


def test_building_the_cache_again_resumes_without_work(phantoms, cache_root, monkeypatch):
    import rrg3d.preprocess.batch as batch

    monkeypatch.setattr(batch, "process_record", lambda *a, **k: (_ for _ in ()).throw(AssertionError("redone")))
    dataset = build_dataset(phantoms, "tiny", cache_dir=cache_root, split="train", progress=False)
    assert len(dataset) == 4 and dataset.mode == "cache"


def test_a_cache_made_with_another_preset_is_refused(cache_root, tmp_path):
    cache_manifest = cache_root / "tiny" / "manifest.jsonl"
    with pytest.raises(RRG3DError, match=r"made with preset 'tiny'.*not 'multiscale_64'"):
        build_dataset(cache_manifest, "multiscale_64", progress=False)
    with pytest.raises(RRG3DError, match="made with preset 'tiny'"):
        build_dataset(cache_manifest, "multiscale_64", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "multiscale_64").exists()  # never windowed twice
    # a manifest mixing cached and original studies is refused too
    records = _absolute(_records(cache_manifest), cache_manifest.parent)
    del records[1]["preprocess"]
    with pytest.raises(RRG3DError, match="either original scans or one preprocessing cache"):
        build_dataset(_write(records, tmp_path / "mixed.jsonl"), "tiny", progress=False)


def test_split_filter(phantoms):
    assert build_dataset(phantoms, "tiny", split="train", progress=False).ids == [
        "phantom_00001", "phantom_00002", "phantom_00003", "phantom_00004"]
    assert build_dataset(phantoms, "tiny", split="val", progress=False).ids == ["phantom_00005"]
    assert build_dataset(phantoms, "tiny", split=("val", "test"), progress=False).ids == [
        "phantom_00000", "phantom_00005"]
    assert len(build_dataset(phantoms, "tiny", split="nonexistent", progress=False)) == 0


def test_labels_follow_the_project_order_with_nan_for_unknown(phantoms, tmp_path):
    assert len(LABEL_NAMES) == 18 and LABEL_NAMES[2] == "Cardiomegaly"
    vector = labels_vector({"Cardiomegaly": 1, "Emphysema": 0, "Not a label": 1})
    assert vector[2] == 1.0 and vector[LABEL_NAMES.index("Emphysema")] == 0.0
    assert sum(math.isnan(v) for v in vector) == 16
    assert all(math.isnan(v) for v in labels_vector(None))

    records = _absolute(_records(phantoms), phantoms.parent)
    full = records[1]["labels"]
    records[1]["labels"] = {"Lung nodule": 1, "Cardiomegaly": 0}
    del records[2]["labels"]
    dataset = build_dataset(_write(records, tmp_path / "m.jsonl"), "tiny", progress=False)
    assert torch.equal(dataset[0]["labels"], torch.tensor([float(records[0]["labels"][n]) for n in LABEL_NAMES]))
    partial = dataset[1]["labels"]
    assert partial.shape == (18,) and partial.dtype == torch.float32
    assert partial[LABEL_NAMES.index("Lung nodule")] == 1 and partial[LABEL_NAMES.index("Cardiomegaly")] == 0
    assert int(torch.isnan(partial).sum()) == 16
    assert torch.isnan(dataset[2]["labels"]).all()
    matrix = dataset.label_matrix()
    assert matrix.shape == (6, 18) and torch.equal(matrix[0], dataset[0]["labels"])
    assert set(full) == set(LABEL_NAMES)


def test_studies_without_report_are_skipped_unless_not_required(phantoms, tmp_path, caplog):
    records = _absolute(_records(phantoms), phantoms.parent)
    del records[0]["report"]
    records[1]["report"] = None
    records[2]["report"] = "   "  # invalid in a manifest: the line is left out as invalid
    manifest = _write(records, tmp_path / "m.jsonl")
    with caplog.at_level("WARNING", logger="rrg3d.train.data"):
        dataset = build_dataset(manifest, "tiny", progress=False)
    assert dataset.ids == ["phantom_00003", "phantom_00004", "phantom_00005"]
    assert dataset.skipped == {"invalid_line": 1, "no_report": 2}
    assert sum("no report" in r.message for r in caplog.records) == 1
    kept = build_dataset(manifest, "tiny", require_report=False, progress=False)
    assert kept.ids[:2] == ["phantom_00000", "phantom_00001"] and kept[0]["report"] == ""


def test_an_unreadable_image_raises_naming_the_file(phantoms, tmp_path):
    records = _absolute(_records(phantoms), phantoms.parent)
    records[3]["images"]["ct"] = str(tmp_path / "gone.nii.gz")
    manifest = _write(records, tmp_path / "m.jsonl")
    dataset = build_dataset(manifest, "tiny", progress=False)
    assert len(dataset) == 6
    with pytest.raises(RRG3DError, match=r"phantom_00003.*gone\.nii\.gz.*file not found"):
        dataset[3]
    assert dataset[4]["volume"].shape == (1, 32, 64, 64)

    # preprocessing into a cache records the failure and leaves the study out
    cached = build_dataset(manifest, "tiny", cache_dir=tmp_path / "cache", progress=False)
    assert "phantom_00003" not in cached.ids and len(cached) == 5
    assert cached.skipped == {"preprocess_failed": 1}
    errors = _records(tmp_path / "cache" / "tiny" / "errors.jsonl")
    assert [e["id"] for e in errors] == ["phantom_00003"] and "gone.nii.gz" in errors[0]["file"]


def test_a_broken_cached_tensor_raises_naming_it(cache_root, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(cache_root / "tiny", copy)
    dataset = build_dataset(copy / "manifest.jsonl", "tiny", progress=False)
    tensors = sorted((copy / "tensors").glob("*.ct.npy"))
    tensors[0].unlink()
    with pytest.raises(RRG3DError, match=r"phantom_00000\.ct\.npy: file not found"):
        dataset[0]
    np.save(tensors[1], np.full((32, 64, 64), np.nan, dtype=np.float16))
    with pytest.raises(RRG3DError, match=r"phantom_00001\.ct\.npy: the preprocessed volume contains NaN"):
        dataset[1]
    np.save(tensors[2], np.zeros((16, 64, 64), dtype=np.float16))
    with pytest.raises(RRG3DError, match=r"phantom_00002\.ct\.npy: cached array has shape"):
        dataset[2]


def test_multiscale_preset_and_shape(phantoms, cache_root):
    assert preset_shape("multiscale_64") == (64, 128, 128) and preset_shape(load_preset("tiny")) == (32, 64, 64)
    live = build_dataset(phantoms, "multiscale_64", split="val", progress=False)
    cached = build_dataset(phantoms, "multiscale_64", split="val", cache_dir=cache_root, progress=False)
    assert live.shape == cached.shape == (64, 128, 128) and live.preset.name == "multiscale_64"
    assert cached.manifest == cache_root / "multiscale_64" / "manifest.jsonl"
    assert torch.equal(live[0]["volume"], cached[0]["volume"]) and live[0]["volume"].shape == (1, 64, 128, 128)


def test_collate_and_dataloader_with_workers(cache_root, phantoms):
    dataset = build_dataset(cache_root / "tiny" / "manifest.jsonl", "tiny", progress=False)
    batch = collate_reports([dataset[0], dataset[1], dataset[2]])
    assert batch["ids"] == dataset.ids[:3] and len(batch["reports"]) == 3
    assert batch["volumes"].shape == (3, 1, 32, 64, 64) and batch["labels"].shape == (3, 18)

    live = build_dataset(phantoms, "tiny", progress=False)
    assert isinstance(pickle.loads(pickle.dumps(live)), ReportDataset)
    loader = torch.utils.data.DataLoader(live, batch_size=2, num_workers=2, collate_fn=collate_reports)
    batches = list(loader)
    assert [b["volumes"].shape for b in batches] == [(2, 1, 32, 64, 64)] * 3
    assert [i for b in batches for i in b["ids"]] == live.ids
    assert torch.equal(batches[0]["volumes"][1], dataset[1]["volume"])
    with pytest.raises(ValueError):
        collate_reports([])


def test_report_field_selects_a_section(phantoms):
    from rrg3d.train.data import ReportDataset

    whole = ReportDataset(phantoms, "tiny")
    impression = ReportDataset(phantoms, "tiny", report_field="impression")
    assert len(whole) == len(impression)
    item_whole, item_impression = whole[0], impression[0]
    assert item_impression["report"] and item_impression["report"] in item_whole["report"]
    with pytest.raises(ValueError, match="report_field"):
        ReportDataset(phantoms, "tiny", report_field="summary")


def test_blank_images_control_keeps_reports_and_zeroes_volumes(phantoms):
    from rrg3d.train.data import ReportDataset

    blank = ReportDataset(phantoms, "tiny", blank_images=True)
    real = ReportDataset(phantoms, "tiny")
    assert torch.count_nonzero(blank[0]["volume"]) == 0 and torch.count_nonzero(real[0]["volume"]) > 0
    assert blank[0]["report"] == real[0]["report"] and blank[0]["volume"].shape == real[0]["volume"].shape


def test_constant_baselines_majority_and_best(tmp_path):
    from rrg3d.data.manifest import write_manifest
    from rrg3d.train.data import best_constant_text, majority_text

    def record(i: int, labels: dict[str, int], split: str = "train") -> dict:
        return {"id": f"s{i}", "split": split, "images": {"ct": "x.nii.gz"}, "report": f"report {i}",
                "labels": labels}

    nodule, effusion = {"Lung nodule": 1}, {"Pleural effusion": 1}
    both = {"Lung nodule": 1, "Pleural effusion": 1}
    records = [record(0, {}), record(1, {}), record(2, {}), record(3, nodule), record(4, both), record(5, both),
               record(6, effusion), record(7, nodule, split="test")]
    manifest = write_manifest(records, tmp_path / "m.jsonl")
    assert majority_text(manifest) == "report 0"  # the normal study: most frequent, and it names nothing
    # saying "nodule and effusion" of all 7: 6 hits of 14 calls, 6 findings -> F1 0.6; "nodule" alone 3/7 -> 0.46
    assert best_constant_text(manifest) == "report 4"
    with pytest.raises(ValueError, match="no 'val' study"):
        best_constant_text(manifest, split="val")
