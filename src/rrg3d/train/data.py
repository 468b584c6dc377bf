"""Training data: the studies of a manifest as ``(volume, report, labels)`` items for one preprocessing preset.

A :class:`ReportDataset` is made for one preset (multi-scale training builds one per phase). Its volumes come
from one of three places, chosen by :func:`build_dataset`:

1. the manifest *is* a preprocessing cache made with this preset (its records carry ``preprocess.sha256 ==
   preset.sha256``): the cached ``.npy`` tensors are read as they are (memory-mapped, converted to float32);
2. a ``cache_dir`` is given: the manifest is preprocessed into ``cache_dir / preset.name`` (resumable, see
   :func:`rrg3d.preprocess.batch.preprocess_manifest`) and that cache is read; failed studies are listed in the
   cache's ``errors.jsonl`` and left out of the dataset;
3. otherwise each item is read and preprocessed on the fly (:func:`rrg3d.preprocess.batch.load_model_input`,
   the same code the cache and ``rrg3d generate`` use), rounded through the preset's ``cache_dtype`` so that
   the tensors are identical to a cache's.

A cache made with *another* preset is refused: windowing twice would silently shift intensities.

The dataset holds only plain data (paths, texts, label tuples), so it pickles into DataLoader workers and
keeps no file open.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrg3d.data.manifest import check_manifest, resolve
from rrg3d.errors import RRG3DError
from rrg3d.models.classifier import UPTAKE_TARGETS, uptake_matrix
from rrg3d.preprocess.batch import load_model_input, load_petct_input, preprocess_manifest
from rrg3d.preprocess.presets import Preset, load_preset
from rrg3d.text.labels import CTRATE_LABELS

#: the uptake row of a study without per-region PET status
UNKNOWN_UPTAKE: tuple[float, ...] = (float("nan"),) * len(UPTAKE_TARGETS)

log = logging.getLogger(__name__)

#: Order of the ``labels`` vector of every item (the 18 CT-RATE abnormalities).
LABEL_NAMES: tuple[str, ...] = CTRATE_LABELS
REPORT_FIELDS = ("report", "findings", "impression")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One usable study: where its CT is and what it says (plain data, cheap to pickle)."""

    id: str
    image: str
    report: str
    labels: tuple[float, ...]
    cached_sha256: str | None = None
    header_overrides: dict[str, Any] | None = None
    split: str | None = None
    #: region-guided models: the study's label map (on the preset grid when ``cached_sha256`` is set), its
    #: value → region name mapping, and the reference region reports
    mask: str | None = None
    mask_labels: dict[str, str] | None = None
    region_reports: dict[str, str] | None = None
    #: region-guided models with a region classifier: the abnormalities of each region (``{region: [labels]}`` or
    #: ``{region: {label: 0/1}}``; :func:`region_labels_of`)
    region_labels: dict[str, Any] | None = None
    #: PET/CT presets: the study's PET (on the CT's grid when cached) and its units when the file is already SUV
    pet: str | None = None
    pet_units: str | None = None
    #: the reporting style (hospital) and sex, for style-adaptive prompts
    style: str | None = None
    sex: str | None = None
    #: per-region abnormal FDG uptake from the record's ``petrg`` status (NaN: unknown), the targets of a finding
    #: classifier that calls uptake (:data:`rrg3d.models.classifier.UPTAKE_TARGETS` order)
    uptake: tuple[float, ...] | None = None


def labels_vector(labels: dict[str, Any] | None, names: Sequence[str] = LABEL_NAMES) -> tuple[float, ...]:
    """A record's ``labels`` (name → 0/1, names possibly missing) as floats in ``names`` order, NaN when unknown."""
    labels = labels or {}
    values = []
    for name in names:
        value = labels.get(name)
        values.append(math.nan if value is None or isinstance(value, bool) or value not in (0, 1) else float(value))
    return tuple(values)


