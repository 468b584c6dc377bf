"""Keep patient identifiers out of everything rrg3d writes.

DICOM headers carry names, IDs, dates and accession numbers. rrg3d copies header values into
:attr:`Volume.meta` only through an allow-list of acquisition facts, and scrubs any message built from
library exceptions against the identifying values of the dataset it was reading.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: DICOM keywords whose values may be copied into metadata: acquisition physics, never people or dates.
ALLOWED_TAGS: tuple[str, ...] = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "PatientPosition",
    "ImageType",
    "RescaleType",
    "Units",
    "DecayCorrection",
    "CorrectedImage",
    "PhotometricInterpretation",
    "BitsStored",
)

#: Keywords that identify a patient, a study or a place; their values are scrubbed from messages.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MilitaryRank",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StationName",
    "DeviceSerialNumber",
    "IssuerOfPatientID",
    "AdmissionID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
)

REDACTED = "<redacted>"


def _flatten(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for item in value:
            out.extend(_flatten(item))
        return out
    text = str(value).strip()
    parts = {text}
    # Person names: also the components ("Family^Given" → "Family", "Given", "Given Family").
    if "^" in text:
        comps = [c for c in text.split("^") if c]
        parts.update(comps)
        parts.add(" ".join(comps))
        parts.add(" ".join(reversed(comps)))
    return [p for p in parts if len(p) >= 3]


def identifying_values(datasets: Iterable[Any]) -> set[str]:
    """Every identifying string found in the given pydicom datasets (for scrubbing)."""
    values: set[str] = set()
    for ds in datasets:
        for keyword in IDENTIFYING_TAGS:
            try:
                value = ds.get(keyword, None)
            except Exception:  # a corrupt element must not stop scrubbing of the others
                continue
            if value is None:
                continue
            values.update(_flatten(getattr(value, "value", value)))
    return values


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret (case-insensitive) with ``<redacted>``."""
    import re

    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    return text


def safe_meta(ds: Any) -> dict[str, Any]:
    """Allow-listed, JSON-safe header facts of one dataset."""
    meta: dict[str, Any] = {}
    for keyword in ALLOWED_TAGS:
        try:
            value = ds.get(keyword, None)
        except Exception:
            continue
        if value is None or value == "":
            continue
        if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
            meta[keyword] = [str(v) for v in value]
        elif isinstance(value, (int, float)):
            meta[keyword] = value
        else:
            try:
                meta[keyword] = float(value) if keyword in ("SliceThickness", "KVP") else str(value)
            except (TypeError, ValueError):
                meta[keyword] = str(value)
    return meta
