"""Preprocess every study of a manifest into a tensor cache that training reads.

Layout of the output folder::

    DIR/preset.yaml          the full preset (the cache is only ever valid for this one)
    DIR/manifest.jsonl       input records, images/masks pointing at the cached tensors, preset recorded
    DIR/errors.jsonl         one record per failed study: {"id", "file", "error"}
    DIR/summary.json         counts and timing of the last run
    DIR/tensors/<id>.<image>.npy, DIR/tensors/<id>.mask.npy
    DIR/records/<id>.json    per-study receipts; a study with a receipt for this preset is skipped on resume

Tensors are written atomically, then the receipt, so a killed run resumes where it stopped and never
trusts a half-written file. One bad study is recorded in ``errors.jsonl`` and the batch goes on.

A shard (``shard=Shard(1, 4)``, see :mod:`rrg3d.utils.shards`) processes only its studies, into the same folder
(tensors and receipts are per study), and writes ``manifest.shard-1-of-4.jsonl``, ``errors.shard-1-of-4.jsonl`` and
``summary.shard-1-of-4.json`` (``"complete": true`` once it ran through, with the source positions of its studies).
:func:`merge_cache` joins them into ``manifest.jsonl``, ``errors.jsonl`` and ``summary.json`` in the source
manifest's order; the last shard to finish does that on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.data.manifest import check_manifest, relativize, resolve, write_manifest
from rrg3d.errors import RRG3DError
from rrg3d.io.volume import Volume
from rrg3d.preprocess.ops import apply_header_overrides
from rrg3d.preprocess.presets import Preset, load_preset
from rrg3d.utils.files import atomic_path, atomic_write_json, atomic_write_text, iter_jsonl
from rrg3d.utils.shards import Shard, find_shards, merge_when_complete, select, shard_path


@dataclasses.dataclass
class BatchSummary:
    """Outcome of one ``preprocess`` run."""

    total: int = 0
    processed: int = 0
    skipped_done: int = 0
    failed: int = 0
    invalid_lines: int = 0
    seconds: float = 0.0
    out_dir: str = ""
    #: sharded runs: the shard ("1/4"), and the merged manifest when this run merged every shard
    shard: str | None = None
    merged: str | None = None
    merge_error: str | None = None

    @property
    def succeeded(self) -> int:
        return self.processed + self.skipped_done

    def line(self) -> str:
        shard = f"shard {self.shard}: " if self.shard else ""
        return (f"{shard}{self.succeeded}/{self.total} studies ready ({self.processed} processed, {self.skipped_done} "
                f"already done), {self.failed} failed, {self.invalid_lines} invalid manifest lines, "
                f"{self.seconds:.1f} s → {self.out_dir}")


def safe_name(study_id: str) -> str:
    """A file-name-safe version of a study id (a hash suffix keeps distinct ids distinct)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", study_id).strip("._") or "study"
    if cleaned == study_id:
        return cleaned
    return f"{cleaned[:80]}-{hashlib.sha1(study_id.encode()).hexdigest()[:8]}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def preprocess_image(path: str | os.PathLike[str], preset: Preset, *, key: str = "ct",
                     header_overrides: dict[str, Any] | None = None,
                     pet_units: str | None = None) -> tuple[Volume, Volume, Preset]:
    """Read one image of a study and apply the preset exactly as the cache does.

    Returns ``(read volume, preprocessed volume, preset used)``: a PET image under a non-SUV preset is
    preprocessed with ``petct_suv``; a manifest's ``meta.header_overrides`` apply to the CT, and its
    ``meta.pet_units`` (e.g. ``"SUVbw"`` for PET already in SUV, as phantoms and AutoPET ship it) to the PET.
    """
    from rrg3d.io import read_volume

    volume = read_volume(path, modality="PT" if key == "pet" else None)
    if key == "pet" and pet_units and "pet_units" not in volume.meta:
        volume.meta["pet_units"] = pet_units
    if key == "ct":
        volume = apply_header_overrides(volume, header_overrides)
    item_preset = preset
    if key == "pet" and preset.intensity.kind != "suv":
        item_preset = load_preset("petct_suv")
    return volume, item_preset.apply(volume), item_preset


