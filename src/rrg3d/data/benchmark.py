"""A CT-3DRRG-style benchmark (Argus): several public CT–report datasets merged into one patient-split manifest.

    from rrg3d.data.benchmark import build_benchmark

    summary = build_benchmark({"ctrate": Path("/data/CT-RATE"), "radgenome": Path("/data/RadGenome-ChestCT"),
                               "ctrg": Path("/data/CTRG")}, Path("bench"))

Each source is converted by its dataset adapter (:mod:`rrg3d.data.adapters`) into ``OUT/sources/<name>.jsonl``
(files an adapter derives, such as RadGenome's merged masks, live beside it), then:

1. **Ids**: every id starts with the source name (``ctrate_...``; adapters already prefix theirs); ``meta.source``
   is kept, ``meta.source_id`` holds the adapter's id and ``meta.patient_id`` the patient key.
2. **Patients** (:func:`patient_key`): ``meta.patient_id`` when an adapter gives one, else CT-RATE volume names
   ``<split>_<n>_<scan>_<recon>`` give patient ``<split>_<n>`` in one id space shared by CT-RATE and RadGenome-ChestCT
   (RadGenome is built on CT-RATE volumes: ``ctrate:train_1`` is one patient in both), autoPET ids their
   ``PETCT_<hash>`` folder (or the challenge case stem), CTRG cases are their own patient.
3. **Reports** (:func:`normalise_sections`): the adapter's findings/impression sections, else the report split by
   :func:`rrg3d.text.reports.split_sections` (text before the first header counts as findings when there is no
   findings section); ``sections`` keeps only ``findings`` and ``impression`` (other sections move to
   ``meta.other_sections``) and ``report`` is rebuilt as ``Findings: ... Impression: ...``. A record without findings
   or impression text (no letter or digit in either) is dropped (reason ``no report text``).
4. **Splits** (:func:`resolve_splits`), per patient and across sources: the official splits of all the patient's
   records (even ones dropped later) are collected and the strictest wins, ``test`` > ``val`` > ``train``, so no
   evaluation patient ever reaches training; each conflict is listed in ``summary.json``. A patient without any
   official split (CTRG cases that the report file does not place, which the builder has the adapter mark
   ``unassigned`` in ``sources/ctrg.jsonl``; every patient of a source named in ``resplit``) gets
   ``test`` when ``u < test_fraction``, ``val`` when ``u < test_fraction + val_fraction``, else ``train``, with
   ``u = sha256(f"{seed}:{patient}")`` as a fraction in [0, 1): deterministic and independent of the other
   patients, so adding a source never moves one. ``meta.official_split`` keeps what the source said.
5. **Duplicates** (:func:`deduplicate`), within one patient: the text compared is findings + impression,
   lower-cased, punctuation removed, whitespace collapsed. Equal texts are exact duplicates; texts whose
   ``difflib.SequenceMatcher`` ratio over their word sequences is at least ``near_duplicate`` (default 0.9) are near
   duplicates. Records are visited in source order (as given) then natural id order, and a record is removed when
   it duplicates one already kept (the first source given wins).
6. **Outputs**: ``manifest.jsonl`` (paths relative to it, schema-checked per record, validated again with
   :func:`rrg3d.data.manifest.validate_manifest`, opening every file with ``check_files``), ``summary.json``
   (per-source input, kept, dropped by reason, per split, lengths, label prevalences), ``removed.jsonl`` (every
   dropped row with its stage and reason), ``datasheet.md`` and ``report_lengths.png``. Every write is atomic.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d import __version__
from rrg3d.data.adapters import get_adapter
from rrg3d.data.adapters.base import Adapter, Option, build_report, natural_key, split_name, volume_stem
from rrg3d.data.manifest import check_record, relativize, resolve, validate_manifest
from rrg3d.errors import RRG3DError
from rrg3d.text.reports import normalize_report, split_sections
from rrg3d.utils.files import atomic_path, atomic_write_json, atomic_write_text, iter_jsonl

__all__ = ["LICENCES", "SPLIT_PRIORITY", "BenchmarkSummary", "SourceStats", "build_benchmark", "deduplicate",
           "hash_split", "normalise_sections", "parse_source_option", "patient_key", "resolve_splits"]

log = logging.getLogger(__name__)

FORMAT = "rrg3d-benchmark"
FORMAT_VERSION = 1
#: Official splits from the strictest down: a patient with several gets the first of them.
SPLIT_PRIORITY: tuple[str, ...] = ("test", "val", "train")
#: Split the builder asks an adapter to write for studies its release does not place (re-split by hash here).
UNASSIGNED = "unassigned"
#: Adapter options that make an adapter mark unplaced studies instead of putting them in ``train``.
_UNASSIGNED_OPTIONS: dict[str, dict[str, Any]] = {"ctrg": {"default_split": UNASSIGNED}}
#: Licences by adapter name (what the dataset's release states).
LICENCES: dict[str, str] = {
    "ctrate": "CC BY-NC-SA 4.0",
    "radgenome": "CC BY-NC-SA 4.0",
}
DEFAULT_LICENCE = "see the dataset's terms"
#: Patient id spaces: adapters whose records name the same patients share one.
_ID_SPACES = {"ctrate": "ctrate", "radgenome": "ctrate", "autopet": "autopet", "autopet-rg-lym": "autopet"}
_CTRATE_NAME = re.compile(r"^(?P<patient>[A-Za-z]+_\d+)_[A-Za-z]+_\d+$")
_AUTOPET_PATIENT = re.compile(r"PETCT_[0-9A-Za-z]+")
_PUNCTUATION = re.compile(r"[^\w\s]+")
_WORD = re.compile(r"\w")
_KEPT_SECTIONS = ("findings", "impression")

# drop reasons (summary keys)
ADAPTER_EMPTY = "adapter: empty report"
ADAPTER_MISSING = "adapter: missing volume"
ADAPTER_INVALID = "adapter: invalid row"
ADAPTER_DUPLICATE = "adapter: duplicate id"
ADAPTER_OTHER = "adapter: other"
NO_REPORT = "no report text"
EXACT_DUPLICATE = "exact duplicate"
NEAR_DUPLICATE = "near duplicate"


# ------------------------------------------------------------------------------------------------------ results


@dataclasses.dataclass
class SourceStats:
    """Counts of one source: rows the adapter saw, records kept, dropped by reason, kept per split."""

    name: str
    dataset: str
    root: str
    licence: str
    input: int = 0
    converted: int = 0
    kept: int = 0
    patients: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    splits: dict[str, int] = dataclasses.field(default_factory=dict)
    report_words: dict[str, float | int | None] = dataclasses.field(default_factory=dict)
    label_prevalence: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BenchmarkSummary:
    """What :func:`build_benchmark` wrote and counted."""

    out: Path
    manifest: Path
    n_records: int
    n_patients: int
    splits: dict[str, int]
    patient_splits: dict[str, int]
    sources: dict[str, SourceStats]
    conflicts: list[dict[str, Any]]
    settings: dict[str, Any]
    files: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        """The ``summary.json`` content."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rrg3d_version": __version__,
            "settings": self.settings,
            "total": {"records": self.n_records, "patients": self.n_patients, "splits": self.splits,
                      "patients_per_split": self.patient_splits},
            "sources": {name: dataclasses.asdict(stats) for name, stats in self.sources.items()},
            "split_conflicts": self.conflicts,
            "files": self.files,
        }

    def text(self) -> str:
        """A few lines for the command line."""
        splits = ", ".join(f"{split} {count}" for split, count in self.splits.items())
        lines = [f"benchmark: {self.n_records} record(s) of {self.n_patients} patient(s) in {self.manifest} "
                 f"({splits})"]
        for stats in self.sources.values():
            dropped = ", ".join(f"{reason} {count}" for reason, count in stats.dropped.items()) or "none"
            lines.append(f"  {stats.name} ({stats.dataset}): input {stats.input}, kept {stats.kept}; dropped: "
                         f"{dropped}")
        if self.conflicts:
            lines.append(f"  {len(self.conflicts)} patient(s) had conflicting official splits (strictest kept)")
        lines.append(f"  datasheet: {self.out / self.files['datasheet']}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ building blocks


def patient_key(record: Mapping[str, Any], adapter: str) -> str:
    """The patient a record belongs to, as ``<id space>:<patient>`` (see the module doc)."""
    space = _ID_SPACES.get(adapter, adapter)
    meta = record.get("meta") or {}
    given = meta.get("patient_id") if isinstance(meta, dict) else None
    if isinstance(given, str) and given.strip():
        return f"{space}:{given.strip()}"
    study_id = str(record.get("id", ""))
    if space == "ctrate":
        name = meta.get("volume_name") if isinstance(meta, dict) else None
        stem = volume_stem(str(name)) if name else re.sub(r"^(ctrate|radgenome)_", "", study_id)
        match = _CTRATE_NAME.match(stem)
        return f"{space}:{match['patient'] if match else stem}"
    if space == "autopet":
        match = _AUTOPET_PATIENT.search(study_id)
        if match:
            return f"{space}:{match.group()}"
        case = re.sub(r"^autopet_(rg_lym_)?", "", study_id)
        stem, _, tail = case.rpartition("_")
        return f"{space}:{stem if stem and tail.isdigit() else case}"
    prefix = f"{_id_prefix(adapter)}_"
    return f"{space}:{study_id.removeprefix(prefix)}"


def _id_prefix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def hash_split(patient: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a patient without an official one (``sha256(f"{seed}:{patient}")`` → [0, 1))."""
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()
    u = int(digest[:16], 16) / 16**16
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def official_split(split: Any) -> str | None:
    """``train``/``val``/``test`` for a split a source states, ``None`` for none (or one rrg3d does not know)."""
    if not isinstance(split, str) or not split.strip():
        return None
    name = split_name(split)
    return name if name in SPLIT_PRIORITY else None


def resolve_splits(
    official: Mapping[str, Mapping[str, set[str]]], seed: int, val_fraction: float, test_fraction: float
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """``({patient: split}, conflicts)`` from ``{patient: {source: {official splits}}}`` (see the module doc)."""
    resolved: dict[str, str] = {}
    conflicts: list[dict[str, Any]] = []
    for patient in sorted(official, key=natural_key):
        by_source = official[patient]
        stated = {split for splits in by_source.values() for split in splits}
        if not stated:
            resolved[patient] = hash_split(patient, seed, val_fraction, test_fraction)
            continue
        winner = next(split for split in SPLIT_PRIORITY if split in stated)
        resolved[patient] = winner
        if len(stated) > 1:
            conflicts.append({"patient": patient, "resolved": winner,
                              "official": {source: sorted(splits, key=SPLIT_PRIORITY.index)
                                           for source, splits in by_source.items() if splits}})
    return resolved, conflicts


def normalise_sections(record: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``(findings/impression sections, other sections)`` of a record (see the module doc)."""
    given = record.get("sections") if isinstance(record.get("sections"), dict) else {}
    if any(isinstance(given.get(key), str) and given[key].strip() for key in _KEPT_SECTIONS):
        parsed = {key: normalize_report(value, keep_newlines=False) for key, value in given.items()
                  if isinstance(value, str)}
    else:
        parsed = {key: normalize_report(value, keep_newlines=False)
                  for key, value in split_sections(record.get("report") or "").items()}
        if "findings" not in parsed and parsed.get("other"):
            parsed["findings"] = parsed.pop("other")
    sections = {key: parsed[key] for key in _KEPT_SECTIONS if _WORD.search(parsed.get(key) or "")}
    others = {key: value for key, value in parsed.items() if key not in _KEPT_SECTIONS and _WORD.search(value)}
    return sections, others


def comparable_text(sections: Mapping[str, str]) -> str:
    """The text duplicates are judged on: findings + impression, lower case, no punctuation, single spaces."""
    text = " ".join(sections.get(key, "") for key in _KEPT_SECTIONS)
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def deduplicate(
    items: Sequence[tuple[str, str]], near_duplicate: float
) -> tuple[list[str], list[dict[str, Any]]]:
    """Keep the first of each group of duplicate texts among ``[(key, comparable text), ...]`` (in that order).

    Returns ``(kept keys, removed)`` with ``removed`` entries ``{"key", "kind", "duplicate_of", "similarity"}``:
    ``kind`` ``exact`` for equal texts, ``near`` when the word-sequence ``difflib`` ratio is ``>= near_duplicate``.
    """
    kept: list[tuple[str, str, list[str]]] = []
    removed: list[dict[str, Any]] = []
    for key, text in items:
        words = text.split()
        match: tuple[str, str, float] | None = None
        for kept_key, kept_text, kept_words in kept:
            if text == kept_text:
                match = (kept_key, "exact", 1.0)
                break
            matcher = difflib.SequenceMatcher(None, kept_words, words, autojunk=False)
            if matcher.real_quick_ratio() < near_duplicate or matcher.quick_ratio() < near_duplicate:
                continue
            ratio = matcher.ratio()
            if ratio >= near_duplicate and (match is None or ratio > match[2]):
                match = (kept_key, "near", ratio)
        if match is None:
            kept.append((key, text, words))
        else:
            removed.append({"key": key, "kind": match[1], "duplicate_of": match[0],
                            "similarity": round(match[2], 4)})
    return [key for key, _, _ in kept], removed


def _adapter_reason(reason: str) -> str:
    text = reason.lower()
    if "empty report" in text:
        return ADAPTER_EMPTY
    if "duplicate" in text:
        return ADAPTER_DUPLICATE
    if "not found" in text or "no volume" in text or "missing" in text or "slice images" in text:
        return ADAPTER_MISSING
    if "invalid" in text or "malformed" in text or "bad " in text:
        return ADAPTER_INVALID
    return ADAPTER_OTHER


def parse_source_option(text: str) -> tuple[str, str, Any]:
    """``NAME.KEY=VALUE`` → ``(adapter name, option name, value)`` typed by the adapter's option.

    Switches take true/false; list options take comma-separated values.
    """
    head, sep, value = text.partition("=")
    name, dot, key = head.partition(".")
    if not sep or not dot or not name.strip() or not key.strip():
        raise RRG3DError(f"--source-option {text!r}: expected NAME.OPTION=VALUE (e.g. ctrg.stack_slices=true)")
    adapter = get_adapter(name)
    option = _find_option(adapter, key)
    return adapter.name, option.name, _option_value(option, value, text)


def _find_option(adapter: Adapter, key: str) -> Option:
    wanted = key.strip().lstrip("-").replace("-", "_")
    for option in adapter.options:
        if option.name == wanted:
            return option
    known = ", ".join(option.name for option in adapter.options) or "none"
    raise RRG3DError(f"--source-option: {adapter.name} has no option {key!r}; known: {known}")


def _option_value(option: Option, value: str, text: str) -> Any:
    value = value.strip()
    try:
        if option.is_switch:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on", ""):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not true/false: {value!r}")
        convert = option.type or str
        if option.nargs is not None:
            items = [convert(item.strip()) for item in value.split(",") if item.strip()]
            if option.choices is not None and any(item not in option.choices for item in items):
                raise ValueError(f"choose from {', '.join(option.choices)}")
            return items
        result = convert(value)
        if option.choices is not None and result not in option.choices:
            raise ValueError(f"choose from {', '.join(option.choices)}")
        return result
    except ValueError as exc:
        raise RRG3DError(f"--source-option {text!r}: bad value for {option.name} ({exc})") from None


# ---------------------------------------------------------------------------------------------------- the build


@dataclasses.dataclass
class _Item:
    """One converted record on its way into the benchmark."""

    source: str
    record: dict[str, Any]
    manifest: Path
    patient: str
    sections: dict[str, str] = dataclasses.field(default_factory=dict)
    others: dict[str, str] = dataclasses.field(default_factory=dict)
    text: str = ""


def _check_settings(sources: Mapping[str, Path], val_fraction: float, test_fraction: float,
                    near_duplicate: float, resplit: Sequence[str]) -> dict[str, Adapter]:
    if not sources:
        raise RRG3DError("no source given (e.g. --source ctrate=/data/CT-RATE)")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise RRG3DError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise RRG3DError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    if not 0.0 < near_duplicate <= 1.0:
        raise RRG3DError(f"near_duplicate must be in (0, 1], got {near_duplicate}")
    adapters: dict[str, Adapter] = {}
    for name, root in sources.items():
        adapter = get_adapter(name)
        if adapter.name in adapters:
            raise RRG3DError(f"source {adapter.name} given twice")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise RRG3DError(f"source {adapter.name}: root folder {root_path} not found")
        adapters[adapter.name] = adapter
    unknown = sorted({get_adapter(name).name for name in resplit} - set(adapters))
    if unknown:
        raise RRG3DError(f"resplit names source(s) not given: {', '.join(unknown)}")
    return adapters


def _convert(name: str, adapter: Adapter, root: Path, out: Path, options: Mapping[str, Any],
             stats: SourceStats, removed: list[dict[str, Any]]) -> list[_Item]:
    values = dict(_UNASSIGNED_OPTIONS.get(name, {}))
    values.update(options)
    manifest = out / "sources" / f"{name}.jsonl"
    try:
        result = adapter.convert(root, manifest, **values)
    except RRG3DError as exc:
        raise RRG3DError(f"source {name} ({root}): {exc}") from exc
    stats.converted = result.n_records
    stats.input = result.n_records + result.n_skipped
    stats.warnings = list(result.warnings)
    for key, reason in result.skipped:
        category = _adapter_reason(reason)
        stats.dropped[category] = stats.dropped.get(category, 0) + 1
        removed.append({"source": name, "id": key, "stage": "adapter", "reason": category, "detail": reason})
    items = []
    try:
        lines = list(iter_jsonl(manifest, what="manifest"))
    except RRG3DError as exc:
        raise RRG3DError(f"source {name}: {exc}") from None
    for number, record in lines:
        errors = [(field, message) for field, message, severity in check_record(record) if severity == "error"]
        if errors:
            field, message = errors[0]
            raise RRG3DError(f"source {name}: record {record.get('id')!r} ({manifest}:{number}) [{field}]: {message}")
        items.append(_Item(name, record, manifest, patient_key(record, name)))
    return items


def _merged_record(item: _Item, split: str, out_manifest: Path) -> dict[str, Any]:
    """The benchmark record of an item: id prefixed by its source, paths relative to the benchmark manifest."""
    record = item.record
    prefix = f"{_id_prefix(item.source)}_"
    source_id = str(record["id"])
    merged: dict[str, Any] = {"id": source_id if source_id.startswith(prefix) else prefix + source_id,
                              "split": split}
    images = {key: (relativize(resolve(item.manifest, value), out_manifest) if value else None)
              for key, value in (record.get("images") or {}).items()}
    merged["images"] = images
    masks = record.get("masks")
    if isinstance(masks, dict):
        merged["masks"] = {**masks, "path": relativize(resolve(item.manifest, masks["path"]), out_manifest)}
    merged["report"] = build_report(item.sections.get("findings", ""), item.sections.get("impression", ""))
    merged["sections"] = dict(item.sections)
    for key in ("region_reports", "labels", "style", "sex", "petrg"):
        if record.get(key) is not None:
            merged[key] = record[key]
    meta = dict(record.get("meta") or {})
    meta.setdefault("source", item.source)
    meta["benchmark_source"] = item.source
    meta["source_id"] = source_id
    meta["patient_id"] = item.patient
    meta["official_split"] = official_split(record.get("split"))
    if item.others:
        meta["other_sections"] = dict(item.others)
    merged["meta"] = meta
    return merged


def _length_summary(words: np.ndarray) -> dict[str, float | int | None]:
    if not words.size:
        return {"n": 0, "mean": None, "median": None, "p5": None, "p95": None, "min": None, "max": None}
    return {"n": int(words.size), "mean": round(float(words.mean()), 2), "median": float(np.median(words)),
            "p5": float(np.percentile(words, 5)), "p95": float(np.percentile(words, 95)),
            "min": int(words.min()), "max": int(words.max())}


def build_benchmark(
    sources: Mapping[str, str | Path],
    out: str | Path,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    near_duplicate: float = 0.9,
    deduplicate_reports: bool = True,
    resplit: Sequence[str] = (),
    check_files: bool = False,
    labeler: str | Path | None = None,
    plot: bool = True,
) -> BenchmarkSummary:
    """Convert, merge, split, deduplicate and document ``sources`` (``{adapter name: root}``) into ``out``.

    ``options`` holds adapter options per source name; ``resplit`` names sources whose official splits are
    ignored (their patients are split by hash); ``labeler`` is a learned labeler folder (default: rule labeler).
    Raises :class:`RRG3DError` naming the source (and record) on a missing root, a wrong layout or a bad record.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise RRG3DError(f"{out}: --out must be a folder (the benchmark writes several files into it)")
    adapters = _check_settings({name: Path(root) for name, root in sources.items()}, val_fraction, test_fraction,
                               near_duplicate, resplit)
    roots = {get_adapter(name).name: Path(root).expanduser() for name, root in sources.items()}
    source_options = {get_adapter(name).name: dict(values) for name, values in (options or {}).items()}
    unknown = sorted(set(source_options) - set(adapters))
    if unknown:
        raise RRG3DError(f"options given for source(s) that are not built: {', '.join(unknown)}")
    resplit_names = {get_adapter(name).name for name in resplit}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.jsonl"

    removed: list[dict[str, Any]] = []
    stats: dict[str, SourceStats] = {}
    items: list[_Item] = []
    for name, adapter in adapters.items():
        stats[name] = SourceStats(name=name, dataset=adapter.source, root=str(roots[name]),
                                  licence=LICENCES.get(name, DEFAULT_LICENCE))
        log.info("converting %s from %s", name, roots[name])
        converted = _convert(name, adapter, roots[name], out, source_options.get(name, {}), stats[name], removed)
        converted.sort(key=lambda item: natural_key(str(item.record["id"])))
        items.extend(converted)

    # splits: every converted record votes with its official split, then the patient's split is resolved
    official: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for item in items:
        split = None if item.source in resplit_names else official_split(item.record.get("split"))
        votes = official[item.patient][item.source]
        if split is not None:
            votes.add(split)
    patient_split, conflicts = resolve_splits(official, seed, val_fraction, test_fraction)

    # report sections; records without report text are dropped
    with_text: list[_Item] = []
    for item in items:
        item.sections, item.others = normalise_sections(item.record)
        if not item.sections:
            _drop(stats, removed, item, NO_REPORT, "no findings or impression text")
            continue
        item.text = comparable_text(item.sections)
        with_text.append(item)

    # duplicates within a patient, in source order then id order
    kept_items = with_text
    if deduplicate_reports:
        by_patient: dict[str, list[_Item]] = defaultdict(list)
        for item in with_text:
            by_patient[item.patient].append(item)
        dropped_keys: set[int] = set()
        for group in by_patient.values():
            if len(group) < 2:
                continue
            keyed = {f"{item.source}:{item.record['id']}": item for item in group}
            _, duplicates = deduplicate([(key, item.text) for key, item in keyed.items()], near_duplicate)
            for entry in duplicates:
                item = keyed[entry["key"]]
                kept = keyed[entry["duplicate_of"]]
                reason = EXACT_DUPLICATE if entry["kind"] == "exact" else NEAR_DUPLICATE
                _drop(stats, removed, item, reason, f"duplicate of {kept.source} record {kept.record['id']}",
                      duplicate_of={"source": kept.source, "id": kept.record["id"]},
                      similarity=entry["similarity"])
                dropped_keys.add(id(item))
        kept_items = [item for item in with_text if id(item) not in dropped_keys]
    removed.sort(key=lambda entry: (list(adapters).index(entry["source"]), natural_key(str(entry["id"]))))
    if not kept_items:
        _write_removed(removed, out / "removed.jsonl")
        raise RRG3DError(f"no record left for the benchmark: {len(items)} converted, all dropped (see "
                         f"{out / 'removed.jsonl'})")

    records = [_merged_record(item, patient_split[item.patient], manifest_path) for item in kept_items]
    _check_unique_and_split(records, kept_items)
    _write_manifest_checked(records, kept_items, manifest_path, check_files)

    # statistics
    from rrg3d.text.labeler import load_labeler
    from rrg3d.text.labels import CTRATE_LABELS

    label_model = load_labeler(labeler)
    all_patients: dict[str, str] = {}
    lengths: dict[str, np.ndarray] = {}
    for name, source_stats in stats.items():
        mine = [(item, record) for item, record in zip(kept_items, records, strict=True) if item.source == name]
        source_stats.kept = len(mine)
        source_stats.patients = len({item.patient for item, _ in mine})
        split_counts = Counter(record["split"] for _, record in mine)
        source_stats.splits = {split: split_counts.get(split, 0) for split in ("train", "val", "test")}
        words = np.array([len(item.text.split()) for item, _ in mine], dtype=np.float64)
        lengths[name] = words
        source_stats.report_words = _length_summary(words)
        if mine:
            predicted = np.asarray(label_model.predict([record["report"] for _, record in mine]))
            source_stats.label_prevalence = {label: round(float(value), 4)
                                             for label, value in zip(CTRATE_LABELS, predicted.mean(axis=0),
                                                                     strict=True)}
        source_stats.dropped = dict(sorted(source_stats.dropped.items()))
        for item, record in mine:
            all_patients[item.patient] = record["split"]
    split_totals = Counter(record["split"] for record in records)
    patient_totals = Counter(all_patients.values())

    files = {"manifest": "manifest.jsonl", "summary": "summary.json", "datasheet": "datasheet.md",
             "removed": "removed.jsonl", "sources": "sources/"}
    if plot and _plot_lengths(lengths, out / "report_lengths.png"):
        files["lengths_plot"] = "report_lengths.png"
    settings = {"sources": {name: str(root) for name, root in roots.items()},
                "options": {name: _jsonable(values) for name, values in source_options.items()},
                "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                "near_duplicate": near_duplicate, "deduplicate": deduplicate_reports,
                "resplit": sorted(resplit_names), "check_files": check_files,
                "labeler": str(labeler) if labeler else "rule",
                "split_rule": "official splits per patient, strictest wins (test > val > train); patients without one: "
                              "sha256(seed:patient) fraction < test_fraction → test, < + val_fraction → val, "
                              "else train",
                "duplicate_rule": "within a patient: equal normalised findings+impression (exact) or difflib word "
                                  "ratio >= near_duplicate (near); first source given, then first id, is kept"}
    summary = BenchmarkSummary(
        out=out, manifest=manifest_path, n_records=len(records), n_patients=len(all_patients),
        splits={split: split_totals.get(split, 0) for split in ("train", "val", "test")},
        patient_splits={split: patient_totals.get(split, 0) for split in ("train", "val", "test")},
        sources=stats, conflicts=conflicts, settings=settings, files=files,
    )
    _write_removed(removed, out / "removed.jsonl")
    atomic_write_json(out / "summary.json", summary.as_dict())
    atomic_write_text(out / "datasheet.md", datasheet(summary))
    return summary


def _write_removed(removed: Sequence[dict[str, Any]], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in removed), encoding="utf-8")


def _drop(stats: Mapping[str, SourceStats], removed: list[dict[str, Any]], item: _Item, reason: str, detail: str,
          **extra: Any) -> None:
    counts = stats[item.source].dropped
    counts[reason] = counts.get(reason, 0) + 1
    removed.append({"source": item.source, "id": item.record["id"], "stage": "benchmark", "reason": reason,
                    "detail": detail, "patient_id": item.patient, **extra})


def _check_unique_and_split(records: Sequence[dict[str, Any]], items: Sequence[_Item]) -> None:
    seen: dict[str, _Item] = {}
    split_of: dict[str, str] = {}
    for record, item in zip(records, items, strict=True):
        if record["id"] in seen:
            other = seen[record["id"]]
            raise RRG3DError(f"source {item.source} record {item.record['id']!r} and source {other.source} record "
                             f"{other.record['id']!r} both become benchmark id {record['id']!r}")
        seen[record["id"]] = item
        if split_of.setdefault(item.patient, record["split"]) != record["split"]:  # pragma: no cover - invariant
            raise RRG3DError(f"internal error: patient {item.patient} in two splits")


def _write_manifest_checked(records: Sequence[dict[str, Any]], items: Sequence[_Item], path: Path,
                            check_files: bool) -> None:
    """Schema-check every record, write the manifest atomically, validate it (optionally opening every file)."""
    for record, item in zip(records, items, strict=True):
        errors = [(field, message) for field, message, severity in check_record(record) if severity == "error"]
        if errors:
            field, message = errors[0]
            raise RRG3DError(f"source {item.source} record {item.record['id']!r}: malformed benchmark record "
                             f"[{field}]: {message}")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                       encoding="utf-8")
        _, problems = validate_manifest(tmp, check_files=check_files)
        errors = [problem for problem in problems if problem.severity == "error"]
        if errors:
            lines = []
            for problem in errors[:10]:
                item = items[problem.line - 1] if problem.line and problem.line <= len(items) else None
                where = f"source {item.source} record {item.record['id']!r}" if item else "benchmark manifest"
                field = f" [{problem.field}]" if problem.field else ""
                lines.append(f"{where}{field}: {problem.message}")
            more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
            raise RRG3DError(f"benchmark validation failed: {'; '.join(lines)}{more}")


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in values.items()}


def _plot_lengths(lengths: Mapping[str, np.ndarray], path: Path) -> bool:
    """Histogram of report lengths per source as a PNG (Agg canvas); False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        log.warning("matplotlib is not installed: no report length histogram")
        return False
    series = {name: values for name, values in lengths.items() if values.size}
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.subplots()
    if series:
        top = max(float(values.max()) for values in series.values())
        bins = np.linspace(0, max(top, 1.0), 41)
        for index, (name, values) in enumerate(series.items()):
            axes.hist(values, bins=bins, density=True, alpha=0.45, color=f"C{index}",
                      label=f"{name} (n={values.size}, median {np.median(values):g})")
        axes.legend()
    axes.set_xlabel("report length (words, findings + impression)")
    axes.set_ylabel("density")
    axes.set_title("Report length per source")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return True


# --------------------------------------------------------------------------------------------------- datasheet


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell(value) for value in row) + " |" for row in rows)
    return lines


