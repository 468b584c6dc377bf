"""Scans in, reports out: resolve inputs, preprocess with the checkpoint's preset, generate in batches, write JSONL.

Inputs are NIfTI/NRRD/MHA/NPY files, DICOM folders, or manifests (JSONL). Studies of a preprocessing cache
(``rrg3d preprocess``) are used as they are when the cache was made with the checkpoint's preset (same sha256), and
refused otherwise — applying a window twice would silently shift intensities. A study that cannot be read becomes a
record with an ``error`` field and the batch goes on. The output is appended line by line (each line flushed), so
an interrupted run resumes: studies already reported are skipped, failed ones are tried again.
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

from rrg3d.errors import RRG3DError
from rrg3d.utils.files import append_jsonl, atomic_write_text

log = logging.getLogger(__name__)
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".dcm")


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


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_studies(inputs: Sequence[str | os.PathLike[str]]) -> list[Study]:
    """Expand files, DICOM folders and manifests into studies with unique ids (input order kept)."""
    from rrg3d.data.manifest import check_manifest, record_affine, resolve

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
                overrides = (record.get("meta") or {}).get("header_overrides")
                studies.append(Study(id=str(record["id"]), path=resolve(path, image), source=str(path),
                                     affine=record_affine(record, "images.ct"), preprocessed_with=preprocessed,
                                     meta={"header_overrides": overrides} if overrides else {}))
        else:
            studies.append(Study(id=_stem(path), path=path, source=str(path)))
    seen: dict[str, int] = {}
    for study in studies:
        if study.id in seen:
            seen[study.id] += 1
            study.id = f"{study.id}#{seen[study.id]}"
        else:
            seen[study.id] = 1
    return studies


def load_study(study: Study, preset: Any) -> np.ndarray:
    """The model-ready array [C, D, H, W] of a study (read + preprocess, or the cache's array as is)."""
    from rrg3d.preprocess.batch import load_model_input

    assert study.path is not None
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


@dataclass
class GenerateSummary:
    written: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0


def generate_reports(model: Any, inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                     settings: Any | None = None, batch_size: int = 1, checkpoint: str | None = None,
                     on_record: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                     resume: bool = True) -> GenerateSummary:
    """Generate a report for every study of ``inputs`` into the predictions JSONL ``out``."""
    import torch
    from tqdm import tqdm

    from rrg3d.preprocess.presets import load_preset

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = settings or model.config.generation
    preset = load_preset(model.config.preprocess)
    studies = resolve_studies(inputs)
    finished = done_ids(out_path) if resume else set()
    if not resume and out_path.exists():
        out_path.unlink()
    todo = [s for s in studies if s.id not in finished]
    summary = GenerateSummary(skipped=len(studies) - len(todo))
    meta_common = {"model": model.config.name, "checkpoint": checkpoint,
                   "preset": {"name": preset.name, "sha256": preset.sha256},
                   "generation": {k: v for k, v in vars(settings).items()}}
    start = time.perf_counter()

    def emit(record: dict[str, Any]) -> None:
        append_jsonl(out_path, record)
        if on_record is not None:
            on_record(record)

    bar = tqdm(total=len(todo), desc="generate", unit="scan", disable=not progress)
    for batch in _batches(todo, max(1, batch_size)):
        arrays: list[np.ndarray] = []
        ready: list[Study] = []
        for study in batch:
            if study.error is None:
                try:
                    arrays.append(load_study(study, preset))
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
        reports = model.generate(volumes, settings)
        seconds = (time.perf_counter() - tick) / len(ready)
        # with a finding classifier: its probabilities and the calls the diagnosis prompt listed
        classified = model.classify(volumes) if getattr(model.vision, "classifier", None) is not None else None
        for index, (study, report) in enumerate(zip(ready, reports, strict=True)):
            extra = {"findings_classifier": classified[index]} if classified is not None else {}
            emit({"id": study.id, "report": report,
                  "meta": {"source": study.source, **meta_common, "seconds": round(seconds, 3), **extra}})
            summary.written += 1
            bar.update(1)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def iter_predictions(path: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    """Records of a predictions JSONL (for tests and tools)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
