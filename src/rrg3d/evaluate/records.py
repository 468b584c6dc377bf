"""Loading predictions and references and pairing them by id — every mismatch counted, none dropped silently.

* Predictions: JSONL ``{"id", "report", "region_reports"?: {region: text}, "region_recognition"?: {region: name},
  "error"?: "...", ...}``; a record with a non-empty ``error`` (generation failed) is a failed prediction whatever its
  report says. ``region_recognition`` (region-guided models) names, for each region the model was shown, the region
  it recognised. Older predictions with ``regions`` mapping names to text are read as ``region_reports`` (a
  ``regions`` mapping names to label values, as ``rrg3d generate`` writes it, is grounding, not text).
* References: a manifest (:mod:`rrg3d.data.manifest`, detected by ``images`` in its records), a JSONL of
  ``{"id", "report", "region_reports"?, "petrg"?}``, or a CSV with an id column (``id``, ``AccessionNo``,
  ``VolumeName``) and a report column (``report``, ``report_text``; else ``Findings_EN`` + ``Impressions_EN``). A
  reference's ``petrg`` (``{region: {"pet": class, "ct": class}}``, e.g. PET phantoms) is the PETRG truth of its
  study (:mod:`rrg3d.text.petrg`).

Pairing (:func:`pair`) gives every reference a status: ``ok``, ``empty`` (blank report), ``error`` (the record
carries an error) or ``missing`` (no prediction). ``missing="score-empty"`` (default) keeps them all and scores the
failures as empty reports, ``"skip"`` leaves them out of the metrics (still counted), ``"fail"`` raises.
Predictions whose id is not among the references are counted as ``extra``. Duplicate ids are errors.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrg3d.errors import RRG3DError
from rrg3d.utils.files import iter_jsonl

MISSING_POLICIES = ("score-empty", "skip", "fail")
STATUSES = ("ok", "empty", "error", "missing")
_ID_COLUMNS = ("id", "AccessionNo", "VolumeName", "study_id")
_REPORT_COLUMNS = ("report", "report_text", "Report")


class EvaluationError(RRG3DError):
    """Predictions or references cannot be evaluated as given."""


@dataclasses.dataclass
class Reference:
    id: str
    report: str
    region_reports: dict[str, str] | None = None
    petrg: dict[str, dict[str, str]] | None = None


@dataclasses.dataclass
class Prediction:
    id: str
    report: str | None
    regions: dict[str, str] | None = None
    error: str | None = None
    line: int | None = None
    #: region shown → region the model named for it (None: it wrote nothing for that region)
    recognition: dict[str, str | None] | None = None


@dataclasses.dataclass
class Paired:
    """References and the candidates scored against them, in reference order."""

    ids: list[str]
    references: list[str]
    candidates: list[str]
    status: list[str]
    reference_regions: list[dict[str, str] | None]
    candidate_regions: list[dict[str, str] | None]
    counts: dict[str, Any]
    problems: dict[str, list[str]]
    candidate_recognition: list[dict[str, str | None] | None] = dataclasses.field(default_factory=list)
    reference_petrg: list[dict[str, dict[str, str]] | None] = dataclasses.field(default_factory=list)


def _read_jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvaluationError(f"{path}: {what} file not found")
    records = list(iter_jsonl(path, what=what, error=EvaluationError))
    if not records:
        raise EvaluationError(f"{path}: no {what} in the file (it is empty)")
    return records


def _record_id(path: Path, number: int, record: dict[str, Any]) -> str:
    value = record.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise EvaluationError(f"{path}:{number} [id]: missing or empty 'id'")
    return value


def _text_dict(path: Path, number: int, record: dict[str, Any], field: str) -> dict[str, str] | None:
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) or v is None for v in value.values()):
        raise EvaluationError(f"{path}:{number} [{field}]: must map region names to text")
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def load_predictions(path: str | os.PathLike[str]) -> list[Prediction]:
    """Read a predictions JSONL (see the module doc); duplicate ids and malformed lines raise."""
    path = Path(path)
    out: list[Prediction] = []
    seen: dict[str, int] = {}
    for number, record in _read_jsonl(path, "predictions"):
        pid = _record_id(path, number, record)
        if pid in seen:
            raise EvaluationError(f"{path}:{number} [id]: duplicate prediction id {pid!r} (first on line {seen[pid]})")
        seen[pid] = number
        report = record.get("report")
        if report is not None and not isinstance(report, str):
            raise EvaluationError(f"{path}:{number} [report]: must be a string or null")
        error = record.get("error")
        error = str(error) if error not in (None, "", False) else None
        regions = _text_dict(path, number, record, "region_reports")
        legacy = record.get("regions")
        if regions is None and isinstance(legacy, dict) and legacy and all(isinstance(v, str) for v in legacy.values()):
            regions = _text_dict(path, number, record, "regions")
        recognition = record.get("region_recognition")
        if recognition is not None and (not isinstance(recognition, dict) or not all(
                isinstance(v, str) or v is None for v in recognition.values())):
            raise EvaluationError(f"{path}:{number} [region_recognition]: must map region names to a name or null")
        out.append(Prediction(pid, report, regions, error, number,
                              {str(k): v for k, v in recognition.items()} if recognition is not None else None))
    return out


def load_references(path: str | os.PathLike[str]) -> tuple[list[Reference], list[str]]:
    """References with a report, and the ids of records that have none (counted, not evaluated)."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _load_csv(path)
    records = _read_jsonl(path, "references")
    if any("images" in record for _, record in records):
        from rrg3d.data.manifest import load_manifest

        records = list(enumerate(load_manifest(path), start=1))
    out: list[Reference] = []
    without: list[str] = []
    seen: dict[str, int] = {}
    for number, record in records:
        rid = _record_id(path, number, record)
        if rid in seen:
            raise EvaluationError(f"{path}:{number} [id]: duplicate reference id {rid!r} (first on line {seen[rid]})")
        seen[rid] = number
        report = record.get("report")
        if report is not None and not isinstance(report, str):
            raise EvaluationError(f"{path}:{number} [report]: must be a string")
        if not report or not report.strip():
            without.append(rid)
            continue
        out.append(Reference(rid, report, _text_dict(path, number, record, "region_reports"),
                             _petrg_truth(path, number, record)))
    if not out:
        raise EvaluationError(f"{path}: no reference has a report")
    return out, without


