"""Manifest schema: clear errors with line numbers and fields; file checks through the readers."""

from __future__ import annotations

import json

import pytest

from rrg3d.data.manifest import check_manifest, load_manifest, validate_manifest, write_manifest
from rrg3d.errors import ManifestError
from rrg3d.io import write_volume


def _write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_full_design_record_is_valid(tmp_path, chest):
    write_volume(chest, tmp_path / "vols" / "a.nii.gz")
    write_volume(chest.replace(array=(chest.array > 0).astype("uint8")), tmp_path / "seg" / "a.nii.gz")
    record = {
        "id": "ctrate_train_1_a_1", "split": "train",
        "images": {"ct": "vols/a.nii.gz", "pet": None},
        "masks": {"path": "seg/a.nii.gz", "labels": {"1": "lung", "2": "heart"}},
        "report": "Findings: clear. Impression: normal.",
        "sections": {"findings": "clear.", "impression": "normal."},
        "region_reports": {"lung": "clear."},
        "labels": {"Cardiomegaly": 1, "Emphysema": 0},
        "style": "hospital_a", "meta": {"source": "CT-RATE"},
    }
    manifest = _write_lines(tmp_path / "m.jsonl", [record])
    records, problems = validate_manifest(manifest)
    assert problems == []
    assert records[0]["id"] == "ctrate_train_1_a_1"


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("{not json", None, "invalid JSON"),
        ([1, 2], None, "JSON object"),
        ({"images": {"ct": "a.nii.gz"}}, "id", "missing or empty 'id'"),
        ({"id": "a/b", "images": {"ct": "a.nii.gz"}}, "id", "path separators"),
        ({"id": "a"}, "images", "missing 'images'"),
        ({"id": "a", "images": {"ct": None, "pet": None}}, "images", "no image"),
        ({"id": "a", "images": {"ct": 3}}, "images.ct", "non-empty string"),
        ({"id": "a", "images": {"ct": "x.nii"}, "report": "   "}, "report", "empty report"),
        ({"id": "a", "images": {"ct": "x.nii"}, "labels": {"Cardiomegaly": 2}}, "labels.Cardiomegaly", "0 or 1"),
        ({"id": "a", "images": {"ct": "x.nii"}, "labels": {"Cardiomegaly": True}}, "labels.Cardiomegaly", "0 or 1"),
        ({"id": "a", "images": {"ct": "x.nii"}, "masks": {"path": "m.nii", "labels": {"one": "lung"}}},
         "masks.labels.one", "integers"),
        ({"id": "a", "images": {"ct": "x.nii"}, "sections": "text"}, "sections", "map names"),
    ],
)
def test_schema_errors_name_line_and_field(tmp_path, line, field, message):
    ok = {"id": "ok", "images": {"ct": "x.nii.gz"}}
    manifest = _write_lines(tmp_path / "m.jsonl", [ok, line])
    _, problems = check_manifest(manifest)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1
    assert errors[0].line == 2
    assert errors[0].field == field
    assert message in errors[0].message
    assert str(errors[0]).startswith(f"{manifest}:2")
    with pytest.raises(ManifestError, match=message):
        load_manifest(manifest)


def test_duplicates_blank_lines_and_warnings(tmp_path):
    manifest = _write_lines(tmp_path / "m.jsonl", [
        {"id": "a", "images": {"ct": "x.nii.gz"}, "split": "holdout", "extra": 1},
        "",
        {"id": "a", "images": {"ct": "y.nii.gz"}},
    ])
    records, problems = check_manifest(manifest)
    assert [r["id"] for r in records] == ["a"]
    assert [(p.line, p.severity) for p in problems] == [(1, "warning"), (1, "warning"), (3, "error")]
    assert "duplicate id 'a' (first on line 1)" in str(problems[-1])


def test_empty_missing_and_binary_manifests(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "manifest is empty" in str(check_manifest(empty)[1][0])
    with pytest.raises(ManifestError, match="manifest not found"):
        check_manifest(tmp_path / "nope.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError, match="UTF-8"):
        check_manifest(binary)


def test_validate_opens_files_and_reports_bad_ones(tmp_path, chest):
    write_volume(chest, tmp_path / "good.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    manifest = _write_lines(tmp_path / "m.jsonl", [
        {"id": "good", "images": {"ct": "good.nii.gz"}},
        {"id": "bad", "images": {"ct": "bad.nii.gz"}},
        {"id": "missing", "images": {"ct": "missing.nii.gz"}},
    ])
    _, problems = validate_manifest(manifest)
    assert [(p.line, p.field) for p in problems] == [(2, "images.ct"), (3, "images.ct")]
    assert "bad.nii.gz" in str(problems[0]) and "file not found" in str(problems[1])
    assert validate_manifest(manifest, check_files=False)[1] == []


def test_write_manifest_refuses_invalid_records(tmp_path):
    with pytest.raises(ManifestError, match="refusing to write invalid record"):
        write_manifest([{"id": "a", "images": {}}], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
    path = write_manifest([{"id": "a", "images": {"ct": "x.nii"}, "_line": 3}], tmp_path / "m.jsonl")
    assert json.loads(path.read_text()) == {"id": "a", "images": {"ct": "x.nii"}}