def preprocess_petct(ct_path: str | os.PathLike[str], pet_path: str | os.PathLike[str], preset: Preset, *,
                     header_overrides: dict[str, Any] | None = None,
                     pet_units: str | None = None) -> tuple[Volume, Volume, Volume]:
    """A study's CT and PET through a PET/CT preset (``preset.pet``): ``(CT read, CT preprocessed, PET on the CT's
    output grid)``. The PET is read in SUV (``pet_units``, e.g. ``"SUVbw"``, for files already in SUV)."""
    from rrg3d.io import read_volume

    if preset.pet is None:
        raise RRG3DError(f"preset {preset.name!r} is not a PET/CT preset (no pet section)")
    ct, ct_out, _ = preprocess_image(ct_path, preset, key="ct", header_overrides=header_overrides)
    pet = read_volume(pet_path, modality="PT")
    if pet_units and "pet_units" not in pet.meta:
        pet.meta["pet_units"] = pet_units
    try:
        pet_out = preset.apply_pet(pet, ct_out, where=f"{pet_path} on {ct_path}")
    except RRG3DError:
        raise
    except Exception as exc:  # SimpleITK / numpy failure: name both files
        raise RRG3DError(f"{pet_path}: resampling the PET onto the CT grid failed ({type(exc).__name__}: {exc})") \
            from exc
    return ct, ct_out, pet_out


def read_cached(path: str | os.PathLike[str], preset: Preset, sha256: str) -> np.ndarray:
    """A cached tensor as a float32 ``[D, H, W]`` copy (memory-mapped read, no file handle kept).

    Refuses a tensor cached with another preset (``sha256`` is the one its record carries): applying a
    window twice would silently shift intensities. Checks the shape against the preset.
    """
    from rrg3d.errors import VolumeReadError

    if sha256 != preset.sha256:
        raise RRG3DError(f"{path}: preprocessed with another preset (sha256 {sha256[:12]}) "
                         f"than the model's {preset.name!r} ({preset.sha256[:12]}); give the original scans")
    if str(path).lower().endswith(".npy"):
        try:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            array = np.array(mapped, dtype=np.float32)  # always a copy: the map goes with ``mapped``
            del mapped
        except FileNotFoundError as exc:
            raise VolumeReadError(path, "file not found") from exc
        except (ValueError, OSError, EOFError) as exc:
            raise VolumeReadError(path, f"not a readable cached tensor ({type(exc).__name__}: {exc})") from exc
    else:  # a hand-made cache in another format: the general reader
        from rrg3d.io import read_volume

        array = np.asarray(read_volume(path).array, dtype=np.float32)
    if tuple(array.shape) != tuple(preset.shape):
        raise RRG3DError(f"{path}: cached array has shape {array.shape}, the preset gives {preset.shape}")
    return array


def load_model_input(path: str | os.PathLike[str], preset: Preset, *, cached_sha256: str | None = None,
                     header_overrides: dict[str, Any] | None = None) -> np.ndarray:
    """The model-ready float32 ``[D, H, W]`` array of a CT: a cache's tensor as is, or read + preprocessed.

    ``cached_sha256`` is the preset hash a cache record carries (``None`` for an original scan). Raises
    :class:`RRG3DError` naming the file on any failure, including NaN or infinite values.
    """
    if cached_sha256 is not None:
        array = read_cached(path, preset, cached_sha256)
    else:
        array = np.asarray(preprocess_image(path, preset, header_overrides=header_overrides)[1].array,
                           dtype=np.float32)
        if tuple(array.shape) != tuple(preset.shape):
            raise RRG3DError(f"{path}: preprocessing gave shape {array.shape}, the preset gives {preset.shape}")
    if not np.isfinite(array).all():
        raise RRG3DError(f"{path}: the preprocessed volume contains NaN or infinite values")
    return array


def load_petct_input(ct_path: str | os.PathLike[str], pet_path: str | os.PathLike[str] | None, preset: Preset, *,
                     cached_sha256: str | None = None, header_overrides: dict[str, Any] | None = None,
                     pet_units: str | None = None) -> np.ndarray:
    """The model-ready float32 ``[2, D, H, W]`` (CT, PET) array of a PET/CT study for a PET/CT preset: a cache's two
    tensors (same grid by construction), or both files read and the PET resampled onto the CT's output grid. A
    missing PET, a PET that does not overlap the CT, NaN values: :class:`RRG3DError` naming the file."""
    if preset.pet is None:
        raise RRG3DError(f"preset {preset.name!r} is not a PET/CT preset (no pet section)")
    if not pet_path:
        raise RRG3DError(f"{ct_path}: this PET/CT model needs the study's PET (images.pet), and it has none")
    if cached_sha256 is not None:
        arrays = [read_cached(ct_path, preset, cached_sha256), read_cached(pet_path, preset, cached_sha256)]
    else:
        _, ct_out, pet_out = preprocess_petct(ct_path, pet_path, preset, header_overrides=header_overrides,
                                              pet_units=pet_units)
        arrays = [np.asarray(ct_out.array, dtype=np.float32), np.asarray(pet_out.array, dtype=np.float32)]
        for path, array in zip((ct_path, pet_path), arrays, strict=True):
            if tuple(array.shape) != tuple(preset.shape):
                raise RRG3DError(f"{path}: preprocessing gave shape {array.shape}, the preset gives {preset.shape}")
    for path, array in zip((ct_path, pet_path), arrays, strict=True):
        if not np.isfinite(array).all():
            raise RRG3DError(f"{path}: the preprocessed volume contains NaN or infinite values")
    return np.stack(arrays)


