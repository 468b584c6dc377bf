"""AutoPET-RG-Lym: the autoPET FDG lymphoma studies (PET/CT) with expert reports written in Chinese (PETRG-3D).

The images are the public autoPET FDG NIfTI release; the dataset adds a report file. Its exact shape is not fixed
here, so the adapter accepts the plausible ones:

* **report file** (``--reports``; found automatically as ``reports.json``, ``AutoPET-RG-Lym.json``,
  ``annotations.json`` ... or as the only ``.json``/``.jsonl`` file of the root): a JSON list of records, a JSON
  object ``{study_key: record}`` (or ``{study_key: "report text"}``), ``{split: [records]}`` /
  ``{split: {study_key: record}}`` (the split is taken from the key), a wrapper ``{"data"|"records"|"studies"|
  "annotations"|"reports": [...]}``, or JSON Lines (one record per line);
* **images** (``--images-dir``, default: the root): the autoPET TCIA layout ``<patient>/<study>/CTres.nii.gz``,
  ``SUV.nii.gz``, ``SEG.nii.gz`` (any depth up to four folders below), or the challenge layout ``imagesTr/`` (see
  :mod:`rrg3d.data.adapters.autopet`, whose folder discovery is reused). The autoPET folders of the other
  (non-lymphoma) studies may be present: they are counted in a warning and left out.

Fields of a record are looked up case-insensitively (``--id-key`` / ``--report-key`` / ``--style-key`` override):

* study key: the object key, or ``id``/``study_id``/``case``/``study``/``folder``/``patient``/``path`` ... It may
  be the autoPET patient folder (``PETCT_0117d7f11f``), the study folder (``09-13-2001-NA-PET-CT ...``), both as
  ``patient/study``, a path to the study folder or one of its files, our ``autopet_...`` id, or the challenge case
  name. A patient folder holding several studies is resolved by a study date (``study_date``/``date``/``检查日期``,
  or a date written in the key); otherwise the record is skipped as ambiguous;
* report: ``findings``/``检查所见``/``影像所见``/``影像表现`` and ``impression``/``诊断意见``/``印象``/``结论`` ...
  give ``sections``; a single ``report``/``report_zh``/``text``/``报告`` text (or a nested ``{"findings", ...}``
  object) is kept as the report and split into sections at Chinese or English headers (``检查所见：``,
  ``【诊断意见】``, ``Impression:`` ...) when it has them. Keys ending in ``_en`` (translations) are ignored;
* ``hospital``/``style``/``center``/``site``/``医院`` → ``style`` (the reporting style), kept as written;
* ``sex``/``gender``/``性别``: ``M``/``F``/``male``/``female``/``男``/``女`` (``男性``/``女性``) → ``"male"`` /
  ``"female"``; missing or anything else → ``null`` (unrecognised values are counted in a warning);
* ``split``/``subset``/``set``: the release's split. Studies without one get ``--split-file``'s split, else a
  seeded split by patient (``--seed``, ``--split-ratios`` train/val/test), so that no patient spans two splits.

Records: ``id`` ``autopet_rg_lym_<patient>_<study>`` (from the autoPET folders, never from the report file's
keys), ``images`` ``{ct: CTres.nii.gz, pet: SUV.nii.gz}``, ``masks`` (``SEG.nii.gz``, ``{"1": "lesion"}``) when
present, ``report``, ``sections`` when separable, ``style``, ``sex``, ``split`` and ``meta`` (``source``,
``language``, ``tracer``, ``pet_units``, ``diagnosis`` ``LYMPHOMA``). Nothing else of the report file (ages,
dates, names, hospital record numbers) is copied. Malformed JSON is an error naming the file; a record whose
study is not found (or that has no report text) is skipped with the reason.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rrg3d.data.adapters.autopet import (
    LAYOUTS,
    LESION_LABELS,
    PET_KINDS,
    _date_key,
    _nnunet_studies,
    _read_split_file,
    _Study,
    _tcia_studies,
)
from rrg3d.data.adapters.base import (
    SPLIT_NAMES,
    Adapter,
    Collector,
    ConversionResult,
    Option,
    clean_text,
    natural_key,
    sanitize_id,
    split_name,
    user_path,
    volume_stem,
)
from rrg3d.errors import RRG3DError

SOURCE = "AutoPET-RG-Lym"
ID_PREFIX = "autopet_rg_lym_"

REPORT_FILES = ("reports.json", "report.json", "AutoPET-RG-Lym.json", "autopet_rg_lym.json", "autopet-rg-lym.json",
                "annotations.json", "annotation.json", "reports.jsonl", "AutoPET-RG-Lym.jsonl")
#: JSON files of image layouts that are never the report file.
NOT_REPORT_FILES = ("dataset.json", "splits_final.json", "splits.json", "split.json")
WRAPPER_KEYS = ("data", "records", "studies", "annotations", "reports", "items", "cases")

ID_KEYS = ("id", "study_id", "studyid", "case_id", "case", "study", "study_folder", "folder", "name", "autopet_id",
           "petct_id", "patient_id", "patient", "subject_id", "subject", "path", "study_path", "image", "image_path",
           "dir", "pet", "pet_path", "suv", "ct", "ct_path")
PATIENT_KEYS = ("patient", "patient_id", "subject", "subject_id", "petct_id")
STUDY_KEYS = ("study", "study_folder", "study_id", "folder")
DATE_KEYS = ("study_date", "date", "exam_date", "检查日期")
FINDINGS_KEYS = ("findings_zh", "findings", "finding", "检查所见", "影像所见", "影像表现", "所见", "description")
IMPRESSION_KEYS = ("impression_zh", "impression", "impressions", "conclusion", "诊断意见", "诊断结论", "检查结论",
                   "影像诊断", "诊断", "印象", "结论")
REPORT_KEYS = ("report_zh", "report", "text", "report_text", "报告", "报告内容", "content")
STYLE_KEYS = ("hospital", "style", "center", "centre", "site", "institution", "report_style", "医院", "中心")
SEX_KEYS = ("sex", "gender", "性别")
SPLIT_KEYS = ("split", "subset", "set", "partition")
SEX_VALUES = {"m": "male", "male": "male", "man": "male", "男": "male", "男性": "male",
              "f": "female", "female": "female", "woman": "female", "女": "female", "女性": "female"}

_FINDINGS_HEADERS = ("检查所见", "影像所见", "影像表现", "检查描述", "所见", "findings", "finding")
_IMPRESSION_HEADERS = ("影像学诊断", "诊断意见", "诊断结论", "检查结论", "影像诊断", "诊断印象", "印象", "结论", "诊断",
                       "impressions", "impression", "conclusions", "conclusion")
_NAMES = "|".join(sorted((re.escape(h) for h in _FINDINGS_HEADERS + _IMPRESSION_HEADERS), key=len, reverse=True))
#: A section header: in brackets anywhere (【检查所见】, [Findings], colon optional), or at the start of the text or a
#: line, or after a space or sentence punctuation (a "PET/CT" prefix allowed), followed by a colon or the end of its
#: line.
_HEADER = re.compile(rf"[【\[]\s*(?P<bracketed>{_NAMES})\s*[】\]]\s*[:：]?"
                     rf"|(?:^|(?<=[\s。；;，,.!?！？]))(?:PET\s*[/-]?\s*CT\s*)?(?P<plain>{_NAMES})[ \t]*(?:[:：]|\n|$)",
                     re.IGNORECASE | re.MULTILINE)
_DATE = r"\d{2,4}[-./]\d{1,2}[-./]\d{2,4}|(?:19|20)\d{6}"
_DATE_SUFFIX = re.compile(rf"[\s_/-]+(?:{_DATE})$")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def normalize_sex(value: Any) -> str | None:
    """``"male"``/``"female"`` from ``M``/``F``/``male``/``female``/``男``/``女`` (any case); otherwise ``None``."""
    if value is None or isinstance(value, bool):
        return None
    return SEX_VALUES.get(clean_text(value).lower().rstrip("."))


def split_sections(text: str) -> dict[str, str]:
    """``{"findings", "impression"}`` of a report at its Chinese or English headers; ``{}`` without headers.

    Text before the first header (e.g. the examination technique) stays in the report only; a kind that appears
    twice is joined with a space.
    """
    matches = list(_HEADER.finditer(text or ""))
    sections: dict[str, list[str]] = {}
    for index, match in enumerate(matches):
        header = (match.group("bracketed") or match.group("plain")).lower()
        kind = "findings" if header in _FINDINGS_HEADERS else "impression"
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = clean_text(text[match.end():end])
        if body:
            sections.setdefault(kind, []).append(body)
    return {kind: " ".join(parts) for kind, parts in sections.items()}


def build_zh_report(findings: str, impression: str) -> str:
    """``"检查所见：... 诊断意见：..."`` from whichever sections are present."""
    parts = []
    if findings:
        parts.append(f"检查所见：{findings}")
    if impression:
        parts.append(f"诊断意见：{impression}")
    return " ".join(parts)


def _lower_keys(entry: dict[str, Any]) -> dict[str, Any]:
    return {str(key).strip().lower(): value for key, value in entry.items()}


def _first_text(fields: dict[str, Any], keys: Sequence[str]) -> str:
    """The first non-empty text value among ``keys`` (objects and lists are not text)."""
    for key in keys:
        value = fields.get(key.lower())
        text = "" if isinstance(value, (dict, list)) else clean_text(value)
        if text:
            return text
    return ""


def report_texts(fields: dict[str, Any], report_key: str | None = None) -> tuple[str, dict[str, str]]:
    """``(report, sections)`` of one record (keys already lower-case); ``("", {})`` when it has no text."""
    for key in (report_key.lower(),) if report_key else REPORT_KEYS:
        nested = fields.get(key)
        if isinstance(nested, dict):  # {"report": {"findings": ..., "impression": ...}}
            fields = {**fields, **_lower_keys(nested)}
            fields.pop(key, None)
            break
    findings = _first_text(fields, FINDINGS_KEYS)
    impression = _first_text(fields, IMPRESSION_KEYS)
    sections = {k: v for k, v in (("findings", findings), ("impression", impression)) if v}
    raw = next((value for key in ((report_key.lower(),) if report_key else REPORT_KEYS)
                if isinstance(value := fields.get(key), str) and value.strip()), "")
    if raw:  # the release's own report text; sections from its fields, or from its headers when they give more
        from_headers = split_sections(raw.replace("\r\n", "\n"))
        return clean_text(raw), sections if len(sections) >= len(from_headers) else from_headers
    if sections:
        return build_zh_report(findings, impression), sections
    return "", {}


# ----------------------------------------------------------------------------------------------- report file


def _find_reports(root: Path, reports: str | None) -> Path:
    if reports:
        path = user_path(reports, root)
        if not path.is_file():
            raise RRG3DError(f"{path}: AutoPET-RG-Lym report file not found")
        return path
    for name in REPORT_FILES:
        if (root / name).is_file():
            return root / name
    candidates = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl")
                        and p.name.lower() not in NOT_REPORT_FILES and "split" not in p.name.lower())
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no .json/.jsonl file"
    raise RRG3DError(f"{root}: cannot tell which file holds the AutoPET-RG-Lym reports (looked for "
                     f"{', '.join(REPORT_FILES)}; found {found}); pass --reports FILE")


def _load_json(path: Path) -> Any:
    """The parsed report file (JSON, or JSON Lines as a list); malformed content raises naming the file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RRG3DError(f"{path}: AutoPET-RG-Lym report file is not UTF-8 text (byte offset {exc.start})") from exc
    except OSError as exc:
        raise RRG3DError(f"{path}: cannot read the AutoPET-RG-Lym report file ({exc.strerror or exc})") from exc
    if path.suffix.lower() != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RRG3DError(f"{path}: malformed JSON in the AutoPET-RG-Lym report file ({exc.msg} at line "
                             f"{exc.lineno}, column {exc.colno})") from exc
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RRG3DError(f"{path}:{number}: malformed JSON line in the AutoPET-RG-Lym report file "
                             f"({exc.msg} at column {exc.colno})") from exc
    return items


