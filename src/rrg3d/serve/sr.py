"""A prediction record as a DICOM Comprehensive SR document (``highdicom.sr.ComprehensiveSR``).

Content tree (the shape of TID 2000 "Basic Diagnostic Imaging Report", without claiming conformance to it)::

    CONTAINER  LN 24627-2 "CT Chest Report" | LN 18748-4 "Diagnostic Imaging Report"   (document title, CID 7000)
      HAS CONCEPT MOD  CODE  DCM 121049 Language of Content Item and Descendants = RFC5646 "en" English
      HAS OBS CONTEXT  CODE  DCM 121005 Observer Type = DCM 121007 Device
      HAS OBS CONTEXT  UIDREF/TEXT  DCM 121012/121013/121014/121015 Device Observer UID/Name/Manufacturer/Model Name
      CONTAINS CONTAINER  LN 55752-0 Clinical Information      > TEXT LN 11329-0 History
      CONTAINS CONTAINER  LN 55111-9 Current Procedure Descriptions > TEXT DCM 121065 Procedure Description
      CONTAINS CONTAINER  LN 55114-3 Prior Procedure Descriptions   > TEXT DCM 121065 Procedure Description
      CONTAINS CONTAINER  LN 59776-5 Findings                  > TEXT DCM 121071 Finding  (the findings section)
        CONTAINS CONTAINER  LN 59776-5 Findings  (one per region of a region-guided record)
          HAS CONCEPT MOD  TEXT SCT 363698007 Finding Site = region name
          CONTAINS TEXT  DCM 121071 Finding = that region's text
      CONTAINS CONTAINER  LN 19005-8 Impressions               > TEXT DCM 121073 Impression

(sections the report does not have are left out; text before the first header goes to Findings). Headings come from
CID 7001, items from CID 7002.

Patient and study: highdicom copies patient/study attributes from the SR's ``evidence`` (source image datasets) and
refuses to build without one. Exported predictions usually have no DICOM source, and the source's headers must not be
copied anyway, so the evidence is a stub dataset built here: a new Study Instance UID (or the caller's), empty Patient
Name, a Patient ID ``rrg3d-anon-<hash of the new study UID>``, no birth date, sex, accession number or study date.
The stub's fictional instance is removed from the Current Requested Procedure Evidence Sequence after construction,
so the document references no image. Only the explicit ``patient`` argument (``name``, ``id``, ``birth_date``,
``sex``) puts identifiers in. Completion PARTIAL, verification UNVERIFIED, preliminary flag PRELIMINARY;
Manufacturer "rrg3d", Manufacturer's Model Name = the model name, the preset named in the Series Description. Paths
and record ids are never written.
"""

from __future__ import annotations

import hashlib
import os
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from rrg3d.errors import RRG3DError
from rrg3d.serve.export import provenance, record_regions, record_report, report_code, report_sections

__all__ = ["PATIENT_KEYS", "comprehensive_sr", "write_sr"]

#: Keys of the ``patient`` argument.
PATIENT_KEYS = frozenset({"name", "id", "birth_date", "sex"})

#: Report section → (heading (CID 7001), item (CID 7002)) as (value, scheme, meaning) triples.
_SECTIONS: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "clinical_information": (("55752-0", "LN", "Clinical Information"), ("11329-0", "LN", "History")),
    "technique": (("55111-9", "LN", "Current Procedure Descriptions"), ("121065", "DCM", "Procedure Description")),
    "comparison": (("55114-3", "LN", "Prior Procedure Descriptions"), ("121065", "DCM", "Procedure Description")),
    "findings": (("59776-5", "LN", "Findings"), ("121071", "DCM", "Finding")),
    "impression": (("19005-8", "LN", "Impressions"), ("121073", "DCM", "Impression")),
}
_FINDING_SITE = ("363698007", "SCT", "Finding Site")


def _patient_attributes(patient: dict[str, Any] | None, study_uid: str) -> dict[str, Any]:
    patient = dict(patient or {})
    unknown = set(patient) - PATIENT_KEYS
    if unknown:
        raise RRG3DError(f"unknown patient keys {sorted(unknown)} (known: {sorted(PATIENT_KEYS)})")
    birth = patient.get("birth_date")
    if isinstance(birth, (date, datetime)):
        birth = birth.strftime("%Y%m%d")
    sex = patient.get("sex")
    if sex is not None:
        sex = {"female": "F", "male": "M", "other": "O"}.get(str(sex).lower(), str(sex).upper())
        if sex not in ("F", "M", "O"):
            raise RRG3DError(f"patient sex must be F, M or O (or female/male/other), not {patient['sex']!r}")
    anon_id = "rrg3d-anon-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]
    return {"PatientName": patient.get("name") or "", "PatientID": patient.get("id") or anon_id,
            "PatientBirthDate": birth or "", "PatientSex": sex or ""}