def process_record(record: dict[str, Any], manifest_path: str, preset_data: dict[str, Any], out_dir: str) -> dict:
    """Preprocess one study (runs in a worker). Returns ``{"id", "record"}`` or ``{"id", "file", "error"}``."""
    from rrg3d.io import read_volume

    preset = load_preset(preset_data)
    out = Path(out_dir)
    name = safe_name(record["id"])
    new_record = {k: v for k, v in record.items() if not k.startswith("_")}
    current_file = None
    try:
        images: dict[str, str | None] = {}
        reference = None
        geometry: dict[str, Any] = {}
        meta = record.get("meta") or {}
        given = record.get("images") or {}
        ct_output = None
        for key in sorted(given, key=lambda k: k != "ct"):  # the CT first: a PET/CT preset puts the PET on its grid
            relative = given[key]
            if not relative:
                images[key] = relative
                continue
            current_file = str(resolve(manifest_path, relative))
            if key == "pet" and preset.pet is not None:
                if ct_output is None:
                    raise RRG3DError("a PET/CT preset needs the study's CT (images.ct) to place the PET on")
                volume = read_volume(current_file, modality="PT")
                if meta.get("pet_units") and "pet_units" not in volume.meta:
                    volume.meta["pet_units"] = meta["pet_units"]
                result, item_preset = preset.apply_pet(volume, ct_output, where=current_file), preset
            else:
                volume, result, item_preset = preprocess_image(current_file, preset, key=key,
                                                               header_overrides=meta.get("header_overrides"),
                                                               pet_units=meta.get("pet_units"))
            if key == "ct":
                ct_output = result
            target = out / "tensors" / f"{name}.{key}.npy"
            _save_npy(target, result.array.astype(preset.cache_dtype, copy=False))
            images[key] = relativize(target, out / "manifest.jsonl")
            geometry[key] = {"shape": list(result.shape), "affine": result.affine.round(6).tolist(),
                             "preset": item_preset.name, "sha256": item_preset.sha256}
            reference = reference or volume
        new_record["images"] = images
        masks = record.get("masks")
        if masks and masks.get("path"):
            current_file = str(resolve(manifest_path, masks["path"]))
            mask = read_volume(current_file, modality="SEG")
            spacing_fix = ((record.get("meta") or {}).get("header_overrides") or {}).get("spacing_mm")
            mask = apply_header_overrides(mask, {"spacing_mm": spacing_fix} if spacing_fix else None)
            if mask.array.dtype.kind == "f":
                mask = mask.replace(array=np.rint(mask.array).astype(np.int16))
            if reference is not None and mask.shape != reference.shape:
                raise RRG3DError(f"mask shape {mask.shape} differs from its image's {reference.shape}")
            result = preset.apply_mask(mask)
            target = out / "tensors" / f"{name}.mask.npy"
            _save_npy(target, result.array.astype(np.uint8 if result.array.max(initial=0) < 256 else np.int16))
            new_record["masks"] = dict(masks, path=relativize(target, out / "manifest.jsonl"))
        new_record["preprocess"] = {"preset": preset.name, "sha256": preset.sha256, "images": geometry}
        atomic_write_json(out / "records" / f"{name}.json", new_record)
        return {"id": record["id"], "record": new_record}
    except RRG3DError as exc:
        return {"id": record["id"], "file": current_file, "error": str(exc)}
    except MemoryError:
        return {"id": record["id"], "file": current_file, "error": "out of memory while preprocessing"}
    except Exception as exc:  # a bug or an unexpected library failure: record it, keep the batch going
        return {"id": record["id"], "file": current_file, "error": f"unexpected {type(exc).__name__}: {exc}"}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _receipt(out: Path, record: dict[str, Any], preset: Preset) -> dict[str, Any] | None:
    """The stored result for a study if it is complete for this preset (all its tensors present)."""
    path = out / "records" / f"{safe_name(record['id'])}.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if stored.get("preprocess", {}).get("sha256") != preset.sha256:
        return None
    source = {k: v for k, v in record.items() if not k.startswith("_")}
    if {k: v for k, v in stored.items() if k not in ("images", "masks", "preprocess")} != {
        k: v for k, v in source.items() if k not in ("images", "masks", "preprocess")
    }:
        return None  # the manifest record changed (e.g. a corrected report): redo it
    files = [v for v in (stored.get("images") or {}).values() if v]
    if stored.get("masks"):
        files.append(stored["masks"]["path"])
    if not all((out / f).exists() for f in files):
        return None
    return stored


