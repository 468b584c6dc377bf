"""The demo runs end to end; no planted identifier reaches any output, log or error of the pipeline."""

from __future__ import annotations

import json
import logging
import shutil

from rrg3d.cli import main
from rrg3d.data.manifest import write_manifest


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    monkeypatch.setenv("RRG3D_MODEL", str(tmp_path / "default_model"))
    assert main(["demo", "--out", str(out), "--presets", "m3d", "--workers", "1", "--no-shared",
                 "--phantoms", "10", "--clip-steps", "1", "--align-steps", "1", "--sft-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "studies ready" in printed and "recorded failure: bad_truncated" in printed
    assert "CE micro-F1" in printed and "majority-class report" in printed and "best constant report" in printed
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    test_ids = [json.loads(line)["id"] for line in (out / "test_references.jsonl").read_text().splitlines()]
    assert metrics["counts"]["references"] == metrics["counts"]["scored"] == len(test_ids) >= 1
    assert (out / "evaluation" / "report.html").exists() and (out / "runs" / "sft" / "final" / "rrg3d.yaml").exists()
    records = [json.loads(line) for line in (out / "cache_m3d" / "manifest.jsonl").read_text().splitlines()]
    assert {r["id"] for r in records} >= {"synth_nifti", "synth_nifti_flipped", "synth_dicom", "synth_nrrd"}
    assert (out / "preview.png").stat().st_size > 10_000

    # the trained checkpoint is now the default model of `rrg3d generate`
    assert (tmp_path / "default_model" / "rrg3d.yaml").exists()
    predictions = tmp_path / "pred.jsonl"
    assert main(["generate", str(out / "scans" / "synth_nifti.nii.gz"), "--out", str(predictions),
                 "--max-new-tokens", "4", "--quiet"]) == 0
    assert json.loads(predictions.read_text())["meta"]["checkpoint"] == str(tmp_path / "default_model")


def _all_text(folder) -> str:
    chunks = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log"):
            chunks.append(path.read_text(errors="replace"))
    return "\n".join(chunks)


def test_planted_identifiers_never_leave_the_pipeline(tmp_path, shared_data, capsys, caplog, assert_no_phi):
    caplog.set_level(logging.DEBUG)
    planted = shared_data / "ct" / "phi_planted_dicom"
    broken = tmp_path / "broken_series"
    shutil.copytree(planted, broken)
    files = sorted(broken.iterdir())
    files[3].write_bytes(files[3].read_bytes()[:-20000])  # truncated pixel data
    files[5].write_bytes(files[5].read_bytes()[:600])  # truncated header
    manifest = write_manifest([
        {"id": "planted", "images": {"ct": str(planted)}, "report": "Findings: normal."},
        {"id": "broken", "images": {"ct": str(broken)}, "report": "Findings: normal."},
    ], tmp_path / "m.jsonl")
    out = tmp_path / "cache"
    main(["validate", str(manifest)])
    main(["info", str(planted), "--json"])
    main(["info", str(broken)])
    assert main(["preprocess", str(manifest), "--preset", "m3d", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    text = "\n".join([captured.out, captured.err, caplog.text, _all_text(out)])
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["broken"]  # the corrupt copy failed with a message ...
    assert "slice_00" in errors[0]["error"]  # ... naming the bad file
    assert (out / "manifest.jsonl").read_text().count('"planted"') == 1
    assert_no_phi(text)
