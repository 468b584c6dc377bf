"""Prediction records as FHIR DiagnosticReports or DICOM Comprehensive SRs, one file per record.

:func:`export_predictions` reads a predictions JSONL (``rrg3d generate``) and writes ``<name>.fhir.json`` or
``<name>.dcm`` per record plus ``export_summary.json``. The helpers here are shared by :mod:`rrg3d.serve.fhir` and
:mod:`rrg3d.serve.sr`: what text a record holds, which report code describes it, and the provenance (model and preset
names only) that both formats carry.

Identifiers: a record's ``meta.source`` and ``meta.checkpoint`` are paths and its ``id`` is derived from a file name,
so any of them may carry patient identifiers. None of them is ever written into a resource or SR; model and preset
names are only used when they look like plain names (``[A-Za-z0-9._+-]``, at most 64 characters). File names,
however, come from record ids unless ``anonymize_names`` is set (then ``study_0001``, ... in file order).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from rrg3d.errors import RRG3DError
from rrg3d.utils.files import iter_jsonl

__all__ = [
    "CT_CHEST_CODE",
    "DIAGNOSTIC_IMAGING_CODE",
    "ReportCode",
    "export_predictions",
    "provenance",
    "read_predictions",
    "record_regions",
    "record_report",
    "report_code",
    "report_sections",
]


class ReportCode:
    """A LOINC report code with its LOINC display (FHIR) and its DICOM CID 7000 code meaning (SR)."""

    def __init__(self, code: str, display: str, dicom_meaning: str) -> None:
        self.code = code
        self.display = display
        self.dicom_meaning = dicom_meaning

    def __repr__(self) -> str:
        return f"ReportCode({self.code!r}, {self.display!r})"


#: LOINC 24627-2 "CT Chest" (DICOM CID 7000: "CT Chest Report"): records made with a chest-CT preset.
CT_CHEST_CODE = ReportCode("24627-2", "CT Chest", "CT Chest Report")
#: LOINC 18748-4 "Diagnostic imaging study" (DICOM CID 7000: "Diagnostic Imaging Report"): every other record.
DIAGNOSTIC_IMAGING_CODE = ReportCode("18748-4", "Diagnostic imaging study", "Diagnostic Imaging Report")
#: Presets whose field of view is the chest alone (CT-RATE convention).
CHEST_CT_PRESETS = frozenset({"ctrate"})

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def _plain_name(value: Any) -> str | None:
    return value if isinstance(value, str) and _PLAIN_NAME.fullmatch(value) else None


def provenance(record: dict[str, Any]) -> dict[str, str | None]:
    """``{"model", "preset"}`` names of the model that wrote a record (None when absent or not a plain name)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    preset = meta.get("preset")
    preset_name = preset.get("name") if isinstance(preset, dict) else preset
    return {"model": _plain_name(meta.get("model")), "preset": _plain_name(preset_name)}


def report_code(record: dict[str, Any]) -> ReportCode:
    """The report code of a record: CT Chest for chest-CT presets, Diagnostic imaging study otherwise."""
    return CT_CHEST_CODE if provenance(record)["preset"] in CHEST_CT_PRESETS else DIAGNOSTIC_IMAGING_CODE


def record_report(record: dict[str, Any]) -> str:
    """The report text of a record; raises :class:`RRG3DError` for failed records and empty reports."""
    if not isinstance(record, dict):
        raise RRG3DError("a prediction record must be a JSON object")
    if record.get("error"):
        raise RRG3DError("generation failed for this record (it has an error)")
    report = record.get("report")
    if not isinstance(report, str) or not report.strip():
        raise RRG3DError("the record has no report text")
    return report.strip()


def report_sections(report: str) -> dict[str, str]:
    """Sections of a report (:func:`rrg3d.text.reports.split_sections`); a report without headers is findings."""
    from rrg3d.text.reports import split_sections

    return split_sections(report) or {"findings": report}


def record_regions(record: dict[str, Any]) -> dict[str, str]:
    """Region name → report text of a region-guided record (regions with empty text are left out)."""
    regions = record.get("region_reports")
    if not isinstance(regions, dict):
        return {}
    return {str(name): text.strip() for name, text in regions.items() if isinstance(text, str) and text.strip()}


def read_predictions(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-empty line; :class:`RRG3DError` naming the line when one is bad."""
    yield from iter_jsonl(path, what="predictions")


def export_predictions(pred_path: str | os.PathLike[str], fmt: Literal["fhir", "sr"],
                       out_dir: str | os.PathLike[str], *, patient_reference: str | None = None,
                       anonymize_names: bool = False) -> dict[str, Any]:
    """Write one FHIR DiagnosticReport (``fmt="fhir"``) or DICOM Comprehensive SR (``"sr"``) per record.

    Files are ``<safe id>.fhir.json`` / ``<safe id>.dcm`` in ``out_dir``, named after record ids
    (:func:`rrg3d.preprocess.batch.safe_name`). ``rrg3d generate`` derives ids from scan file names, which can carry
    identifiers: ``anonymize_names=True`` names files ``study_0001``, ... in file order instead and keeps ids and
    error texts out of the summary too. The resources themselves never contain ids or paths.
    ``patient_reference`` (FHIR only) becomes every report's ``subject``. Records with an ``error`` or without report
    text are skipped and listed with the reason, as are records that fail to convert. The whole predictions file is
    read (and every line checked) before anything is written. Returns the summary, also written to
    ``out_dir/export_summary.json``: ``{"format", "records", "written", "files", "skipped"}``.
    """
    from rrg3d.preprocess.batch import safe_name
    from rrg3d.utils.files import atomic_write_json, atomic_write_text

    if fmt not in ("fhir", "sr"):
        raise RRG3DError(f"unknown export format {fmt!r} (fhir or sr)")
    if patient_reference is not None and fmt != "fhir":
        raise RRG3DError("a patient reference is a FHIR reference: it only applies to --format fhir")
    records = list(read_predictions(pred_path))
    if not records:
        raise RRG3DError(f"{pred_path}: no prediction records")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".fhir.json" if fmt == "fhir" else ".dcm"
    files: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    used: set[str] = set()
    for index, (line, record) in enumerate(records, start=1):
        where: dict[str, Any] = {"line": line}
        if not anonymize_names and record.get("id") is not None:
            where["id"] = str(record["id"])
        try:
            record_report(record)
        except RRG3DError as exc:
            reason = str(exc)
            if record.get("error") and not anonymize_names:
                reason += f": {record['error']}"
            skipped.append({**where, "reason": reason})
            continue
        named = not anonymize_names and record.get("id") is not None
        stem = safe_name(str(record["id"])) if named else f"study_{index:04d}"
        name, n = stem, 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        target = out_dir / f"{name}{suffix}"
        try:
            if fmt == "fhir":
                from rrg3d.serve.fhir import diagnostic_report_json

                atomic_write_text(target, diagnostic_report_json(record, patient_reference=patient_reference))
            else:
                from rrg3d.serve.sr import write_sr

                write_sr(record, target)
        except (RRG3DError, ValueError, TypeError) as exc:
            used.discard(name.lower())
            skipped.append({**where, "reason": f"conversion failed ({type(exc).__name__})"
                            + ("" if anonymize_names else f": {exc}")})
            continue
        files.append({**where, "file": target.name})
    summary = {"format": fmt, "records": len(records), "written": len(files), "files": files, "skipped": skipped}
    atomic_write_json(out_dir / "export_summary.json", summary)
    return summary
