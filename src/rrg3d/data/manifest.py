"""The study manifest: JSONL, one study per line, paths relative to the manifest file.

Schema (only ``id`` and one image are required)::

    {"id": "ctrate_train_1_a_1", "split": "train",
     "images": {"ct": "vols/train_1_a_1.nii.gz", "pet": null},
     "masks": {"path": "seg/train_1_a_1.nii.gz", "labels": {"1": "lung", "2": "heart"}},
     "report": "Findings: ... Impression: ...",
     "sections": {"findings": "...", "impression": "..."},
     "region_reports": {"lung": "...", "heart": "..."},
     "labels": {"Cardiomegaly": 1, "Emphysema": 0},
     "style": "hospital_a", "sex": null, "meta": {"source": "CT-RATE"}}

``sex`` is ``"female"``, ``"male"`` or null (unknown).

A preprocessed cache adds ``"preprocess": {"preset": ..., "sha256": ..., ...}`` to each record.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.errors import ManifestError

IMAGE_KEYS = ("ct", "pet")
KNOWN_FIELDS = (
    "id",
    "split",
    "images",
    "masks",
    "report",
    "sections",
    "region_reports",
    "labels",
    "style",
    "sex",
    "meta",
    "preprocess",
    "petrg",  # PETRG truth {region: {"pet": class, "ct": class}} (rrg3d.text.petrg), e.g. PET phantoms
)
KNOWN_SPLITS = ("train", "val", "valid", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where (line, field) and what."""

    path: str
    line: int | None
    field: str | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.field:
            where += f" [{self.field}]"
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        return f"{where}: {prefix}{self.message}"

    def as_error(self) -> ManifestError:
        return ManifestError(self.path, self.message, line=self.line, field=self.field)


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def check_record(record: Any) -> list[tuple[str | None, str, str]]:
    """Schema problems of one parsed record as ``(field, message, severity)`` tuples (no file access)."""
    problems: list[tuple[str | None, str, str]] = []
    if not isinstance(record, dict):
        return [(None, f"each line must be a JSON object, got {type(record).__name__}", "error")]

    study_id = record.get("id")
    if not _is_text(study_id) or not study_id.strip():
        problems.append(("id", "missing or empty 'id' (a non-empty string is required)", "error"))
    elif any(ch in study_id for ch in "/\\\n\r\t\0"):
        problems.append(("id", "'id' must not contain path separators or control characters", "error"))

    split = record.get("split")
    if split is not None and (not _is_text(split) or not split.strip()):
        problems.append(("split", "'split' must be a non-empty string", "error"))
    elif split is not None and split not in KNOWN_SPLITS:
        problems.append(("split", f"unusual split {split!r} (expected one of {', '.join(KNOWN_SPLITS)})", "warning"))

    images = record.get("images")
    if not isinstance(images, dict):
        problems.append(("images", "missing 'images' object (e.g. {\"ct\": \"vols/x.nii.gz\"})", "error"))
    else:
        present = invalid = 0
        for key, value in images.items():
            if value is None:
                continue
            if not _is_text(value) or not value.strip():
                problems.append((f"images.{key}", "image path must be a non-empty string or null", "error"))
                invalid += 1
                continue
            present += 1
            if key not in IMAGE_KEYS:
                problems.append((f"images.{key}", f"unknown image key {key!r} (known: {', '.join(IMAGE_KEYS)})",
                                 "warning"))
        if present == 0 and invalid == 0:
            problems.append(("images", "no image: at least one of images.ct / images.pet must be a path", "error"))

    masks = record.get("masks")
    if masks is not None:
        if not isinstance(masks, dict):
            problems.append(("masks", "'masks' must be an object with 'path' and 'labels'", "error"))
        else:
            if not _is_text(masks.get("path")) or not masks["path"].strip():
                problems.append(("masks.path", "mask path must be a non-empty string", "error"))
            labels = masks.get("labels", {})
            if not isinstance(labels, dict):
                problems.append(("masks.labels", "mask labels must map label values to region names", "error"))
            else:
                for value, name in labels.items():
                    if not str(value).lstrip("-").isdigit():
                        problems.append((f"masks.labels.{value}", "label keys must be integers (as strings)",
                                         "error"))
                    if not _is_text(name) or not name.strip():
                        problems.append((f"masks.labels.{value}", "region name must be a non-empty string", "error"))

    if "report" in record and record["report"] is not None:
        if not _is_text(record["report"]):
            problems.append(("report", "'report' must be a string", "error"))
        elif not record["report"].strip():
            problems.append(("report", "empty report (omit the field or set it to null when there is none)", "error"))

    for name in ("sections", "region_reports"):
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            problems.append((name, f"'{name}' must map names to text", "error"))
            continue
        for key, text in value.items():
            if not _is_text(text):
                problems.append((f"{name}.{key}", "must be a string", "error"))

    labels = record.get("labels")
    if labels is not None:
        if not isinstance(labels, dict):
            problems.append(("labels", "'labels' must map abnormality names to 0 or 1", "error"))
        else:
            for key, value in labels.items():
                if isinstance(value, bool) or value not in (0, 1):
                    problems.append((f"labels.{key}", f"label must be 0 or 1, got {value!r}", "error"))

    style = record.get("style")
    if style is not None and (not _is_text(style) or not style.strip()):
        problems.append(("style", "'style' must be a non-empty string", "error"))
    if record.get("sex") not in (None, "female", "male"):
        problems.append(("sex", f"unusual sex {record['sex']!r} (expected \"female\", \"male\" or null)", "warning"))
    for name in ("meta", "preprocess"):
        if record.get(name) is not None and not isinstance(record[name], dict):
            problems.append((name, f"'{name}' must be an object", "error"))
    overrides = (record.get("meta") or {}).get("header_overrides") if isinstance(record.get("meta"), dict) else None
    if overrides is not None:
        problems.extend(_check_overrides(overrides))
    for key in record:
        if key not in KNOWN_FIELDS:
            problems.append((key, f"unknown field {key!r} (kept as is)", "warning"))
    return problems


