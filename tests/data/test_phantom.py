"""Phantom generator: determinism, geometry, region truth that matches the image, CLI contract."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from rrg3d.cli import main
from rrg3d.data.manifest import load_manifest, resolve, validate_manifest
from rrg3d.data.phantom import REGIONS, PhantomConfig, generate_phantoms, render_case, sample_case
from rrg3d.data.phantom.render import REGION_ID
from rrg3d.data.phantom.sampling import PREVALENCE, describe_finding
from rrg3d.errors import RRG3DError
from rrg3d.io import read_volume
from rrg3d.text.labels import CTRATE_LABELS

SMALL = (32, 64, 64)


def _digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "summary.json"}


def test_same_seed_same_dataset_whatever_the_workers(tmp_path):
    config = PhantomConfig(n=4, seed=7, shape=SMALL, pet=True)
    generate_phantoms(config, tmp_path / "a", workers=1, progress=False)
    generate_phantoms(config, tmp_path / "b", workers=2, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = PhantomConfig(n=4, seed=8, shape=SMALL, pet=True)
    generate_phantoms(other, tmp_path / "c", progress=False)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_manifest_contract_and_files(tmp_path):
    manifest = generate_phantoms(PhantomConfig(n=6, seed=1, shape=SMALL, pet=True, styles=2), tmp_path,
                                 progress=False)
    records = load_manifest(manifest)
    assert [r["id"] for r in records] == [f"phantom_{i:05d}" for i in range(6)]
    assert validate_manifest(manifest)[1] == []
    for record in records:
        assert list(record["labels"]) == list(CTRATE_LABELS)
        assert set(record["region_reports"]) == set(REGIONS)
        assert record["style"] in ("hospital_a", "hospital_b")
        assert record["masks"]["labels"] == {str(i + 1): name for i, name in enumerate(REGIONS)}
        assert record["report"].strip() and set(record["sections"]) >= {"findings", "impression"}
        ct = read_volume(resolve(manifest, record["images"]["ct"]))
        pet = read_volume(resolve(manifest, record["images"]["pet"]))
        seg = read_volume(resolve(manifest, record["masks"]["path"]))
        assert ct.shape == pet.shape == seg.shape == SMALL
        np.testing.assert_allclose(ct.affine, seg.affine)
        np.testing.assert_allclose(ct.affine, pet.affine)
        assert ct.array.dtype == np.int16 and ct.orientation == "SPL"
        present = {int(v) for v in np.unique(seg.array)} - {0}
        assert present <= set(range(1, 11))
        for name in ("lung", "heart", "mediastinum", "bone", "abdomen", "pleura", "trachea and bronchi"):
            assert REGION_ID[name] in present, name
        # plausible HU: air outside, lungs dark, heart soft tissue
        hu = ct.array.astype(np.float32)
        assert np.median(hu[seg.array == REGION_ID["heart"]]) == pytest.approx(40, abs=60)
        assert np.median(hu[seg.array == REGION_ID["lung"]]) < -600
        assert hu[0, 0, 0] < -900
        findings = record["meta"]["findings"]
        assert {f["label"] for f in findings} == {k for k, v in record["labels"].items() if v}
        for region, labels in record["meta"]["region_truth"].items():
            assert all(REGIONS.index(region) >= 0 and label in CTRATE_LABELS for label in labels)
        assert float(pet.array.max()) > 1.0  # physiological uptake (myocardium, liver)


def test_resume_skips_written_cases_and_refuses_other_configs(tmp_path):
    config = PhantomConfig(n=3, seed=2, shape=SMALL)
    generate_phantoms(config, tmp_path, progress=False)
    stamp = (tmp_path / "vols" / "phantom_00001.nii.gz").stat().st_mtime_ns
    generate_phantoms(PhantomConfig(n=5, seed=2, shape=SMALL), tmp_path, progress=False)  # extends
    assert (tmp_path / "vols" / "phantom_00001.nii.gz").stat().st_mtime_ns == stamp
    assert len(load_manifest(tmp_path / "manifest.jsonl")) == 5
    assert json.loads((tmp_path / "summary.json").read_text())["written"] == 2
    with pytest.raises(RRG3DError, match="another configuration"):
        generate_phantoms(PhantomConfig(n=3, seed=3, shape=SMALL), tmp_path, progress=False)


def test_one_named_style_changes_only_the_reports(tmp_path):
    from rrg3d.data.phantom.generator import make_case

    drawn, fixed = PhantomConfig(n=6, styles=3), PhantomConfig(n=6, styles=3, style="hospital_b")
    for index in range(6):
        a, b = make_case(drawn, index), make_case(fixed, index)
        assert b.style == "hospital_b"
        assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings] and a.anatomy == b.anatomy
    generate_phantoms(PhantomConfig(n=2, seed=2, shape=SMALL, style="hospital_b"), tmp_path, progress=False)
    assert all(r["style"] == "hospital_b" and "AIRWAYS:" in r["report"]
               for r in load_manifest(tmp_path / "manifest.jsonl"))
    assert json.loads((tmp_path / "phantom.json").read_text())["style"] == "hospital_b"
    with pytest.raises(RRG3DError, match="another configuration"):
        generate_phantoms(PhantomConfig(n=2, seed=2, shape=SMALL), tmp_path, progress=False)
    assert "style" not in PhantomConfig().to_dict()  # datasets written before the option still resume
    with pytest.raises(RRG3DError, match="unknown --style"):
        PhantomConfig(style="hospital_z")


@pytest.mark.parametrize("label", [name for name in CTRATE_LABELS if name != "Cardiomegaly"])
def test_each_finding_is_drawn_inside_its_region(label):
    """Render one case with and without the finding: what changes lies in the finding's region."""
    case = sample_case("x", 0, np.random.default_rng(3))
    case.findings = []
    base = render_case(case, (48, 96, 96), np.random.default_rng(11))
    finding = describe_finding(label, np.random.default_rng(5), False, case.anatomy.heart_scale)
    case.findings = [finding]
    drawn = render_case(case, (48, 96, 96), np.random.default_rng(11))
    changed = np.abs(drawn.ct.astype(np.float32) - base.ct) > 60
    assert changed.sum() >= 10, f"{label} is not visible"
    region = ndimage.binary_dilation(drawn.regions == REGION_ID[finding.region], iterations=1)
    assert (region[changed]).mean() > 0.75, f"{label} drawn outside {finding.region}"


