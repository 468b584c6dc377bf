"""The command-line contract: `rrg3d validate`, `rrg3d preprocess`, `rrg3d presets`, `rrg3d info`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from rrg3d.cli import COMMANDS, main
from rrg3d.data.manifest import write_manifest
from rrg3d.io import write_volume


def _manifest(tmp_path, chest, bad: bool = False):
    write_volume(chest, tmp_path / "a.nii.gz")
    records = [{"id": "a", "images": {"ct": "a.nii.gz"}, "report": "Findings: clear."}]
    if bad:
        (tmp_path / "b.nii.gz").write_bytes(b"not a nifti")
        records.append({"id": "b", "images": {"ct": "b.nii.gz"}})
    return write_manifest(records, tmp_path / "manifest.jsonl")


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "rrg3d.cli", "--help"], capture_output=True, text=True,
                            check=True)
    for name in COMMANDS:
        assert name in result.stdout


def test_validate_exit_codes(tmp_path, chest, capsys):
    good = _manifest(tmp_path, chest)
    assert main(["validate", str(good)]) == 0
    bad = _manifest(tmp_path, chest, bad=True)
    with open(bad, "a") as handle:
        handle.write('{"id": "c", "images": {}}\n')
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{bad}:2 [images.ct]") and "b.nii.gz" in lines[0]
    assert lines[1].startswith(f"{bad}:3 [images]")


def test_preprocess_contract(tmp_path, chest, capsys):
    manifest = _manifest(tmp_path, chest, bad=True)
    out = tmp_path / "cache"
    code = main(["preprocess", str(manifest), "--preset", "reg2rg", "--out", str(out), "--workers", "2",
                 "--no-progress"])
    assert code == 0, "the batch ran: failures are recorded, not an exit code"
    assert "1/2 studies ready" in capsys.readouterr().out
    assert main(["preprocess", str(manifest), "--preset", "reg2rg", "--out", str(out), "--no-progress",
                 "--strict"]) == 1
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["preprocess"]["preset"] == "reg2rg"
    assert np.load(out / record["images"]["ct"]).shape == (64, 256, 256)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], sorted(e)) for e in errors] == [("b", ["error", "file", "id"])]


def test_preprocess_nothing_could_run(tmp_path, capsys):
    (tmp_path / "b.nii.gz").write_bytes(b"junk")
    manifest = write_manifest([{"id": "b", "images": {"ct": "b.nii.gz"}}], tmp_path / "m.jsonl")
    assert main(["preprocess", str(manifest), "--preset", "m3d", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["preprocess", str(tmp_path / "missing.jsonl"), "--preset", "m3d", "--out", str(tmp_path / "o2")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(["preprocess", str(manifest), "--preset", "nope", "--out", str(tmp_path / "o3")]) == 2


def test_presets_and_info(tmp_path, chest, capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "ctrate" in listing and "multiscale_256" in listing
    assert main(["presets", "ctrate"]) == 0
    assert "window:" in capsys.readouterr().out
    path = write_volume(chest, tmp_path / "a.nrrd")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [40, 64, 64] and info["orientation"] == "SPL"