def _check_overrides(overrides: Any) -> list[tuple[str | None, str, str]]:
    field = "meta.header_overrides"
    if not isinstance(overrides, dict):
        return [(field, "must be an object with 'spacing_mm' and/or 'rescale'", "error")]
    problems: list[tuple[str | None, str, str]] = []
    spacing = overrides.get("spacing_mm")
    if spacing is not None and not (
        isinstance(spacing, list) and len(spacing) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in spacing)
    ):
        problems.append((f"{field}.spacing_mm", "must be three positive numbers (D, H, W) in mm", "error"))
    rescale = overrides.get("rescale")
    if rescale is not None and not (
        isinstance(rescale, dict) and all(isinstance(rescale.get(k), (int, float)) for k in ("slope", "intercept"))
    ):
        problems.append((f"{field}.rescale", "must be {\"slope\": number, \"intercept\": number}", "error"))
    unknown = sorted(set(overrides) - {"spacing_mm", "rescale"})
    if unknown:
        problems.append((field, f"unknown override(s) {unknown}", "error"))
    return problems


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any | ManifestError]]:
    """Yield ``(line_number, record_or_error)`` for each non-blank line; JSON errors are yielded, not raised."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found")
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, ManifestError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", line=number)
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not UTF-8 text (byte offset {exc.start})") from exc
    except OSError as exc:
        raise ManifestError(path, f"cannot read manifest ({exc.strerror})") from exc


def check_manifest(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Parse and schema-check a manifest; returns the valid records and every problem found."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    count = 0
    for number, item in iter_lines(path):
        count += 1
        if isinstance(item, ManifestError):
            problems.append(Problem(str(path), number, None, item.problem))
            continue
        record_problems = check_record(item)
        problems.extend(Problem(str(path), number, f, m, s) for f, m, s in record_problems)
        if any(s == "error" for _, _, s in record_problems):
            continue
        if item["id"] in seen:
            problems.append(Problem(str(path), number, "id", f"duplicate id {item['id']!r} (first on line "
                                                             f"{seen[item['id']]})"))
            continue
        seen[item["id"]] = number
        item.setdefault("_line", number)
        records.append(item)
    if count == 0:
        problems.append(Problem(str(path), None, None, "manifest is empty"))
    return records, problems


def load_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load a manifest, raising :class:`ManifestError` on the first error (warnings are ignored)."""
    records, problems = check_manifest(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise errors[0].as_error()
    for record in records:
        record.pop("_line", None)
    return records


def resolve(manifest_path: str | os.PathLike[str], relative: str) -> Path:
    """Absolute path of a manifest-relative file path (absolute paths pass through)."""
    candidate = Path(relative).expanduser()
    if candidate.is_absolute():
        return candidate
    return (Path(manifest_path).resolve().parent / candidate).resolve()


def record_files(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, relative_path)`` of every file a record references."""
    files = [(f"images.{key}", value) for key, value in (record.get("images") or {}).items() if value]
    masks = record.get("masks")
    if isinstance(masks, dict) and masks.get("path"):
        files.append(("masks.path", masks["path"]))
    return files


def record_affine(record: dict[str, Any], field: str) -> list[list[float]] | None:
    """The affine a preprocessing cache recorded for a file of this record (``None`` for original scans)."""
    geometry = (record.get("preprocess") or {}).get("images") or {}
    # masks share the grid of the record's first image
    is_image = field.startswith("images.")
    entry = geometry.get(field.split(".", 1)[1]) if is_image else next(iter(geometry.values()), None)
    return entry.get("affine") if isinstance(entry, dict) else None


def relativize(path: str | os.PathLike[str], manifest_path: str | os.PathLike[str]) -> str:
    """``path`` relative to the manifest's folder when possible (POSIX separators), else absolute."""
    base = Path(manifest_path).resolve().parent
    target = Path(path).resolve()
    try:
        return Path(os.path.relpath(target, base)).as_posix()
    except ValueError:  # different drive on Windows
        return target.as_posix()


def write_manifest(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as JSONL atomically after checking each against the schema."""
    from rrg3d.utils.files import atomic_path

    path = Path(path)
    lines = []
    for number, record in enumerate(records, start=1):
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        errors = [(f, m) for f, m, s in check_record(record) if s == "error"]
        if errors:
            field, message = errors[0]
            raise ManifestError(path, f"refusing to write invalid record: {message}", line=number, field=field)
        lines.append(json.dumps(record, ensure_ascii=False))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def validate_manifest(
    path: str | os.PathLike[str], check_files: bool = True, progress: bool = False
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Schema-check a manifest and, optionally, open every referenced file with the rrg3d readers."""
    from rrg3d.errors import RRG3DError
    from rrg3d.io import read_volume

    records, problems = check_manifest(path)
    if not check_files:
        return records, problems
    iterator: Iterable[dict[str, Any]] = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="checking files", unit="study")
    for record in iterator:
        for field, relative in record_files(record):
            file_path = resolve(path, relative)
            try:
                volume = read_volume(file_path, modality="SEG" if field == "masks.path" else None,
                                     affine=record_affine(record, field))
            except RRG3DError as exc:
                problems.append(Problem(str(path), record.get("_line"), field, str(exc)))
                continue
            fractional = volume.array.dtype.kind == "f" and not np.array_equal(volume.array, np.rint(volume.array))
            if field == "masks.path" and fractional:
                problems.append(Problem(str(path), record.get("_line"), field,
                                        f"{file_path}: mask has non-integer values"))
    problems.sort(key=lambda p: p.line or 0)  # file problems join the schema ones in line order
    return records, problems
