"""`rrg3d benchmark build`: CT-RATE + RadGenome-ChestCT + CTRG fixtures merged into one patient-split benchmark."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rrg3d.cli import main
from rrg3d.data.benchmark import (
    build_benchmark,
    deduplicate,
    hash_split,
    normalise_sections,
    parse_source_option,
    patient_key,
    resolve_splits,
)
from rrg3d.data.manifest import load_manifest, resolve
from rrg3d.errors import RRG3DError

SHAPE = (4, 4, 4)


def write_nifti(path: Path, data: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = data if data is not None else np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    nib.save(nib.Nifti1Image(array, np.diag([0.75, 0.75, 1.5, 1.0])), str(path))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ctrate_volume(dataset: Path, folder: str, name: str) -> None:
    patient = "_".join(name.split("_")[:2])
    write_nifti(dataset / folder / patient / f"{patient}_a" / f"{name}.nii.gz")


CARDIO_FINDINGS = "Heart is enlarged. Lungs are clear. No pleural effusion."


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("downloads")
    # CT-RATE: patient train_1 has two reconstructions with the same report; train_5 is also in RadGenome's valid
    ctrate = base / "CT-RATE" / "dataset"
    for name in ("train_1_a_1", "train_1_a_2", "train_2_a_1", "train_5_a_1"):
        ctrate_volume(ctrate, "train_fixed", name)
    ctrate_volume(ctrate, "valid_fixed", "valid_1_a_1")
    header = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    write_csv(ctrate / "radiology_text_reports" / "train_reports.csv", header, [
        ["train_1_a_1.nii.gz", "Dyspnea.", "Non-contrast.", CARDIO_FINDINGS, "Cardiomegaly."],
        ["train_1_a_2.nii.gz", "Dyspnea.", "Non-contrast.", CARDIO_FINDINGS, "Cardiomegaly."],
        ["train_2_a_1.nii.gz", "", "", "Centrilobular emphysema in both upper lobes.", "Emphysema."],
        ["train_3_a_1.nii.gz", "", "", "", ""],  # empty report: the adapter skips it
        ["train_5_a_1.nii.gz", "", "", "Right pleural effusion with adjacent atelectasis.", "Pleural effusion."],
    ])
    write_csv(ctrate / "radiology_text_reports" / "validation_reports.csv", header,
              [["valid_1_a_1.nii.gz", "", "", "A 6 mm nodule in the left lower lobe.", "Lung nodule."]])

    # RadGenome-ChestCT: train_1 near-duplicates CT-RATE's report; train_5 sits in the validation CSV (conflict)
    radgenome = base / "RadGenome-ChestCT" / "dataset"
    for name in ("train_1_a_1", "train_6_a_1", "train_7_a_1"):
        patient = "_".join(name.split("_")[:2])
        write_nifti(radgenome / "train_preprocessed" / patient / f"{patient}a" / f"{name}.nii.gz")
    write_nifti(radgenome / "valid_preprocessed" / "train_5" / "train_5a" / "train_5_a_1.nii.gz")
    region_header = ["Volumename", "Anatomy", "Sentence"]
    write_csv(radgenome / "radgenome_files" / "train_region_report.csv", region_header, [
        ["train_1_a_1.nii.gz", "", "Findings: Heart is enlarged. Lungs are clear, no pleural effusion. "
                                   "Impression: Cardiomegaly is noted."],
        ["train_1_a_1.nii.gz", "heart", "Heart is enlarged."],
        ["train_6_a_1.nii.gz", "lung", "Bronchiectasis in the right lower lobe."],
        ["train_6_a_1.nii.gz", "heart", "Heart size is normal."],
        ["train_7_a_1.nii.gz", "", "nan"],  # empty report: the adapter skips it
    ])
    write_csv(radgenome / "radgenome_files" / "validation_region_report.csv", region_header,
              [["train_5_a_1.nii.gz", "", "Small right pleural effusion. Mediastinal lymphadenopathy."]])
    lung = np.zeros(SHAPE, dtype=np.uint8)
    lung[:, :2] = 1
    write_nifti(radgenome / "train_region_mask" / "seg_train_6_a_1" / "lung.nii.gz", lung)

    # CTRG-Chest-548K: a JSON list, splits given for some cases only
    ctrg = base / "CTRG"
    for case in ("2001", "2002", "2003", "2004", "2005"):
        write_nifti(ctrg / "volumes" / f"{case}.nii.gz")
    (ctrg / "reports.json").write_text(json.dumps([
        {"id": "2001", "findings": "Bilateral lungs are clear.", "impression": "Normal chest CT.", "split": "train"},
        {"id": "2002", "findings": "Pericardial effusion.", "impression": "Pericardial effusion.", "split": "test"},
        {"id": "2003", "findings": "Hiatal hernia.", "impression": "Hiatal hernia."},  # no split: hash
        {"id": "2004", "report": "Indication: cough."},  # no findings or impression: dropped by the builder
        {"id": "2005", "report": "  "},  # empty: the adapter skips it
    ]), encoding="utf-8")
    return {"ctrate": base / "CT-RATE", "radgenome": base / "RadGenome-ChestCT", "ctrg": ctrg}


@pytest.fixture(scope="module")
def built(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench") / "lib"
    return build_benchmark(roots, out, check_files=True), out


def test_merged_counts_ids_and_paths(built) -> None:
    summary, out = built
    records = {record["id"]: record for record in load_manifest(out / "manifest.jsonl")}
    assert sorted(records) == sorted([
        "ctrate_train_1_a_1", "ctrate_train_2_a_1", "ctrate_train_5_a_1", "ctrate_valid_1_a_1",
        "radgenome_train_5_a_1", "radgenome_train_6_a_1", "ctrg_2001", "ctrg_2002", "ctrg_2003"])
    assert summary.n_records == 9
    ctrate, radgenome, ctrg = (summary.sources[name] for name in ("ctrate", "radgenome", "ctrg"))
    assert (ctrate.input, ctrate.converted, ctrate.kept) == (6, 5, 4)
    assert ctrate.dropped == {"adapter: empty report": 1, "exact duplicate": 1}
    assert (radgenome.input, radgenome.converted, radgenome.kept) == (4, 3, 2)
    assert radgenome.dropped == {"adapter: empty report": 1, "near duplicate": 1}
    assert (ctrg.input, ctrg.converted, ctrg.kept) == (5, 4, 3)
    assert ctrg.dropped == {"adapter: empty report": 1, "no report text": 1}

    first = records["ctrate_train_1_a_1"]
    assert first["meta"]["source"] == "CT-RATE" and first["meta"]["source_id"] == "ctrate_train_1_a_1"
    assert first["meta"]["patient_id"] == "ctrate:train_1"
    assert not Path(first["images"]["ct"]).is_absolute()
    assert resolve(out / "manifest.jsonl", first["images"]["ct"]).is_file()
    region = records["radgenome_train_6_a_1"]
    assert region["meta"]["patient_id"] == "ctrate:train_6"
    assert resolve(out / "manifest.jsonl", region["masks"]["path"]) == (
        out / "sources" / "radgenome_masks" / "train_6_a_1.nii.gz").resolve()
    assert region["region_reports"]["lung"] == "Bronchiectasis in the right lower lobe."
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"


def test_sections_are_findings_and_impression(built) -> None:
    _, out = built
    records = {record["id"]: record for record in load_manifest(out / "manifest.jsonl")}
    first = records["ctrate_train_1_a_1"]
    assert first["sections"] == {"findings": CARDIO_FINDINGS, "impression": "Cardiomegaly."}
    assert first["report"] == f"Findings: {CARDIO_FINDINGS} Impression: Cardiomegaly."
    assert first["meta"]["other_sections"] == {"clinical_information": "Dyspnea.", "technique": "Non-contrast."}
    region = records["radgenome_train_6_a_1"]  # no whole-report row: region sentences, no headers → findings
    assert region["sections"] == {"findings": "Bronchiectasis in the right lower lobe. Heart size is normal."}
    assert region["report"] == "Findings: Bronchiectasis in the right lower lobe. Heart size is normal."
    for record in records.values():
        assert set(record["sections"]) <= {"findings", "impression"} and record["sections"].get("findings")


def test_no_patient_in_two_splits_and_conflicts_resolved(built) -> None:
    summary, out = built
    records = load_manifest(out / "manifest.jsonl")
    splits_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        splits_of[record["meta"]["patient_id"]].add(record["split"])
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    by_id = {record["id"]: record for record in records}
    # train_5: CT-RATE says train, RadGenome val → val (no evaluation patient in training)
    assert by_id["ctrate_train_5_a_1"]["split"] == by_id["radgenome_train_5_a_1"]["split"] == "val"
    assert by_id["ctrate_train_5_a_1"]["meta"]["official_split"] == "train"
    assert summary.conflicts == [{"patient": "ctrate:train_5", "resolved": "val",
                                  "official": {"ctrate": ["train"], "radgenome": ["val"]}}]
    assert by_id["ctrate_valid_1_a_1"]["split"] == "val"
    assert by_id["ctrg_2001"]["split"] == "train" and by_id["ctrg_2002"]["split"] == "test"
    assert by_id["ctrg_2003"]["split"] == hash_split("ctrg:2003", 0, 0.1, 0.1)
    assert by_id["ctrg_2003"]["meta"]["official_split"] is None


def test_duplicates_are_recorded_with_reason(built) -> None:
    _, out = built
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    by_id = {entry["id"]: entry for entry in removed}
    exact = by_id["ctrate_train_1_a_2"]
    assert exact["reason"] == "exact duplicate" and exact["duplicate_of"] == {"source": "ctrate",
                                                                             "id": "ctrate_train_1_a_1"}
    near = by_id["radgenome_train_1_a_1"]
    assert near["reason"] == "near duplicate" and 0.9 <= near["similarity"] < 1.0
    assert by_id["ctrg_2004"]["reason"] == "no report text"
    assert by_id["ctrate_train_3_a_1"]["stage"] == "adapter" and "empty report" in by_id["ctrate_train_3_a_1"]["detail"]


def test_summary_and_datasheet(built) -> None:
    _, out = built
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["records"] == 9 and sum(summary["total"]["splits"].values()) == 9
    ctrate = summary["sources"]["ctrate"]
    assert ctrate["input"] == 6 and ctrate["kept"] == 4 and sum(ctrate["splits"].values()) == 4
    assert ctrate["splits"]["val"] == 2
    assert ctrate["label_prevalence"]["Cardiomegaly"] == 0.25 and len(ctrate["label_prevalence"]) == 18
    assert summary["sources"]["ctrg"]["label_prevalence"]["Hiatal hernia"] == pytest.approx(1 / 3, abs=1e-3)
    words = ctrate["report_words"]
    assert words["n"] == 4 and words["p5"] <= words["median"] <= words["p95"]
    sheet = (out / "datasheet.md").read_text()
    assert "CC BY-NC-SA 4.0" in sheet and "see the dataset's terms" in sheet
    assert "| ctrate | CT-RATE |" in sheet and "| Cardiomegaly |" in sheet and "test > val > train" in sheet
    assert (out / "report_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_contract_matches_the_library(roots: dict[str, Path], built, tmp_path: Path, capsys) -> None:
    _, lib_out = built
    out = lib_out.parent / "cli"
    code = main(["benchmark", "build", "--source", f"ctrate={roots['ctrate']}", "--source",
                 f"radgenome={roots['radgenome']}", "--source", f"ctrg={roots['ctrg']}", "--out", str(out)])
    assert code == 0
    assert "benchmark: 9 record(s)" in capsys.readouterr().out
    assert (out / "manifest.jsonl").read_text() == (lib_out / "manifest.jsonl").read_text()
    for name in ("summary.json", "datasheet.md", "removed.jsonl"):
        assert (out / name).is_file()


def test_near_duplicate_threshold_and_options(roots: dict[str, Path], tmp_path: Path) -> None:
    summary = build_benchmark(roots, tmp_path / "b", near_duplicate=1.0, resplit=["ctrg"], plot=False,
                              options={"radgenome": {"mask_layout": "none"}})
    assert summary.sources["radgenome"].kept == 3  # the near duplicate stays at threshold 1.0
    assert summary.sources["ctrate"].dropped["exact duplicate"] == 1
    records = {record["id"]: record for record in load_manifest(tmp_path / "b" / "manifest.jsonl")}
    assert all("masks" not in record for record in records.values())
    assert records["ctrg_2002"]["split"] == hash_split("ctrg:2002", 0, 0.1, 0.1)  # official split ignored
    assert not (tmp_path / "b" / "report_lengths.png").exists()


def test_missing_root_and_malformed_input_are_clear_errors(roots: dict[str, Path], tmp_path: Path,
                                                           capsys) -> None:
    missing = tmp_path / "no-such-download"
    assert main(["benchmark", "build", "--source", f"ctrate={roots['ctrate']}", "--source", f"ctrg={missing}",
                 "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "source ctrg" in error and str(missing) in error
    assert not (tmp_path / "x" / "manifest.jsonl").exists()
    with pytest.raises(RRG3DError, match="unknown dataset adapter 'mimic'"):
        build_benchmark({"mimic": roots["ctrg"]}, tmp_path / "y")

    # a layout the adapter refuses: the error names the source
    broken = tmp_path / "ctrg-broken"
    write_nifti(broken / "volumes" / "1.nii.gz")
    (broken / "reports.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RRG3DError, match=r"source ctrg \(.*ctrg-broken\).*not a readable JSON"):
        build_benchmark({"ctrg": broken}, tmp_path / "z")
    # a volume that does not open (--check-files): the error names the source and the record
    (broken / "reports.json").write_text(json.dumps({"1": "Clear lungs."}), encoding="utf-8")
    (broken / "volumes" / "1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(RRG3DError, match=r"source ctrg record 'ctrg_1' \[images\.ct\]"):
        build_benchmark({"ctrg": broken}, tmp_path / "z", check_files=True)
    assert not (tmp_path / "z" / "manifest.jsonl").exists()


# ------------------------------------------------------------------------------------------------- building blocks


def test_deduplicate_exact_and_near() -> None:
    kept, removed = deduplicate([("a", "heart is enlarged lungs clear"), ("b", "heart is enlarged lungs clear"),
                                 ("c", "heart is enlarged lungs are clear"), ("d", "small pleural effusion")], 0.9)
    assert kept == ["a", "d"]
    assert removed[0] == {"key": "b", "kind": "exact", "duplicate_of": "a", "similarity": 1.0}
    assert removed[1]["key"] == "c" and removed[1]["kind"] == "near" and removed[1]["similarity"] >= 0.9
    assert deduplicate([("a", "x y z"), ("b", "x y w")], 0.9)[0] == ["a", "b"]


def test_split_rules_and_hash_fractions() -> None:
    resolved, conflicts = resolve_splits({"p1": {"a": {"train"}, "b": {"test"}}, "p2": {"a": {"val", "train"}},
                                          "p3": {"a": set()}}, seed=3, val_fraction=0.2, test_fraction=0.3)
    assert resolved["p1"] == "test" and resolved["p2"] == "val"
    assert resolved["p3"] == hash_split("p3", 3, 0.2, 0.3)
    assert [c["patient"] for c in conflicts] == ["p1", "p2"]
    drawn = [hash_split(f"p{i}", 0, 0.2, 0.3) for i in range(2000)]
    assert abs(drawn.count("test") / 2000 - 0.3) < 0.05 and abs(drawn.count("val") / 2000 - 0.2) < 0.05
    assert drawn == [hash_split(f"p{i}", 0, 0.2, 0.3) for i in range(2000)]


def test_patient_keys_and_sections() -> None:
    assert patient_key({"id": "ctrate_train_12_b_2", "meta": {"volume_name": "train_12_b_2.nii.gz"}},
                       "ctrate") == "ctrate:train_12"
    assert patient_key({"id": "radgenome_valid_3_a_1", "meta": {}}, "radgenome") == "ctrate:valid_3"
    assert patient_key({"id": "ctrg_77", "meta": {}}, "ctrg") == "ctrg:77"
    assert patient_key({"id": "ctrg_77", "meta": {"patient_id": "P9"}}, "ctrg") == "ctrg:P9"
    assert patient_key({"id": "autopet_PETCT_0af_01-01-2001-x", "meta": {}}, "autopet") == "autopet:PETCT_0af"
    sections, others = normalise_sections({"report": "History: cough. Findings: Clear. IMPRESSION: Normal."})
    assert sections == {"findings": "Clear.", "impression": "Normal."} and others == {"clinical_information":
                                                                                       "cough."}
    assert normalise_sections({"report": "Technique: non-contrast."})[0] == {}
    assert normalise_sections({"report": " - . ", "sections": {"findings": "--"}})[0] == {}
    given = normalise_sections({"report": "x", "sections": {"findings": "A  \u201cclear\u201d lung.", "other": "y"}})
    assert given == ({"findings": 'A "clear" lung.'}, {"other": "y"})


def test_source_options_are_typed() -> None:
    assert parse_source_option("ctrg.stack_slices=true") == ("ctrg", "stack_slices", True)
    assert parse_source_option("ctrg.slice-spacing=2,0.5,0.5") == ("ctrg", "slice_spacing", [2.0, 0.5, 0.5])
    assert parse_source_option("CT-RATE.splits=valid") == ("ctrate", "splits", ["valid"])
    with pytest.raises(RRG3DError, match="has no option 'colour'"):
        parse_source_option("ctrg.colour=blue")
    with pytest.raises(RRG3DError, match=r"expected NAME\.OPTION=VALUE"):
        parse_source_option("ctrg=1")