def _entries(path: Path, data: Any) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """``(where, entry, key_or_None, split_or_None)`` for each record of a parsed report file."""
    if isinstance(data, dict):
        lowered = {str(key).strip().lower(): key for key in data}
        wrapped = [lowered[k] for k in WRAPPER_KEYS if k in lowered and isinstance(data[lowered[k]], (list, dict))]
        if wrapped and len(data) <= 4:  # {"info": {...}, "version": ..., "data": [...]}
            yield from _entries(path, data[wrapped[0]])
            return
        splits = [key for key, value in data.items()
                  if str(key).strip().lower() in SPLIT_NAMES and isinstance(value, (list, dict))]
        if splits and len(splits) == len(data):
            for key in splits:
                for where, entry, study_key, _ in _entries(path, data[key]):
                    yield where.replace(path.name, f"{path.name}:{key}", 1), entry, study_key, split_name(str(key))
            return
        for key, value in data.items():
            yield f"{path.name}:{key}", value, str(key), None
        return
    if isinstance(data, list):
        for index, item in enumerate(data):
            yield f"{path.name}[{index}]", item, None, None
        return
    raise RRG3DError(f"{path}: expected a JSON list of report records or an object keyed by study, got "
                     f"{type(data).__name__}")


# ------------------------------------------------------------------------------------------- study matching


