"""`preprocess_manifest`: cache layout, resume, failure recording, parallel workers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rrg3d.data.manifest import load_manifest, validate_manifest, write_manifest
from rrg3d.errors import RRG3DError
from rrg3d.io import write_volume
from rrg3d.preprocess import load_preset
from rrg3d.preprocess.batch import preprocess_manifest, safe_name


@pytest.fixture()
def study_set(tmp_path, chest):
    from rrg3d.data.synthetic import synthetic_chest

    records = []
    for i in range(3):
        volume = synthetic_chest(shape=(24, 40, 40), spacing=(3.0, 4.0, 4.0), seed=i)
        write_volume(volume, tmp_path / "in" / f"s{i}.nii.gz")
        mask = volume.replace(array=(volume.array < -500).astype(np.uint8), modality="SEG")
        write_volume(mask, tmp_path / "in" / f"s{i}_mask.nii.gz")
        records.append({"id": f"study {i}", "split": "train", "images": {"ct": f"s{i}.nii.gz"},
                        "masks": {"path": f"s{i}_mask.nii.gz", "labels": {"1": "lung"}},
                        "report": f"Findings: case {i}."})
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08truncated")
    records.append({"id": "broken", "images": {"ct": "broken.nii.gz"}, "report": "x"})
    manifest = write_manifest(records, tmp_path / "in" / "manifest.jsonl")
    with open(manifest, "a") as handle:
        handle.write('{"id": "no image"}\n')
    return manifest


def test_batch_writes_cache_records_failures_and_resumes(tmp_path, study_set):
    out = tmp_path / "cache"
    summary = preprocess_manifest(study_set, "m3d", out, workers=1, progress=False)
    assert (summary.total, summary.processed, summary.failed, summary.invalid_lines) == (4, 3, 1, 1)
    records = load_manifest(out / "manifest.jsonl")
    assert [r["id"] for r in records] == ["study 0", "study 1", "study 2"]
    preset = load_preset("m3d")
    for record in records:
        assert record["preprocess"]["sha256"] == preset.sha256
        tensor = np.load(out / record["images"]["ct"])
        assert tensor.shape == preset.shape and tensor.dtype == np.float16
        mask = np.load(out / record["masks"]["path"])
        assert mask.shape == preset.shape and set(np.unique(mask)) <= {0, 1}
        assert record["report"].startswith("Findings")
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == {"broken", None}
    broken = next(e for e in errors if e["id"] == "broken")
    assert broken["file"].endswith("broken.nii.gz") and "broken.nii.gz" in broken["error"]
    assert load_preset(out / "preset.yaml") == preset
    # the cache is itself a valid manifest whose files open with their recorded geometry
    assert [p for p in validate_manifest(out / "manifest.jsonl")[1] if p.severity == "error"] == []

    # resume: nothing redone, same outputs
    before = {p.name: p.stat().st_mtime_ns for p in (out / "tensors").iterdir()}
    again = preprocess_manifest(study_set, "m3d", out, workers=1, progress=False)
    assert (again.processed, again.skipped_done, again.failed) == (0, 3, 1)
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "tensors").iterdir()}

    # a lost tensor is rebuilt, the rest is not
    (out / "tensors" / f"{safe_name('study 1')}.ct.npy").unlink()
    third = preprocess_manifest(study_set, "m3d", out, workers=1, progress=False)
    assert (third.processed, third.skipped_done) == (1, 2)
    assert not list(out.rglob("*.tmp*")), "no temporary files may be left behind"


def test_cache_refuses_another_preset(tmp_path, study_set):
    out = tmp_path / "cache"
    preprocess_manifest(study_set, "m3d", out, progress=False)
    with pytest.raises(RRG3DError, match="made with preset 'm3d'"):
        preprocess_manifest(study_set, "reg2rg", out, progress=False)
    summary = preprocess_manifest(study_set, "reg2rg", out, overwrite=True, progress=False)
    assert summary.processed == 3


def test_parallel_workers_give_identical_tensors(tmp_path, study_set):
    serial = preprocess_manifest(study_set, "m3d", tmp_path / "a", workers=1, progress=False)
    parallel = preprocess_manifest(study_set, "m3d", tmp_path / "b", workers=2, progress=False)
    assert serial.processed == parallel.processed == 3
    for name in sorted(p.name for p in (tmp_path / "a" / "tensors").iterdir()):
        np.testing.assert_array_equal(np.load(tmp_path / "a" / "tensors" / name),
                                      np.load(tmp_path / "b" / "tensors" / name))


def test_changed_report_invalidates_receipt(tmp_path, study_set):
    out = tmp_path / "cache"
    preprocess_manifest(study_set, "m3d", out, progress=False)
    lines = study_set.read_text().splitlines()
    first = json.loads(lines[0])
    first["report"] = "Findings: corrected."
    lines[0] = json.dumps(first)
    study_set.write_text("\n".join(lines) + "\n")
    summary = preprocess_manifest(study_set, "m3d", out, progress=False)
    assert (summary.processed, summary.skipped_done) == (1, 2)
    assert load_manifest(out / "manifest.jsonl")[0]["report"] == "Findings: corrected."


def test_safe_name_is_stable_and_distinct():
    assert safe_name("train_1_a_1") == "train_1_a_1"
    assert safe_name("a b") != safe_name("a_b")
    assert "/" not in safe_name("../../etc/passwd")


def test_header_overrides_fix_spacing_and_rescale(tmp_path, chest):
    """A scan with a wrong header (CT-RATE's first release) is corrected from the record's metadata."""
    from rrg3d.io import Volume

    stored = (chest.array.astype(np.int32) + 1024).astype(np.int16)  # raw values, intercept -1024 not applied
    wrong = Volume.from_spacing(stored, (1.0, 1.0, 1.0))  # and a header that says 1 mm
    write_volume(wrong, tmp_path / "raw.nii.gz")
    overrides = {"spacing_mm": [2.5, 2.8, 2.8], "rescale": {"slope": 1, "intercept": -1024}}
    manifest = write_manifest([
        {"id": "fixed", "images": {"ct": "raw.nii.gz"}, "meta": {"header_overrides": overrides}},
        {"id": "reference", "images": {"ct": "ref.nii.gz"}},
    ], tmp_path / "m.jsonl")
    write_volume(chest, tmp_path / "ref.nii.gz")
    out = tmp_path / "cache"
    assert preprocess_manifest(manifest, "merlin", out, progress=False).processed == 2
    a, b = (np.load(out / "tensors" / f"{name}.ct.npy").astype(np.float32) for name in ("fixed", "reference"))
    assert np.abs(a - b).max() < 1e-3  # identical once corrected (origins differ only by the header's)


def test_malformed_header_overrides_are_schema_errors(tmp_path):
    from rrg3d.data.manifest import check_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "images": {"ct": "x.nii"},
                                    "meta": {"header_overrides": {"spacing_mm": [0, 1, 1], "slope": 2}}}) + "\n")
    fields = sorted(p.field for p in check_manifest(manifest)[1] if p.severity == "error")
    assert fields == ["meta.header_overrides", "meta.header_overrides.spacing_mm"]


def test_pet_already_in_suv_is_cached_with_a_ct_preset(tmp_path):
    """Phantom and AutoPET manifests record meta.pet_units: SUVbw; their PET needs no DICOM SUV factor."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.preprocess.batch import preprocess_manifest

    manifest = generate_phantoms(PhantomConfig(n=2, seed=0, shape=(32, 64, 64), pet=True, styles=1),
                                 tmp_path / "phantoms", workers=1, progress=False)
    summary = preprocess_manifest(manifest, "tiny", tmp_path / "cache", progress=False)
    assert summary.failed == 0 and summary.succeeded == 2
