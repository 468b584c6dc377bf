"""Segment many scans into region label maps: parallel, resumable, one JSON line per scan.

Layout of the output folder::

    DIR/<safe name>.nii.gz   uint8 label map per scan (1 = lung ... 10 = abdomen), written atomically
    DIR/masks.jsonl          {"image", "masks": {"path", "labels"}, "empty", "backend", "seconds"} per scan, or
                             {"image", "error"} for a scan that failed

File names come from the scan's file or folder name (never from DICOM headers). A scan whose label map exists and
whose line is in ``masks.jsonl`` is skipped on a rerun; failed scans are tried again. Lines are appended as scans
finish (a killed run keeps what it did) and the file is rewritten at the end with the last line of each scan, in
the order the scans were given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from rrg3d.errors import RRG3DError
from rrg3d.io.readers import scan_stem
from rrg3d.preprocess.batch import safe_name
from rrg3d.utils.files import append_jsonl, atomic_write_text

MASKS_FILE = "masks.jsonl"


@dataclasses.dataclass
class SegmentSummary:
    """Outcome of one :func:`segment_scans` run."""

    total: int = 0
    segmented: int = 0
    skipped_done: int = 0
    failed: int = 0
    seconds: float = 0.0
    out_dir: str = ""

    def line(self) -> str:
        return (f"{self.segmented + self.skipped_done}/{self.total} scans segmented ({self.segmented} now, "
                f"{self.skipped_done} already done), {self.failed} failed, {self.seconds:.1f} s → {self.out_dir}")


def output_names(scans: list[str]) -> dict[str, str]:
    """Label-map file name per scan: the safe file/folder name, with a path hash where two scans would clash."""
    stems = {scan: safe_name(scan_stem(scan) or "scan") for scan in scans}
    counts: dict[str, int] = {}
    for scan in dict.fromkeys(scans):
        counts[stems[scan]] = counts.get(stems[scan], 0) + 1
    names = {}
    for scan, stem in stems.items():
        if counts[stem] > 1:
            stem = f"{stem[:80]}-{hashlib.sha1(scan.encode()).hexdigest()[:8]}"
        names[scan] = f"{stem}.nii.gz"
    return names


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The last line of each scan in a ``masks.jsonl`` (unreadable lines are ignored: they are redone)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("image"), str):
            records[record["image"]] = record
    return records


def segment_one(scan: str, out_dir: str, name: str, backend: str) -> dict[str, Any]:
    """Read, segment and write one scan; failures come back as ``{"image", "error"}`` records."""
    try:
        from rrg3d.io import read_volume, write_volume
        from rrg3d.segment import segment_volume

        volume = read_volume(scan)
        result = segment_volume(volume, backend=backend)
        write_volume(result.label_map, Path(out_dir) / name)
        return {"image": scan, "masks": {"path": name, "labels": result.labels}, "empty": result.empty,
                "backend": result.backend, "seconds": result.seconds}
    except RRG3DError as exc:
        return {"image": scan, "error": str(exc)}
    except MemoryError:
        return {"image": scan, "error": f"{scan}: out of memory while segmenting"}
    except Exception as exc:  # a bug or an unforeseen input: record it, keep the batch going
        return {"image": scan, "error": f"{scan}: segmentation failed ({type(exc).__name__}: {exc})"}


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def segment_scans(scans: list[str], out_dir: str | os.PathLike[str], backend: str = "rules", workers: int = 1,
                  progress: bool = True, overwrite: bool = False) -> SegmentSummary:
    """Segment every scan into ``out_dir`` (see the module docstring for the layout)."""
    from rrg3d.segment import BACKENDS

    if backend not in BACKENDS:
        raise RRG3DError(f"unknown segmentation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not scans:
        raise RRG3DError("no scans given")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    masks_path = out / MASKS_FILE
    scans = list(dict.fromkeys(str(s) for s in scans))
    names = output_names(scans)
    done = {} if overwrite else read_records(masks_path)
    summary = SegmentSummary(total=len(scans), out_dir=str(out))
    todo = []
    for scan in scans:
        record = done.get(scan)
        if record and "masks" in record and (out / record["masks"]["path"]).exists():
            summary.skipped_done += 1
        else:
            todo.append(scan)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="segment", unit="scan")

    def finish(record: dict[str, Any]) -> None:
        append_jsonl(masks_path, record)
        done[record["image"]] = record
        if "error" in record:
            summary.failed += 1
        else:
            summary.segmented += 1
        if bar is not None:
            bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for scan in todo:
                finish(segment_one(scan, str(out), names[scan], backend))
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
                pending: set[Future] = set()
                queue = list(todo)
                while queue or pending:
                    while queue and len(pending) < 2 * workers:
                        scan = queue.pop(0)
                        pending.add(pool.submit(segment_one, scan, str(out), names[scan], backend))
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        finish(future.result())
    finally:
        if bar is not None:
            bar.close()
        # one line per scan, in the given order (scans of earlier runs not given now are kept after them)
        ordered = [done[s] for s in scans if s in done] + [r for k, r in done.items() if k not in set(scans)]
        if ordered:
            atomic_write_text(masks_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    summary.seconds = round(time.perf_counter() - start, 2)
    return summary