def preprocess_manifest(
    manifest: str | os.PathLike[str],
    preset: str | Preset,
    out_dir: str | os.PathLike[str],
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    merge: bool = True,
) -> BatchSummary:
    """Preprocess all studies of ``manifest`` with ``preset`` into ``out_dir`` (resumable, parallel).

    With ``shard``, only that shard's studies and invalid lines, written under the shard's file names; ``merge``:
    when every shard of the run has finished, merge them (see :func:`merge_cache`)."""
    start = time.perf_counter()
    preset = load_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset_file = out / "preset.yaml"
    if preset_file.exists() and not overwrite:
        existing = load_preset(preset_file)
        if existing.sha256 != preset.sha256:
            raise RRG3DError(f"{out}: this cache was made with preset {existing.name!r} ({existing.sha256[:12]}); "
                             f"use another folder or --overwrite to rebuild it with {preset.name!r}")
    atomic_write_text(preset_file, preset.to_yaml())

    records, problems = check_manifest(manifest)
    manifest_records = len(records)
    positions = {str(r["id"]): position for position, r in enumerate(records)}
    invalid = [p for p in problems if p.severity == "error"]
    if shard is not None:  # every study by its id, every invalid line by its place
        records = select(records, shard, key=lambda r: str(r["id"]))
        invalid = select(invalid, shard, key=lambda p: f"{p.path}:{p.line}")
    files = {name: shard_path(out / name, shard) for name in ("manifest.jsonl", "errors.jsonl", "summary.json")}
    if shard is not None:
        files["summary.json"].unlink(missing_ok=True)  # it says the shard is complete: not while it runs again
    errors: list[dict[str, Any]] = [{"id": None, "file": f"{p.path}:{p.line}", "error": str(p)} for p in invalid]
    summary = BatchSummary(total=len(records), invalid_lines=len(errors), out_dir=str(out),
                           shard=str(shard) if shard is not None else None)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for record in records:
        stored = None if overwrite else _receipt(out, record, preset)
        if stored is not None:
            results[record["id"]] = stored
            summary.skipped_done += 1
        else:
            todo.append(record)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), initial=summary.skipped_done, desc=f"preprocess [{preset.name}]",
                   unit="study", dynamic_ncols=True)

    def collect(outcome: dict[str, Any]) -> None:
        if "record" in outcome:
            results[outcome["id"]] = outcome["record"]
            summary.processed += 1
        else:
            errors.append(outcome)
            summary.failed += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=summary.failed)

    preset_data = preset.to_dict()
    complete = False
    try:
        if workers <= 1:
            for record in todo:
                collect(process_record(record, str(manifest), preset_data, str(out)))
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
                pending: set[Future] = set()
                queue = list(reversed(todo))
                while queue or pending:
                    while queue and len(pending) < 2 * workers:
                        rec = queue.pop()
                        pending.add(pool.submit(process_record, rec, str(manifest), preset_data, str(out)))
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        collect(future.result())
        complete = True
    finally:
        if bar is not None:
            bar.close()
        ordered = [results[r["id"]] for r in records if r["id"] in results]
        write_manifest(ordered, files["manifest.jsonl"])
        atomic_write_text(files["errors.jsonl"], "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
        summary.seconds = time.perf_counter() - start
        data = {k: v for k, v in dataclasses.asdict(summary).items() if k not in ("merged", "merge_error")}
        data.update(preset=preset.name, preset_sha256=preset.sha256, manifest=str(manifest))
        if shard is None:
            data.pop("shard")
        else:  # written last: its "complete" tells a merge that the other two files are final
            data.update(complete=complete, source=str(Path(manifest).resolve()), manifest_records=manifest_records,
                        positions=[[positions[str(r["id"])], str(r["id"])] for r in records])
        atomic_write_json(files["summary.json"], data)
    if shard is not None and merge:
        try:
            merged = merge_when_complete(out / "merge.lock", lambda: _shards_complete(out, shard.count),
                                         lambda: merge_cache(out, count=shard.count))
            summary.merged = str(out / "manifest.jsonl") if merged is not None else None
        except RRG3DError as exc:
            summary.merge_error = str(exc)
    return summary


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path, what="shard")]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RRG3DError(f"{path}: not a readable summary ({exc})") from None
    if not isinstance(data, dict):
        raise RRG3DError(f"{path}: not a summary (expected a JSON object)")
    return data