def _stub_evidence(study_uid: str, patient: dict[str, Any]) -> Any:
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid

    stub = Dataset()
    stub.SOPClassUID = CTImageStorage
    stub.SOPInstanceUID = generate_uid()
    stub.SeriesInstanceUID = generate_uid()
    stub.StudyInstanceUID = study_uid
    for keyword, value in patient.items():
        setattr(stub, keyword, value)
    for keyword in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(stub, keyword, "")
    return stub


def _content(record: dict[str, Any], report: str, device_uid: str, model: str | None) -> Any:
    from highdicom.sr import (
        CodedConcept,
        ContainerContentItem,
        ContentSequence,
        DeviceObserverIdentifyingAttributes,
        LanguageOfContentItemAndDescendants,
        ObserverContext,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS

    def concept(triple: tuple[str, str, str]) -> CodedConcept:
        return CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])

    def section(heading: tuple[str, str, str], item: tuple[str, str, str], text: str | None) -> ContainerContentItem:
        container = ContainerContentItem(name=concept(heading), relationship_type=contains)
        container.ContentSequence = ContentSequence()
        if text:
            container.ContentSequence.append(
                TextContentItem(name=concept(item), value=text, relationship_type=contains))
        return container

    code = report_code(record)
    root = ContainerContentItem(name=concept((code.code, "LN", code.dicom_meaning)))
    root.ContentSequence = ContentSequence(is_root=False)
    root.ContentSequence.extend(LanguageOfContentItemAndDescendants(
        CodedConcept(value="en", scheme_designator="RFC5646", meaning="English")))
    root.ContentSequence.extend(ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="rrg3d", manufacturer_name="rrg3d", model_name=model)))
    sections = report_sections(report)
    if "other" in sections:
        sections["findings"] = " ".join(t for t in (sections.pop("other"), sections.get("findings")) if t)
    regions = record_regions(record)
    for name, (heading, item) in _SECTIONS.items():
        if not sections.get(name) and not (name == "findings" and regions):
            continue
        container = section(heading, item, sections.get(name))
        if name == "findings":
            for region, text in regions.items():
                region_item = section(heading, item, text)
                region_item.ContentSequence.insert(0, TextContentItem(
                    name=concept(_FINDING_SITE), value=region,
                    relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
                container.ContentSequence.append(region_item)
        root.ContentSequence.append(container)
    return root


def comprehensive_sr(record: dict[str, Any], *, patient: dict[str, Any] | None = None,
                     study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                     sop_instance_uid: str | None = None, series_number: int = 1, instance_number: int = 1,
                     issued: datetime | None = None) -> Any:
    """A Comprehensive SR (``highdicom.sr.ComprehensiveSR``, a ``pydicom.Dataset``) for one prediction record.

    New UIDs are generated for whatever is not given; ``patient`` (keys ``name``, ``id``, ``birth_date``, ``sex``)
    is the only way patient identifiers enter the document. Content date/time is ``issued`` (default now) in UTC.
    Raises :class:`RRG3DError` for failed records and bad ``patient`` values.
    """
    from highdicom.sr import ComprehensiveSR
    from pydicom.uid import generate_uid

    from rrg3d import __version__

    report = record_report(record)
    when = (issued or datetime.now(timezone.utc)).astimezone(timezone.utc)
    study_uid = study_instance_uid or generate_uid()
    patient_attributes = _patient_attributes(patient, study_uid)
    names = provenance(record)
    device_uid = generate_uid(entropy_srcs=["rrg3d", names["model"] or "", names["preset"] or ""])
    description = "rrg3d preliminary report" + (f", preset {names['preset']}" if names["preset"] else "")
    try:
        dataset = ComprehensiveSR(
            evidence=[_stub_evidence(study_uid, patient_attributes)],
            content=_content(record, report, device_uid, names["model"]),
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=instance_number,
            manufacturer="rrg3d",
            is_complete=False, is_final=False, is_verified=False,
            record_evidence=False,
            series_description=description[:64],
            manufacturer_model_name=names["model"],
            software_versions=__version__,
            content_date=when.date(), content_time=when.time().replace(tzinfo=None),
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError) as exc:
        raise RRG3DError(f"the SR document could not be built: {exc}") from None
    # The stub's instance does not exist: the document references no images.
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        if keyword in dataset:
            delattr(dataset, keyword)
    dataset.TimezoneOffsetFromUTC = "+0000"
    return dataset


def write_sr(record: dict[str, Any], path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write :func:`comprehensive_sr` of a record as a DICOM Part 10 file, atomically; returns the path."""
    from rrg3d.utils.files import atomic_path

    dataset = comprehensive_sr(record, **kwargs)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return Path(path)