def normalize_sex(value: Any) -> str | None:
    """A record's ``sex`` as ``"female"``, ``"male"`` or None (unknown): M/F, male/female, 男/女, any case."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text in ("f", "female", "woman", "w", "女"):
        return "female"
    if text in ("m", "male", "man", "男"):
        return "male"
    return None


def preset_shape(preset: str | Preset) -> tuple[int, int, int]:
    """The ``(D, H, W)`` input size a preset gives (what the model of a phase is built for)."""
    return tuple(int(n) for n in load_preset(preset).shape)  # type: ignore[return-value]


class ReportDataset(torch.utils.data.Dataset):
    """Studies of a manifest preprocessed with one preset; items are ``{"id", "volume", "report", "labels"}``.

    ``volume`` is a float32 tensor ``[C, D, H, W]`` (C = 1: CT; C = 2 for a PET/CT preset: CT, PET on the CT's
    grid), ``style``/``sex`` the study's reporting style and sex (None when unknown), ``labels`` a float32 tensor
    of the 18 :data:`LABEL_NAMES` with NaN where the manifest does not say. Prefer :func:`build_dataset`, which also
    builds a cache; constructing the class directly does the same (``workers``/``progress`` apply to caching).

    Attributes: ``ids``, ``preset``, ``shape`` (the preset's ``(D, H, W)``), ``mode`` (``"cache"`` or
    ``"on_the_fly"``), ``manifest`` (the manifest actually read: the cache's when one was built), ``skipped``
    (counts of studies left out, by reason) and ``entries``.
    """

    def __init__(self, manifest: str | os.PathLike[str], preset: str | Preset, *,
                 split: str | Sequence[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 require_report: bool = True, workers: int = 1, progress: bool = False,
                 report_field: str = "report", blank_images: bool = False, regions: Any = None) -> None:
        if report_field not in REPORT_FIELDS:
            raise ValueError(f"report_field must be one of {REPORT_FIELDS}, got {report_field!r}")
        self.preset: Preset = load_preset(preset)
        #: region-guided models (:class:`~rrg3d.models.regions.RegionSettings`): items also carry ``regions``
        self.regions = regions
        self.require_report = require_report
        self.report_field = report_field
        #: a control for learnability: every volume is zeros (the model can only learn the text prior)
        self.blank_images = blank_images
        self.skipped: dict[str, int] = {}
        source = Path(manifest)
        records, problems = check_manifest(source)
        invalid = [p for p in problems if p.severity == "error"]
        if invalid:
            self.skipped["invalid_line"] = len(invalid)
            log.warning("%s: %d invalid manifest line(s) skipped (first: %s)", source, len(invalid), invalid[0])
        cached = [r for r in records if r.get("preprocess")]
        if cached:
            self._check_cache(source, records)
            self.mode = "cache"
        elif cache_dir is not None:
            out = Path(cache_dir) / self.preset.name
            summary = preprocess_manifest(source, self.preset, out, workers=workers, progress=progress)
            if summary.failed:
                self.skipped["preprocess_failed"] = summary.failed
                log.warning("%d of %d studies failed to preprocess and are left out (see %s)", summary.failed,
                            summary.total, out / "errors.jsonl")
            source = out / "manifest.jsonl"
            records, _ = check_manifest(source)
            self.mode = "cache"
        else:
            self.mode = "on_the_fly"
        self.manifest = source
        self.entries: list[Entry] = self._select(source, records, split)
        self.ids: list[str] = [e.id for e in self.entries]
        if not self.entries:
            log.warning("%s: no usable study%s", source, f" in split {split!r}" if split else "")

    # -- construction ------------------------------------------------------------------------------
    def _check_cache(self, source: Path, records: list[dict[str, Any]]) -> None:
        for record in records:
            sha = (record.get("preprocess") or {}).get("sha256")
            if sha is None:
                raise RRG3DError(f"{source}:{record.get('_line')}: study {record['id']!r} has no 'preprocess' entry "
                                 "while others do; a manifest must be either original scans or one preprocessing cache")
            if sha != self.preset.sha256:
                made_with = (record.get("preprocess") or {}).get("preset")
                raise RRG3DError(f"{source}: this is a preprocessing cache made with preset {made_with!r} "
                                 f"({sha[:12]}), not {self.preset.name!r} ({self.preset.sha256[:12]}); give the "
                                 "original manifest (and a cache_dir) instead of preprocessing twice")

    def _select(self, source: Path, records: list[dict[str, Any]], split: str | Sequence[str] | None) -> list[Entry]:
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        entries: list[Entry] = []
        for record in records:
            if splits is not None and record.get("split") not in splits:
                continue
            masks = record.get("masks") or {}
            region_reports = None
            if self.regions is not None:
                if not masks.get("path") or not masks.get("labels"):
                    self.skipped["no_masks"] = self.skipped.get("no_masks", 0) + 1
                    continue
                region_reports = {str(k): v for k, v in (record.get("region_reports") or {}).items()
                                  if isinstance(v, str) and v.strip()}
                if self.require_report and not region_reports:
                    self.skipped["no_region_reports"] = self.skipped.get("no_region_reports", 0) + 1
                    continue
            region_labels = None
            if self.regions is not None and getattr(self.regions, "classifier", None) is not None:
                region_labels = region_labels_of(record, region_reports)
            report = record_text(record, self.report_field)
            if self.regions is not None and (not isinstance(report, str) or not report.strip()):
                report = "\n".join(region_reports.values()) if region_reports else ""
            if not isinstance(report, str) or not report.strip():
                if self.require_report:
                    self.skipped["no_report"] = self.skipped.get("no_report", 0) + 1
                    continue
                report = ""
            image = (record.get("images") or {}).get("ct")
            if not image:
                self.skipped["no_ct"] = self.skipped.get("no_ct", 0) + 1
                continue
            pet = (record.get("images") or {}).get("pet")
            if self.preset.pet is not None and not pet:
                self.skipped["no_pet"] = self.skipped.get("no_pet", 0) + 1
                continue
            entries.append(Entry(
                id=str(record["id"]), image=str(resolve(source, image)), report=report,
                labels=labels_vector(record.get("labels")),
                cached_sha256=(record.get("preprocess") or {}).get("sha256"),
                header_overrides=(record.get("meta") or {}).get("header_overrides"),
                split=record.get("split"),
                mask=str(resolve(source, masks["path"])) if masks.get("path") else None,
                mask_labels={str(k): str(v) for k, v in (masks.get("labels") or {}).items()} or None,
                region_reports=region_reports,
                region_labels=region_labels,
                pet=str(resolve(source, pet)) if pet and self.preset.pet is not None else None,
                pet_units=(record.get("meta") or {}).get("pet_units"),
                style=record.get("style") if isinstance(record.get("style"), str) else None,
                sex=normalize_sex(record.get("sex")),
                uptake=uptake_matrix(record.get("petrg")) if isinstance(record.get("petrg"), dict) else None,
            ))
        reasons = {"no_report": "no report", "no_ct": "no images.ct", "no_masks": "no masks (a region model needs a "
                   "label map)", "no_region_reports": "no region_reports",
                   "no_pet": f"no images.pet (preset {self.preset.name!r} is PET/CT)"}
        for reason, what in reasons.items():
            if self.skipped.get(reason):
                log.warning("%s: %d stud%s skipped (%s)", source, self.skipped[reason],
                            "y" if self.skipped[reason] == 1 else "ies", what)
        return entries

    # -- access --------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.preset.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.entries)

    def load_volume(self, i: int) -> np.ndarray:
        """The float32 ``[C, D, H, W]`` array of item ``i``; :class:`RRG3DError` naming the file on failure."""
        entry = self.entries[i]
        try:
            if self.preset.pet is not None:
                array = load_petct_input(entry.image, entry.pet, self.preset, cached_sha256=entry.cached_sha256,
                                         header_overrides=entry.header_overrides, pet_units=entry.pet_units)
            else:
                array = load_model_input(entry.image, self.preset, cached_sha256=entry.cached_sha256,
                                         header_overrides=entry.header_overrides)[None]
        except RRG3DError as exc:
            raise RRG3DError(f"study {entry.id!r}: {exc}") from exc
        except MemoryError as exc:
            raise RRG3DError(f"study {entry.id!r}: {entry.image}: out of memory while reading") from exc
        except Exception as exc:  # a library failure: still name the file, let the loop decide
            raise RRG3DError(f"study {entry.id!r}: {entry.image}: unexpected {type(exc).__name__}: {exc}") from exc
        if entry.cached_sha256 is None:  # round as the cache stores it: both modes give identical tensors
            array = array.astype(self.preset.cache_dtype).astype(np.float32)
        return array

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.entries[i]
        volume = (torch.zeros((self.preset.channels, *self.preset.shape)) if self.blank_images
                  else torch.from_numpy(self.load_volume(i)))
        item = {
            "id": entry.id,
            "volume": volume,
            "report": entry.report,
            "labels": torch.tensor(entry.labels, dtype=torch.float32),
            "uptake": torch.tensor(entry.uptake if entry.uptake is not None else UNKNOWN_UPTAKE, dtype=torch.float32),
            "style": entry.style,
            "sex": entry.sex,
        }
        if self.regions is not None:
            item["regions"] = self.region_item(i, volume)
        return item

    def region_item(self, i: int, volume: torch.Tensor) -> dict[str, Any]:
        """Item ``i``'s region inputs (:func:`region_item`) from its label map on the preset grid."""
        from rrg3d.preprocess.regions import load_label_map

        entry = self.entries[i]
        assert entry.mask is not None and entry.mask_labels is not None
        try:
            label_map, _ = load_label_map(entry.mask, self.preset, cached=entry.cached_sha256 is not None,
                                       header_overrides=entry.header_overrides)
        except RRG3DError as exc:
            raise RRG3DError(f"study {entry.id!r}: {exc}") from exc
        return region_item(volume, label_map, entry.mask_labels, self.regions, self.preset,
                           reports=entry.region_reports, region_labels=entry.region_labels,
                           where=f"study {entry.id!r}: {entry.mask}")

    def label_matrix(self) -> torch.Tensor:
        """``[N, 18]`` labels of every item (NaN where unknown) without reading any volume."""
        return torch.tensor([e.labels for e in self.entries], dtype=torch.float32).reshape(len(self.entries),
                                                                                           len(LABEL_NAMES))

    def target_matrix(self) -> torch.Tensor:
        """``[N, 18 + U]``: :meth:`label_matrix`, then each item's uptake targets (NaN where unknown) — the label
        matrix a finding classifier that calls uptake reads (:func:`rrg3d.models.classifier.target_matrix`)."""
        uptake = torch.tensor([e.uptake if e.uptake is not None else UNKNOWN_UPTAKE for e in self.entries],
                              dtype=torch.float32).reshape(len(self.entries), len(UPTAKE_TARGETS))
        return torch.cat([self.label_matrix(), uptake], dim=-1)

    def __repr__(self) -> str:
        return (f"ReportDataset({len(self)} studies, preset={self.preset.name!r} {self.shape}, mode={self.mode}, "
                f"manifest={str(self.manifest)!r})")


def record_text(record: dict[str, Any], field: str = "report") -> str | None:
    """The target text of a record: the whole report, or one section of it (``findings``, ``impression``)."""
    if field == "report":
        return record.get("report")
    return (record.get("sections") or {}).get(field)


def region_item(volume: torch.Tensor, label_map: np.ndarray, labels: dict[str, str], settings: Any, preset: Preset,
                *, reports: dict[str, str] | None = None, region_labels: dict[str, Any] | None = None,
                where: str = "label map") -> dict[str, Any]:
    """The ``regions`` entry of an item: :func:`rrg3d.preprocess.regions.region_inputs` as a dict (``names``,
    ``label_ids``, ``texture``, ``geometry``, ``dropped``) plus the reference region ``reports`` (None at
    inference). Texture crops are ``settings.texture_size`` (default the preset's shape), air outside the region.
    With a region classifier (``settings.classifier``) also each region's masked intensity ``histograms`` and its
    abnormalities ``findings`` [R, 18] from ``region_labels`` (NaN where unknown: always at inference)."""
    from rrg3d.preprocess.regions import air_value, region_inputs

    texture_size = (settings.texture_size or tuple(preset.shape)) if settings.texture else None
    classifier = getattr(settings, "classifier_config", None)
    inputs = region_inputs(volume, label_map, labels, settings.names, texture_size=texture_size,
                           geometry_size=settings.geometry_size if settings.geometry else None,
                           air=settings.air if settings.air is not None else air_value(preset),
                           min_voxels=settings.min_voxels, where=where, keep_masks=classifier is not None)
    item = {"names": inputs.names, "label_ids": inputs.label_ids, "texture": inputs.texture,
            "geometry": inputs.geometry, "dropped": inputs.dropped, "reports": reports}
    if classifier is not None:
        from rrg3d.models.region_classifier import region_histograms, region_label_rows

        assert inputs.masks is not None
        item["histograms"] = region_histograms(volume, inputs.masks, classifier.histogram_bins,
                                               classifier.histogram_range)
        try:
            rows = region_label_rows(inputs.names, region_labels)
        except ValueError as exc:
            raise RRG3DError(f"{where}: region_labels: {exc}") from exc
        item["findings"] = torch.tensor(rows, dtype=torch.float32).reshape(len(inputs.names), len(LABEL_NAMES))
    return item


@functools.cache
def _rule_labeler() -> Any:
    from rrg3d.text.labeler import RuleLabeler

    return RuleLabeler()


def region_labels_of(record: dict[str, Any], region_reports: dict[str, str] | None) -> dict[str, Any] | None:
    """A record's abnormalities per region, the targets of a region classifier: its ``region_labels``, a phantom's
    ``meta.region_truth``, or else the rule labeler's reading of its region reports (None without any of them)."""
    given = record.get("region_labels") or (record.get("meta") or {}).get("region_truth")
    if isinstance(given, dict):
        return given
    if not region_reports:
        return None
    names = list(region_reports)
    rows = _rule_labeler().predict([region_reports[n] for n in names])
    return {name: [label for label, on in zip(LABEL_NAMES, row.tolist(), strict=True) if on]
            for name, row in zip(names, rows, strict=True)}


def collate_reports(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: ``{"ids": [B], "volumes": [B, C, D, H, W], "reports": [B], "labels": [B, 18], "uptake": [B, U]
    (per-region FDG uptake targets, NaN: unknown), "styles": [B] (style, sex) pairs}``, and
    ``regions`` (a :class:`~rrg3d.models.regions.RegionBatch`) when the items carry region inputs."""
    if not items:
        raise ValueError("collate_reports needs at least one item")
    batch = {
        "ids": [item["id"] for item in items],
        "volumes": torch.stack([item["volume"] for item in items]),
        "reports": [item["report"] for item in items],
        "labels": torch.stack([item["labels"] for item in items]),
        "uptake": torch.stack([item["uptake"] if "uptake" in item else torch.tensor(UNKNOWN_UPTAKE)
                               for item in items]),
        "styles": [(item.get("style"), item.get("sex")) for item in items],
    }
    if any("regions" in item for item in items):
        from rrg3d.models.regions import collate_regions

        batch["regions"] = collate_regions([item["regions"] for item in items])
    return batch


def build_dataset(manifest: str | os.PathLike[str], preset: str | Preset, *, split: str | Sequence[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None, workers: int = 1, progress: bool = True,
                  require_report: bool = True, report_field: str = "report",
                  blank_images: bool = False, regions: Any = None) -> ReportDataset:
    """A :class:`ReportDataset` reading a cache when there is (or ``cache_dir`` allows) one, else on the fly.

    * ``manifest`` is a cache made with ``preset``: read as is (another preset's cache is refused);
    * ``cache_dir`` given: ``preprocess_manifest(manifest, preset, cache_dir / preset.name)`` (resumable, all
      splits, so train and val share it) and read that cache — studies that failed are left out;
    * otherwise: read and preprocess each item in ``__getitem__``.

    Under distributed training build it on the main process first (the cache writes are not concurrent-safe).
    """
    return ReportDataset(manifest, preset, split=split, cache_dir=cache_dir, require_report=require_report,
                         report_field=report_field, blank_images=blank_images, regions=regions,
                         workers=workers, progress=progress)


def write_references(manifest: str | os.PathLike[str], out: str | os.PathLike[str], *, split: str = "test",
                     field: str = "report") -> Path:
    """A references manifest of one split whose ``report`` is the text a model was trained to write
    (``field``: the whole report or a section); image paths made absolute so it can sit anywhere."""
    from rrg3d.data.manifest import load_manifest, write_manifest

    records = []
    for record in load_manifest(manifest):
        if record.get("split") != split or not record_text(record, field):
            continue
        images = {k: (str(resolve(manifest, v)) if v else v) for k, v in (record.get("images") or {}).items()}
        records.append({k: v for k, v in record.items() if k not in ("masks", "preprocess")}
                       | {"report": record_text(record, field), "images": images})
    if not records:
        raise ValueError(f"{manifest}: no {split!r} study has a {field!r} text")
    return write_manifest(records, out)


def best_constant_text(manifest: str | os.PathLike[str], *, split: str = "train", field: str = "report") -> str:
    """The ``field`` text of the study whose 18-label vector, predicted for every study of ``split``, has the best
    clinical-efficacy micro-F1 there: the strongest constant report (stronger than :func:`majority_text` when most
    studies are normal, as the majority vector then names nothing)."""
    from rrg3d.data.manifest import load_manifest

    records = [r for r in load_manifest(manifest) if r.get("split") == split and record_text(r, field)]
    if not records:
        raise ValueError(f"{manifest}: no {split!r} study has a {field!r} text")
    truth = np.array([[int((r.get("labels") or {}).get(name, 0)) for name in LABEL_NAMES] for r in records])
    candidates, first = np.unique(truth, axis=0, return_index=True)
    hits = candidates @ truth.T  # [candidates, studies]: findings both name
    called = candidates.sum(1, keepdims=True) * len(records)
    f1 = 2 * hits.sum(1) / np.maximum(called[:, 0] + truth.sum(), 1)
    best = int(np.argmax(f1))  # ties: the first in np.unique's (lexicographic) order
    return str(record_text(records[int(first[best])], field))


def majority_text(manifest: str | os.PathLike[str], *, split: str = "train", field: str = "report") -> str:
    """The ``field`` text of a study whose 18-label vector is the most frequent in ``split`` (a majority-class
    baseline: the best a model that ignores the image can do on clinical efficacy, to first order)."""
    from collections import Counter

    from rrg3d.data.manifest import load_manifest

    records = [r for r in load_manifest(manifest) if r.get("split") == split and record_text(r, field)]
    if not records:
        raise ValueError(f"{manifest}: no {split!r} study has a {field!r} text")
    vectors = [tuple(int((r.get("labels") or {}).get(name, 0)) for name in LABEL_NAMES) for r in records]
    common = Counter(vectors).most_common(1)[0][0]
    return str(record_text(records[vectors.index(common)], field))
