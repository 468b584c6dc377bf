"""CT-RATE (Hugging Face ``ibrahimhamamci/CT-RATE``): non-contrast chest CT with reports and 18 abnormality labels.

Layout (the repository root or its ``dataset/`` folder)::

    dataset/train/train_1/train_1_a/train_1_a_1.nii.gz     (newer releases: train_fixed/, valid_fixed/)
    dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz
    dataset/radiology_text_reports/train_reports.csv       VolumeName, ClinicalInformation_EN, Technique_EN,
    dataset/radiology_text_reports/validation_reports.csv  Findings_EN, Impressions_EN
    dataset/multi_abnormality_labels/train_predicted_labels.csv   VolumeName + the 18 labels
    dataset/multi_abnormality_labels/valid_predicted_labels.csv
    dataset/metadata/train_metadata.csv                    VolumeName, XYSpacing, ZSpacing, RescaleSlope, ...
    dataset/metadata/validation_metadata.csv

Some releases have broken NIfTI headers, so the spacing and rescale of the metadata CSV go into ``meta``:
``spacing_mm`` as ``[z, row, column]`` (rrg3d's ``[D, H, W]`` order) and ``rescale`` ``{"slope", "intercept"}``.
Only a subset of the volumes is often downloaded: rows without a volume file are skipped (``--keep-missing``
keeps them, pointing at where the file belongs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrg3d.data.adapters.base import (
    Adapter,
    Collector,
    ConversionResult,
    Option,
    VolumeIndex,
    build_report,
    clean_text,
    display,
    expand_folders,
    find_dataset_dir,
    first_existing,
    parse_binary,
    read_csv,
    sanitize_id,
    split_name,
    volume_stem,
)
from rrg3d.errors import RRG3DError
from rrg3d.text.labels import CTRATE_LABELS  # re-exported: rrg3d.data.adapters.ctrate.CTRATE_LABELS

SOURCE = "CT-RATE"

SPLITS = ("train", "valid")
REPORT_FILES = {"train": ("train_reports.csv",), "valid": ("validation_reports.csv", "valid_reports.csv")}
LABEL_FILES = {"train": ("train_predicted_labels.csv",),
               "valid": ("valid_predicted_labels.csv", "validation_predicted_labels.csv")}
METADATA_FILES = {"train": ("train_metadata.csv",), "valid": ("validation_metadata.csv", "valid_metadata.csv")}
MARKERS = ("radiology_text_reports", "multi_abnormality_labels", "train", "valid", "train_fixed", "valid_fixed")

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_label_table(path: Path, name_column: str = "VolumeName") -> dict[str, dict[str, str]]:
    """Raw label values of a CT-RATE label CSV, keyed by volume stem (values are parsed per record)."""
    _, rows = read_csv(path, [name_column, *CTRATE_LABELS], "CT-RATE label CSV")
    table: dict[str, dict[str, str]] = {}
    for _, row in rows:
        name = clean_text(row.get(name_column))
        if name:
            table.setdefault(volume_stem(name), {label: row.get(label, "") for label in CTRATE_LABELS})
    return table


def parse_labels(raw: dict[str, str], source_name: str) -> dict[str, int]:
    """The 18 labels as 0/1; raises ``ValueError`` naming the column and value when one is malformed."""
    labels = {}
    for label in CTRATE_LABELS:
        try:
            labels[label] = parse_binary(raw.get(label))
        except ValueError:
            raise ValueError(f"malformed label value {raw.get(label)!r} in column {label!r} of {source_name}") from None
    return labels


def _numbers(value: Any) -> list[float]:
    return [float(token) for token in _NUMBER.findall(str(value or ""))]


APPLY_METADATA = ("auto", "always", "never")


def parse_metadata(row: dict[str, str]) -> dict[str, Any]:
    """``spacing_mm`` ``[z, row, column]`` and ``rescale`` from a metadata row; unparsable values are left out."""
    meta: dict[str, Any] = {}
    xy = _numbers(row.get("XYSpacing"))
    z = _numbers(row.get("ZSpacing"))
    if z and xy and all(value > 0 for value in (*xy, *z)):
        row_spacing, column_spacing = (xy[0], xy[1]) if len(xy) >= 2 else (xy[0], xy[0])
        meta["spacing_mm"] = [z[0], row_spacing, column_spacing]
    slope = _numbers(row.get("RescaleSlope"))
    intercept = _numbers(row.get("RescaleIntercept"))
    if slope and intercept:
        meta["rescale"] = {"slope": slope[0], "intercept": intercept[0]}
    return meta


def _optional_table(
    folder: Path, names: Sequence[str], split: str, what: str, collector: Collector
) -> Path | None:
    path = first_existing(folder, names)
    if path is None:
        collector.warn(f"no {what} for split {split!r} (looked for {', '.join(str(folder / n) for n in names)}); "
                       f"its records have no {what.split()[0]}")
    return path


def convert(
    root: Path,
    out: Path,
    *,
    splits: Sequence[str] = SPLITS,
    volume_folders: Sequence[str] = ("{split}_fixed", "{split}"),
    reports_dir: str = "radiology_text_reports",
    labels_dir: str = "multi_abnormality_labels",
    metadata_dir: str = "metadata",
    name_column: str = "VolumeName",
    findings_column: str = "Findings_EN",
    impression_column: str = "Impressions_EN",
    keep_missing: bool = False,
    apply_metadata: str = "auto",
) -> ConversionResult:
    """Write a manifest of CT-RATE under ``root`` (repository root or ``dataset/``) to ``out``.

    ``apply_metadata`` decides when the metadata CSV's spacing and rescale become ``meta.header_overrides``
    (which ``rrg3d preprocess`` applies): ``auto`` for volumes outside the ``*_fixed`` folders (the first
    release stores raw values and unreliable spacings in its headers), ``always`` or ``never``.
    """
    if apply_metadata not in APPLY_METADATA:
        raise RRG3DError(f"CT-RATE: apply_metadata must be one of {', '.join(APPLY_METADATA)}, got {apply_metadata!r}")
    dataset = find_dataset_dir(root, MARKERS, SOURCE)
    collector = Collector(SOURCE, out)
    for split in splits:
        if split not in SPLITS:
            raise RRG3DError(f"CT-RATE: unknown split {split!r} (known: {', '.join(SPLITS)})")
        reports_csv = first_existing(dataset / reports_dir, REPORT_FILES[split])
        if reports_csv is None:
            raise RRG3DError(f"{dataset / reports_dir / REPORT_FILES[split][0]}: CT-RATE reports CSV for split "
                             f"{split!r} not found")
        _, rows = read_csv(reports_csv, [name_column, findings_column, impression_column], "CT-RATE reports CSV")

        labels_csv = _optional_table(dataset / labels_dir, LABEL_FILES[split], split, "labels CSV", collector)
        label_table = read_label_table(labels_csv, name_column) if labels_csv else {}
        metadata_csv = _optional_table(dataset / metadata_dir, METADATA_FILES[split], split, "metadata CSV",
                                       collector)
        metadata: dict[str, dict[str, Any]] = {}
        if metadata_csv is not None:
            columns, meta_rows = read_csv(metadata_csv, [name_column], "CT-RATE metadata CSV")
            absent = [c for c in ("XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept") if c not in columns]
            if absent:
                collector.warn(f"{metadata_csv}: no column(s) {', '.join(absent)}; spacing/rescale left out")
            for _, row in meta_rows:
                name = clean_text(row.get(name_column))
                if name:
                    metadata.setdefault(volume_stem(name), parse_metadata(row))

        volumes = VolumeIndex(expand_folders(dataset, volume_folders, split))
        without_labels = without_metadata = 0
        for line, row in rows:
            name = clean_text(row.get(name_column))
            if not name:
                collector.skip(f"{reports_csv.name}:{line}", f"empty {name_column}")
                continue
            stem = volume_stem(name)
            file_name = name if name.lower().endswith((".nii.gz", ".nii")) else f"{stem}.nii.gz"
            study_id = f"ctrate_{sanitize_id(stem)}"
            if collector.seen(study_id):
                collector.skip(study_id, f"duplicate row for {name} in {reports_csv.name} (line {line})")
                continue
            findings = clean_text(row.get(findings_column))
            impression = clean_text(row.get(impression_column))
            if not findings and not impression:
                collector.skip(study_id, f"empty report (no {findings_column} or {impression_column} text)")
                continue
            labels = None
            if stem in label_table:
                try:
                    labels = parse_labels(label_table[stem], labels_csv.name if labels_csv else "labels CSV")
                except ValueError as exc:
                    collector.skip(study_id, str(exc))
                    continue
            else:
                without_labels += 1
            volume = volumes.find(file_name)
            if volume is None:
                if not keep_missing:
                    collector.skip(study_id, f"volume file not found ({display(volumes.expected(file_name), dataset)})")
                    continue
                volume = volumes.expected(file_name)

            sections = {"findings": findings, "impression": impression}
            for key, column in (("clinical_information", "ClinicalInformation_EN"), ("technique", "Technique_EN")):
                text = clean_text(row.get(column))
                if text:
                    sections[key] = text
            meta: dict[str, Any] = {"source": SOURCE, "volume_name": file_name}
            if stem in metadata:
                meta.update(metadata[stem])
                fixed = any(part.endswith("_fixed") for part in volume.parts)
                if apply_metadata == "always" or (apply_metadata == "auto" and not fixed):
                    meta["header_overrides"] = dict(metadata[stem])
            else:
                without_metadata += 1
            record: dict[str, Any] = {
                "id": study_id,
                "split": split_name(split),
                "images": {"ct": collector.rel(volume), "pet": None},
                "report": build_report(findings, impression),
                "sections": {key: value for key, value in sections.items() if value},
            }
            if labels is not None:
                record["labels"] = labels
            record["meta"] = meta
            collector.add(record)
        if label_table and without_labels:
            collector.warn(f"{without_labels} {split} report row(s) have no row in {labels_csv}; kept without labels")
        if metadata and without_metadata:
            collector.warn(f"{without_metadata} {split} report row(s) have no row in {metadata_csv}; "
                           f"kept without spacing/rescale")
    return collector.finish(root)


OPTIONS = (
    Option("splits", SPLITS, "which splits to convert", nargs="+", choices=SPLITS),
    Option("volume_folders", ("{split}_fixed", "{split}"),
           "volume folders tried in order, relative to dataset/ ({split} = train or valid)", nargs="+",
           metavar="FOLDER"),
    Option("reports_dir", "radiology_text_reports", "folder of the report CSVs, relative to dataset/"),
    Option("labels_dir", "multi_abnormality_labels", "folder of the label CSVs, relative to dataset/"),
    Option("metadata_dir", "metadata", "folder of the metadata CSVs, relative to dataset/"),
    Option("name_column", "VolumeName", "volume name column of the CSVs"),
    Option("findings_column", "Findings_EN", "findings column of the report CSVs"),
    Option("impression_column", "Impressions_EN", "impression column of the report CSVs"),
    Option("keep_missing", False, "keep rows whose volume is not downloaded (path points where it belongs)"),
    Option("apply_metadata", "auto", "when the metadata CSV's spacing/rescale override the NIfTI header: auto = "
           "volumes outside *_fixed folders", choices=APPLY_METADATA),
)

ADAPTER = Adapter(
    name="ctrate",
    description="CT-RATE chest CT: reports (findings/impression), 18 abnormality labels, spacing from metadata",
    source=SOURCE,
    options=OPTIONS,
    run=convert,
)
