"""`rrg3d model` and `rrg3d generate`: a tiny untrained checkpoint runs end to end on real scans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rrg3d.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["model", "init", "tiny_ctvit_v", "--out", str(path)]) == 0
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_model_list_show_and_info(checkpoint, capsys):
    assert main(["model", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("ctvit_v", "tiny_ctvit_v", "vit3d", "resnet3d", "ctvit"):
        assert name in listed
    assert "perceiver" in listed and "mlp2x_gelu" in listed
    assert main(["model", "show", "ctvit_v"]) == 0
    assert "patch_size" in capsys.readouterr().out
    assert main(["model", "info", str(checkpoint)]) == 0
    info = capsys.readouterr().out
    assert "weights: adapter" in info and "preset: tiny" in info


def test_generate_on_nifti_dicom_manifest_and_a_broken_file(checkpoint, shared_data, tmp_path, capsys,
                                                            assert_no_phi):
    nifti = shared_data / "ct" / "totalseg_example" / "example_ct_sm.nii.gz"
    dicom = shared_data / "ct" / "phi_planted_dicom"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    manifest = tmp_path / "studies.jsonl"
    manifest.write_text(json.dumps({"id": "from_manifest", "images": {"ct": str(nifti)}}) + "\n")
    out = tmp_path / "pred.jsonl"
    code = main(["generate", str(nifti), str(broken), str(dicom), str(manifest), "--model", str(checkpoint),
                 "--out", str(out), "--batch-size", "2", "--max-new-tokens", "6"])
    assert code == 0, "some scans failed: the batch ran (exit 0), the rest still reported"
    records = {r["id"]: r for r in _records(out)}
    assert set(records) == {"example_ct_sm", "broken", "phi_planted_dicom", "from_manifest"}
    assert records["broken"]["error"] and "broken.nii.gz" in records["broken"]["error"]
    for key in ("example_ct_sm", "phi_planted_dicom", "from_manifest"):
        assert isinstance(records[key]["report"], str) and "error" not in records[key]
        assert records[key]["meta"]["preset"]["name"] == "tiny"
    assert records["example_ct_sm"]["report"] == records["from_manifest"]["report"], "same scan, same greedy report"
    captured = capsys.readouterr()
    assert "== example_ct_sm" in captured.out
    assert_no_phi(out.read_text() + captured.out + captured.err)

    # resume: finished scans are skipped, the failed one is tried again
    code = main(["generate", str(nifti), str(broken), "--model", str(checkpoint), "--out", str(out),
                 "--max-new-tokens", "6", "--quiet", "--strict"])
    assert code == 1, "--strict: a recorded failure gives 1"
    assert "1 already done" in capsys.readouterr().err
    assert [r["id"] for r in _records(out)].count("example_ct_sm") == 1


def test_generate_uses_a_cache_only_when_made_with_the_models_preset(checkpoint, tmp_path, chest):
    from rrg3d.data.manifest import write_manifest
    from rrg3d.io import write_volume
    from rrg3d.preprocess.batch import preprocess_manifest

    scan = write_volume(chest, tmp_path / "chest.nii.gz")
    source = write_manifest([{"id": "c1", "images": {"ct": str(scan)}}], tmp_path / "src.jsonl")
    preprocess_manifest(source, "tiny", tmp_path / "cache_tiny", progress=False)
    preprocess_manifest(source, "m3d", tmp_path / "cache_m3d", progress=False)
    out = tmp_path / "pred.jsonl"
    main(["generate", str(source), str(tmp_path / "cache_tiny" / "manifest.jsonl"),
          str(tmp_path / "cache_m3d" / "manifest.jsonl"), "--model", str(checkpoint), "--out", str(out),
          "--max-new-tokens", "6", "--quiet"])
    records = _records(out)
    assert [r["id"] for r in records] == ["c1", "c1#2", "c1#3"]
    assert "error" not in records[0] and "error" not in records[1]
    assert records[0]["report"] == records[1]["report"]
    assert "another preset" in records[2]["error"]


def test_generate_without_a_default_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RRG3D_MODEL", str(tmp_path / "nothing"))
    scan = tmp_path / "x.npy"
    np.save(scan, np.zeros((4, 4, 4), dtype=np.float32))
    assert main(["generate", str(scan), "--out", str(tmp_path / "p.jsonl")]) != 0
    assert "--model" in capsys.readouterr().err