def test_cardiomegaly_enlarges_the_heart():
    case = sample_case("x", 0, np.random.default_rng(4))
    case.findings = []
    case.anatomy.heart_scale = 1.0
    normal = (render_case(case, SMALL, np.random.default_rng(1)).regions == REGION_ID["heart"]).sum()
    case.anatomy.heart_scale = 1.35
    big = (render_case(case, SMALL, np.random.default_rng(1)).regions == REGION_ID["heart"]).sum()
    assert big > 1.8 * normal


def test_label_prevalence_and_co_occurrence_follow_ct_rate():
    labels = np.array([[c.labels[name] for name in CTRATE_LABELS]
                       for c in (sample_case(f"c{i}", 0, np.random.default_rng([0, i])) for i in range(1500))])
    for k, name in enumerate(CTRATE_LABELS):
        assert labels[:, k].mean() == pytest.approx(PREVALENCE[name], abs=0.05), name
    corr = np.corrcoef(labels.T)
    a, c = CTRATE_LABELS.index("Arterial wall calcification"), CTRATE_LABELS.index("Coronary artery wall calcification")
    e, p = CTRATE_LABELS.index("Emphysema"), CTRATE_LABELS.index("Pleural effusion")
    assert corr[a, c] > 0.25 and corr[a, c] > corr[e, p] + 0.15


def test_cli_contract(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", "--n", "2", "--out", str(out), "--seed", "3", "--shape", "32", "48", "48", "--pet",
                 "--styles", "3", "--preview", "--no-progress", "--workers", "1"]) == 0
    assert (out / "manifest.jsonl").exists() and (out / "preview.png").stat().st_size > 10_000
    assert "wrote 2 phantom cases" in capsys.readouterr().out
    assert main(["phantom", "--n", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["phantom", "--n", "2", "--out", str(tmp_path / "y"), "--shape", "8", "8", "8"]) == 2
