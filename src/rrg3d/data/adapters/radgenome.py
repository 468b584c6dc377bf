"""RadGenome-ChestCT (Hugging Face ``RadGenome/RadGenome-ChestCT``): region-grounded reports on CT-RATE volumes.

Layout (the repository root or its ``dataset/`` folder)::

    dataset/radgenome_files/train_region_report.csv        Volumename, Anatomy, Sentence
    dataset/radgenome_files/validation_region_report.csv
    dataset/train_preprocessed/train_1/train_1a/train_1_a_1.nii.gz
    dataset/valid_preprocessed/valid_1/valid_1a/valid_1_a_1.nii.gz
    dataset/train_region_mask/seg_train_1_a_1/lung.nii.gz  one binary mask per region (extracted tar.gz)
    dataset/valid_region_mask/seg_valid_1_a_1/heart.nii.gz

The report CSV has one row per region sentence; the row whose ``Anatomy`` is empty holds the whole report.
Region names are lower-cased and ``trachea and bronchie`` becomes ``trachea and bronchi``.

The manifest holds one label map per study, so per-region binary masks are merged into
``<merged-mask-dir>/<name>.nii.gz`` (label ``i`` = the i-th of ``--regions``; where regions overlap, the smaller
region wins and ``meta.mask_overlap_voxels`` counts the voxels concerned). A release that already has one label map
per volume (``<mask folder>/<name>.nii.gz``) is used as is (``--mask-layout labelmap``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.data.adapters.base import (
    Adapter,
    Collector,
    ConversionResult,
    Option,
    VolumeIndex,
    clean_text,
    display,
    expand_folders,
    find_dataset_dir,
    first_existing,
    read_csv,
    require_nibabel,
    sanitize_id,
    split_name,
    user_path,
    volume_stem,
)
from rrg3d.data.adapters.ctrate import LABEL_FILES, parse_labels, read_label_table
from rrg3d.errors import RRG3DError

SOURCE = "RadGenome-ChestCT"

#: The 10 regions of RadGenome region reports, in label-map order (label 1 = lung, ...).
RADGENOME_REGIONS: tuple[str, ...] = (
    "lung",
    "trachea and bronchi",
    "mediastinum",
    "heart",
    "esophagus",
    "pleura",
    "bone",
    "thyroid",
    "breast",
    "abdomen",
)

#: Spelling fixes applied to region names (the release writes "bronchie").
REGION_ALIASES = {"trachea and bronchie": "trachea and bronchi", "trachea and bronchus": "trachea and bronchi"}

SPLITS = ("train", "valid")
REPORT_FILES = {"train": ("train_region_report.csv",),
                "valid": ("validation_region_report.csv", "valid_region_report.csv")}
MARKERS = ("radgenome_files", "train_preprocessed", "valid_preprocessed")
MASK_LAYOUTS = ("auto", "per-region", "labelmap", "none")


def normalize_region(name: str) -> str:
    """Lower-case, single-spaced region name with known misspellings fixed."""
    text = " ".join(str(name).lower().split())
    return REGION_ALIASES.get(text, text)


def _region_file_names(region: str) -> list[str]:
    names = [region]
    names.extend(raw for raw, fixed in REGION_ALIASES.items() if fixed == region)
    return [f"{name}{suffix}" for name in names for suffix in (".nii.gz", ".nii")]


def _load_mask(path: Path) -> tuple[np.ndarray, Any]:
    nib = require_nibabel()
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise ValueError(f"mask {path.name} unreadable ({type(exc).__name__})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"mask {path.name} is not 3D (shape {data.shape})")
    return data, image


def merge_region_masks(
    files: dict[str, Path], regions: Sequence[str], target: Path, overwrite: bool = False
) -> tuple[dict[str, str], int]:
    """Merge binary region masks into one label map at ``target``; returns ``(labels, overlap_voxels)``.

    Labels follow the order of ``regions`` (1-based). Where masks overlap the smaller region wins, so that small
    structures are not swallowed by large ones. Masks are read one at a time. An existing ``target`` is kept unless
    ``overwrite``. Raises ``ValueError`` when a mask is unreadable or the shapes differ.
    """
    nib = require_nibabel()
    from rrg3d.utils.files import atomic_path

    reference = None
    label_map = coverage = None
    sizes = np.full(len(regions) + 1, np.inf)
    present: list[str] = []
    for region, path in files.items():
        data, image = _load_mask(path)
        if reference is None:
            reference = image
            label_map = np.zeros(data.shape, dtype=np.uint8)
            coverage = np.zeros(data.shape, dtype=np.uint8)
        elif data.shape != label_map.shape:
            raise ValueError(f"mask {path.name} has shape {data.shape}, the other masks {label_map.shape}")
        foreground = data > 0
        count = int(foreground.sum())
        if not count:
            continue
        value = regions.index(region) + 1
        coverage += foreground
        owners = label_map[foreground]
        owners[sizes[owners] > count] = value
        label_map[foreground] = owners
        sizes[value] = count
        present.append(region)
    if reference is None:
        raise ValueError("no region mask to merge")
    labels = {str(regions.index(region) + 1): region for region in sorted(present, key=regions.index)}
    overlap = int((coverage > 1).sum())
    if present and (overwrite or not target.exists()):
        output = nib.Nifti1Image(label_map, reference.affine)
        output.header.set_xyzt_units("mm")
        output.header.set_intent("label")
        with atomic_path(target) as tmp:
            nib.save(output, str(tmp))
    return labels, overlap


def read_region_reports(
    path: Path, name_column: str, region_column: str, sentence_column: str
) -> tuple[dict[str, tuple[int, list[str], dict[str, list[str]]]], list[tuple[str, str]]]:
    """Group a region report CSV by volume: ``{name: (first_line, whole_sentences, {region: sentences})}``."""
    _, rows = read_csv(path, [name_column, region_column, sentence_column], "RadGenome region report CSV")
    grouped: dict[str, tuple[int, list[str], dict[str, list[str]]]] = {}
    bad: list[tuple[str, str]] = []
    for line, row in rows:
        name = clean_text(row.get(name_column))
        if not name:
            bad.append((f"{path.name}:{line}", f"empty {name_column}"))
            continue
        _, whole, regions = grouped.setdefault(name, (line, [], {}))
        sentence = clean_text(row.get(sentence_column))
        if not sentence:
            continue
        region = clean_text(row.get(region_column))
        if region:
            regions.setdefault(normalize_region(region), []).append(sentence)
        else:
            whole.append(sentence)
    return grouped, bad


def convert(
    root: Path,
    out: Path,
    *,
    splits: Sequence[str] = SPLITS,
    reports_dir: str = "radgenome_files",
    volume_folders: Sequence[str] = ("{split}_preprocessed", "{split}_fixed", "{split}"),
    mask_folders: Sequence[str] = ("{split}_region_mask",),
    mask_layout: str = "auto",
    regions: Sequence[str] = RADGENOME_REGIONS,
    merged_mask_dir: str | None = None,
    overwrite_masks: bool = False,
    require_masks: bool = False,
    ctrate_labels: str | None = None,
    name_column: str = "Volumename",
    region_column: str = "Anatomy",
    sentence_column: str = "Sentence",
    keep_missing: bool = False,
) -> ConversionResult:
    """Write a manifest of RadGenome-ChestCT under ``root`` to ``out`` (merging region masks when needed)."""
    if mask_layout not in MASK_LAYOUTS:
        raise RRG3DError(f"RadGenome: unknown mask layout {mask_layout!r} (known: {', '.join(MASK_LAYOUTS)})")
    region_order = [normalize_region(region) for region in regions]
    if len(set(region_order)) != len(region_order) or not region_order:
        raise RRG3DError(f"RadGenome: --regions must be distinct region names, got {list(regions)}")
    dataset = find_dataset_dir(root, MARKERS, SOURCE)
    merged_dir = Path(merged_mask_dir).expanduser() if merged_mask_dir else out.parent / f"{out.stem}_masks"
    collector = Collector(SOURCE, out)
    for split in splits:
        if split not in SPLITS:
            raise RRG3DError(f"RadGenome: unknown split {split!r} (known: {', '.join(SPLITS)})")
        reports_csv = first_existing(dataset / reports_dir, REPORT_FILES[split])
        if reports_csv is None:
            raise RRG3DError(f"{dataset / reports_dir / REPORT_FILES[split][0]}: RadGenome region report CSV for "
                             f"split {split!r} not found")
        grouped, bad = read_region_reports(reports_csv, name_column, region_column, sentence_column)
        for key, reason in bad:
            collector.skip(key, reason)
        label_table: dict[str, dict[str, str]] = {}
        labels_csv = None
        if ctrate_labels:
            labels_csv = first_existing(user_path(ctrate_labels, root), LABEL_FILES[split])
            if labels_csv is None:
                collector.warn(f"no CT-RATE labels CSV for split {split!r} in {ctrate_labels}; records have no labels")
            else:
                label_table = read_label_table(labels_csv)
        volumes = VolumeIndex(expand_folders(dataset, volume_folders, split))
        mask_dirs = [folder for folder in expand_folders(dataset, mask_folders, split) if folder.is_dir()]
        if mask_layout != "none" and not mask_dirs:
            collector.warn(f"no mask folder for split {split!r} (looked for "
                           f"{', '.join(str(f) for f in expand_folders(dataset, mask_folders, split))})")
        without_masks = 0
        for name in sorted(grouped):
            _, whole, region_sentences = grouped[name]
            stem = volume_stem(name)
            file_name = name if name.lower().endswith((".nii.gz", ".nii")) else f"{stem}.nii.gz"
            study_id = f"radgenome_{sanitize_id(stem)}"
            region_reports = {region: " ".join(sentences) for region, sentences in region_sentences.items()}
            ordered = [r for r in region_order if r in region_reports] + sorted(set(region_reports) - set(region_order))
            region_reports = {region: region_reports[region] for region in ordered}
            report = " ".join(whole) or " ".join(region_reports.values())
            if not report:
                collector.skip(study_id, f"empty report (no {sentence_column} text for {name})")
                continue
            labels = None
            if stem in label_table:
                try:
                    labels = parse_labels(label_table[stem], labels_csv.name if labels_csv else "labels CSV")
                except ValueError as exc:
                    collector.skip(study_id, str(exc))
                    continue
            volume = volumes.find(file_name)
            if volume is None:
                if not keep_missing:
                    collector.skip(study_id, f"volume file not found ({display(volumes.expected(file_name), dataset)})")
                    continue
                volume = volumes.expected(file_name)

            meta: dict[str, Any] = {"source": SOURCE, "volume_name": file_name}
            masks = None
            if mask_layout != "none":
                try:
                    masks = _masks_for(stem, mask_dirs, mask_layout, region_order, merged_dir, overwrite_masks,
                                       collector, meta)
                except ValueError as exc:
                    collector.skip(study_id, f"bad region mask for {stem}: {exc}")
                    continue
            if masks is None:
                if require_masks:
                    collector.skip(study_id, f"no region masks found for {stem}")
                    continue
                without_masks += 1
            record: dict[str, Any] = {
                "id": study_id,
                "split": split_name(split),
                "images": {"ct": collector.rel(volume), "pet": None},
            }
            if masks is not None:
                record["masks"] = masks
            record["report"] = report
            if region_reports:
                record["region_reports"] = region_reports
            if labels is not None:
                record["labels"] = labels
            record["meta"] = meta
            collector.add(record)
        if mask_layout != "none" and mask_dirs and without_masks:
            collector.warn(f"{without_masks} {split} stud(ies) have no region masks; kept without masks")
    return collector.finish(root)


def _masks_for(
    stem: str,
    mask_dirs: Sequence[Path],
    layout: str,
    regions: Sequence[str],
    merged_dir: Path,
    overwrite: bool,
    collector: Collector,
    meta: dict[str, Any],
) -> dict[str, Any] | None:
    """The manifest ``masks`` entry of one study, or ``None`` when it has none; ``ValueError`` on a bad mask."""
    for folder in mask_dirs:
        if layout in ("auto", "per-region"):
            case_dir = first_existing(folder, (f"seg_{stem}", stem))
            if case_dir is not None and case_dir.is_dir():
                files = {}
                for region in regions:
                    path = first_existing(case_dir, _region_file_names(region))
                    if path is not None:
                        files[region] = path
                if not files:
                    raise ValueError(f"no mask file of the regions {', '.join(regions)} in {case_dir.name}")
                target = merged_dir / f"{stem}.nii.gz"
                labels, overlap = merge_region_masks(files, list(regions), target, overwrite=overwrite)
                if not labels:
                    return None
                meta["mask_source"] = "per-region masks merged"
                if overlap:
                    meta["mask_overlap_voxels"] = overlap
                return {"path": collector.rel(target), "labels": labels}
        if layout in ("auto", "labelmap"):
            path = first_existing(folder, (f"{stem}.nii.gz", f"{stem}.nii", f"seg_{stem}.nii.gz"))
            if path is not None and path.is_file():
                meta["mask_source"] = "label map"
                return {"path": collector.rel(path),
                        "labels": {str(index): region for index, region in enumerate(regions, start=1)}}
    return None


OPTIONS = (
    Option("splits", SPLITS, "which splits to convert", nargs="+", choices=SPLITS),
    Option("reports_dir", "radgenome_files", "folder of the region report CSVs, relative to dataset/"),
    Option("volume_folders", ("{split}_preprocessed", "{split}_fixed", "{split}"),
           "volume folders tried in order, relative to dataset/ ({split} = train or valid)", nargs="+",
           metavar="FOLDER"),
    Option("mask_folders", ("{split}_region_mask",),
           "region mask folders tried in order, relative to dataset/", nargs="+", metavar="FOLDER"),
    Option("mask_layout", "auto",
           "per-region: seg_<name>/<region>.nii.gz binary masks (merged); labelmap: <name>.nii.gz; none: no masks",
           choices=MASK_LAYOUTS),
    Option("regions", RADGENOME_REGIONS, "region names in label order (label 1 = first)", nargs="+",
           metavar="REGION"),
    Option("merged_mask_dir", None, "where merged label maps are written (default: <manifest stem>_masks/ beside "
                                    "the manifest)"),
    Option("overwrite_masks", False, "rewrite merged label maps that already exist"),
    Option("require_masks", False, "skip studies without region masks instead of keeping them without masks"),
    Option("ctrate_labels", None, "CT-RATE multi_abnormality_labels folder, to add the 18 labels"),
    Option("name_column", "Volumename", "volume name column of the region report CSVs"),
    Option("region_column", "Anatomy", "region column of the region report CSVs"),
    Option("sentence_column", "Sentence", "sentence column of the region report CSVs"),
    Option("keep_missing", False, "keep rows whose volume is not downloaded (path points where it belongs)"),
)

ADAPTER = Adapter(
    name="radgenome",
    description="RadGenome-ChestCT: CT-RATE volumes with region reports and region masks (merged to a label map)",
    source=SOURCE,
    options=OPTIONS,
    run=convert,
)
