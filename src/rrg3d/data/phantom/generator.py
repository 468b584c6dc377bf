"""Write a phantom dataset: NIfTI volumes (CT, optional PET, region masks) and a manifest with reports and truth.

Case ``i`` of seed ``S`` is drawn from its own random streams (``[S, i, ...]``), so a dataset is identical
whatever the number of workers, and a larger ``n`` extends a smaller one without changing it. Each case is
written atomically with a receipt; re-running the same command skips cases already written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.data.manifest import relativize, write_manifest
from rrg3d.data.phantom.model import REGIONS, STYLES, Case
from rrg3d.data.phantom.render import render_case
from rrg3d.data.phantom.sampling import sample_case
from rrg3d.errors import RRG3DError
from rrg3d.io import Volume, write_volume
from rrg3d.utils.files import atomic_write_json

GENERATOR_VERSION = 1
DEFAULT_SHAPE = (64, 128, 128)
MAX_SHAPE = (256, 512, 512)


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Everything that determines a phantom dataset (dumped beside it as ``phantom.json``)."""

    n: int = 100
    seed: int = 0
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    pet: bool = False
    styles: int = 2
    #: every case in this one reporting style (a name of ``STYLES``); None: drawn among the first ``styles``
    style: str | None = None
    report_bank: str | None = None
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if self.n < 1:
            raise RRG3DError(f"phantom: --n must be at least 1, got {self.n}")
        if len(self.shape) != 3 or any(n < 16 for n in self.shape):
            raise RRG3DError(f"phantom: --shape needs three sizes of at least 16 voxels, got {self.shape}")
        if any(n > m for n, m in zip(self.shape, MAX_SHAPE, strict=True)):
            raise RRG3DError(f"phantom: --shape {self.shape} exceeds the largest supported {MAX_SHAPE}")
        if not 1 <= self.styles <= 3:
            raise RRG3DError(f"phantom: --styles must be 1, 2 or 3, got {self.styles}")
        if self.style is not None and self.style not in STYLES:
            raise RRG3DError(f"phantom: unknown --style {self.style!r} (known: {', '.join(STYLES)})")

    def to_dict(self) -> dict[str, Any]:
        """The dump of ``phantom.json`` (``style`` only when set, so datasets written before it still resume)."""
        out = dataclasses.asdict(self)
        out["shape"] = list(out["shape"])
        if out["style"] is None:
            del out["style"]
        return out


def split_of(index: int) -> str:
    """Deterministic 80/10/10 split by case index."""
    return {0: "test", 5: "val"}.get(index % 10, "train")


def case_id(index: int) -> str:
    return f"phantom_{index:05d}"


def make_case(config: PhantomConfig, index: int) -> Case:
    rng = np.random.default_rng([config.seed, index, 0])
    return sample_case(case_id(index), config.seed, rng, n_styles=config.styles, pet=config.pet,
                       thyroid_in_view=True, style=config.style)


def _generate_one(config: PhantomConfig, index: int, out_dir: str, bank: Any) -> dict[str, Any]:
    """Render, write and describe one case; returns its manifest record."""
    from rrg3d.data.phantom.reports import write_report

    out = Path(out_dir)
    case = make_case(config, index)
    rendered = render_case(case, config.shape, np.random.default_rng([config.seed, index, 1]))
    report = write_report(case, np.random.default_rng([config.seed, index, 2]), bank)
    manifest = out / "manifest.jsonl"
    ct_path = write_volume(Volume.from_spacing(rendered.ct, rendered.spacing, rendered.origin_lps),
                           out / "vols" / f"{case.id}.nii.gz")
    seg = Volume.from_spacing(rendered.regions, rendered.spacing, rendered.origin_lps, modality="SEG")
    seg_path = write_volume(seg, out / "seg" / f"{case.id}.nii.gz")
    images: dict[str, str | None] = {"ct": relativize(ct_path, manifest), "pet": None}
    meta: dict[str, Any] = {
        "source": "rrg3d-phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": config.seed,
        "case_index": index,
        "anatomy": dataclasses.asdict(case.anatomy),
        "findings": [finding.to_dict() for finding in case.findings],
        "region_truth": case.region_truth,
        "spacing_mm": [round(s, 4) for s in rendered.spacing],
    }
    if rendered.pet is not None:
        pet = Volume.from_spacing(rendered.pet, rendered.spacing, rendered.origin_lps, modality="PT")
        images["pet"] = relativize(write_volume(pet, out / "pet" / f"{case.id}.nii.gz"), manifest)
        meta["pet_units"] = "SUVbw"
    if case.pet is not None:
        meta["pet_facts"] = dataclasses.asdict(case.pet)
    record = {
        "id": case.id,
        "split": split_of(index),
        "images": images,
        "masks": {"path": relativize(seg_path, manifest),
                  "labels": {str(i + 1): name for i, name in enumerate(REGIONS)}},
        "report": report.text,
        "sections": report.sections,
        "region_reports": report.region_reports,
        "labels": case.labels,
        "style": case.style,
        "sex": case.anatomy.sex,
        "meta": meta,
    }
    if case.pet is not None:  # PETRG truth: PET and CT status of each region in the field of view
        from rrg3d.data.phantom.petrg import petrg_truth

        record["petrg"] = petrg_truth(case)
    atomic_write_json(out / "records" / f"{case.id}.json", record)
    return record


def _done(out: Path, config: PhantomConfig, index: int) -> dict[str, Any] | None:
    receipt = out / "records" / f"{case_id(index)}.json"
    if not receipt.exists():
        return None
    try:
        record = json.loads(receipt.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if config.pet and "petrg" not in record:  # a PET case written before PET phantoms had region truth: redo it
        return None
    files = [p for p in record.get("images", {}).values() if p] + [record["masks"]["path"]]
    return record if all((out / f).exists() for f in files) else None


def generate_phantoms(config: PhantomConfig, out_dir: str | os.PathLike[str], workers: int = 1,
                      progress: bool = True) -> Path:
    """Write ``config.n`` cases under ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "phantom.json"
    if config_file.exists():
        previous = json.loads(config_file.read_text(encoding="utf-8"))
        previous.pop("n", None)
        current = {k: v for k, v in config.to_dict().items() if k != "n"}
        if previous != current:
            raise RRG3DError(f"{out}: holds phantoms made with another configuration ({previous}); "
                             "use another folder")
    atomic_write_json(config_file, config.to_dict())
    bank = None
    if config.report_bank:
        from rrg3d.data.phantom.reports import SentenceBank

        bank = SentenceBank.mine(config.report_bank)
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for index in range(config.n):
        done = _done(out, config, index)
        if done is not None:
            records[index] = done
        else:
            todo.append(index)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.n, initial=len(records), desc="phantoms", unit="case", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        if workers <= 1:
            for index in todo:
                records[index] = _generate_one(config, index, str(out), bank)
                if bar is not None:
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {index: pool.submit(_generate_one, config, index, str(out), bank) for index in todo}
                for index, future in futures.items():
                    records[index] = future.result()
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        ordered = [records[i] for i in sorted(records)]
        if ordered:
            write_manifest(ordered, out / "manifest.jsonl")
    atomic_write_json(out / "summary.json", {"n": config.n, "written": len(todo),
                                             "seconds": round(time.perf_counter() - start, 2),
                                             "labels_prevalence": _prevalence(ordered)})
    return out / "manifest.jsonl"


def _prevalence(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    if not records:
        return {}
    names = list(records[0]["labels"])
    return {name: round(sum(r["labels"][name] for r in records) / len(records), 3) for name in names}
