"""Dataset adapters on tiny fixture layouts that mimic the public releases (CT-RATE, RadGenome, CTRG, AutoPET)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rrg3d.data.adapters import ADAPTERS, CTRATE_LABELS, RADGENOME_REGIONS, ConversionResult, get_adapter
from rrg3d.data.manifest import load_manifest, resolve, validate_manifest
from rrg3d.errors import RRG3DError

SHAPE = (6, 6, 6)


def write_nifti(path: Path, data: np.ndarray | None = None, dtype: type = np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = data if data is not None else (np.arange(np.prod(SHAPE)).reshape(SHAPE) - 100).astype(dtype)
    nib.save(nib.Nifti1Image(array, np.diag([0.75, 0.75, 1.5, 1.0])), str(path))
    return path


def write_mask(path: Path, box: tuple[slice, slice, slice], value: int = 1) -> Path:
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[box] = value
    return write_nifti(path, data)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def by_id(manifest: Path) -> dict[str, dict]:
    return {record["id"]: record for record in load_manifest(manifest)}


def assert_valid(manifest: Path) -> None:
    _, problems = validate_manifest(manifest, check_files=True)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert not errors, errors


def reasons(result: ConversionResult) -> dict[str, str]:
    return dict(result.skipped)


# --------------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_adapters_and_rejects_unknown_names() -> None:
    assert set(ADAPTERS) == {"ctrate", "radgenome", "ctrg", "autopet", "autopet-rg-lym"}
    assert get_adapter("CT-RATE") is ADAPTERS["ctrate"]
    assert get_adapter("AutoPET_RG_Lym") is ADAPTERS["autopet-rg-lym"]
    with pytest.raises(RRG3DError, match="known: autopet, autopet-rg-lym, ctrate, ctrg, radgenome"):
        get_adapter("mimic")


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_options_round_trip_through_argparse(name: str) -> None:
    adapter = ADAPTERS[name]
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    adapter.add_arguments(parser)
    args = parser.parse_args(["somewhere"])
    assert adapter.options_from_args(args) == adapter.defaults()
    assert adapter.description and adapter.source


def test_unknown_option_and_missing_root_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RRG3DError, match="unknown option"):
        get_adapter("ctrate").convert(tmp_path, tmp_path / "m.jsonl", colour="blue")
    with pytest.raises(RRG3DError, match="root folder not found"):
        get_adapter("ctrate").convert(tmp_path / "nope", tmp_path / "m.jsonl")


def test_ctrate_labels_constant_is_exact() -> None:
    assert len(CTRATE_LABELS) == 18
    assert CTRATE_LABELS[0] == "Medical material"
    assert CTRATE_LABELS[-1] == "Interlobular septal thickening"
    assert len(RADGENOME_REGIONS) == 10
    from rrg3d.data.adapters import ctrate
    from rrg3d.text import labels

    assert ctrate.CTRATE_LABELS is CTRATE_LABELS is labels.CTRATE_LABELS  # one label set, re-exported by the adapter


# ---------------------------------------------------------------------------------------------------- CT-RATE

REPORT_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]


def label_row(name: str, positives: tuple[str, ...] = (), value: str = "1", bad: str | None = None) -> list[str]:
    row = [name]
    for label in CTRATE_LABELS:
        row.append(value if label in positives else "0")
    if bad is not None:
        row[1 + CTRATE_LABELS.index("Emphysema")] = bad
    return row


@pytest.fixture
def ctrate_root(tmp_path: Path) -> Path:
    repo = tmp_path / "CT-RATE"
    dataset = repo / "dataset"
    for name in ("train_1_a_1", "train_1_a_2", "train_4_a_1", "train_10_a_1"):
        patient = "_".join(name.split("_")[:2])
        write_nifti(dataset / "train_fixed" / patient / f"{patient}_a" / f"{name}.nii.gz")
    write_nifti(dataset / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz")
    reports = dataset / "radiology_text_reports"
    write_csv(reports / "train_reports.csv", REPORT_HEADER, [
        ["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Heart enlarged.  Lungs clear.", "Cardiomegaly."],
        ["train_1_a_2.nii.gz", "Cough.", "", "Heart enlarged.", "Cardiomegaly."],
        ["train_2_a_1.nii.gz", "", "", "Normal.", "Normal."],  # volume not downloaded
        ["train_3_a_1.nii.gz", "", "", "", "nan"],  # empty report
        ["train_4_a_1.nii.gz", "", "", "Emphysema.", "Emphysema."],  # bad label value
        ["train_10_a_1.nii.gz", "", "", "Nodule.", ""],  # no labels row
        ["", "", "", "orphan", "row"],
    ])
    write_csv(reports / "validation_reports.csv", REPORT_HEADER,
              [["valid_1_a_1.nii.gz", "", "", "Effusion on the right.", "Pleural effusion."]])
    labels = dataset / "multi_abnormality_labels"
    write_csv(labels / "train_predicted_labels.csv", ["VolumeName", *CTRATE_LABELS], [
        label_row("train_1_a_1.nii.gz", ("Cardiomegaly",)),
        label_row("train_1_a_2.nii.gz", ("Cardiomegaly",), value="1.0"),
        label_row("train_2_a_1.nii.gz"),
        label_row("train_4_a_1.nii.gz", bad="2"),
    ])
    write_csv(labels / "valid_predicted_labels.csv", ["VolumeName", *CTRATE_LABELS],
              [label_row("valid_1_a_1.nii.gz", ("Pleural effusion",))])
    meta_header = ["VolumeName", "Manufacturer", "RescaleIntercept", "RescaleSlope", "XYSpacing", "ZSpacing"]
    write_csv(dataset / "metadata" / "train_metadata.csv", meta_header, [
        ["train_1_a_1.nii.gz", "X", "-1024", "1", "[0.75, 0.8]", "1.5"],
        ["train_1_a_2.nii.gz", "X", "-1024.0", "1.0", "['0.7', '0.7']", "2"],
    ])
    write_csv(dataset / "metadata" / "validation_metadata.csv", meta_header,
              [["valid_1_a_1.nii.gz", "Y", "-8192", "1", "[0.6, 0.6]", "1.0"]])
    return repo


def test_ctrate_converts_reports_labels_and_metadata(ctrate_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "ctrate.jsonl"
    result = get_adapter("ctrate").convert(ctrate_root, out)
    records = by_id(out)
    assert list(records) == ["ctrate_train_1_a_1", "ctrate_train_1_a_2", "ctrate_train_10_a_1",
                             "ctrate_valid_1_a_1"]
    assert result.n_records == 4 and result.manifest == out

    first = records["ctrate_train_1_a_1"]
    assert first["split"] == "train"
    assert resolve(out, first["images"]["ct"]) == (
        ctrate_root / "dataset/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz").resolve()
    assert not Path(first["images"]["ct"]).is_absolute()
    assert first["report"] == "Findings: Heart enlarged. Lungs clear. Impression: Cardiomegaly."
    assert first["sections"] == {"findings": "Heart enlarged. Lungs clear.", "impression": "Cardiomegaly.",
                                 "clinical_information": "Cough.", "technique": "Non-contrast."}
    assert list(first["labels"]) == list(CTRATE_LABELS)
    assert first["labels"]["Cardiomegaly"] == 1 and sum(first["labels"].values()) == 1
    assert first["meta"] == {"source": "CT-RATE", "volume_name": "train_1_a_1.nii.gz", "spacing_mm": [1.5, 0.75, 0.8],
                             "rescale": {"slope": 1.0, "intercept": -1024.0}}
    assert records["ctrate_train_1_a_2"]["labels"]["Cardiomegaly"] == 1
    assert records["ctrate_train_1_a_2"]["meta"]["spacing_mm"] == [2.0, 0.7, 0.7]

    nodule = records["ctrate_train_10_a_1"]
    assert "labels" not in nodule and "spacing_mm" not in nodule["meta"]
    assert nodule["report"] == "Findings: Nodule."

    valid = records["ctrate_valid_1_a_1"]
    assert valid["split"] == "val" and valid["labels"]["Pleural effusion"] == 1
    assert resolve(out, valid["images"]["ct"]).is_file()

    skipped = reasons(result)
    assert result.n_skipped == 4 == len(result.skipped)
    assert "volume file not found" in skipped["ctrate_train_2_a_1"]
    assert "train_fixed/train_2/train_2_a/train_2_a_1.nii.gz" in skipped["ctrate_train_2_a_1"]
    assert "empty report" in skipped["ctrate_train_3_a_1"]
    assert "malformed label value '2'" in skipped["ctrate_train_4_a_1"]
    assert "'Emphysema'" in skipped["ctrate_train_4_a_1"]
    assert "empty VolumeName" in skipped["train_reports.csv:8"]
    assert any("no row in" in warning for warning in result.warnings)
    assert "skipped 4" in result.summary()
    assert_valid(out)


def test_ctrate_accepts_the_dataset_folder_as_root_and_is_deterministic(ctrate_root: Path, tmp_path: Path) -> None:
    adapter = get_adapter("ctrate")
    adapter.convert(ctrate_root, tmp_path / "a.jsonl")
    adapter.convert(ctrate_root / "dataset", tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_ctrate_split_selection_and_keep_missing(ctrate_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "valid.jsonl"
    get_adapter("ctrate").convert(ctrate_root, out, splits=["valid"])
    assert list(by_id(out)) == ["ctrate_valid_1_a_1"]

    out = tmp_path / "keep.jsonl"
    result = get_adapter("ctrate").convert(ctrate_root, out, splits=["train"], keep_missing=True)
    records = by_id(out)
    assert "ctrate_train_2_a_1" in records and "ctrate_train_2_a_1" not in reasons(result)
    expected = ctrate_root / "dataset/train_fixed/train_2/train_2_a/train_2_a_1.nii.gz"
    assert resolve(out, records["ctrate_train_2_a_1"]["images"]["ct"]) == expected.resolve()


def test_ctrate_wrong_layout_errors_name_file_and_columns(ctrate_root: Path, tmp_path: Path) -> None:
    labels_csv = ctrate_root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv"
    write_csv(labels_csv, ["VolumeName", "Emphysema"], [["valid_1_a_1.nii.gz", "0"]])
    with pytest.raises(RRG3DError) as info:
        get_adapter("ctrate").convert(ctrate_root, tmp_path / "m.jsonl", splits=["valid"])
    message = str(info.value)
    assert str(labels_csv) in message and "'Cardiomegaly'" in message and "found columns: 'VolumeName'" in message

    reports_csv = ctrate_root / "dataset/radiology_text_reports/train_reports.csv"
    write_csv(reports_csv, ["VolumeName", "Findings"], [["train_1_a_1.nii.gz", "x"]])
    with pytest.raises(RRG3DError, match=r"train_reports\.csv.*'Findings_EN', 'Impressions_EN'.*found columns"):
        get_adapter("ctrate").convert(ctrate_root, tmp_path / "m.jsonl", splits=["train"])

    reports_csv.unlink()
    with pytest.raises(RRG3DError, match="reports CSV for split 'train' not found"):
        get_adapter("ctrate").convert(ctrate_root, tmp_path / "m.jsonl", splits=["train"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RRG3DError, match="does not look like a CT-RATE download"):
        get_adapter("ctrate").convert(tmp_path / "empty", tmp_path / "m.jsonl")


def test_ctrate_all_rows_bad_is_an_error_not_an_empty_manifest(ctrate_root: Path, tmp_path: Path) -> None:
    (ctrate_root / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz").unlink()
    with pytest.raises(RRG3DError, match=r"no usable CT-RATE study found.*volume file not found"):
        get_adapter("ctrate").convert(ctrate_root, tmp_path / "m.jsonl", splits=["valid"])
    assert not (tmp_path / "m.jsonl").exists()


# -------------------------------------------------------------------------------------------------- RadGenome

REGION_HEADER = ["Volumename", "Anatomy", "Sentence"]


@pytest.fixture
def radgenome_root(tmp_path: Path) -> Path:
    repo = tmp_path / "RadGenome-ChestCT"
    dataset = repo / "dataset"
    for name in ("train_1_a_1", "train_2_a_1", "train_3_a_1"):
        patient = "_".join(name.split("_")[:2])
        write_nifti(dataset / "train_preprocessed" / patient / f"{patient}a" / f"{name}.nii.gz")
    write_nifti(dataset / "valid_preprocessed" / "valid_1" / "valid_1a" / "valid_1_a_1.nii.gz")
    write_csv(dataset / "radgenome_files" / "train_region_report.csv", REGION_HEADER, [
        ["train_1_a_1.nii.gz", "", "Lungs clear. Heart enlarged. Trachea patent."],
        ["train_1_a_1.nii.gz", "lung", "Lungs clear."],
        ["train_1_a_1.nii.gz", "Heart", "Heart enlarged."],
        ["train_1_a_1.nii.gz", "heart", "No effusion."],
        ["train_1_a_1.nii.gz", "trachea and bronchie", "Trachea patent."],
        ["train_2_a_1.nii.gz", "", "Normal study."],
        ["train_2_a_1.nii.gz", "bone", "Degenerative changes."],
        ["train_3_a_1.nii.gz", "", "nan"],  # empty report
        ["train_4_a_1.nii.gz", "", "Volume not downloaded."],  # missing volume
    ])
    write_csv(dataset / "radgenome_files" / "validation_region_report.csv", REGION_HEADER, [
        ["valid_1_a_1.nii.gz", "", "Effusion."],
        ["valid_1_a_1.nii.gz", "pleura", "Effusion."],
    ])
    masks = dataset / "train_region_mask" / "seg_train_1_a_1"
    write_mask(masks / "lung.nii.gz", (slice(0, 6), slice(0, 3), slice(0, 6)))
    write_mask(masks / "mediastinum.nii.gz", (slice(0, 6), slice(3, 6), slice(0, 6)))
    write_mask(masks / "heart.nii.gz", (slice(2, 4), slice(3, 5), slice(2, 4)))
    write_mask(masks / "trachea and bronchie.nii.gz", (slice(0, 1), slice(0, 1), slice(0, 1)))
    write_mask(masks / "breast.nii.gz", (slice(0, 0), slice(0, 0), slice(0, 0)))  # empty: left out
    label_map = np.zeros(SHAPE, dtype=np.uint8)
    label_map[:, :3] = 1
    label_map[:, 3:] = 6
    write_nifti(dataset / "valid_region_mask" / "valid_1_a_1.nii.gz", label_map)
    return repo


def test_radgenome_region_reports_and_merged_masks(radgenome_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "radgenome.jsonl"
    result = get_adapter("radgenome").convert(radgenome_root, out)
    records = by_id(out)
    assert list(records) == ["radgenome_train_1_a_1", "radgenome_train_2_a_1", "radgenome_valid_1_a_1"]

    first = records["radgenome_train_1_a_1"]
    assert first["split"] == "train"
    assert first["report"] == "Lungs clear. Heart enlarged. Trachea patent."
    assert first["region_reports"] == {"lung": "Lungs clear.", "trachea and bronchi": "Trachea patent.",
                                       "heart": "Heart enlarged. No effusion."}
    assert resolve(out, first["images"]["ct"]) == (
        radgenome_root / "dataset/train_preprocessed/train_1/train_1a/train_1_a_1.nii.gz").resolve()
    masks = first["masks"]
    assert masks["labels"] == {"1": "lung", "2": "trachea and bronchi", "3": "mediastinum", "4": "heart"}
    merged_path = resolve(out, masks["path"])
    assert merged_path == (tmp_path / "out" / "radgenome_masks" / "train_1_a_1.nii.gz").resolve()
    merged = np.asarray(nib.load(str(merged_path)).dataobj)
    assert merged[3, 4, 3] == 4  # heart wins over the larger mediastinum
    assert merged[0, 4, 0] == 3 and merged[5, 1, 5] == 1 and merged[0, 0, 0] == 2  # trachea wins over lung
    assert first["meta"]["mask_overlap_voxels"] == 8 + 1

    second = records["radgenome_train_2_a_1"]
    assert "masks" not in second and second["region_reports"] == {"bone": "Degenerative changes."}
    valid = records["radgenome_valid_1_a_1"]
    assert valid["split"] == "val" and valid["masks"]["labels"]["6"] == "pleura"
    assert resolve(out, valid["masks"]["path"]) == (
        radgenome_root / "dataset/valid_region_mask/valid_1_a_1.nii.gz").resolve()

    skipped = reasons(result)
    assert set(skipped) == {"radgenome_train_3_a_1", "radgenome_train_4_a_1"}
    assert "empty report" in skipped["radgenome_train_3_a_1"]
    assert "volume file not found" in skipped["radgenome_train_4_a_1"]
    assert any("no region masks" in warning for warning in result.warnings)
    assert_valid(out)


def test_radgenome_options_require_masks_labels_and_no_masks(radgenome_root: Path, ctrate_root: Path,
                                                             tmp_path: Path) -> None:
    labels_dir = tmp_path / "labels"
    write_csv(labels_dir / "train_predicted_labels.csv", ["VolumeName", *CTRATE_LABELS],
              [label_row("train_1_a_1.nii.gz", ("Cardiomegaly",)), label_row("train_2_a_1.nii.gz", bad="x")])
    out = tmp_path / "r.jsonl"
    result = get_adapter("radgenome").convert(radgenome_root, out, splits=["train"], require_masks=True,
                                              ctrate_labels=str(labels_dir), merged_mask_dir=str(tmp_path / "mm"))
    records = by_id(out)
    assert list(records) == ["radgenome_train_1_a_1"]
    assert records["radgenome_train_1_a_1"]["labels"]["Cardiomegaly"] == 1
    assert (tmp_path / "mm" / "train_1_a_1.nii.gz").is_file()
    assert "malformed label value 'x'" in reasons(result)["radgenome_train_2_a_1"]

    out = tmp_path / "none.jsonl"
    get_adapter("radgenome").convert(radgenome_root, out, splits=["train"], mask_layout="none")
    assert all("masks" not in record for record in load_manifest(out))


def test_radgenome_bad_mask_is_skipped_and_missing_columns_raise(radgenome_root: Path, tmp_path: Path) -> None:
    masks = radgenome_root / "dataset/train_region_mask/seg_train_1_a_1"
    write_nifti(masks / "heart.nii.gz", np.zeros((4, 4, 4), dtype=np.uint8))
    result = get_adapter("radgenome").convert(radgenome_root, tmp_path / "m.jsonl", splits=["train"])
    assert "bad region mask" in reasons(result)["radgenome_train_1_a_1"]
    assert "shape" in reasons(result)["radgenome_train_1_a_1"]

    report_csv = radgenome_root / "dataset/radgenome_files/validation_region_report.csv"
    write_csv(report_csv, ["Volumename", "Sentence"], [["valid_1_a_1.nii.gz", "x"]])
    with pytest.raises(RRG3DError) as info:
        get_adapter("radgenome").convert(radgenome_root, tmp_path / "m.jsonl", splits=["valid"])
    assert str(report_csv) in str(info.value) and "'Anatomy'" in str(info.value)


# ------------------------------------------------------------------------------------------------------- CTRG


def write_slices(folder: Path, count: int = 3) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.full((6, 6), 10 * index, dtype=np.uint8)).save(folder / f"{index}.png")


@pytest.fixture
def ctrg_root(tmp_path: Path) -> Path:
    root = tmp_path / "CTRG-Chest-548K"
    write_nifti(root / "volumes" / "1001.nii.gz")
    write_nifti(root / "volumes" / "1005" / "scan.nii.gz")
    write_slices(root / "volumes" / "1004")
    annotation = {
        "train": [
            {"id": "1001", "finding": "Bilateral  lungs are clear.", "impression": "Normal chest CT."},
            {"id": "1002", "finding": ""},
            {"id": "1003", "finding": "Nodule in the right upper lobe."},
            {"id": "1005", "finding": "Emphysema."},
        ],
        "test": [{"id": "1004", "finding": "Pleural effusion.", "image_path": ["1004/0.png", "1004/1.png"]}],
    }
    (root / "annotation.json").write_text(json.dumps(annotation), encoding="utf-8")
    return root


def test_ctrg_r2gen_annotation_with_volumes_and_slice_folders(ctrg_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ctrg.jsonl"
    result = get_adapter("ctrg").convert(ctrg_root, out)
    records = by_id(out)
    assert list(records) == ["ctrg_1001", "ctrg_1005"]
    assert records["ctrg_1001"]["report"] == "Findings: Bilateral lungs are clear. Impression: Normal chest CT."
    assert records["ctrg_1001"]["sections"] == {"findings": "Bilateral lungs are clear.",
                                                "impression": "Normal chest CT."}
    assert resolve(out, records["ctrg_1005"]["images"]["ct"]) == (ctrg_root / "volumes/1005/scan.nii.gz").resolve()
    skipped = reasons(result)
    assert skipped["ctrg_1002"] == "empty report"
    assert "no volume for case '1003'" in skipped["ctrg_1003"]
    assert "--stack-slices" in skipped["ctrg_1004"]
    assert_valid(out)

    out = tmp_path / "stacked.jsonl"
    result = get_adapter("ctrg").convert(ctrg_root, out, stack_slices=True, slice_spacing=[2.0, 0.5, 0.5])
    records = by_id(out)
    stacked = records["ctrg_1004"]
    assert stacked["split"] == "test"
    path = resolve(out, stacked["images"]["ct"])
    assert path == (tmp_path / "stacked_volumes" / "1004.nii.gz").resolve()
    assert stacked["meta"]["stacked_from_slices"] == 3 and "spacing_assumed" not in stacked["meta"]
    from rrg3d.io import read_volume

    volume = read_volume(path)
    assert volume.shape == (3, 6, 6)
    assert np.allclose(volume.spacing, (2.0, 0.5, 0.5))
    assert_valid(out)


def test_ctrg_json_mapping_and_csv_with_configurable_columns(tmp_path: Path) -> None:
    root = tmp_path / "ctrg"
    write_nifti(root / "images" / "a.nii.gz")
    write_nifti(root / "images" / "b.nii.gz")
    (root / "reports.json").write_text(json.dumps({"a": "Clear lungs.", "b": {"findings": "Effusion.",
                                                                              "split": "val"}}))
    out = tmp_path / "map.jsonl"
    get_adapter("ctrg").convert(root, out)
    records = by_id(out)
    assert records["ctrg_a"]["report"] == "Clear lungs." and "sections" not in records["ctrg_a"]
    assert records["ctrg_b"]["split"] == "val" and records["ctrg_b"]["report"] == "Findings: Effusion."

    write_csv(root / "table.csv", ["AccessionNo", "report_text", "fold"],
              [["a", "Clear lungs.", "test"], ["b", "", "train"]])
    out = tmp_path / "csv.jsonl"
    result = get_adapter("ctrg").convert(root, out, reports="table.csv", report_key="report_text", split_key="fold")
    assert list(by_id(out)) == ["ctrg_a"] and by_id(out)["ctrg_a"]["split"] == "test"
    assert reasons(result) == {"ctrg_b": "empty report"}

    with pytest.raises(RRG3DError, match=r"table\.csv.*no report column.*'AccessionNo'"):
        get_adapter("ctrg").convert(root, out, reports="table.csv", id_key="AccessionNo")
    with pytest.raises(RRG3DError, match=r"table\.csv.*no case id column.*found columns.*'case_id'"):
        get_adapter("ctrg").convert(root, out, reports="table.csv", id_key="case_id", report_key="report_text")
    with pytest.raises(RRG3DError, match="cannot tell which file holds the CTRG reports"):
        get_adapter("ctrg").convert(root / "images", out)


# ---------------------------------------------------------------------------------------------------- AutoPET

STUDY_A1 = "01-01-2001-NA-PET-CT Ganzkoerper  primaer mit KM-111"
STUDY_A2 = "06-06-2002-NA-PET-CT Ganzkoerper  primaer mit KM-222"


@pytest.fixture
def autopet_root(tmp_path: Path) -> Path:
    root = tmp_path / "NIFTI" / "FDG-PET-CT-Lesions"
    for patient, study, files in (
        ("PETCT_aaa", STUDY_A1, ("CTres", "SUV", "SEG", "PET", "CT")),
        ("PETCT_aaa", STUDY_A2, ("CTres", "SUV", "SEG")),
        ("PETCT_bbb", "03-03-2003-NA-PET-CT Ganzkoerper-333", ("CTres", "PET")),
        ("PETCT_ccc", "04-04-2004-NA-PET-CT Ganzkoerper-444", ("SUV", "SEG")),  # no CTres
    ):
        for name in files:
            if name == "SEG":
                write_mask(root / patient / study / "SEG.nii.gz", (slice(1, 3), slice(1, 3), slice(1, 3)))
            else:
                write_nifti(root / patient / study / f"{name}.nii.gz")
    write_csv(tmp_path / "NIFTI" / "Clinical Metadata FDG PET_CT Lesions.csv",
              ["Subject ID", "Study UID", "Study Date", "diagnosis", "age", "sex", "File Location"], [
                  ["PETCT_aaa", "1.2.3.4", "01-01-2001", "LYMPHOMA", "61", "M",
                   f"./FDG-PET-CT-Lesions/PETCT_aaa/{STUDY_A1}"],
                  ["PETCT_aaa", "1.2.3.5", "06-06-2002", "NEGATIVE", "62", "M",
                   f"./FDG-PET-CT-Lesions/PETCT_aaa/{STUDY_A2}"],
                  ["PETCT_bbb", "1.2.3.6", "03-03-2003", "lung cancer", "70", "F", ""],
              ])
    return root


def test_autopet_tcia_layout_with_clinical_csv_and_split_file(autopet_root: Path, tmp_path: Path) -> None:
    split_file = write_csv(tmp_path / "splits.csv", ["case", "split"], [["PETCT_bbb", "val"]])
    out = tmp_path / "autopet.jsonl"
    result = get_adapter("autopet").convert(autopet_root, out, split_file=str(split_file))
    records = by_id(out)
    a1 = "autopet_PETCT_aaa_01-01-2001-NA-PET-CT_Ganzkoerper_primaer_mit_KM-111"
    a2 = "autopet_PETCT_aaa_06-06-2002-NA-PET-CT_Ganzkoerper_primaer_mit_KM-222"
    b = "autopet_PETCT_bbb_03-03-2003-NA-PET-CT_Ganzkoerper-333"
    assert list(records) == [a1, a2, b]

    first = records[a1]
    assert "report" not in first and first["split"] == "train"
    study = autopet_root / "PETCT_aaa" / STUDY_A1
    assert resolve(out, first["images"]["ct"]) == (study / "CTres.nii.gz").resolve()
    assert resolve(out, first["images"]["pet"]) == (study / "SUV.nii.gz").resolve()
    assert first["masks"] == {"path": first["masks"]["path"], "labels": {"1": "lesion"}}
    assert resolve(out, first["masks"]["path"]) == (study / "SEG.nii.gz").resolve()
    assert first["meta"] == {"source": "AutoPET", "pet_units": "SUVbw", "tracer": "FDG", "diagnosis": "LYMPHOMA"}
    assert records[a2]["meta"]["diagnosis"] == "NEGATIVE"

    fallback = records[b]
    assert fallback["split"] == "val" and "masks" not in fallback
    assert fallback["meta"]["pet_units"] == "BQML" and fallback["meta"]["diagnosis"] == "LUNG_CANCER"
    assert resolve(out, fallback["images"]["pet"]).name == "PET.nii.gz"

    text = out.read_text()
    for value in ("1.2.3.4", "Study UID", '"age"', '"sex"', "61"):
        assert value not in text
    assert "missing CTres.nii.gz" in reasons(result)["autopet_PETCT_ccc_04-04-2004-NA-PET-CT_Ganzkoerper-444"]
    assert_valid(out)

    out = tmp_path / "pet.jsonl"
    result = get_adapter("autopet").convert(tmp_path / "NIFTI", out, pet="pet", require_seg=True)
    records = by_id(out)
    assert list(records) == [a1, a2]
    assert records[a1]["meta"]["pet_units"] == "BQML"
    assert records[a2]["meta"]["pet_units"] == "SUVbw"  # no PET.nii.gz: falls back to SUV
    assert "missing SEG.nii.gz" in reasons(result)[b]


def test_autopet_nnunet_layout_and_json_splits(tmp_path: Path) -> None:
    root = tmp_path / "autoPETIII"
    for case in ("fdg_0a1b_0", "psma_9z8y_0"):
        write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz")
        write_nifti(root / "imagesTr" / f"{case}_0001.nii.gz", dtype=np.float32)
        write_mask(root / "labelsTr" / f"{case}.nii.gz", (slice(0, 2), slice(0, 2), slice(0, 2)))
    write_nifti(root / "imagesTr" / "fdg_bad_0_0000.nii.gz")  # no PET channel
    write_nifti(root / "imagesTs" / "fdg_test_0_0000.nii.gz")
    write_nifti(root / "imagesTs" / "fdg_test_0_0001.nii.gz")
    (root / "splits_final.json").write_text(json.dumps([{"train": ["fdg_0a1b_0"], "val": ["psma_9z8y_0"]},
                                                        {"train": ["psma_9z8y_0"], "val": ["fdg_0a1b_0"]}]))
    out = tmp_path / "nnunet.jsonl"
    result = get_adapter("autopet").convert(root, out, split_file="splits_final.json", fold=1)
    records = by_id(out)
    assert list(records) == ["autopet_fdg_0a1b_0", "autopet_fdg_test_0", "autopet_psma_9z8y_0"]
    assert records["autopet_fdg_0a1b_0"]["split"] == "val"
    assert records["autopet_psma_9z8y_0"]["split"] == "train"
    assert records["autopet_psma_9z8y_0"]["meta"]["tracer"] == "PSMA"
    assert records["autopet_fdg_test_0"]["split"] == "test" and "masks" not in records["autopet_fdg_test_0"]
    assert "missing imagesTr/fdg_bad_0_0001.nii.gz" in reasons(result)["autopet_fdg_bad_0"]
    assert_valid(out)


def test_autopet_wrong_layouts_raise_clear_errors(autopet_root: Path, tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "clinical.csv", ["Subject ID", "Diagnosis (free text)"], [["PETCT_aaa", "x"]])
    with pytest.raises(RRG3DError) as info:
        get_adapter("autopet").convert(autopet_root, tmp_path / "m.jsonl", clinical_csv=str(bad))
    assert str(bad) in str(info.value) and "'diagnosis'" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RRG3DError, match="no AutoPET study found"):
        get_adapter("autopet").convert(tmp_path / "empty", tmp_path / "m.jsonl")


def test_ctrate_header_overrides_only_where_the_header_is_unreliable(ctrate_root: Path, tmp_path: Path) -> None:
    """auto: volumes outside *_fixed folders get the metadata CSV's spacing/rescale as header overrides."""
    adapter = get_adapter("ctrate")
    out = tmp_path / "auto.jsonl"
    adapter.convert(ctrate_root, out)
    records = by_id(out)
    assert "header_overrides" not in records["ctrate_train_1_a_1"]["meta"]  # from train_fixed/
    assert records["ctrate_valid_1_a_1"]["meta"]["header_overrides"] == {
        "spacing_mm": [1.0, 0.6, 0.6], "rescale": {"slope": 1.0, "intercept": -8192.0}}
    adapter.convert(ctrate_root, tmp_path / "always.jsonl", apply_metadata="always")
    assert "header_overrides" in by_id(tmp_path / "always.jsonl")["ctrate_train_1_a_1"]["meta"]
    adapter.convert(ctrate_root, tmp_path / "never.jsonl", apply_metadata="never")
    assert all("header_overrides" not in r["meta"] for r in by_id(tmp_path / "never.jsonl").values())
    with pytest.raises(RRG3DError, match="apply_metadata"):
        adapter.convert(ctrate_root, tmp_path / "bad.jsonl", apply_metadata="sometimes")
