"""AutoPET whole-body PET/CT (TCIA FDG-PET-CT-Lesions / PSMA-PET-CT-Lesions, NIfTI release; challenge layout).

TCIA NIfTI layout (``--layout tcia``; the root may also be a parent such as ``NIFTI/``)::

    <root>/<patient>/<study>/CTres.nii.gz   CT resampled to the PET grid   → images.ct
                             SUV.nii.gz     PET in SUVbw                   → images.pet (meta.pet_units "SUVbw")
                             PET.nii.gz     PET in Bq/ml (optional)        → images.pet with --pet pet ("BQML")
                             SEG.nii.gz     lesion mask                    → masks {"1": "lesion"}

Challenge (nnU-Net) layout (``--layout nnunet``): ``imagesTr/<case>_0000.nii.gz`` (CT), ``<case>_0001.nii.gz``
(SUV), ``labelsTr/<case>.nii.gz``; ``imagesTs/`` becomes the test split.

AutoPET has no reports: records have no ``report``. An optional clinical CSV (TCIA "Clinical Metadata";
columns ``Subject ID``, ``diagnosis`` and, to tell studies apart, ``File Location`` or ``Study Date``) adds
``meta.diagnosis`` (LYMPHOMA, MELANOMA, LUNG_CANCER, NEGATIVE) and nothing else. Folder names are already
pseudonymised by TCIA and appear only in the id. The split comes from ``--split-file`` (CSV ``case,split``; JSON
``{split: [cases]}``, ``{case: split}`` or an nnU-Net ``splits_final.json`` with ``--fold``) or is ``train``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rrg3d.data.adapters.base import (
    Adapter,
    Collector,
    ConversionResult,
    Option,
    clean_text,
    natural_key,
    read_csv,
    sanitize_id,
    split_name,
    user_path,
)
from rrg3d.errors import RRG3DError

SOURCE = "AutoPET"
LAYOUTS = ("auto", "tcia", "nnunet")
PET_KINDS = {"suv": ("SUV.nii.gz", "SUVbw"), "pet": ("PET.nii.gz", "BQML")}
STUDY_FILES = ("CTres.nii.gz", "SUV.nii.gz", "PET.nii.gz", "SEG.nii.gz", "CT.nii.gz")
LESION_LABELS = {"1": "lesion"}
MAX_DEPTH = 4


class _Study:
    """One PET/CT study found on disk: its id, the keys a split file may use, and its files."""

    def __init__(self, study_id: str, keys: Sequence[str], tracer: str | None, default_split: str) -> None:
        self.id = study_id
        self.keys = [key for key in keys if key]
        self.tracer = tracer
        self.default_split = default_split
        self.ct: Path | None = None
        self.pet: Path | None = None
        self.pet_units: str | None = None
        self.seg: Path | None = None
        self.folder: tuple[str, str] | None = None
        self.problem: str | None = None


def _tracer_from(text: str) -> str | None:
    lower = text.lower()
    if "psma" in lower:
        return "PSMA"
    if "fdg" in lower:
        return "FDG"
    return None


def _study_dirs(root: Path) -> Iterator[Path]:
    """Folders (up to MAX_DEPTH below root) that hold any AutoPET study file, in natural order."""
    def walk(folder: Path, depth: int) -> Iterator[Path]:
        try:
            children = sorted((p for p in folder.iterdir() if not p.name.startswith(".")),
                              key=lambda p: natural_key(p.name))
        except OSError:
            return
        if depth > 0 and any(child.name in STUDY_FILES and child.is_file() for child in children):
            yield folder
            return
        if depth < MAX_DEPTH:
            for child in children:
                if child.is_dir():
                    yield from walk(child, depth + 1)

    yield from walk(root, 0)


def _tcia_studies(root: Path, ct_file: str, pet: str, seg_file: str, tracer: str) -> list[_Study]:
    studies = []
    preferred, fallback = ("suv", "pet") if pet == "suv" else ("pet", "suv")
    for folder in _study_dirs(root):
        parent = folder.parent
        if parent == root:
            study_id = f"autopet_{sanitize_id(folder.name)}"
            keys = [folder.name]
        else:
            study_id = f"autopet_{sanitize_id(parent.name)}_{sanitize_id(folder.name)}"
            keys = [f"{parent.name}/{folder.name}", parent.name, folder.name]
        study_tracer = tracer if tracer != "auto" else (_tracer_from(str(folder.relative_to(root.parent))) or "FDG")
        study = _Study(study_id, [study_id, study_id.removeprefix("autopet_"), *keys], study_tracer, "train")
        study.folder = (parent.name, folder.name)
        if (folder / ct_file).is_file():
            study.ct = folder / ct_file
        for kind in (preferred, fallback):
            name, units = PET_KINDS[kind]
            if (folder / name).is_file():
                study.pet, study.pet_units = folder / name, units
                break
        if (folder / seg_file).is_file():
            study.seg = folder / seg_file
        if study.ct is None:
            study.problem = f"missing {ct_file} in the study folder"
        elif study.pet is None:
            study.problem = f"missing {PET_KINDS[preferred][0]} (and {PET_KINDS[fallback][0]}) in the study folder"
        studies.append(study)
    return studies


def _nnunet_studies(root: Path, ct_channel: str, pet_channel: str, tracer: str) -> list[_Study]:
    studies = []
    for images, labels, split in (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test")):
        folder = root / images
        if not folder.is_dir():
            continue
        cases = sorted({match[1] for p in folder.iterdir()
                        if (match := re.match(r"^(.+)_(\d{4})\.nii\.gz$", p.name))}, key=natural_key)
        for case in cases:
            study_tracer = tracer if tracer != "auto" else (_tracer_from(case.split("_", 1)[0]) or "FDG")
            study = _Study(f"autopet_{sanitize_id(case)}", [f"autopet_{sanitize_id(case)}", case], study_tracer, split)
            ct = folder / f"{case}_{ct_channel}.nii.gz"
            pet = folder / f"{case}_{pet_channel}.nii.gz"
            seg = root / labels / f"{case}.nii.gz"
            study.ct = ct if ct.is_file() else None
            study.pet, study.pet_units = (pet, "SUVbw") if pet.is_file() else (None, None)
            study.seg = seg if seg.is_file() else None
            if study.ct is None:
                study.problem = f"missing {images}/{ct.name}"
            elif study.pet is None:
                study.problem = f"missing {images}/{pet.name}"
            studies.append(study)
    return studies


def _normalize_diagnosis(value: Any) -> str:
    return re.sub(r"[\s\-]+", "_", clean_text(value).upper())


def _date_key(text: str) -> tuple[int, int, int] | None:
    numbers = re.findall(r"\d+", text)
    if len(numbers) < 3:
        return None
    a, b, c = numbers[:3]
    if len(a) == 4:
        return int(a), int(b), int(c)
    if len(c) == 4:
        return int(c), int(a), int(b)  # TCIA writes MM-DD-YYYY
    return None


class _Clinical:
    """Diagnosis per study from a clinical metadata CSV (location, then date, then subject match)."""

    def __init__(self, path: Path, subject: str, diagnosis: str, location: str, date: str) -> None:
        columns, rows = read_csv(path, [subject, diagnosis], "AutoPET clinical CSV")
        self.path = path
        self.by_location: dict[tuple[str, str], set[str]] = {}
        self.by_date: dict[tuple[str, tuple[int, int, int]], set[str]] = {}
        self.by_subject: dict[str, set[str]] = {}
        for _, row in rows:
            who = clean_text(row.get(subject))
            value = _normalize_diagnosis(row.get(diagnosis))
            if not who or not value:
                continue
            self.by_subject.setdefault(who, set()).add(value)
            if location in columns:
                parts = [p for p in clean_text(row.get(location)).replace("\\", "/").split("/") if p not in ("", ".")]
                if len(parts) >= 2:
                    self.by_location.setdefault((parts[-2], parts[-1]), set()).add(value)
            if date in columns:
                key = _date_key(clean_text(row.get(date)))
                if key:
                    self.by_date.setdefault((who, key), set()).add(value)

    def lookup(self, patient: str, study: str) -> tuple[str | None, bool]:
        """``(diagnosis, conflicting)`` of one study folder."""
        candidates = [self.by_location.get((patient, " ".join(study.split()))), self.by_location.get((patient, study))]
        date = _date_key(study[:10]) if re.match(r"^\d{2}-\d{2}-\d{4}", study) else None
        if date:
            candidates.append(self.by_date.get((patient, date)))
        candidates.append(self.by_subject.get(patient))
        for values in candidates:
            if values:
                if len(values) == 1:
                    return next(iter(values)), False
                return None, True
        return None, False


def _find_clinical(root: Path, clinical_csv: str | None) -> tuple[Path | None, bool]:
    """``(path, explicit)``: the given CSV, else one named like the TCIA clinical metadata in root or its parent."""
    if clinical_csv:
        path = user_path(clinical_csv, root)
        if not path.is_file():
            raise RRG3DError(f"{path}: AutoPET clinical CSV not found")
        return path, True
    for folder in (root, root.parent):
        for path in sorted(folder.glob("*.csv")):
            if "clinical" in path.name.lower():
                return path, False
    return None, False


def _read_split_file(path: Path, fold: int, case_column: str, split_column: str) -> dict[str, str]:
    """``{case: split}`` from a CSV or JSON split file."""
    if not path.is_file():
        raise RRG3DError(f"{path}: split file not found")
    if path.suffix.lower() == ".csv":
        _, rows = read_csv(path, [case_column, split_column], "split file")
        return {clean_text(row[case_column]): clean_text(row[split_column]) for _, row in rows
                if clean_text(row[case_column]) and clean_text(row[split_column])}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RRG3DError(f"{path}: not a readable JSON split file ({exc})") from exc
    if isinstance(data, list):  # nnU-Net splits_final.json: [{"train": [...], "val": [...]}, ...]
        if not data or not all(isinstance(item, dict) for item in data):
            raise RRG3DError(f"{path}: expected a list of folds ({{\"train\": [...], \"val\": [...]}})")
        if not 0 <= fold < len(data):
            raise RRG3DError(f"{path}: fold {fold} out of range ({len(data)} folds)")
        data = data[fold]
    if not isinstance(data, dict):
        raise RRG3DError(f"{path}: expected {{split: [cases]}} or {{case: split}}, got {type(data).__name__}")
    mapping: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, list):
            for case in value:
                mapping[str(case)] = str(key)
        elif isinstance(value, str):
            mapping[str(key)] = value
        else:
            raise RRG3DError(f"{path}: entry {key!r} must be a list of cases or a split name")
    return mapping


def convert(
    root: Path,
    out: Path,
    *,
    layout: str = "auto",
    ct_file: str = "CTres.nii.gz",
    pet: str = "suv",
    seg_file: str = "SEG.nii.gz",
    ct_channel: str = "0000",
    pet_channel: str = "0001",
    tracer: str = "auto",
    clinical_csv: str | None = None,
    subject_column: str = "Subject ID",
    diagnosis_column: str = "diagnosis",
    location_column: str = "File Location",
    date_column: str = "Study Date",
    split_file: str | None = None,
    fold: int = 0,
    split_case_column: str = "case",
    split_column: str = "split",
    default_split: str | None = None,
    require_seg: bool = False,
) -> ConversionResult:
    """Write a manifest of an AutoPET NIfTI download under ``root`` to ``out``."""
    if layout not in LAYOUTS:
        raise RRG3DError(f"AutoPET: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if pet not in PET_KINDS:
        raise RRG3DError(f"AutoPET: --pet must be one of {', '.join(PET_KINDS)}, got {pet!r}")
    if layout == "auto":
        layout = "nnunet" if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir() else "tcia"
    if layout == "nnunet":
        studies = _nnunet_studies(root, ct_channel, pet_channel, tracer)
    else:
        studies = _tcia_studies(root, ct_file, pet, seg_file, tracer)
    if not studies:
        expected = ("imagesTr/<case>_0000.nii.gz" if layout == "nnunet"
                    else f"<patient>/<study>/{ct_file} + {PET_KINDS[pet][0]}")
        raise RRG3DError(f"{root}: no AutoPET study found (layout {layout}: expected {expected})")

    collector = Collector(SOURCE, out)
    clinical = None
    clinical_path, explicit = _find_clinical(root, clinical_csv)
    if clinical_path is not None:
        try:
            clinical = _Clinical(clinical_path, subject_column, diagnosis_column, location_column, date_column)
        except RRG3DError as exc:
            if explicit:
                raise
            collector.warn(f"ignored {clinical_path.name}: {exc}")
    splits: dict[str, str] = {}
    if split_file:
        splits = _read_split_file(user_path(split_file, root), fold, split_case_column, split_column)

    without_seg = conflicting = 0
    for study in studies:
        if study.problem:
            collector.skip(study.id, study.problem)
            continue
        if study.seg is None:
            if require_seg:
                collector.skip(study.id, f"missing {seg_file} (lesion mask)")
                continue
            without_seg += 1
        split = next((splits[key] for key in study.keys if key in splits), None)
        if split is None:
            split = default_split or study.default_split
        meta: dict[str, Any] = {"source": SOURCE, "pet_units": study.pet_units, "tracer": study.tracer}
        if clinical is not None and study.folder is not None:
            diagnosis, clash = clinical.lookup(*study.folder)
            if diagnosis:
                meta["diagnosis"] = diagnosis
            conflicting += clash
        record: dict[str, Any] = {
            "id": study.id,
            "split": split_name(split),
            "images": {"ct": collector.rel(study.ct), "pet": collector.rel(study.pet)},
        }
        if study.seg is not None:
            record["masks"] = {"path": collector.rel(study.seg), "labels": dict(LESION_LABELS)}
        record["meta"] = meta
        collector.add(record)
    if without_seg:
        collector.warn(f"{without_seg} stud(ies) have no {seg_file if layout == 'tcia' else 'label file'}; "
                       f"kept without masks")
    if conflicting and clinical is not None:
        collector.warn(f"{conflicting} stud(ies) match rows of {clinical.path.name} with different diagnoses; "
                       f"left without meta.diagnosis")
    return collector.finish(root)


OPTIONS = (
    Option("layout", "auto", "tcia: <patient>/<study>/CTres.nii.gz ...; nnunet: imagesTr/<case>_0000.nii.gz ...",
           choices=LAYOUTS),
    Option("ct_file", "CTres.nii.gz", "CT file of a TCIA study folder (CT.nii.gz for the original resolution)"),
    Option("pet", "suv", "PET image: suv (SUV.nii.gz, SUVbw) or pet (PET.nii.gz, Bq/ml); the other is the fallback",
           choices=tuple(PET_KINDS)),
    Option("seg_file", "SEG.nii.gz", "lesion mask file of a TCIA study folder"),
    Option("ct_channel", "0000", "nnU-Net channel of the CT"),
    Option("pet_channel", "0001", "nnU-Net channel of the PET (SUV)"),
    Option("tracer", "auto", "tracer written to meta.tracer (auto: PSMA/FDG from the folder or case names)"),
    Option("clinical_csv", None, "clinical metadata CSV (default: a *clinical*.csv in the root or its parent)"),
    Option("subject_column", "Subject ID", "subject column of the clinical CSV (matched to patient folders)"),
    Option("diagnosis_column", "diagnosis", "diagnosis column of the clinical CSV"),
    Option("location_column", "File Location", "study folder column of the clinical CSV, when present"),
    Option("date_column", "Study Date", "study date column of the clinical CSV, when present"),
    Option("split_file", None, "CSV (case,split) or JSON ({split: [cases]}, {case: split}, nnU-Net splits_final)"),
    Option("fold", 0, "fold of an nnU-Net splits_final.json", type=int),
    Option("split_case_column", "case", "case column of a CSV split file"),
    Option("split_column", "split", "split column of a CSV split file"),
    Option("default_split", None, "split of studies the split file does not list (default: train; imagesTs: test)"),
    Option("require_seg", False, "skip studies without a lesion mask instead of keeping them without masks"),
)

ADAPTER = Adapter(
    name="autopet",
    description="AutoPET FDG/PSMA PET/CT (TCIA NIfTI or challenge layout): CT, SUV PET, lesion masks, no reports",
    source=SOURCE,
    options=OPTIONS,
    run=convert,
)
