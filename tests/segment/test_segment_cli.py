"""`rrg3d segment`: label maps and masks.jsonl, failures recorded, reruns skip finished scans, no identifiers."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from rrg3d.cli import COMMANDS, main
from rrg3d.io import read_volume
from rrg3d.segment import REGIONS


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_segment_two_scans_one_corrupt_then_resume(tmp_path, phantoms, capsys):
    assert COMMANDS["segment"] == "segment"
    good = tmp_path / "in" / "scan one.nii.gz"
    good.parent.mkdir()
    shutil.copy(phantoms / "vols" / "phantom_00000.nii.gz", good)
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    out = tmp_path / "masks"
    code = main(["segment", str(good), str(bad), "--out", str(out), "--no-progress"])
    assert code == 0  # the batch ran; the failure is recorded
    captured = capsys.readouterr()
    assert "1/2 scans segmented" in captured.out and "masks.jsonl" in captured.err
    records = _lines(out / "masks.jsonl")
    assert [r["image"] for r in records] == [str(good), str(bad)]
    ok, failed = records
    assert set(failed) == {"image", "error"} and "broken.nii.gz" in failed["error"]
    assert ok["backend"] == "rules" and ok["seconds"] > 0
    assert ok["masks"]["path"].endswith(".nii.gz") and "/" not in ok["masks"]["path"]
    assert ok["masks"]["path"].startswith("scan_one")
    assert set(ok["masks"]["labels"].values()) | set(ok["empty"]) == set(REGIONS)
    assert all(REGIONS[int(k) - 1] == v for k, v in ok["masks"]["labels"].items())
    label_map = read_volume(out / ok["masks"]["path"])
    scan = read_volume(good)
    assert label_map.shape == scan.shape and np.allclose(label_map.affine, scan.affine, atol=1e-4)
    assert set(np.unique(label_map.array).tolist()) == {0} | {int(k) for k in ok["masks"]["labels"]}
    written = (out / ok["masks"]["path"]).stat().st_mtime_ns
    # rerun: the finished scan is skipped, the broken one is tried again, still one line per scan
    code = main(["segment", str(good), str(bad), "--out", str(out), "--no-progress", "--strict"])
    assert code == 1
    assert "0 now, 1 already done" in capsys.readouterr().out
    assert (out / ok["masks"]["path"]).stat().st_mtime_ns == written
    assert [r["image"] for r in _lines(out / "masks.jsonl")] == [str(good), str(bad)]
    # once the broken scan is dropped, the batch succeeds without redoing anything
    assert main(["segment", str(good), "--out", str(out), "--no-progress", "--workers", "2"]) == 0
    assert "0 now, 1 already done" in capsys.readouterr().out


def test_segment_parallel_and_name_clashes(tmp_path, phantoms, capsys):
    scans = []
    for folder in ("a", "b"):
        path = tmp_path / folder / "ct.nii.gz"
        path.parent.mkdir()
        shutil.copy(phantoms / "vols" / "phantom_00001.nii.gz", path)
        scans.append(str(path))
    out = tmp_path / "masks"
    assert main(["segment", *scans, "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    records = _lines(out / "masks.jsonl")
    assert [r["image"] for r in records] == scans
    names = [r["masks"]["path"] for r in records]
    assert len(set(names)) == 2 and all(name.startswith("ct-") for name in names)
    first, second = (read_volume(out / name).array for name in names)
    assert np.array_equal(first, second)


def test_unknown_backend_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.nii.gz", "--out", str(tmp_path), "--backend", "nnunet"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_dicom_series_without_identifiers(tmp_path, shared_data, capsys, caplog, assert_no_phi):
    caplog.set_level(logging.DEBUG)
    planted = shared_data / "ct" / "phi_planted_dicom"
    broken = tmp_path / "broken_series"
    shutil.copytree(planted, broken)
    first = sorted(broken.iterdir())[0]
    first.write_bytes(first.read_bytes()[:600])  # a truncated header
    out = tmp_path / "masks"
    main(["segment", str(planted), str(broken), "--out", str(out), "--no-progress"])
    records = _lines(out / "masks.jsonl")
    assert "masks" in records[0] and records[0]["masks"]["path"] == "phi_planted_dicom.nii.gz"
    import nibabel as nib

    header = nib.load(str(out / "phi_planted_dicom.nii.gz")).header
    captured = capsys.readouterr()
    text = "\n".join([captured.out, captured.err, caplog.text, (out / "masks.jsonl").read_text(),
                      bytes(header.structarr.tobytes()).decode("latin-1")])
    assert_no_phi(text)
