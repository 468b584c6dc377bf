"""AutoPET-RG-Lym adapter on a tiny fixture: autoPET FDG NIfTI folders and a report file with Chinese reports."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rrg3d.cli import main
from rrg3d.data.adapters import get_adapter
from rrg3d.data.adapters.autopet_rg import normalize_sex, seeded_split, split_sections
from rrg3d.data.manifest import check_manifest, load_manifest, resolve, validate_manifest
from rrg3d.errors import RRG3DError

SHAPE = (5, 6, 4)
STUDY_A1 = "01-01-2001-NA-PET-CT Ganzkoerper  primaer mit KM-111"
STUDY_A2 = "06-06-2002-NA-PET-CT Ganzkoerper  primaer mit KM-222"
STUDY_B = "03-03-2003-NA-PET-CT Ganzkoerper-333"
STUDY_C = "04-04-2004-NA-PET-CT Ganzkoerper-444"
STUDY_D = "05-05-2005-NA-PET-CT Ganzkoerper-555"
STUDY_E = "07-07-2007-NA-PET-CT Ganzkoerper-777"

FINDINGS_A1 = "双侧颈部及纵隔见多发肿大淋巴结，FDG摄取增高，SUVmax 12.3。"
IMPRESSION_A1 = "多发淋巴结FDG高代谢，考虑淋巴瘤。"


def write_volume(path: Path, rng: np.random.Generator, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (rng.random(SHAPE) > 0.8).astype(np.uint8) if mask else rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))


def write_study(images: Path, patient: str, study: str, files: tuple[str, ...], rng: np.random.Generator) -> Path:
    folder = images / patient / study
    for name in files:
        write_volume(folder / f"{name}.nii.gz", rng, mask=name == "SEG")
    return folder


@pytest.fixture
def rg_root(tmp_path: Path) -> Path:
    """Reports at the root, the autoPET FDG NIfTI release below it (one patient with two studies)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "AutoPET-RG-Lym"
    images = root / "NIFTI" / "FDG-PET-CT-Lesions"
    write_study(images, "PETCT_aaa", STUDY_A1, ("CTres", "SUV", "SEG"), rng)
    write_study(images, "PETCT_aaa", STUDY_A2, ("CTres", "SUV", "SEG"), rng)
    write_study(images, "PETCT_bbb", STUDY_B, ("CTres", "SUV"), rng)  # no lesion mask
    write_study(images, "PETCT_ccc", STUDY_C, ("SUV", "SEG"), rng)  # no CTres
    write_study(images, "PETCT_ddd", STUDY_D, ("CTres", "SUV", "SEG"), rng)  # not a lymphoma study: no report
    write_study(images, "PETCT_eee", STUDY_E, ("CTres", "SUV", "SEG"), rng)
    records = [
        {"study_id": "PETCT_aaa", "study_date": "2001-01-01", "findings": FINDINGS_A1, "impression": IMPRESSION_A1,
         "hospital": "医院A", "sex": "男", "age": 61, "name": "张三", "accession": "ACC-998877"},
        {"id": f"PETCT_aaa/{STUDY_A2}", "report": "检查所见：\n纵隔淋巴结较前缩小。\n诊断意见：\n治疗后好转。",
         "hospital": "医院B", "Sex": "F"},
        {"id": "PETCT_bbb", "report": "全身PET/CT示多发淋巴结肿大。", "sex": "unknown", "split": "test"},
        {"id": "PETCT_ccc", "report": "脾脏增大。", "sex": "M"},
        {"id": "PETCT_zzz", "report": "无对应图像。"},
        {"id": "PETCT_eee", "report": "  ", "sex": "female"},
        {"patient": "PETCT_aaa", "report": "同一患者，未给检查日期。"},
        42,
    ]
    (root / "reports.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


def by_id(manifest: Path) -> dict[str, dict]:
    return {record["id"]: record for record in load_manifest(manifest)}


def test_converts_reports_sections_style_sex_and_images(rg_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "rg.jsonl"
    result = get_adapter("autopet-rg-lym").convert(rg_root, out)
    records = by_id(out)
    a1 = "autopet_rg_lym_PETCT_aaa_01-01-2001-NA-PET-CT_Ganzkoerper_primaer_mit_KM-111"
    a2 = "autopet_rg_lym_PETCT_aaa_06-06-2002-NA-PET-CT_Ganzkoerper_primaer_mit_KM-222"
    b = "autopet_rg_lym_PETCT_bbb_03-03-2003-NA-PET-CT_Ganzkoerper-333"
    assert list(records) == [a1, a2, b]

    first = records[a1]
    study = rg_root / "NIFTI" / "FDG-PET-CT-Lesions" / "PETCT_aaa" / STUDY_A1
    assert resolve(out, first["images"]["ct"]) == (study / "CTres.nii.gz").resolve()
    assert resolve(out, first["images"]["pet"]) == (study / "SUV.nii.gz").resolve()
    assert resolve(out, first["masks"]["path"]) == (study / "SEG.nii.gz").resolve()
    assert first["masks"]["labels"] == {"1": "lesion"}
    assert first["report"] == f"检查所见：{FINDINGS_A1} 诊断意见：{IMPRESSION_A1}"
    assert first["sections"] == {"findings": FINDINGS_A1, "impression": IMPRESSION_A1}
    assert first["style"] == "医院A" and first["sex"] == "male"
    assert first["meta"] == {"source": "AutoPET-RG-Lym", "language": "zh", "tracer": "FDG", "pet_units": "SUVbw",
                             "diagnosis": "LYMPHOMA"}
    assert first["split"] in ("train", "val", "test")

    second = records[a2]
    assert second["report"] == "检查所见： 纵隔淋巴结较前缩小。 诊断意见： 治疗后好转。"
    assert second["sections"] == {"findings": "纵隔淋巴结较前缩小。", "impression": "治疗后好转。"}
    assert second["style"] == "医院B" and second["sex"] == "female"
    assert second["split"] == first["split"]  # one patient, one split

    third = records[b]
    assert "sections" not in third and "masks" not in third and "style" not in third
    assert third["sex"] is None and third["split"] == "test"

    skipped = dict(result.skipped)
    assert "missing CTres.nii.gz" in skipped["autopet_rg_lym_PETCT_ccc_04-04-2004-NA-PET-CT_Ganzkoerper-444"]
    assert "no autoPET study folder matches 'PETCT_zzz'" in skipped["reports.json[4]"]
    assert skipped["autopet_rg_lym_PETCT_eee_07-07-2007-NA-PET-CT_Ganzkoerper-777"] == "empty report"
    assert "names 2 autoPET studies" in skipped["reports.json[6]"]
    assert "not an object" in skipped["reports.json[7]"]
    assert result.n_skipped == 5
    warnings = " | ".join(result.warnings)
    assert "1 stud(ies) have no lesion mask (SEG.nii.gz)" in warnings
    assert "unrecognised sex value(s) 'unknown'" in warnings
    assert "have no report (not part of AutoPET-RG-Lym)" in warnings
    assert "1 record(s) from the release, 2 seeded by patient" in warnings

    text = out.read_text(encoding="utf-8")
    for identifier in ("张三", "ACC-998877", '"age"', "61", "accession", "2001-01-01"):
        assert identifier not in text
    _, problems = validate_manifest(out, check_files=True)
    assert problems == []  # no error and no warning: sex is a known field
    assert main(["validate", str(out), "--strict"]) == 0


def test_command_line_conversion(rg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.jsonl"
    code = main(["convert", "autopet-rg-lym", str(rg_root), "--out", str(out), "--seed", "3",
                 "--split-ratios", "0", "1", "0", "--require-seg"])
    assert code == 0
    records = load_manifest(out)
    assert [r["split"] for r in records] == ["val", "val"]  # PETCT_bbb has no SEG.nii.gz
    assert "skipped" in capsys.readouterr().out


def test_dict_layouts_bracket_headers_and_images_elsewhere(rg_root: Path, tmp_path: Path) -> None:
    images = rg_root / "NIFTI"
    root = tmp_path / "release"
    root.mkdir()
    data = {
        "train": {
            "PETCT_aaa_2002-06-06": {"report": "【影像所见】纵隔淋巴结缩小【诊断意见】好转", "center": "B",
                                     "性别": "女"},
            "PETCT_eee": {"检查所见": "脾大。", "诊断意见": "淋巴瘤累及脾脏。", "gender": "Male"},
        },
        "test": [{"case": f"FDG-PET-CT-Lesions/PETCT_bbb/{STUDY_B}/SUV.nii.gz",
                  "text": "Findings: 多发淋巴结。 Impression: 淋巴瘤。", "report_en": "Lymphoma."}],
    }
    (root / "AutoPET-RG-Lym.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "dict.jsonl"
    result = get_adapter("autopet-rg-lym").convert(root, out, images_dir=str(images))
    records = by_id(out)
    assert len(records) == 3 and result.n_skipped == 0
    a2 = records["autopet_rg_lym_PETCT_aaa_06-06-2002-NA-PET-CT_Ganzkoerper_primaer_mit_KM-222"]
    assert a2["sections"] == {"findings": "纵隔淋巴结缩小", "impression": "好转"}
    assert a2["split"] == "train" and a2["style"] == "B" and a2["sex"] == "female"
    e = records["autopet_rg_lym_PETCT_eee_07-07-2007-NA-PET-CT_Ganzkoerper-777"]
    assert e["report"] == "检查所见：脾大。 诊断意见：淋巴瘤累及脾脏。" and e["sex"] == "male"
    b = records["autopet_rg_lym_PETCT_bbb_03-03-2003-NA-PET-CT_Ganzkoerper-333"]
    assert b["split"] == "test" and b["sections"] == {"findings": "多发淋巴结。", "impression": "淋巴瘤。"}
    assert "Lymphoma." not in out.read_text(encoding="utf-8")
    assert not any("seeded" in w for w in result.warnings)
    assert check_manifest(out)[1] == []


def test_json_lines_and_malformed_files_name_the_file(rg_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "lines"
    root.mkdir()
    lines = [json.dumps({"id": "PETCT_eee", "report": "诊断：淋巴瘤。", "hospital": "C"}, ensure_ascii=False), ""]
    (root / "reports.jsonl").write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "lines.jsonl"
    get_adapter("autopet-rg-lym").convert(root, out, images_dir=str(rg_root / "NIFTI"))
    (record,) = load_manifest(out)
    assert record["sections"] == {"impression": "淋巴瘤。"} and record["sex"] is None

    (root / "reports.jsonl").write_text(lines[0] + "\n{broken", encoding="utf-8")
    with pytest.raises(RRG3DError, match=r"reports\.jsonl:2: malformed JSON line"):
        get_adapter("autopet-rg-lym").convert(root, out, images_dir=str(rg_root / "NIFTI"))
    bad = rg_root / "reports.json"
    bad.write_text('[{"id": "PETCT_aaa", "report": "未闭合}', encoding="utf-8")
    with pytest.raises(RRG3DError) as info:
        get_adapter("autopet-rg-lym").convert(rg_root, out)
    assert str(bad) in str(info.value) and "malformed JSON" in str(info.value)
    bad.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(RRG3DError, match="expected a JSON list of report records"):
        get_adapter("autopet-rg-lym").convert(rg_root, out)
    bad.unlink()
    (rg_root / "a.json").write_text("[]")
    (rg_root / "b.json").write_text("[]")
    with pytest.raises(RRG3DError, match="pass --reports FILE"):
        get_adapter("autopet-rg-lym").convert(rg_root, out)
    with pytest.raises(RRG3DError, match="no usable AutoPET-RG-Lym study"):
        get_adapter("autopet-rg-lym").convert(rg_root, out, reports="a.json")


@pytest.mark.parametrize(("value", "expected"), [
    ("M", "male"), ("f", "female"), ("Male", "male"), ("FEMALE", "female"), ("男", "male"), ("女性", "female"),
    (" 女 ", "female"), (None, None), ("", None), ("unknown", None), (1, None), (True, None), ({"x": 1}, None),
])
def test_sex_values(value: object, expected: str | None) -> None:
    assert normalize_sex(value) == expected


def test_section_headers() -> None:
    assert split_sections("检查方法：常规。检查所见：肝脏未见异常。印象：未见异常。") == {
        "findings": "肝脏未见异常。", "impression": "未见异常。"}
    assert split_sections("影像表现\n双肺清晰\n结论\n正常") == {"findings": "双肺清晰", "impression": "正常"}
    assert split_sections("右肺结节，诊断意见不明确，建议随访。") == {}  # a header word inside a sentence
    assert split_sections("PET/CT检查所见：肝大。 诊断：淋巴瘤。") == {"findings": "肝大。", "impression": "淋巴瘤。"}
    assert split_sections("临床诊断：淋巴瘤。") == {}  # the clinical diagnosis is not the impression
    assert split_sections("") == {}


def test_seeded_split_is_by_patient_and_deterministic() -> None:
    patients = [f"PETCT_{i:03d}" for i in range(20)]
    first = seeded_split(patients, 0, (0.6, 0.2, 0.2))
    assert first == seeded_split(list(reversed(patients)), 0, (0.6, 0.2, 0.2))
    assert sorted(first.values()).count("test") == 4 and list(first.values()).count("val") == 4
    assert first != seeded_split(patients, 1, (0.6, 0.2, 0.2))
    with pytest.raises(RRG3DError, match="split-ratios"):
        seeded_split(patients, 0, (1.0, -1.0, 0.0))


def test_manifest_knows_the_sex_field() -> None:
    from rrg3d.data.manifest import check_record

    base = {"id": "a", "images": {"ct": "x.nii.gz"}}
    assert check_record({**base, "sex": "female"}) == [] and check_record({**base, "sex": None}) == []
    assert check_record({**base, "sex": "M"}) == [("sex", "unusual sex 'M' (expected \"female\", \"male\" or null)",
                                                   "warning")]


def test_challenge_layout_and_patient_grouping(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "challenge"
    for case in ("fdg_p1_0", "fdg_p1_1", "fdg_p2_0"):
        write_volume(root / "imagesTr" / f"{case}_0000.nii.gz", rng)
        write_volume(root / "imagesTr" / f"{case}_0001.nii.gz", rng)
    reports = {"fdg_p1_0": {"report": "诊断意见：淋巴瘤。", "sex": "F"}, "fdg_p1_1": "淋巴瘤治疗后。",
               "fdg_p2_0": {"report": "未见异常。"}}
    (root / "reports.json").write_text(json.dumps(reports, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "challenge.jsonl"
    result = get_adapter("autopet-rg-lym").convert(root, out, split_ratios=[0.5, 0.0, 0.5])
    records = by_id(out)
    assert list(records) == ["autopet_rg_lym_fdg_p1_0", "autopet_rg_lym_fdg_p1_1", "autopet_rg_lym_fdg_p2_0"]
    assert records["autopet_rg_lym_fdg_p1_0"]["split"] == records["autopet_rg_lym_fdg_p1_1"]["split"]
    assert {r["split"] for r in records.values()} == {"train", "test"}
    assert records["autopet_rg_lym_fdg_p1_0"]["sex"] == "female" and "masks" not in records["autopet_rg_lym_fdg_p1_0"]
    assert any("3 stud(ies) have no lesion mask (labelsTr/" in w for w in result.warnings)