def datasheet(summary: BenchmarkSummary) -> str:
    """The markdown datasheet of a built benchmark."""
    from rrg3d.text.labels import CTRATE_LABELS

    settings = summary.settings
    sources = list(summary.sources.values())
    lines = ["# Benchmark datasheet", "",
             f"Built by rrg3d {__version__} (`rrg3d benchmark build`): {summary.n_records} studies of "
             f"{summary.n_patients} patients from {len(sources)} source(s), merged into `manifest.jsonl`.", "",
             "## Sources and licences", ""]
    lines += _table(["source", "dataset", "licence", "root"],
                    [[s.name, s.dataset, s.licence, f"`{s.root}`"] for s in sources])
    lines += ["", "The merged benchmark is bound by the terms of every source it holds: share it only where all of "
              "them allow (CC BY-NC-SA 4.0 sources: non-commercial, attribution, share-alike).", "",
              "## Counts", ""]
    rows = []
    for s in sources:
        rows.append([s.name, s.input, s.converted, s.kept, sum(s.dropped.values()), s.patients,
                     s.splits.get("train", 0), s.splits.get("val", 0), s.splits.get("test", 0)])
    rows.append(["**all**", sum(s.input for s in sources), sum(s.converted for s in sources), summary.n_records,
                 sum(sum(s.dropped.values()) for s in sources), summary.n_patients,
                 summary.splits["train"], summary.splits["val"], summary.splits["test"]])
    lines += _table(["source", "input rows", "converted", "kept", "dropped", "patients", "train", "val", "test"],
                    rows)
    patients = summary.patient_splits
    lines += ["", f"Patients per split: train {patients['train']}, val {patients['val']}, test {patients['test']}.",
              "", "### Dropped, by reason", ""]
    dropped_rows = [[s.name, reason, count] for s in sources for reason, count in s.dropped.items()]
    lines += _table(["source", "reason", "count"], dropped_rows) if dropped_rows else ["Nothing was dropped."]
    lines += ["", "Every dropped row is listed with its detail in `removed.jsonl`.", "",
              "## Splits", "",
              "Splits are per patient, across sources: the official splits of a patient's records are collected "
              "and the strictest wins (test > val > train), so no evaluation patient reaches training. Patients "
              f"without an official split are split by hash (seed {settings['seed']}; val fraction "
              f"{settings['val_fraction']}, test fraction {settings['test_fraction']}). "
              f"{len(summary.conflicts)} patient(s) had conflicting official splits"
              + (f"; sources re-split by hash: {', '.join(settings['resplit'])}." if settings["resplit"] else "."),
              "", "## Duplicates", ""]
    if settings["deduplicate"]:
        lines.append("Within a patient, reports are compared on their findings + impression text (lower case, no "
                     "punctuation): equal texts are exact duplicates, a difflib word-sequence ratio of at least "
                     f"{settings['near_duplicate']} makes a near duplicate. The record of the first source given "
                     "(then the first id) is kept.")
    else:
        lines.append("Duplicate removal was switched off.")
    lines += ["", "## Report lengths (words, findings + impression)", ""]
    lines += _table(["source", "n", "mean", "median", "p5", "p95", "min", "max"],
                    [[s.name, *(s.report_words.get(k) for k in ("n", "mean", "median", "p5", "p95", "min", "max"))]
                     for s in sources])
    if "lengths_plot" in summary.files:
        lines += ["", f"![report lengths]({summary.files['lengths_plot']})"]
    lines += ["", f"## Label prevalence ({settings['labeler']} labeler, the 18 CT-RATE abnormalities)", "",
              "Fraction of kept reports in which the labeler finds each abnormality (from the report text, not the "
              "images).", ""]
    lines += _table(["label", *(s.name for s in sources)],
                    [[label, *(f"{s.label_prevalence[label]:.3f}" if label in s.label_prevalence else None
                               for s in sources)] for label in CTRATE_LABELS])
    warnings = [(s.name, warning) for s in sources for warning in s.warnings]
    if warnings:
        lines += ["", "## Adapter warnings", ""]
        lines += [f"- {name}: {warning}" for name, warning in warnings]
    return "\n".join(lines) + "\n"

