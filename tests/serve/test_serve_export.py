"""FHIR DiagnosticReport and DICOM Comprehensive SR export of prediction records (``rrg3d export``)."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest

from rrg3d.cli import main
from rrg3d.errors import RRG3DError

pytest.importorskip("fhir.resources")
pytest.importorskip("highdicom")

REPORT = ("Findings: The lungs are clear. The heart is normal in size.\n"
          "Impression: No acute cardiopulmonary abnormality.")
META = {"source": "/data/Plantedname^Testpatient/PHI-ID-7781234/scan.nii.gz", "model": "small_resnet3d_dx",
        "checkpoint": "/home/Plantedname/ckpt", "preset": {"name": "ctrate", "sha256": "0" * 64}, "seconds": 1.2}
SECRETS = ("Plantedname", "Testpatient", "PHI-ID-7781234", "/data/", "ckpt")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _record(**extra):
    return {"id": "PHI-ID-7781234", "report": REPORT, "meta": dict(META), **extra}


def _region_record():
    regions = {"lung": "The lungs are clear.", "heart": "The heart is normal in size."}
    return _record(region_reports=regions, regions={"lung": 1, "heart": 2})


def _texts(dataset):
    """Every TEXT value and concept meaning in an SR content tree, depth first."""
    out = []
    for item in dataset.get("ContentSequence", []):
        out.append(item.ConceptNameCodeSequence[0].CodeMeaning)
        if "TextValue" in item:
            out.append(item.TextValue)
        out.extend(_texts(item))
    return out


def test_fhir_report_round_trip():
    from fhir.resources.diagnosticreport import DiagnosticReport

    from rrg3d.serve.fhir import diagnostic_report, diagnostic_report_json

    issued = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    resource = diagnostic_report(_region_record(), issued=issued)
    parsed = DiagnosticReport.model_validate(json.loads(diagnostic_report_json(_region_record(), issued=issued)))
    assert parsed.status == "preliminary"
    assert parsed.conclusion == "No acute cardiopulmonary abnormality."
    assert base64.b64decode(resource["presentedForm"][0]["data"]).decode() == REPORT
    assert parsed.presentedForm[0].contentType.startswith("text/plain") and parsed.presentedForm[0].language == "en"
    assert resource["category"][0]["coding"][0]["code"] == "RAD"
    assert resource["code"]["coding"][0] == {"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}
    assert resource["issued"].startswith("2024-05-01T12:00:00")
    assert "subject" not in resource
    assert {tag["code"] for tag in resource["meta"]["tag"]} == {"small_resnet3d_dx", "ctrate"}
    assert "small_resnet3d_dx" in resource["note"][0]["text"]
    observations = {item["id"]: item for item in resource["contained"]}
    assert [ref["reference"] for ref in resource["result"]] == ["#region-1", "#region-2"]
    assert observations["region-1"]["code"]["text"] == "lung"
    assert observations["region-1"]["bodySite"]["text"] == "lung"
    assert observations["region-2"]["valueString"] == "The heart is normal in size."


def test_fhir_without_impression_subject_and_other_preset():
    from rrg3d.serve.fhir import diagnostic_report

    record = {"id": "x", "report": "Lungs clear.", "meta": {"model": "m", "preset": {"name": "tiny"}}}
    resource = diagnostic_report(record, patient_reference="Patient/123", report_id="rep-1")
    assert resource["conclusion"] == "Lungs clear."
    assert resource["subject"] == {"reference": "Patient/123"}
    assert resource["id"] == "rep-1"
    assert resource["code"]["coding"][0]["code"] == "18748-4"
    assert "contained" not in resource and "result" not in resource
    with pytest.raises(RRG3DError):
        diagnostic_report({"id": "x", "report": None, "error": "unreadable"})
    with pytest.raises(RRG3DError):
        diagnostic_report(record, report_id="not/a fhir id")


def test_sr_round_trip(tmp_path):
    import pydicom

    from rrg3d.serve.sr import write_sr

    path = write_sr(_region_record(), tmp_path / "report.dcm")
    dataset = pydicom.dcmread(path)
    assert dataset.Modality == "SR"
    assert dataset.SOPClassUID == COMPREHENSIVE_SR
    assert dataset.file_meta.MediaStorageSOPClassUID == COMPREHENSIVE_SR
    assert (dataset.CompletionFlag, dataset.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    assert dataset.Manufacturer == "rrg3d" and str(dataset.PatientName) == ""
    assert dataset.PatientID.startswith("rrg3d-anon-") and dataset.PatientBirthDate == ""
    assert "CurrentRequestedProcedureEvidenceSequence" not in dataset
    assert dataset.ConceptNameCodeSequence[0].CodeValue == "24627-2"
    texts = _texts(dataset)
    assert "The lungs are clear. The heart is normal in size." in texts
    assert "No acute cardiopulmonary abnormality." in texts
    assert {"Findings", "Finding", "Impressions", "Impression", "Finding Site"} <= set(texts)
    findings = next(item for item in dataset.ContentSequence if item.ValueType == "CONTAINER"
                    and item.ConceptNameCodeSequence[0].CodeMeaning == "Findings")
    regions = [item for item in findings.ContentSequence if item.ValueType == "CONTAINER"]
    sites = [[child.TextValue for child in item.ContentSequence] for item in regions]
    assert sites == [["lung", "The lungs are clear."], ["heart", "The heart is normal in size."]]
    assert not list(tmp_path.glob(".*tmp*"))


def test_sr_explicit_patient(tmp_path):
    import pydicom

    from rrg3d.serve.sr import comprehensive_sr, write_sr

    patient = {"name": "Doe^Jane", "id": "MRN-1", "birth_date": "19700101", "sex": "female"}
    dataset = pydicom.dcmread(write_sr(_record(), tmp_path / "p.dcm", patient=patient, study_instance_uid="1.2.3.4"))
    assert (str(dataset.PatientName), dataset.PatientID, dataset.PatientBirthDate, dataset.PatientSex) == (
        "Doe^Jane", "MRN-1", "19700101", "F")
    assert dataset.StudyInstanceUID == "1.2.3.4"
    with pytest.raises(RRG3DError):
        comprehensive_sr(_record(), patient={"address": "x"})


def test_no_identifier_leaks(tmp_path):
    from rrg3d.serve.fhir import diagnostic_report_json
    from rrg3d.serve.sr import write_sr

    text = diagnostic_report_json(_region_record())
    data = write_sr(_region_record(), tmp_path / "r.dcm").read_bytes()
    for secret in SECRETS:
        assert secret not in text
        assert secret.encode() not in data


def test_cli_round_trip(tmp_path, capsys):
    from fhir.resources.diagnosticreport import DiagnosticReport

    pred = tmp_path / "pred.jsonl"
    records = [_record(), {"id": "case2", "report": None, "error": "unreadable scan", "meta": {"source": "/x"}},
               {"id": "case3", "report": "Impression: Normal.", "meta": {"model": "m"}}]
    pred.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = tmp_path / "fhir"
    assert main(["export", str(pred), "--format", "fhir", "--out", str(out),
                 "--patient-reference", "Patient/abc"]) == 0
    assert "1 skipped" in capsys.readouterr().err
    summary = json.loads((out / "export_summary.json").read_text())
    assert summary["written"] == 2 and summary["skipped"][0]["line"] == 2
    assert sorted(p.name for p in out.glob("*.fhir.json")) == ["PHI-ID-7781234.fhir.json", "case3.fhir.json"]
    resource = DiagnosticReport.model_validate_json((out / "case3.fhir.json").read_text())
    assert resource.subject.reference == "Patient/abc" and resource.conclusion == "Normal."

    anon = tmp_path / "sr"
    assert main(["export", str(pred), "--format", "sr", "--out", str(anon), "--anonymize-names", "--strict"]) == 1
    assert sorted(p.name for p in anon.iterdir()) == ["export_summary.json", "study_0001.dcm", "study_0003.dcm"]
    for path in anon.iterdir():
        for secret in SECRETS:
            assert secret.encode() not in path.read_bytes()

    only_failed = tmp_path / "failed.jsonl"
    only_failed.write_text(json.dumps(records[1]) + "\n")
    assert main(["export", str(only_failed), "--format", "fhir", "--out", str(tmp_path / "none")]) == 2
    assert main(["export", str(pred), "--format", "sr", "--out", str(tmp_path / "x"),
                 "--patient-reference", "P/1"]) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n")
    capsys.readouterr()
    assert main(["export", str(bad), "--format", "fhir", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid JSON" in err
    assert not (tmp_path / "bad").exists()
    assert main(["export", str(tmp_path / "missing.jsonl"), "--format", "fhir", "--out", str(tmp_path / "m")]) == 2
    assert "no such predictions file" in capsys.readouterr().err