def _norm(key: str) -> str:
    return " ".join(str(key).replace("\\", "/").split()).strip("/ ").lower()


def _parse_date(text: str) -> tuple[int, int, int] | None:
    """``(year, month, day)`` of ``2001-09-13``, ``09-13-2001`` (TCIA), ``2001年9月13日`` or ``20010913``."""
    compact = re.fullmatch(r"\s*((?:19|20)\d{2})(\d{2})(\d{2})\s*", text)
    if compact:
        return int(compact[1]), int(compact[2]), int(compact[3])
    return _date_key(text)


def _patient_of(study: _Study) -> str:
    """The patient a study belongs to (split grouping): the TCIA patient folder, or the case name's stem."""
    if study.folder is not None:
        parent, folder = study.folder
        return folder if study.id == f"autopet_{sanitize_id(folder)}" else parent
    case = study.id.removeprefix("autopet_")
    stem, _, tail = case.rpartition("_")
    return stem if stem and tail.isdigit() else case


class _StudyIndex:
    """autoPET studies found on disk, looked up by any key a report record may use."""

    def __init__(self, studies: Sequence[_Study]) -> None:
        self.studies = list(studies)
        self._keys: dict[str, list[int]] = {}
        for index, study in enumerate(self.studies):
            keys = set(study.keys) | {study.id, sanitize_id(study.id)}
            if study.folder is not None:
                parent, folder = study.folder
                keys |= {f"{parent}/{folder}", f"{parent}_{folder}", sanitize_id(f"{parent}_{folder}")}
            for key in keys:
                bucket = self._keys.setdefault(_norm(key), [])
                if index not in bucket:
                    bucket.append(index)

    def candidates(self, key: str) -> list[int]:
        """Indices of the studies a key names (several for a patient folder with several studies)."""
        text = _norm(key)
        if not text:
            return []
        found = self._keys.get(text) or self._keys.get(_norm(sanitize_id(text)))
        if found:
            return found
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if parts and volume_stem(parts[-1]) != parts[-1]:  # a path to one of the study's files
            parts = parts[:-1]
        for size in (2, 1):
            if len(parts) >= size and (found := self._keys.get("/".join(parts[-size:]))):
                return found
        undated = _DATE_SUFFIX.sub("", text)  # "PETCT_x_2001-09-13": the patient, resolved by the date
        return self._keys.get(undated, []) if undated != text else []

    def resolve(self, keys: Sequence[str], date: str | None) -> tuple[_Study | None, str]:
        """``(study, "")`` for the first key that names one study, else ``(None, reason)``."""
        ambiguous: list[int] = []
        for key in keys:
            found = self.candidates(key)
            if len(found) == 1:
                return self.studies[found[0]], ""
            if len(found) > 1:
                wanted = _parse_date(date) if date else None
                if wanted is None:  # a date written in the key itself, e.g. "PETCT_x_2001-09-13"
                    wanted = next((d for m in re.finditer(_DATE, key)
                                   if (d := _parse_date(m.group()))), None)
                dated = [i for i in found if wanted and self._study_date(i) == wanted]
                if len(dated) == 1:
                    return self.studies[dated[0]], ""
                ambiguous = ambiguous or found
        if ambiguous:
            return None, (f"{keys[0]!r} names {len(ambiguous)} autoPET studies (a patient with several); give the "
                          f"study folder or a study date")
        shown = ", ".join(repr(k) for k in keys[:3]) or "no study key"
        return None, f"no autoPET study folder matches {shown}"

    def _study_date(self, index: int) -> tuple[int, int, int] | None:
        folder = self.studies[index].folder
        if folder is None or not re.match(r"^\d{2}-\d{2}-\d{4}", folder[1]):
            return None
        return _date_key(folder[1][:10])


