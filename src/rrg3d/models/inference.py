"""Scans in, reports out: resolve inputs, preprocess with the checkpoint's preset, generate in batches, write JSONL.

Inputs are NIfTI/NRRD/MHA/NPY files, DICOM folders, or manifests (JSONL). Studies of a preprocessing cache
(``rrg3d preprocess``) are used as they are when the cache was made with the checkpoint's preset (same sha256), and
refused otherwise — applying a window twice would silently shift intensities. A study that cannot be read becomes a
record with an ``error`` field and the batch goes on. The output is appended line by line (each line flushed), so
an interrupted run resumes: studies already reported are skipped, failed ones are tried again.

Sharded (``shard``, see :mod:`rrg3d.utils.shards`): every shard resolves the same inputs, keeps its own studies and
writes ``PRED.shard-1-of-4.jsonl`` (label maps in ``PRED.shard-1-of-4.masks/``), resumable like an unsharded file.
When it has run through it writes ``PRED.shard-1-of-4.done.json`` (the input positions of its studies);
:func:`merge_predictions` joins complete shards into ``PRED.jsonl`` in input order, and the last shard to finish
does that on its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS
from rrg3d.errors import RRG3DError
from rrg3d.io.readers import VOLUME_SUFFIXES, scan_stem
from rrg3d.utils.files import append_jsonl, atomic_write_json, atomic_write_text
from rrg3d.utils.shards import Shard, find_shards, merge_when_complete, select, shard_path

log = logging.getLogger(__name__)


@dataclass
class Study:
    """One scan to report on; ``error`` is set when it cannot be used (it is then recorded, not generated)."""

    id: str
    path: Path | None
    source: str
    affine: list[list[float]] | None = None
    preprocessed_with: str | None = None  # sha256 of the preset a cache applied already
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: the study's label map (a manifest's ``masks``; on the model grid when the study comes from a cache) and its
    #: value → region name mapping: what a region-guided model reads
    mask: Path | None = None
    mask_labels: dict[str, str] | None = None
    #: PET/CT models: the study's PET (a manifest's ``images.pet``, or ``--pet`` for one scan)
    pet: Path | None = None
    #: the reporting style (hospital) and sex a style-prompted model writes for
    style: str | None = None
    sex: str | None = None


def resolve_studies(inputs: Sequence[str | os.PathLike[str]]) -> list[Study]:
    """Expand files, DICOM folders and manifests into studies with unique ids (input order kept)."""
    from rrg3d.data.manifest import check_manifest, record_affine, resolve
    from rrg3d.train.data import normalize_sex

    studies: list[Study] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".jsonl":
            try:
                records, problems = check_manifest(path)
            except RRG3DError as exc:
                studies.append(Study(id=path.name, path=None, source=str(path), error=str(exc)))
                continue
            for problem in problems:
                if problem.severity == "error":
                    studies.append(Study(id=f"{path.name}:{problem.line}", path=None, source=str(path),
                                         error=str(problem)))
            for record in records:
                image = (record.get("images") or {}).get("ct")
                if not image:
                    studies.append(Study(id=str(record["id"]), path=None, source=f"{path}:{record.get('_line')}",
                                         error=f"{path}:{record.get('_line')}: no images.ct to report on"))
                    continue
                preprocessed = (record.get("preprocess") or {}).get("sha256")
                record_meta = record.get("meta") or {}
                meta = {k: record_meta[k] for k in ("header_overrides", "pet_units") if record_meta.get(k)}
                masks = record.get("masks") or {}
                pet = (record.get("images") or {}).get("pet")
                style = record.get("style")
                studies.append(Study(id=str(record["id"]), path=resolve(path, image), source=str(path),
                                     affine=record_affine(record, "images.ct"), preprocessed_with=preprocessed,
                                     meta=meta,
                                     mask=resolve(path, masks["path"]) if masks.get("path") else None,
                                     mask_labels={str(k): str(v) for k, v in (masks.get("labels") or {}).items()}
                                     or None, pet=resolve(path, pet) if pet else None,
                                     style=style if isinstance(style, str) and style else None,
                                     sex=normalize_sex(record.get("sex"))))
        else:
            studies.append(Study(id=scan_stem(path), path=path, source=str(path)))
    seen: dict[str, int] = {}
    for study in studies:
        if study.id in seen:
            seen[study.id] += 1
            study.id = f"{study.id}#{seen[study.id]}"
        else:
            seen[study.id] = 1
    return studies


def load_study(study: Study, preset: Any) -> np.ndarray:
    """The model-ready array [C, D, H, W] of a study (read + preprocess, or the cache's array as is); a PET/CT
    preset reads the study's PET too and puts it on the CT's grid (C = 2)."""
    from rrg3d.preprocess.batch import load_model_input, load_petct_input

    assert study.path is not None
    if preset.pet is not None:
        return load_petct_input(study.path, study.pet, preset, cached_sha256=study.preprocessed_with,
                                header_overrides=study.meta.get("header_overrides"),
                                pet_units=study.meta.get("pet_units"))
    return load_model_input(study.path, preset, cached_sha256=study.preprocessed_with,
                            header_overrides=study.meta.get("header_overrides"))[None]


def done_ids(path: Path) -> set[str]:
    """Ids already reported (without error) in an existing predictions file; a torn last line is dropped."""
    if not path.is_file():
        return set()
    kept: list[str] = []
    ids: set[str] = set()
    torn = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        kept.append(line)
        if isinstance(record, dict) and record.get("report") is not None and not record.get("error"):
            ids.add(str(record.get("id")))
    if torn:  # an interrupted write: rewrite the file without the partial line before appending
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return ids


def _batches(items: list[Study], size: int) -> Iterator[list[Study]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


#: Label values of a label map given without its own mapping (``--masks`` file or folder): rrg3d's 10-region
#: numbering, the one ``rrg3d segment``, the phantoms and the RadGenome adapter write (1 = lung, ...).
DEFAULT_MASK_LABELS: dict[str, str] = {str(i + 1): name for i, name in enumerate(RADGENOME_REGIONS)}


def _masks_index(masks: str | os.PathLike[str] | None) -> tuple[Path | None, dict[str, tuple[Path, dict[str, str]]]]:
    """``--masks``: a single label-map file (for one scan), or a folder of ``<scan stem>.nii.gz`` label maps and/or
    the ``masks.jsonl`` that ``rrg3d segment`` writes (scan stem → (label map, labels))."""
    if masks is None:
        return None, {}
    root = Path(masks)
    if root.is_file() and root.suffix.lower() != ".jsonl":
        return root, {}
    index: dict[str, tuple[Path, dict[str, str]]] = {}
    listing = root if root.is_file() else root / "masks.jsonl"
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not (record.get("masks") or {}).get("path"):
                continue
            entry = record["masks"]
            index[scan_stem(Path(str(record.get("image", ""))))] = (
                listing.parent / entry["path"], {str(k): str(v) for k, v in (entry.get("labels") or {}).items()})
    if root.is_dir():
        for file in sorted(root.iterdir()):
            if file.name.lower().endswith(VOLUME_SUFFIXES) and scan_stem(file) not in index:
                index[scan_stem(file)] = (file, dict(DEFAULT_MASK_LABELS))
    if not index:
        raise RRG3DError(f"{root}: no label maps found (expected <scan name>.nii.gz files or a masks.jsonl)")
    return None, index


def study_label_map(study: Study, preset: Any, *, single_mask: Path | None = None,
                    index: dict[str, tuple[Path, dict[str, str]]] | None = None, segment: str | None = None
                    ) -> tuple[np.ndarray, dict[str, str], np.ndarray | None, str]:
    """The label map of a study on the model grid, its labels, its affine (when known) and where it came from:
    ``segment`` (run a segmenter on the scan), a ``--masks`` file or folder, or the manifest's ``masks``."""
    from rrg3d.io import read_volume
    from rrg3d.preprocess.regions import load_label_map

    assert study.path is not None
    if segment is not None:
        if study.preprocessed_with is not None:
            raise RRG3DError(f"{study.path}: a preprocessed cache tensor cannot be segmented (the segmenter reads HU); "
                             "give the original scan or its label map")
        from rrg3d.preprocess.ops import apply_header_overrides
        from rrg3d.segment import segment_volume

        volume = apply_header_overrides(read_volume(study.path), study.meta.get("header_overrides"))
        result = segment_volume(volume, backend=segment)
        on_grid = preset.apply_mask(result.label_map)
        return np.asarray(on_grid.array).astype(np.int32), dict(result.labels), on_grid.affine, f"segment:{segment}"
    path, labels, cached = None, None, False
    if single_mask is not None:
        path, labels = single_mask, dict(DEFAULT_MASK_LABELS)
    elif index:
        found = index.get(study.id) or (index.get(scan_stem(study.path)) if study.path else None)
        if found is not None:
            path, labels = found
    if path is None and study.mask is not None:
        path, labels, cached = study.mask, dict(study.mask_labels or DEFAULT_MASK_LABELS), \
            study.preprocessed_with is not None
    if path is None:
        raise RRG3DError(f"{study.source}: study {study.id!r} has no label map; a region-guided model needs one "
                         "(the manifest's masks, --masks DIR_OR_FILE, or --segment rules)")
    array, affine = load_label_map(path, preset, cached=cached, header_overrides=study.meta.get("header_overrides"))
    if affine is None and study.affine is not None:  # a cache's mask: the grid its record states
        affine = np.asarray(study.affine)
    return array, labels or dict(DEFAULT_MASK_LABELS), affine, str(path)


@dataclass
class GenerateSummary:
    written: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    #: the file written (a shard's own file when sharded), the shard, and the merged file when this run merged
    out: str = ""
    shard: str | None = None
    merged: str | None = None
    merge_error: str | None = None


def done_marker(path: str | os.PathLike[str]) -> Path:
    """A shard's completion marker: ``PRED.shard-1-of-4.jsonl`` → ``PRED.shard-1-of-4.done.json``."""
    path = Path(path)
    return path.with_name(f"{path.name.removesuffix('.jsonl')}.done.json")


def _last_records(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Per id, the record a merge keeps (the last good one, else the last one) and the count of torn lines."""
    kept: dict[str, dict[str, Any]] = {}
    torn = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not isinstance(record, dict) or "id" not in record:
            torn += 1
            continue
        study = str(record["id"])
        good = record.get("report") is not None and not record.get("error")
        previous = kept.get(study)
        if good or previous is None or previous.get("error") or previous.get("report") is None:
            kept[study] = record
    return kept, torn


def merge_predictions(out: str | os.PathLike[str], *, count: int | None = None, order: Sequence[str] | None = None,
                      allow_incomplete: bool = False) -> GenerateSummary:
    """Join ``PRED.shard-I-of-N.jsonl`` into ``out`` (``PRED.jsonl``, written atomically).

    Checks that all N shard files are present, finished (their ``.done.json`` markers, unless ``allow_incomplete``),
    made from the same inputs, cover every study of their markers, and share no id. A shard that reported a study
    more than once (a failure retried on resume) gives its last good record. Order: ``order`` (ids, e.g. of a
    manifest) when given, else the input order the markers record, else sorted by id; ids outside it go last, sorted.
    """
    start = time.perf_counter()
    out_path = Path(out)
    count, files = find_shards(out_path, count)
    markers: dict[int, dict[str, Any]] = {}
    unfinished = []
    for index, file in files.items():
        marker = done_marker(file)
        try:
            markers[index] = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            unfinished.append(file.name)
    if unfinished and not allow_incomplete:
        raise RRG3DError(f"{out_path}: shard(s) not finished: {', '.join(unfinished)} (no .done.json; rerun them, "
                         "they resume, or merge anyway with --allow-incomplete)")
    if len({json.dumps(m.get("studies")) for m in markers.values()}) > 1:
        raise RRG3DError(f"{out_path}: the shards were run on different inputs (their study counts differ); rerun "
                         "them on the same SCAN arguments")
    if len({json.dumps(m.get("inputs")) for m in markers.values()}) > 1:  # e.g. another mount point per node
        log.warning("%s: the shards name their inputs differently; merging by study id", out_path)
    summary = GenerateSummary(out=str(out_path))
    merged: dict[str, dict[str, Any]] = {}
    owner: dict[str, int] = {}
    overlap: list[str] = []
    positions: dict[str, int] = {}
    missing: list[str] = []
    torn = 0
    for index, file in files.items():
        kept, bad = _last_records(file)
        torn += bad
        for study, record in kept.items():
            if study in owner:
                overlap.append(study)
            owner[study] = index
            merged[study] = record
        if index in markers:
            expected = {str(i): int(p) for p, i in markers[index].get("positions") or []}
            positions.update(expected)
            missing.extend(i for i in expected if i not in kept)
    if overlap:
        raise RRG3DError(f"{out_path}: {len(overlap)} ids are in more than one shard (e.g. {overlap[:3]}); were the "
                         "shards run on different inputs or shard counts?")
    if missing and not allow_incomplete:
        raise RRG3DError(f"{out_path}: {len(missing)} studies have no record in their shard (e.g. {missing[:3]}); "
                         "rerun those shards")
    if torn:
        log.warning("%s: %d unreadable lines in the shard files were left out", out_path, torn)
    if order is not None:
        positions = {}
        for study in order:
            positions.setdefault(str(study), len(positions))
    elif len(markers) < count:
        positions = {}
    last = len(positions)
    ids = sorted(merged, key=lambda study: (positions.get(study, last), study))
    atomic_write_text(out_path, "".join(json.dumps(merged[i], ensure_ascii=False) + "\n" for i in ids))
    summary.failed = sum(1 for i in ids if merged[i].get("error") or merged[i].get("report") is None)
    summary.written = len(ids) - summary.failed
    summary.merged = str(out_path)
    summary.seconds = time.perf_counter() - start
    return summary


def generate_reports(model: Any, inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                     settings: Any | None = None, batch_size: int = 1, checkpoint: str | None = None,
                     on_record: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                     resume: bool = True, masks: str | os.PathLike[str] | None = None,
                     segment: str | None = None, pet: str | os.PathLike[str] | None = None,
                     style: str | None = None, sex: str | None = None,
                     pet_units: str | None = None, shard: Shard | None = None,
                     merge: bool = True) -> GenerateSummary:
    """Generate a report for every study of ``inputs`` into the predictions JSONL ``out``.

    A region-guided model reads each study's label map (``segment``: made by that segmentation backend from the
    scan; ``masks``: a label-map file for one scan or a folder of them; otherwise the manifest's ``masks``). Its
    records gain ``region_reports`` (region → text), ``regions`` (region → label value in the label map written
    beside the predictions, ``masks.path``), ``region_recognition`` (the region the model named for each slot) and
    the merged ``report``.

    A PET/CT model reads each study's PET (a manifest's ``images.pet``; ``pet``: the PET of a single scan given as a
    file, ``pet_units`` ``"SUVbw"`` when that file is already in SUV). A style-prompted model writes in each study's
    ``style`` for its ``sex``; ``style``/``sex`` override them for every study (e.g. a hospital's style for scans
    from elsewhere).

    ``shard``: only that shard's studies, into ``PRED.shard-I-of-N.jsonl`` (see the module doc); ``merge``: when every
    shard has finished, write ``out`` from them (:func:`merge_predictions`)."""
    import torch
    from tqdm import tqdm

    from rrg3d.preprocess.presets import load_preset

    region_settings = getattr(model, "region_settings", None)
    if region_settings is None and (masks is not None or segment is not None):
        raise RRG3DError(f"--masks and --segment are for region-guided models; {model.config.name} reads the scan "
                         "alone")
    single_mask, mask_index = _masks_index(masks) if region_settings is not None else (None, {})
    out_path = shard_path(out, shard)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = settings or model.config.generation
    preset = load_preset(model.config.preprocess)
    studies = resolve_studies(inputs)
    if pet is not None:
        scans = [s for s in studies if s.error is None and s.source == str(s.path)]
        if len(studies) != 1 or len(scans) != 1:
            raise RRG3DError("--pet gives the PET of one scan file: give exactly one SCAN (a manifest carries each "
                             "study's PET in images.pet)")
        scans[0].pet = Path(pet)
        if pet_units:
            scans[0].meta["pet_units"] = pet_units
    if pet is not None and preset.pet is None:
        raise RRG3DError(f"--pet: {model.config.name} reads CT alone (its preset {preset.name!r} is not PET/CT)")
    styled = getattr(model.config.prompt, "style", None) is not None
    if (style is not None or sex is not None) and not styled:
        raise RRG3DError(f"--style/--sex are for style-prompted models; {model.config.name} has no style prompt")
    for study in studies:
        study.style = style or study.style
        study.sex = sex or study.sex
    positions = {study.id: position for position, study in enumerate(studies)}
    total = len(studies)
    studies = select(studies, shard, key=lambda study: study.id)
    marker = done_marker(out_path)
    if shard is not None:
        marker.unlink(missing_ok=True)  # this shard is running again: not complete until it ends
    finished = done_ids(out_path) if resume else set()
    if not resume and out_path.exists():
        out_path.unlink()
    todo = [s for s in studies if s.id not in finished]
    summary = GenerateSummary(skipped=len(studies) - len(todo), out=str(out_path),
                              shard=str(shard) if shard is not None else None)
    meta_common = {"model": model.config.name, "checkpoint": checkpoint,
                   "preset": {"name": preset.name, "sha256": preset.sha256},
                   "generation": {k: v for k, v in vars(settings).items()}}
    start = time.perf_counter()

    def emit(record: dict[str, Any]) -> None:
        append_jsonl(out_path, record)
        if on_record is not None:
            on_record(record)

    bar = tqdm(total=len(todo), desc="generate", unit="scan", disable=not progress)
    mask_dir = out_path.with_suffix(".masks")  # PRED.jsonl → PRED.masks/
    for batch in _batches(todo, max(1, batch_size)):
        arrays: list[np.ndarray] = []
        ready: list[Study] = []
        grounding: list[dict[str, Any]] = []
        for study in batch:
            if study.error is None:
                try:
                    array = load_study(study, preset)
                    if region_settings is not None:
                        grounding.append(_grounding(study, array, preset, region_settings, single_mask, mask_index,
                                                    segment))
                    arrays.append(array)
                    ready.append(study)
                    continue
                except RRG3DError as exc:
                    study.error = str(exc)
                except MemoryError:
                    study.error = f"{study.path}: out of memory while reading or preprocessing"
            emit({"id": study.id, "report": None, "error": study.error, "meta": {"source": study.source}})
            summary.failed += 1
            bar.update(1)
        if not ready:
            continue
        tick = time.perf_counter()
        volumes = torch.from_numpy(np.stack(arrays))
        grounded: list[dict[str, Any]] = [{} for _ in ready]
        if region_settings is not None:
            from rrg3d.models.regions import collate_regions

            region_batch = collate_regions([g["item"] for g in grounding])
            outputs = model.generate_regions(volumes, region_batch, settings,
                                             styles=[(s.style, s.sex) for s in ready] if styled else None)
            reports = [o.report for o in outputs]
            grounded = [_grounded_fields(study, g, o, mask_dir, out_path)
                        for study, g, o in zip(ready, grounding, outputs, strict=True)]
            # with a region classifier: each region's probabilities and the calls its slot line listed
            region_calls = model.classify_regions(region_batch)
            if region_calls is not None:
                for fields, seen in zip(grounded, region_calls, strict=True):
                    fields["meta"]["region_findings_classifier"] = seen
        else:
            reports = model.generate(volumes, settings,
                                     styles=[(s.style, s.sex) for s in ready] if styled else None)
        seconds = (time.perf_counter() - tick) / len(ready)
        # with a finding classifier: its probabilities and the calls the diagnosis prompt listed
        classified = model.classify(volumes) if getattr(model.vision, "classifier", None) is not None else None
        for index, (study, report) in enumerate(zip(ready, reports, strict=True)):
            extra = {"findings_classifier": classified[index]} if classified is not None else {}
            if styled:
                extra["style"] = {"style": study.style or model.config.prompt.default_style, "sex": study.sex}
            fields = dict(grounded[index])
            extra.update(fields.pop("meta", {}))
            emit({"id": study.id, "report": report, **fields,
                  "meta": {"source": study.source, **meta_common, "seconds": round(seconds, 3), **extra}})
            summary.written += 1
            bar.update(1)
    bar.close()
    summary.seconds = time.perf_counter() - start
    if shard is not None:
        atomic_write_json(marker, {"shard": str(shard), "inputs": [str(Path(i).resolve()) for i in inputs],
                                   "studies": total, "written": summary.written, "failed": summary.failed,
                                   "skipped": summary.skipped,
                                   "positions": [[positions[s.id], s.id] for s in studies]})
        if merge:
            count = shard.count

            def ready() -> bool:
                return all(done_marker(shard_path(out, Shard(i, count))).is_file() for i in range(count))

            try:
                merged = merge_when_complete(Path(out).with_name(f"{Path(out).name}.merge.lock"), ready,
                                             lambda: merge_predictions(out, count=count))
                summary.merged = merged.merged if merged is not None else None
            except RRG3DError as exc:
                summary.merge_error = str(exc)
    return summary


def _grounding(study: Study, array: np.ndarray, preset: Any, settings: Any, single_mask: Path | None,
               index: dict[str, tuple[Path, dict[str, str]]], segment: str | None) -> dict[str, Any]:
    """A study's label map on the model grid and its region inputs (a model item's ``regions``)."""
    import torch

    from rrg3d.train.data import region_item

    label_map, labels, affine, source = study_label_map(study, preset, single_mask=single_mask, index=index,
                                                        segment=segment)
    item = region_item(torch.from_numpy(array), label_map, labels, settings, preset, where=f"{study.id}: {source}")
    if not item["names"]:
        raise RRG3DError(f"{study.id}: {source}: none of the model's regions ({', '.join(settings.names)}) has a "
                         "non-empty mask")
    return {"item": item, "label_map": label_map, "labels": labels, "affine": affine, "source": source}


def _grounded_fields(study: Study, grounding: dict[str, Any], output: Any, mask_dir: Path, out_path: Path
                     ) -> dict[str, Any]:
    """The grounded part of a prediction record; writes the label map the model read beside the predictions."""
    from rrg3d.io import Volume, write_volume
    from rrg3d.preprocess.batch import safe_name

    item = grounding["item"]
    masks = None
    if grounding["affine"] is not None:
        label_map = grounding["label_map"]
        dtype = np.uint8 if label_map.max(initial=0) < 256 and label_map.min(initial=0) >= 0 else np.int16
        path = write_volume(Volume(label_map.astype(dtype), grounding["affine"], modality="SEG"),
                            mask_dir / f"{safe_name(study.id)}.nii.gz")
        masks = {"path": os.path.relpath(path, out_path.parent), "labels": grounding["labels"]}
    return {"region_reports": output.region_reports,
            "regions": dict(zip(item["names"], item["label_ids"], strict=True)),
            "region_recognition": output.recognized,
            "masks": masks,
            "meta": {"regions_dropped": item["dropped"], "mask_source": grounding["source"]}}


def iter_predictions(path: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    """Records of a predictions JSONL (for tests and tools)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