def _shards_complete(out: Path, count: int) -> bool:
    """Whether every shard of ``count`` has a summary saying it ran through."""
    for index in range(count):
        path = shard_path(out / "summary.json", Shard(index, count))
        try:
            if not json.loads(path.read_text(encoding="utf-8")).get("complete"):
                return False
        except (OSError, json.JSONDecodeError, AttributeError):
            return False
    return True


def merge_cache(out_dir: str | os.PathLike[str], count: int | None = None,
                allow_incomplete: bool = False) -> BatchSummary:
    """Join the shard files of a cache into ``manifest.jsonl``, ``errors.jsonl`` and ``summary.json``.

    Checks that all N shards are present, finished (unless ``allow_incomplete``), made from the same manifest with
    the same preset, and share no study. Records and errors follow the source manifest's order (errors of invalid
    lines first), so the result equals an unsharded run's. ``count`` chooses N when files of several N are present.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    count, summary_files = find_shards(out / "summary.json", count)
    summaries = {index: _read_json(path) for index, path in summary_files.items()}
    unfinished = [path.name for index, path in summary_files.items() if not summaries[index].get("complete")]
    if unfinished and not allow_incomplete:
        raise RRG3DError(f"{out}: shard(s) not finished: {', '.join(unfinished)} (rerun them, they resume; or merge "
                         "anyway with --allow-incomplete)")
    for key, what in (("preset_sha256", "preset"), ("source", "manifest"), ("manifest_records", "manifest")):
        values = {str(s.get(key)) for s in summaries.values()}
        if len(values) > 1:
            raise RRG3DError(f"{out}: the shards were made with different {what}s ({key}: {', '.join(sorted(values))})")
    positions: dict[str, int] = {}
    owner: dict[str, int] = {}
    overlap: list[str] = []
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for index in summary_files:
        shard = Shard(index, count)
        positions.update({str(i): int(p) for p, i in summaries[index].get("positions") or []})
        for record in _read_jsonl(shard_path(out / "manifest.jsonl", shard)):
            study = str(record.get("id"))
            if study in owner:
                overlap.append(study)
            owner[study] = index
            records.append(record)
        errors.extend(_read_jsonl(shard_path(out / "errors.jsonl", shard)))
    if overlap:
        raise RRG3DError(f"{out}: {len(overlap)} studies are in more than one shard (e.g. {overlap[:3]}); were the "
                         "shards run on different manifests?")
    last = len(positions) + 1

    def place(study: Any) -> tuple[int, str]:
        return positions.get(str(study), last), str(study)

    def error_place(error: dict[str, Any]) -> tuple[int, int, str]:
        if error.get("id") is None:  # an invalid manifest line: "path:line"
            line = str(error.get("file") or "").rpartition(":")[2]
            return 0, int(line) if line.isdigit() else 0, ""
        return (1, *place(error["id"]))

    records.sort(key=lambda r: place(r.get("id")))
    errors.sort(key=error_place)
    write_manifest(records, out / "manifest.jsonl")
    atomic_write_text(out / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    merged = BatchSummary(out_dir=str(out), merged=str(out / "manifest.jsonl"))
    for data in summaries.values():
        for key in ("total", "processed", "skipped_done", "failed", "invalid_lines"):
            setattr(merged, key, getattr(merged, key) + int(data.get(key) or 0))
        merged.seconds = max(merged.seconds, float(data.get("seconds") or 0.0))
    first = summaries[0]
    atomic_write_json(out / "summary.json", {
        **{k: v for k, v in dataclasses.asdict(merged).items() if k not in ("shard", "merged", "merge_error")},
        "preset": first.get("preset"), "preset_sha256": first.get("preset_sha256"), "manifest": first.get("manifest"),
        "shards": count, "complete": not unfinished, "merge_seconds": round(time.perf_counter() - start, 3)})
    return merged