def _study_keys(fields: dict[str, Any], key: str | None, id_key: str | None) -> list[str]:
    """Keys that may name the study of a record, most specific first."""
    keys: list[str] = []
    if id_key:
        value = fields.get(id_key.lower())
        return [clean_text(value)] if value is not None and clean_text(value) else []
    patient = _first_text(fields, PATIENT_KEYS)
    study = next((clean_text(fields[k]) for k in STUDY_KEYS if k in fields and clean_text(fields[k])
                  and clean_text(fields[k]) != patient), "")
    if patient and study:
        keys.append(f"{patient}/{study}")
    if key:
        keys.append(key)
    for name in ID_KEYS:
        value = fields.get(name)
        if isinstance(value, list) and value:
            value = value[0]
        if value is not None and not isinstance(value, (dict, list)) and clean_text(value):
            keys.append(clean_text(value))
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------------- splits


def seeded_split(patients: Sequence[str], seed: int, ratios: Sequence[float]) -> dict[str, str]:
    """``{patient: split}``: a seeded permutation of the sorted patients cut by train/val/test ``ratios``."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise RRG3DError(f"AutoPET-RG-Lym: --split-ratios needs three non-negative numbers (train val test), got "
                         f"{list(ratios)}")
    order = sorted(set(patients), key=natural_key)
    random.Random(seed).shuffle(order)
    total = float(sum(ratios))
    n_test = round(len(order) * ratios[2] / total)
    n_val = round(len(order) * ratios[1] / total)
    out = {patient: "test" for patient in order[:n_test]}
    out.update({patient: "val" for patient in order[n_test:n_test + n_val]})
    out.update({patient: "train" for patient in order[n_test + n_val:]})
    return out


# ------------------------------------------------------------------------------------------------- convert


def convert(
    root: Path,
    out: Path,
    *,
    reports: str | None = None,
    images_dir: str | None = None,
    layout: str = "auto",
    ct_file: str = "CTres.nii.gz",
    pet: str = "suv",
    seg_file: str = "SEG.nii.gz",
    require_seg: bool = False,
    id_key: str | None = None,
    report_key: str | None = None,
    style_key: str | None = None,
    split_file: str | None = None,
    fold: int = 0,
    seed: int = 0,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    language: str = "zh",
) -> ConversionResult:
    """Write a manifest of AutoPET-RG-Lym (report file + autoPET FDG NIfTI folders) to ``out``."""
    if layout not in LAYOUTS:
        raise RRG3DError(f"AutoPET-RG-Lym: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if pet not in PET_KINDS:
        raise RRG3DError(f"AutoPET-RG-Lym: --pet must be one of {', '.join(PET_KINDS)}, got {pet!r}")
    report_path = _find_reports(root, reports)
    images = user_path(images_dir, root) if images_dir else root
    if not images.is_dir():
        raise RRG3DError(f"{images}: autoPET image folder not found")
    if layout == "auto":
        layout = "nnunet" if (images / "imagesTr").is_dir() or (images / "imagesTs").is_dir() else "tcia"
    studies = (_nnunet_studies(images, "0000", "0001", "FDG") if layout == "nnunet"
               else _tcia_studies(images, ct_file, pet, seg_file, "FDG"))
    if not studies:
        raise RRG3DError(f"{images}: no autoPET study folder found (expected <patient>/<study>/{ct_file} + "
                         f"{PET_KINDS[pet][0]}, or imagesTr/<case>_0000.nii.gz)")
    entries = list(_entries(report_path, _load_json(report_path)))
    release_splits: dict[str, str] = {}
    if split_file:
        release_splits = _read_split_file(user_path(split_file, root), fold, "case", "split")

    index = _StudyIndex(studies)
    collector = Collector(SOURCE, out)
    matched: list[tuple[_Study, dict[str, Any], str | None]] = []
    used: set[str] = set()
    unknown_sex: set[str] = set()
    for where, entry, key, entry_split in entries:
        if isinstance(entry, str):
            entry = {"report": entry}
        if not isinstance(entry, dict):
            collector.skip(where, f"entry is a {type(entry).__name__}, not an object")
            continue
        fields = _lower_keys(entry)
        keys = _study_keys(fields, key, id_key)
        if not keys:
            collector.skip(where, f"no study key ({id_key!r} missing or empty)" if id_key else "no study key")
            continue
        study, reason = index.resolve(keys, _first_text(fields, DATE_KEYS) or None)
        if study is None:
            collector.skip(where, reason)
            continue
        study_id = ID_PREFIX + study.id.removeprefix("autopet_")
        if study.problem:
            collector.skip(study_id, study.problem)
            continue
        if study.seg is None and require_seg:
            collector.skip(study_id, f"missing {seg_file} (lesion mask)")
            continue
        report, sections = report_texts(fields, report_key)
        if not report:
            collector.skip(study_id, "empty report")
            continue
        sex_value = next((fields[k] for k in SEX_KEYS if fields.get(k) not in (None, "")), None)
        sex = normalize_sex(sex_value)
        if sex is None and sex_value is not None:
            unknown_sex.add(clean_text(sex_value))
        split = entry_split or _first_text(fields, SPLIT_KEYS) or None
        if split is None and release_splits:
            split = next((release_splits[k] for k in (*study.keys, *keys) if k in release_splits), None)
        record: dict[str, Any] = {
            "id": study_id,
            "split": split_name(split) if split else None,
            "images": {"ct": collector.rel(study.ct), "pet": collector.rel(study.pet)},
        }
        if study.seg is not None:
            record["masks"] = {"path": collector.rel(study.seg), "labels": dict(LESION_LABELS)}
        record["report"] = report
        if sections:
            record["sections"] = sections
        style = _first_text(fields, (style_key,) if style_key else STYLE_KEYS)
        if style:
            record["style"] = style
        record["sex"] = sex
        record["meta"] = {"source": SOURCE, "language": language, "tracer": "FDG", "pet_units": study.pet_units,
                          "diagnosis": "LYMPHOMA"}
        matched.append((study, record, split))
        used.add(study.id)

    unsplit = [(study, record) for study, record, split in matched if split is None]
    if unsplit:
        assigned = seeded_split([_patient_of(s) for s, _ in unsplit], seed, split_ratios)
        for study, record in unsplit:
            record["split"] = assigned[_patient_of(study)]
        collector.warn(f"split: {len(matched) - len(unsplit)} record(s) from the release, {len(unsplit)} seeded by "
                       f"patient (seed {seed}, train/val/test {' / '.join(f'{r:g}' for r in split_ratios)})")
    without_seg = no_cjk = 0
    for study, record, _ in matched:
        if collector.add(record):
            without_seg += study.seg is None
            no_cjk += language == "zh" and not _CJK.search(record["report"])
    if without_seg:
        mask_file = seg_file if layout == "tcia" else "labelsTr/<case>.nii.gz"
        collector.warn(f"{without_seg} stud(ies) have no lesion mask ({mask_file}); kept without masks")
    if no_cjk:
        collector.warn(f"{no_cjk} report(s) contain no Chinese character although meta.language is {language!r}")
    if unknown_sex:
        collector.warn(f"unrecognised sex value(s) {', '.join(sorted(map(repr, unknown_sex)))} written as null")
    unreported = sum(1 for study in studies if study.id not in used)
    if unreported:
        collector.warn(f"{unreported} autoPET stud(ies) under {images} have no report (not part of AutoPET-RG-Lym); "
                       f"left out")
    return collector.finish(root)


OPTIONS = (
    Option("reports", None, "report file (JSON, JSON Lines), relative to the root or absolute (default: found by "
                            "name, or the root's only .json)"),
    Option("images_dir", None, "autoPET FDG NIfTI folder (default: the root)"),
    Option("layout", "auto", "tcia: <patient>/<study>/CTres.nii.gz ...; nnunet: imagesTr/<case>_0000.nii.gz ...",
           choices=LAYOUTS),
    Option("ct_file", "CTres.nii.gz", "CT file of a study folder"),
    Option("pet", "suv", "PET image: suv (SUV.nii.gz) or pet (PET.nii.gz, Bq/ml); the other is the fallback",
           choices=tuple(PET_KINDS)),
    Option("seg_file", "SEG.nii.gz", "lesion mask file of a study folder"),
    Option("require_seg", False, "skip studies without a lesion mask instead of keeping them without masks"),
    Option("id_key", None, "record key naming the autoPET study (default: the object key, id, study_id, case ...)"),
    Option("report_key", None, "record key of the report text (default: report/report_zh/text, or the sections)"),
    Option("style_key", None, "record key of the reporting style (default: hospital/style/center/site ...)"),
    Option("split_file", None, "CSV (case,split) or JSON split file for records without a release split"),
    Option("fold", 0, "fold of an nnU-Net splits_final.json split file", type=int),
    Option("seed", 0, "seed of the split of records the release does not place", type=int),
    Option("split_ratios", (0.8, 0.1, 0.1), "train val test fractions of the seeded split (by patient)", type=float,
           nargs=3, metavar="F"),
    Option("language", "zh", "meta.language of the reports"),
)

ADAPTER = Adapter(
    name="autopet-rg-lym",
    description="AutoPET-RG-Lym: autoPET FDG lymphoma PET/CT (CTres, SUV, SEG) with Chinese reports, hospital "
                "style and sex",
    source=SOURCE,
    options=OPTIONS,
    run=convert,
)