def _petrg_truth(path: Path, number: int, record: dict[str, Any]) -> dict[str, dict[str, str]] | None:
    """A record's PETRG truth, checked: unknown regions or classes are errors (a truth must be exact)."""
    value = record.get("petrg")
    if value is None:
        return None
    from rrg3d.text.petrg import check_statuses

    statuses, problems = check_statuses(value, fill=False)
    if problems:
        raise EvaluationError(f"{path}:{number} [petrg]: {problems[0]}" + (
            f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return statuses


def _load_csv(path: Path) -> tuple[list[Reference], list[str]]:
    if not path.is_file():
        raise EvaluationError(f"{path}: references file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{path}: cannot read the CSV ({exc})") from None
    columns = rows[0].keys() if rows else []
    id_column = next((c for c in _ID_COLUMNS if c in columns), None)
    report_column = next((c for c in _REPORT_COLUMNS if c in columns), None)
    if id_column is None or (report_column is None and "Findings_EN" not in columns):
        raise EvaluationError(f"{path}: a reference CSV needs an id column ({', '.join(_ID_COLUMNS)}) and a report "
                              f"column ({', '.join(_REPORT_COLUMNS)} or Findings_EN)")
    out, without, seen = [], [], set()
    for number, row in enumerate(rows, start=2):
        rid = (row.get(id_column) or "").strip()
        if not rid:
            raise EvaluationError(f"{path}:{number} [{id_column}]: empty id")
        if rid in seen:
            raise EvaluationError(f"{path}:{number} [{id_column}]: duplicate reference id {rid!r}")
        seen.add(rid)
        if report_column:
            report = row.get(report_column) or ""
        else:
            report = " ".join(x for x in (row.get("Findings_EN"), row.get("Impressions_EN")) if x)
        if report.strip():
            out.append(Reference(rid, report))
        else:
            without.append(rid)
    if not out:
        raise EvaluationError(f"{path}: no reference has a report")
    return out, without


def _examples(ids: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def pair(references: Sequence[Reference], predictions: Sequence[Prediction], missing: str = "score-empty",
         references_without_report: Sequence[str] = ()) -> Paired:
    """Pair predictions with references by id (see the module doc for statuses and policies)."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}")
    by_id = {p.id: p for p in predictions}
    ref_ids = {r.id for r in references}
    matched_ids = ref_ids & set(by_id)
    if not matched_ids:
        raise EvaluationError(
            f"no prediction id matches a reference id ({len(predictions)} predictions, {len(references)} "
            f"references; e.g. predictions {_examples([p.id for p in predictions])} vs references "
            f"{_examples([r.id for r in references])})")
    problems: dict[str, list[str]] = {"missing": [], "empty": [], "error": [], "extra": []}
    statuses = []
    for reference in references:
        prediction = by_id.get(reference.id)
        if prediction is None:
            status = "missing"
        elif prediction.error is not None:
            status = "error"
        elif not (prediction.report or "").strip():
            status = "empty"
        else:
            status = "ok"
        statuses.append(status)
        if status != "ok":
            problems[status].append(reference.id)
    no_report = set(references_without_report)
    problems["extra"] = [p.id for p in predictions if p.id not in ref_ids and p.id not in no_report]
    problems["reference_without_report"] = [i for i in references_without_report if i in by_id]
    failed = [i for i, s in zip([r.id for r in references], statuses, strict=True) if s != "ok"]
    if missing == "fail" and failed:
        raise EvaluationError(f"{len(failed)} of {len(references)} references have no usable prediction "
                              f"({_examples(failed)}); use --missing score-empty or skip to evaluate anyway")
    keep = [i for i, s in enumerate(statuses) if missing == "score-empty" or s == "ok"]
    ids, refs, cands, kept_status, ref_regions, cand_regions, recognitions = [], [], [], [], [], [], []
    truths: list[dict[str, dict[str, str]] | None] = []
    for i in keep:
        reference = references[i]
        prediction = by_id.get(reference.id)
        usable = statuses[i] == "ok" and prediction is not None
        ids.append(reference.id)
        refs.append(reference.report)
        cands.append((prediction.report or "") if usable and prediction else "")
        kept_status.append(statuses[i])
        ref_regions.append(reference.region_reports)
        cand_regions.append(prediction.regions if usable and prediction else None)
        recognitions.append(prediction.recognition if usable and prediction else None)
        truths.append(reference.petrg)
    counts = {"references": len(references), "predictions": len(predictions), "matched": len(matched_ids),
              "scored": len(ids), "ok": statuses.count("ok"), "missing_predictions": len(problems["missing"]),
              "empty_predictions": len(problems["empty"]), "errors": len(problems["error"]),
              "extra_predictions": len(problems["extra"]),
              "references_without_report": len(references_without_report), "missing_policy": missing}
    return Paired(ids, refs, cands, kept_status, ref_regions, cand_regions, counts, problems, recognitions, truths)
