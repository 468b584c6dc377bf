"""CTRG-Chest-548K (github.com/tangyuhao2016/CTRG; used by Reg2RG, Dia-LLaMA): chest CT with translated reports.

The release ships a report file and the scans; both exist in several shapes, so this adapter is lenient:

* report file (``--reports``; found automatically as ``annotation.json``, ``reports.json``, ``reports.csv`` ...):
  a JSON object ``{case_id: report}`` or ``{case_id: {"findings": ..., "impression": ...}}``, a JSON list of
  ``{"id": ..., "report"|"finding"|"findings": ..., "split"?: ...}``, the R2Gen-style
  ``{"train": [...], "val": [...], "test": [...]}`` (split from the key), or a CSV with configurable columns;
* scans (``--volumes-dir``): ``<case_id>.nii.gz`` (or NRRD/MHA/NPZ), a folder per case holding one volume file or a
  DICOM series, or a folder per case of 2D slice images (PNG/JPEG, the original release) which ``--stack-slices``
  turns into a NIfTI volume (the slices carry no spacing: ``--slice-spacing``, 1 mm by default, and
  ``meta.spacing_assumed``; intensities stay 8-bit display values, not HU: ``meta.intensity``).

Text fields are looked up case-insensitively: findings ``findings``/``finding``/``findings_en``, impression
``impression``/``impressions_en``, otherwise an unstructured ``report``/``report_en``/``text`` (kept as is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.data.adapters.base import (
    SPLIT_NAMES,
    VOLUME_SUFFIXES,
    Adapter,
    Collector,
    ConversionResult,
    Option,
    build_report,
    clean_text,
    display,
    natural_key,
    read_csv,
    sanitize_id,
    split_name,
    user_path,
    volume_stem,
    volume_suffix,
)
from rrg3d.errors import RRG3DError

SOURCE = "CTRG-Chest-548K"

REPORT_FILES = ("annotation.json", "annotations.json", "reports.json", "report.json", "reports.csv", "report.csv",
                "annotation.csv")
VOLUME_DIRS = ("volumes", "volume", "images", "image", "data", "CTRG-Chest-548K")
FINDINGS_KEYS = ("findings", "finding", "findings_en", "finding_en")
IMPRESSION_KEYS = ("impression", "impressions", "impression_en", "impressions_en")
REPORT_KEYS = ("report", "report_en", "text")
ID_KEYS = ("id", "case_id", "case", "name", "volume", "volumename", "accessionno")
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _find_reports(root: Path, reports: str | None) -> Path:
    if reports:
        path = user_path(reports, root)
        if not path.is_file():
            raise RRG3DError(f"{path}: CTRG report file not found")
        return path
    for name in REPORT_FILES:
        if (root / name).is_file():
            return root / name
    candidates = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".csv"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no .json/.csv file"
    raise RRG3DError(f"{root}: cannot tell which file holds the CTRG reports (looked for {', '.join(REPORT_FILES)}; "
                     f"found {found}); pass --reports FILE")


def _find_volumes(root: Path, volumes_dir: str | None) -> Path:
    if volumes_dir:
        path = user_path(volumes_dir, root)
        if not path.is_dir():
            raise RRG3DError(f"{path}: CTRG volume folder not found")
        return path
    for name in VOLUME_DIRS:
        if (root / name).is_dir():
            return root / name
    return root


def _lower_keys(entry: dict[str, Any]) -> dict[str, Any]:
    return {str(key).strip().lower(): value for key, value in entry.items()}


def _json_entries(path: Path, data: Any, id_key: str) -> Iterator[tuple[str, Any, str | None]]:
    """``(where, entry, split_or_None)`` for each case of a JSON report file; entries are dicts with an id."""
    if isinstance(data, dict):
        split_keys = [key for key in data if str(key).lower() in SPLIT_NAMES and isinstance(data[key], list)]
        if split_keys and len(split_keys) == len(data):
            for key in split_keys:
                for index, item in enumerate(data[key]):
                    yield f"{path.name}:{key}[{index}]", item, split_name(str(key))
            return
        for case_id, value in data.items():
            if isinstance(value, dict):
                yield f"{path.name}:{case_id}", {**value, id_key: case_id}, None
            else:
                yield f"{path.name}:{case_id}", {id_key: case_id, "report": value}, None
        return
    if isinstance(data, list):
        for index, item in enumerate(data):
            yield f"{path.name}[{index}]", item, None
        return
    raise RRG3DError(f"{path}: expected a JSON object ({{case_id: report}} or {{split: [...]}}) or a list of "
                     f"{{\"id\", \"report\"}} objects, got {type(data).__name__}")


def _csv_entries(path: Path, id_key: str, report_key: str | None) -> Iterator[tuple[str, Any, str | None]]:
    text_keys = [report_key] if report_key else [*FINDINGS_KEYS, *IMPRESSION_KEYS, *REPORT_KEYS]
    columns, rows = read_csv(path, [], "CTRG report CSV")
    lower = {column.lower() for column in columns}
    id_keys = ID_KEYS if id_key == "id" else (id_key,)
    if not any(key.lower() in lower for key in id_keys):
        raise RRG3DError(f"{path}: CTRG report CSV has no case id column; found columns: "
                         f"{', '.join(map(repr, columns)) or 'none'}; expected one of: {', '.join(map(repr, id_keys))} "
                         f"(or pass --id-key)")
    if not any(key.lower() in lower for key in text_keys):
        raise RRG3DError(f"{path}: CTRG report CSV has no report column; found columns: "
                         f"{', '.join(map(repr, columns))}; expected one of: {', '.join(map(repr, text_keys))} "
                         f"(or pass --report-key)")
    for line, row in rows:
        yield f"{path.name}:{line}", row, None


def _texts(entry: dict[str, Any], report_key: str | None, impression_key: str | None) -> tuple[str, dict[str, str]]:
    """``(report, sections)`` of one entry."""
    fields = _lower_keys(entry)

    def first(keys: Sequence[str]) -> str:
        for key in keys:
            text = clean_text(fields.get(key.lower()))
            if text:
                return text
        return ""

    impression = first([impression_key] if impression_key else IMPRESSION_KEYS)
    if report_key and report_key.lower() not in FINDINGS_KEYS:
        report = first([report_key])
        if report and impression:
            return build_report(report, impression), {"findings": report, "impression": impression}
        return report, {}
    findings = first([report_key] if report_key else FINDINGS_KEYS)
    if findings or impression:
        sections = {key: value for key, value in (("findings", findings), ("impression", impression)) if value}
        return build_report(findings, impression), sections
    return first(REPORT_KEYS), {}


class _VolumeFinder:
    """Locate a case's scan under the volume folder (direct names first, then a one-time walk)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, Path] | None = None

    def find(self, case_id: str, entry: dict[str, Any]) -> Path | None:
        for suffix in VOLUME_SUFFIXES:
            candidate = self.folder / f"{case_id}{suffix}"
            if candidate.is_file():
                return candidate
        if (self.folder / case_id).is_dir():
            return self.folder / case_id
        hint = _lower_keys(entry).get("image_path")
        if isinstance(hint, list) and hint:
            hint = hint[0]
        if isinstance(hint, str) and hint.strip():
            candidate = self.folder / hint.strip()
            if candidate.is_file():
                return candidate if volume_suffix(candidate) in VOLUME_SUFFIXES else candidate.parent
            if candidate.is_dir():
                return candidate
        return self._walk().get(case_id)

    def _walk(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for directory, subdirs, files in os.walk(self.folder):
                subdirs.sort()
                for name in subdirs:
                    self._index.setdefault(name, Path(directory) / name)
                for name in sorted(files):
                    path = Path(directory) / name
                    if volume_suffix(path) in VOLUME_SUFFIXES:
                        self._index.setdefault(volume_stem(name), path)
        return self._index


def _resolve_case_folder(folder: Path, case_id: str) -> tuple[str, Any]:
    """What a case folder holds: ``("file", path)``, ``("dicom", folder)`` or ``("slices", [paths])``."""
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    volumes = [p for p in files if volume_suffix(p) in VOLUME_SUFFIXES]
    if len(volumes) == 1:
        return "file", volumes[0]
    if volumes:
        named = [p for p in volumes if volume_stem(p.name) == case_id]
        if len(named) == 1:
            return "file", named[0]
        raise ValueError(f"{len(volumes)} volume files in {folder.name}/ (ambiguous)")
    if any(p.suffix.lower() in DICOM_SUFFIXES for p in files):
        return "dicom", folder
    slices = [p for p in files if p.suffix.lower() in SLICE_SUFFIXES]
    if slices:
        return "slices", slices
    raise ValueError(f"no volume, DICOM or slice image in {folder.name}/")


def stack_slice_images(slices: Sequence[Path], target: Path, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Stack 2D slice images (in the given order) into a NIfTI volume at ``target``; returns its shape."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with matplotlib
        raise RRG3DError("Pillow is needed to stack slice images (pip install pillow)") from exc
    from rrg3d.io import Volume, write_volume

    planes = []
    for path in slices:
        try:
            with Image.open(path) as image:
                plane = np.asarray(image if image.mode in ("I;16", "I", "F", "L") else image.convert("L"))
        except Exception as exc:
            raise ValueError(f"slice {path.name} unreadable ({type(exc).__name__})") from exc
        if planes and plane.shape != planes[0].shape:
            raise ValueError(f"slice {path.name} is {plane.shape}, the first slice {planes[0].shape}")
        planes.append(plane)
    if len(planes) < 2:
        raise ValueError(f"only {len(planes)} slice image(s); a volume needs several")
    array = np.stack(planes, axis=0)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        array = array.astype(np.int32)
    write_volume(Volume.from_spacing(array, tuple(float(s) for s in spacing)), target)
    return tuple(int(n) for n in array.shape)  # type: ignore[return-value]


def convert(
    root: Path,
    out: Path,
    *,
    reports: str | None = None,
    volumes_dir: str | None = None,
    id_key: str = "id",
    report_key: str | None = None,
    impression_key: str | None = None,
    split_key: str = "split",
    default_split: str = "train",
    stack_slices: bool = False,
    stacked_dir: str | None = None,
    slice_spacing: Sequence[float] | None = None,
    overwrite_stacked: bool = False,
    keep_missing: bool = False,
) -> ConversionResult:
    """Write a manifest of a CTRG-Chest-548K download under ``root`` to ``out``."""
    report_path = _find_reports(root, reports)
    volume_folder = _find_volumes(root, volumes_dir)
    stacked = Path(stacked_dir).expanduser() if stacked_dir else out.parent / f"{out.stem}_volumes"
    if slice_spacing is not None and (len(slice_spacing) != 3 or any(float(s) <= 0 for s in slice_spacing)):
        raise RRG3DError(f"CTRG: --slice-spacing needs three positive numbers (D H W in mm), got {slice_spacing}")
    spacing = [float(s) for s in slice_spacing] if slice_spacing else [1.0, 1.0, 1.0]

    if report_path.suffix.lower() == ".csv":
        entries = _csv_entries(report_path, id_key, report_key)
    else:
        try:
            data = json.loads(report_path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RRG3DError(f"{report_path}: not a readable JSON report file ({exc})") from exc
        entries = _json_entries(report_path, data, id_key)

    collector = Collector(SOURCE, out)
    finder = _VolumeFinder(volume_folder)
    for where, entry, entry_split in entries:
        if not isinstance(entry, dict):
            collector.skip(where, f"entry is a {type(entry).__name__}, not an object")
            continue
        fields = _lower_keys(entry)
        raw_id = fields.get(id_key.lower())
        if raw_id is None and id_key == "id":
            raw_id = next((fields[key] for key in ID_KEYS if fields.get(key) not in (None, "")), None)
        case_id = volume_stem(clean_text(raw_id)) if raw_id is not None else ""
        if not case_id or not sanitize_id(case_id):
            collector.skip(where, f"no case id ({id_key!r} missing or empty)")
            continue
        study_id = f"ctrg_{sanitize_id(case_id)}"
        report, sections = _texts(entry, report_key, impression_key)
        if not report:
            collector.skip(study_id, "empty report")
            continue
        split = entry_split or clean_text(fields.get(split_key.lower())) or default_split
        meta: dict[str, Any] = {"source": SOURCE}
        location = finder.find(case_id, entry)
        volume: Path | None = None
        if location is None:
            if not keep_missing:
                collector.skip(study_id, f"no volume for case {case_id!r} under {volume_folder}")
                continue
            volume = volume_folder / f"{case_id}.nii.gz"
        elif location.is_file():
            volume = location
        else:
            try:
                kind, found = _resolve_case_folder(location, case_id)
                if kind == "slices":
                    if not stack_slices:
                        collector.skip(study_id, f"{display(location, root)}/ holds {len(found)} 2D slice images; "
                                                 f"pass --stack-slices to stack them into a NIfTI volume")
                        continue
                    volume = stacked / f"{sanitize_id(case_id)}.nii.gz"
                    if overwrite_stacked or not volume.exists():
                        stack_slice_images(found, volume, spacing)
                    meta.update({"stacked_from_slices": len(found), "intensity": "display values (not HU)"})
                    if not slice_spacing:
                        meta["spacing_assumed"] = True
                else:
                    volume = found
            except ValueError as exc:
                collector.skip(study_id, str(exc))
                continue
        record: dict[str, Any] = {
            "id": study_id,
            "split": split_name(split),
            "images": {"ct": collector.rel(volume), "pet": None},
            "report": report,
        }
        if sections:
            record["sections"] = sections
        record["meta"] = meta
        collector.add(record)
    return collector.finish(root)


OPTIONS = (
    Option("reports", None, "report file (JSON or CSV), relative to the root or absolute (default: found by name)"),
    Option("volumes_dir", None, "folder of the scans, relative to the root or absolute (default: volumes/, "
                                "images/, data/ ... or the root)"),
    Option("id_key", "id", "case id key (JSON) or column (CSV)"),
    Option("report_key", None, "report text key/column (default: findings/finding/report ..., case-insensitive)"),
    Option("impression_key", None, "impression key/column (default: impression/impressions_en ...)"),
    Option("split_key", "split", "split key/column, when the file has one"),
    Option("default_split", "train", "split of cases the report file does not place"),
    Option("stack_slices", False, "stack folders of 2D slice images into NIfTI volumes"),
    Option("stacked_dir", None, "where stacked volumes are written (default: <manifest stem>_volumes/ beside the "
                                "manifest)"),
    Option("slice_spacing", None, "voxel size D H W (mm) of stacked slices (default: 1 1 1, marked as assumed)",
           type=float, nargs=3, metavar="MM"),
    Option("overwrite_stacked", False, "restack volumes that already exist"),
    Option("keep_missing", False, "keep cases without a scan (path points at <volumes>/<id>.nii.gz)"),
)

ADAPTER = Adapter(
    name="ctrg",
    description="CTRG-Chest-548K: chest CT (NIfTI, DICOM or slice images) with a JSON/CSV report file",
    source=SOURCE,
    options=OPTIONS,
    run=convert,
)
