"""Fixtures for the IO tests: the shared data folder and a small synthetic DICOM series writer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


def uid(suffix: str | int) -> str:
    """A syntactically valid, obviously fake UID."""
    return f"1.2.826.0.1.3680043.99999.{suffix}"


@dataclass
class SyntheticSeries:
    """What :func:`make_series` wrote, in slice-position order."""

    folder: Path
    files: list[Path]
    positions: np.ndarray  # [n, 3] ImagePositionPatient in position order
    values: np.ndarray  # [n, rows, cols] expected rescaled values in position order
    orientation: np.ndarray
    spacing: tuple[float, float]
    series_uid: str
    extra: dict[str, Any] = field(default_factory=dict)


def _base_dataset(
    sop_class: str,
    modality: str,
    series_uid: str,
    instance_uid: str,
    rows: int,
    cols: int,
    signed: bool,
) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = uid("1")
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = uid("2")
    ds.Modality = modality
    ds.PatientName = "Synthetic^Person"
    ds.PatientID = "SYN-0001"
    ds.SeriesNumber = 3
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    return ds


def slice_pixels(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Stored values with a distinct pattern per slice, row and column (uint16-safe)."""
    rng = np.random.default_rng(seed)
    d, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (1000 + 100 * d + 3 * r + c + rng.integers(0, 2, size=d.shape)).astype(np.uint16)


def make_series(
    folder: Path,
    n: int = 6,
    *,
    rows: int = 32,
    cols: int = 32,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.0,
    gaps: Sequence[float] | None = None,
    tilt_deg: float = 0.0,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    shuffle: bool = True,
    seed: int = 0,
    prefix: str = "",
    suffix: str = "",
    stored: np.ndarray | None = None,
    pet: dict[str, Any] | None = None,
    per_slice: dict[int, dict[str, Any]] | None = None,
) -> SyntheticSeries:
    """Write a classic single-frame series; file names and InstanceNumbers are shuffled against position.

    ``gaps`` gives the n-1 steps (mm) along the normal; ``tilt_deg`` shifts each slice along the column
    direction by ``tan(tilt) * distance`` (a gantry tilt); ``per_slice`` overrides header keywords of the
    slice at that position index; ``pet`` adds PET tags (Units, weight, dose, half-life, times).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or uid(f"9{seed}")
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    steps = list(gaps) if gaps is not None else [step] * (n - 1)
    distances = np.concatenate([[0.0], np.cumsum(steps)])
    shift = np.tan(np.radians(tilt_deg)) * distances
    positions = np.asarray(origin, dtype=np.float64) + np.outer(distances, normal) + np.outer(shift, iop[3:])
    stored = slice_pixels(n, rows, cols, seed) if stored is None else stored
    slopes = list(slopes) if slopes is not None else [1.0] * n
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * n
    values = stored.astype(np.float64) * np.asarray(slopes)[:, None, None] + np.asarray(intercepts)[:, None, None]
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    sop_class = PET_IMAGE_STORAGE if modality == "PT" else CT_IMAGE_STORAGE
    files = [Path()] * n
    for file_number, k in enumerate(order):
        ds = _base_dataset(sop_class, modality, series_uid, uid(f"{seed}.{k}.{n}"), rows, cols, signed=False)
        ds.InstanceNumber = n - file_number  # deliberately unrelated to position
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.SliceThickness = f"{step:g}"
        ds.RescaleSlope = f"{slopes[k]:g}"
        ds.RescaleIntercept = f"{intercepts[k]:g}"
        if modality == "CT":
            ds.RescaleType = "HU"
        if pet:
            _add_pet(ds, pet)
        for keyword, value in (per_slice or {}).get(k, {}).items():
            setattr(ds, keyword, value)
        pixels = stored[k]
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
        path = folder / f"{prefix}{file_number:03d}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        files[k] = path
    return SyntheticSeries(folder, files, positions, values, iop, spacing, series_uid)


def _add_pet(ds: Any, pet: dict[str, Any]) -> None:
    from pydicom.dataset import Dataset

    ds.Units = pet.get("units", "BQML")
    ds.DecayCorrection = pet.get("decay_correction", "START")
    if pet.get("weight_kg") is not None:
        ds.PatientWeight = f"{pet['weight_kg']:g}"
    ds.SeriesDate = pet.get("series_date", "20240102")
    if pet.get("series_time") is not None:
        ds.SeriesTime = pet["series_time"]
    if pet.get("acquisition_time") is not None:
        ds.AcquisitionTime = pet["acquisition_time"]
    info = Dataset()
    if pet.get("dose_bq") is not None:
        info.RadionuclideTotalDose = f"{pet['dose_bq']:g}"
    if pet.get("half_life_s") is not None:
        info.RadionuclideHalfLife = f"{pet['half_life_s']:g}"
    if pet.get("injection_time") is not None:
        info.RadiopharmaceuticalStartTime = pet["injection_time"]
    if pet.get("injection_datetime") is not None:
        info.RadiopharmaceuticalStartDateTime = pet["injection_datetime"]
    ds.RadiopharmaceuticalInformationSequence = [info]


def make_enhanced_ct(
    path: Path,
    n: int = 5,
    *,
    rows: int = 24,
    cols: int = 20,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (5.0, -15.0, -40.0),
    spacing: tuple[float, float] = (0.9, 0.6),
    step: float = 2.5,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    frame_order: Sequence[int] | None = None,
) -> SyntheticSeries:
    """Write an Enhanced CT multi-frame file; ``frame_order[j]`` is the position index stored as frame ``j``."""
    from pydicom.dataset import Dataset

    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.asarray(origin, dtype=np.float64) + np.outer(np.arange(n) * step, normal)
    stored = slice_pixels(n, rows, cols, seed=7)
    slopes = list(slopes) if slopes is not None else [1.0] * n
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * n
    values = stored.astype(np.float64) * np.asarray(slopes)[:, None, None] + np.asarray(intercepts)[:, None, None]
    frame_order = list(frame_order) if frame_order is not None else list(range(n))

    ds = _base_dataset(ENHANCED_CT_IMAGE_STORAGE, "CT", uid("77"), uid("77.1"), rows, cols, signed=False)
    ds.NumberOfFrames = n
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    measures.SliceThickness = f"{step:g}"
    plane = Dataset()
    plane.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in frame_order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        item.PlanePositionSequence = [position]
        transform = Dataset()
        transform.RescaleSlope = f"{slopes[k]:g}"
        transform.RescaleIntercept = f"{intercepts[k]:g}"
        transform.RescaleType = "HU"
        item.PixelValueTransformationSequence = [transform]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.ascontiguousarray(stored[frame_order]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return SyntheticSeries(path.parent, [path], positions, values, iop, spacing, uid("77"))


@pytest.fixture
def make_dicom_series():
    """Factory fixture: :func:`make_series`."""
    return make_series


@pytest.fixture
def make_enhanced_dicom():
    """Factory fixture: :func:`make_enhanced_ct`."""
    return make_enhanced_ct
