"""DICOM reader: classic slice series (a folder) and single-file multi-frame images (Enhanced CT/PET/MR).

Geometry comes only from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (never from
InstanceNumber or file names). Slices are sorted along the slice normal (the cross product of the row and
column cosines); the affine maps ``(slice, row, col)`` to LPS millimetres with

* column 0: the slice step vector (the slice normal times the median step; for a gantry-tilted series the
  unit vector from the first to the last slice position times the median step, so the affine is sheared and
  every voxel sits where the scanner put it),
* column 1: the column cosine (``IOP[3:6]``) times the row spacing (``PixelSpacing[0]``),
* column 2: the row cosine (``IOP[0:3]``) times the column spacing (``PixelSpacing[1]``),
* origin: ImagePositionPatient of the first sorted slice,

and the volume is then brought to the canonical orientation. Irregular series are read, not resampled:
non-uniform gaps use the median step, missing slices are only counted, and both are reported in ``meta`` and
logged. Slices at the same position are dropped when their pixels are identical and rejected otherwise (a
series holding several phases or echoes at one position is not one volume).

Patient identifiers never leave this module: metadata is allow-listed (:func:`rrg3d.io.phi.safe_meta`),
series are named by a hash of their UID, and text taken from library exceptions is scrubbed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.errors import VolumeReadError
from rrg3d.io.phi import identifying_values, safe_meta, scrub
from rrg3d.io.volume import Volume

logger = logging.getLogger(__name__)

#: Length of the hexadecimal SHA-1 prefix of SeriesInstanceUID that names a series.
KEY_LENGTH = 12
#: Slices whose positions along the normal differ by less than this (mm) are at the same position.
POSITION_TOLERANCE_MM = 0.005
#: Largest difference between direction cosines of two slices of one series.
ORIENTATION_TOLERANCE = 1e-3
#: Largest relative difference between pixel spacings of two slices of one series.
SPACING_TOLERANCE = 1e-3
#: Tilt (degrees) above which a series is treated as gantry-tilted (smaller angles are rounding noise).
TILT_THRESHOLD_DEG = 0.05
#: A gap at least this many median steps wide is counted as missing slices.
MISSING_GAP_FACTOR = 1.5

_MODALITIES = {"CT": "CT", "PT": "PT", "MR": "MR"}
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (inflated on read)
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder, described without identifiers."""

    index: int
    key: str
    modality: str
    n_files: int
    n_slices: int
    rows: int
    cols: int
    series_number: int | None = None
    image_type: str = ""
    plane: str = ""
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    transfer_syntax: str = ""
    files: list[Path] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        """One PHI-free line, e.g. ``[0] 3f2a9c01d4e5 CT axial 300 slices 512x512 (300 files) #2 ORIGINAL\\PRIMARY``."""
        parts = [f"[{self.index}] {self.key} {self.modality}"]
        if self.plane:
            parts.append(self.plane)
        parts.append(f"{self.n_slices} slices {self.rows}x{self.cols} ({self.n_files} files)")
        if self.series_number is not None:
            parts.append(f"#{self.series_number}")
        if self.slice_thickness_mm:
            parts.append(f"{self.slice_thickness_mm:g} mm")
        if self.image_type:
            parts.append(self.image_type)
        return " ".join(parts)


@dataclass
class _Frame:
    """Geometry and rescale of one 2D frame (a single-frame file or one frame of a multi-frame file)."""

    path: Path
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float


@dataclass
class _Scan:
    series: list[SeriesInfo]
    headers: dict[str, list[tuple[Path, Any]]]
    skipped: int = 0


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while reading: they may quote header values."""

    def drop(record: logging.LogRecord) -> bool:
        return False

    pyd_logger = logging.getLogger("pydicom")
    pyd_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pyd_logger.removeFilter(drop)


def series_key(uid: str) -> str:
    """The public name of a series: a short SHA-1 hex prefix of its SeriesInstanceUID."""
    return hashlib.sha1(uid.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def _library_text(exc: BaseException, datasets: Sequence[Any]) -> str:
    """``Type: message`` of a library exception with every identifying value scrubbed, shortened."""
    with _quiet_pydicom():
        secrets = identifying_values(datasets)
    text = scrub(f"{type(exc).__name__}: {exc}", secrets)
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        return None
    return values


def _get(ds: Any, keyword: str, default: Any = None) -> Any:
    try:
        value = ds.get(keyword, default)
    except Exception:  # a malformed element is treated as absent
        return default
    return default if value is None or value == "" else value


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return _get(meta, "TransferSyntaxUID") if meta is not None else None


def _syntax_name(ds: Any) -> str:
    uid = _transfer_syntax(ds)
    if uid is None:
        return "unknown transfer syntax"
    name = getattr(uid, "name", "")
    # pydicom names unknown UIDs by the UID itself; a transfer syntax UID is not an identifier, but keep it short
    return str(name) if name else "unknown transfer syntax"


def _plane(orientation: np.ndarray | None) -> str:
    if orientation is None:
        return ""
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    if normal.max() < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _n_frames(ds: Any) -> int:
    try:
        return max(1, int(_get(ds, "NumberOfFrames", 1)))
    except (TypeError, ValueError):
        return 1


def _is_multiframe_enhanced(ds: Any) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _plain(value: Any) -> Any:
    """JSON-friendly copies of pydicom values (DSfloat → float, MultiValue → list)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- reading files


def _looks_like_raw_dicom(path: Path) -> bool:
    """Preamble-less DICOM (old files) starts with a group 0x0002 or 0x0008 element."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) == 4


def _read(path: Path, headers_only: bool) -> Any:
    """Read one file with pydicom; raises ``InvalidDicomError`` for non-DICOM files."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    with _quiet_pydicom():
        try:
            return dcmread(path, stop_before_pixels=headers_only)
        except InvalidDicomError:
            if not _looks_like_raw_dicom(path):
                raise
            ds = dcmread(path, stop_before_pixels=headers_only, force=True)
            if "SOPClassUID" not in ds and "Modality" not in ds:
                raise InvalidDicomError("not DICOM") from None
            return ds


def _read_or_fail(path: Path, headers_only: bool) -> Any:
    from pydicom.errors import InvalidDicomError

    try:
        return _read(path, headers_only)
    except InvalidDicomError as exc:
        raise VolumeReadError(path, "not a DICOM file (no DICM prefix / file meta information)") from exc
    except FileNotFoundError as exc:
        raise VolumeReadError(path, "file not found") from exc
    except PermissionError as exc:
        raise VolumeReadError(path, "permission denied") from exc
    except Exception as exc:
        # Parser errors can quote raw bytes of header values: name only the exception type.
        raise VolumeReadError(path, f"corrupt or truncated DICOM header ({type(exc).__name__})") from exc


def _walk(path: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _scan(path: Path) -> _Scan:
    """Read the headers of every file under ``path`` and group image files by SeriesInstanceUID."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    skipped = 0
    for file in _walk(path):
        if file.name.upper() == "DICOMDIR":
            skipped += 1
            continue
        try:
            ds = _read(file, headers_only=True)
        except Exception:  # not DICOM or unreadable: skipped silently, but counted
            skipped += 1
            continue
        if "Rows" not in ds or "Columns" not in ds:  # structured reports, RT structures, presentation states
            skipped += 1
            continue
        uid = str(_get(ds, "SeriesInstanceUID", ""))
        groups.setdefault(series_key(uid), []).append((file, ds))
    if skipped:
        logger.debug("%s: skipped %d non-image or non-DICOM files", path, skipped)
    infos = [_series_info(key, items) for key, items in groups.items()]
    infos.sort(key=lambda info: (-info.n_slices, info.key))
    for index, info in enumerate(infos):
        info.index = index
    return _Scan(infos, groups, skipped)


def _series_info(key: str, items: list[tuple[Path, Any]]) -> SeriesInfo:
    first = items[0][1]
    modality = str(_get(first, "Modality", "OT")).upper()
    image_type = _get(first, "ImageType")
    if image_type is not None and not isinstance(image_type, str):
        image_type = "\\".join(str(v) for v in image_type)
    try:
        number = int(_get(first, "SeriesNumber"))
    except (TypeError, ValueError):
        number = None
    orientation = _floats(_get(first, "ImageOrientationPatient"), 6)
    spacing = _floats(_get(first, "PixelSpacing"), 2)
    thickness = _float(_get(first, "SliceThickness"))
    if _is_multiframe_enhanced(first):
        shared = _fg_item(first, None, "PlaneOrientationSequence")
        if orientation is None and shared is not None:
            orientation = _floats(_get(shared, "ImageOrientationPatient"), 6)
        measures = _fg_item(first, None, "PixelMeasuresSequence")
        if measures is not None:
            spacing = spacing if spacing is not None else _floats(_get(measures, "PixelSpacing"), 2)
            thickness = thickness if thickness is not None else _float(_get(measures, "SliceThickness"))
    return SeriesInfo(
        index=0,
        key=key,
        modality=modality,
        n_files=len(items),
        n_slices=sum(_n_frames(ds) for _, ds in items),
        rows=int(_get(first, "Rows", 0)),
        cols=int(_get(first, "Columns", 0)),
        series_number=number,
        image_type=str(image_type or ""),
        plane=_plane(orientation),
        slice_thickness_mm=thickness,
        pixel_spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        transfer_syntax=_syntax_name(first),
        files=[file for file, _ in items],
    )


def list_series(path: str | os.PathLike[str]) -> list[SeriesInfo]:
    """The image series under a folder (searched recursively), most slices first.

    Headers only are read. DICOMDIR, non-DICOM and non-image files are skipped (their number is logged at
    DEBUG level). A single file gives a one-element list.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(path, "file or folder not found")
    if path.is_file():
        ds = _read_or_fail(path, headers_only=True)
        if "Rows" not in ds:
            raise VolumeReadError(path, "DICOM file holds no image")
        return [_series_info(series_key(str(_get(ds, "SeriesInstanceUID", ""))), [(path, ds)])]
    return _scan(path).series


def _select(path: Path, infos: list[SeriesInfo], series: int | str | None) -> SeriesInfo:
    choices = "; ".join(info.describe() for info in infos)
    if series is None:
        chosen = infos[0]
        if len(infos) > 1:
            logger.warning(
                "%s holds %d series; reading %s (the most slices). Pass series= (index or key) to choose: %s",
                path,
                len(infos),
                chosen.describe(),
                choices,
            )
        return chosen
    if isinstance(series, (int, np.integer)) and not isinstance(series, bool):
        if 0 <= int(series) < len(infos):
            return infos[int(series)]
        raise VolumeReadError(path, f"series index {int(series)} out of range; choose one of: {choices}")
    text = str(series).strip().lower()
    matches = [info for info in infos if text and info.key.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise VolumeReadError(path, f"series key prefix {text!r} is ambiguous; choose one of: {choices}")
    if text.isdigit() and int(text) < len(infos):
        return infos[int(text)]
    raise VolumeReadError(path, f"no series matches {str(series)[:40]!r}; choose one of: {choices}")


# --------------------------------------------------------------------------------------------- geometry


def _fg_item(ds: Any, frame: int | None, sequence: str) -> Any:
    """First item of a functional group macro for ``frame`` (per-frame first, then shared), or ``None``."""
    containers = []
    if frame is not None:
        per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            containers.append(per_frame[frame])
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        containers.append(shared[0])
    for container in containers:
        items = _get(container, sequence)
        if items:
            return items[0]
    return None


def _rescale(source: Any) -> tuple[float, float]:
    slope = _float(_get(source, "RescaleSlope", 1.0)) if source is not None else 1.0
    intercept = _float(_get(source, "RescaleIntercept", 0.0)) if source is not None else 0.0
    return (1.0 if slope is None or slope == 0 else slope), (0.0 if intercept is None else intercept)


def _frames_of(path: Path, ds: Any, allow_derived: bool) -> list[_Frame]:
    """Per-frame geometry of one file (one frame for a classic single-slice file)."""
    rows, cols = int(_get(ds, "Rows", 0)), int(_get(ds, "Columns", 0))
    if rows <= 0 or cols <= 0:
        raise VolumeReadError(path, f"invalid image size Rows={rows}, Columns={cols}")
    n = _n_frames(ds)
    top_iop = _floats(_get(ds, "ImageOrientationPatient"), 6)
    top_ipp = _floats(_get(ds, "ImagePositionPatient"), 3)
    top_spacing = _floats(_get(ds, "PixelSpacing"), 2)
    top_slope, top_intercept = _rescale(ds)
    if _is_multiframe_enhanced(ds):
        per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != n:
            count = 0 if per_frame is None else len(per_frame)
            raise VolumeReadError(path, f"PerFrameFunctionalGroupsSequence has {count} items for {n} frames")
        frames = []
        for k in range(n):
            position_item = _fg_item(ds, k, "PlanePositionSequence")
            position = _floats(_get(position_item, "ImagePositionPatient"), 3) if position_item else None
            if position is None:
                raise VolumeReadError(path, f"frame {k + 1} has no PlanePositionSequence/ImagePositionPatient")
            orientation_item = _fg_item(ds, k, "PlaneOrientationSequence")
            orientation = _floats(_get(orientation_item, "ImageOrientationPatient"), 6) if orientation_item else None
            orientation = orientation if orientation is not None else top_iop
            if orientation is None:
                raise VolumeReadError(path, f"frame {k + 1} has no PlaneOrientationSequence/ImageOrientationPatient")
            measures = _fg_item(ds, k, "PixelMeasuresSequence")
            spacing = _floats(_get(measures, "PixelSpacing"), 2) if measures else None
            spacing = spacing if spacing is not None else top_spacing
            if spacing is None:
                raise VolumeReadError(path, f"frame {k + 1} has no PixelMeasuresSequence/PixelSpacing")
            transform = _fg_item(ds, k, "PixelValueTransformationSequence")
            slope, intercept = _rescale(transform) if transform is not None else (top_slope, top_intercept)
            frames.append(
                _Frame(path, k, position, orientation, (spacing[0], spacing[1]), rows, cols, slope, intercept)
            )
        return frames
    if top_ipp is None:
        raise VolumeReadError(path, "missing or invalid ImagePositionPatient")
    if top_iop is None:
        raise VolumeReadError(path, "missing or invalid ImageOrientationPatient")
    if top_spacing is None:
        raise VolumeReadError(path, "missing or invalid PixelSpacing")
    spacing = (float(top_spacing[0]), float(top_spacing[1]))
    if n == 1:
        return [_Frame(path, None, top_ipp, top_iop, spacing, rows, cols, top_slope, top_intercept)]
    # Legacy multi-frame without functional groups: frames stacked along the normal from the first position.
    step = _float(_get(ds, "SpacingBetweenSlices")) or _float(_get(ds, "SliceThickness"))
    if not allow_derived or not step:
        raise VolumeReadError(path, f"{n}-frame file without per-frame positions or SpacingBetweenSlices")
    normal = np.cross(top_iop[:3], top_iop[3:])
    normal /= np.linalg.norm(normal)
    return [
        _Frame(path, k, top_ipp + k * step * normal, top_iop, spacing, rows, cols, top_slope, top_intercept)
        for k in range(n)
    ]


def _frame_name(frame: _Frame) -> str:
    return frame.path.name if frame.frame is None else f"{frame.path.name} frame {frame.frame + 1}"


def _check_consistent(where: Path, frames: list[_Frame]) -> None:
    """Same Rows/Columns, orientation and pixel spacing on every frame.

    The most common value is taken as the series' own; the message names it, the odd value, how many frames
    carry the odd value, and the first of them.
    """
    checks = [
        ("Rows/Columns", lambda f: (f.rows, f.cols), lambda a, b: a == b, lambda v: f"{v[0]}x{v[1]}"),
        (
            "ImageOrientationPatient",
            lambda f: tuple(f.orientation),
            lambda a, b: np.abs(np.subtract(a, b)).max() <= ORIENTATION_TOLERANCE,
            lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]",
        ),
        (
            "PixelSpacing",
            lambda f: f.spacing,
            lambda a, b: np.abs(np.subtract(a, b)).max() <= SPACING_TOLERANCE * max(a),
            lambda v: f"{v[0]:g}x{v[1]:g} mm",
        ),
    ]
    for label, value_of, same, show in checks:
        groups: list[tuple[Any, list[_Frame]]] = []
        for frame in frames:
            value = value_of(frame)
            for ref_value, members in groups:
                if same(ref_value, value):
                    members.append(frame)
                    break
            else:
                groups.append((value, [frame]))
        if len(groups) > 1:
            groups.sort(key=lambda group: -len(group[1]))
            (common, _), (odd, odd_frames) = groups[0], groups[1]
            raise VolumeReadError(
                where,
                f"inconsistent {label} within the series: {show(odd)} in {len(odd_frames)} slice(s) "
                f"(first: {_frame_name(odd_frames[0])}) but {show(common)} in the others",
            )


def _unit_normal(where: Path, orientation: np.ndarray) -> np.ndarray:
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-3 or abs(np.linalg.norm(row) - 1) > 0.05 or abs(np.linalg.norm(col) - 1) > 0.05:
        raise VolumeReadError(where, "invalid ImageOrientationPatient (row and column cosines are not unit vectors)")
    return normal / norm


# --------------------------------------------------------------------------------------------- pixels


def _pydicom_can_decode(ds: Any) -> bool:
    """Whether pydicom has a working decoder for the file's transfer syntax."""
    uid = _transfer_syntax(ds)
    if uid is None or str(uid) in _NATIVE_SYNTAXES:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(uid).is_available)
    except Exception:
        return False


def _decode_with_sitk(path: Path) -> np.ndarray:
    """Decode a compressed single-frame file with SimpleITK (GDCM); the values come back already rescaled."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image)


def _expected_bytes(ds: Any, n: int, rows: int, cols: int) -> int:
    bits = int(_get(ds, "BitsAllocated", 16))
    samples = int(_get(ds, "SamplesPerPixel", 1))
    return (n * rows * cols * samples * bits + 7) // 8


def _decode(path: Path, ds: Any, n: int, rows: int, cols: int) -> tuple[np.ndarray, bool]:
    """Stored values ``[n, rows, cols]`` of one file, and whether they are already rescaled (GDCM fallback)."""
    samples = int(_get(ds, "SamplesPerPixel", 1))
    if samples != 1:
        raise VolumeReadError(path, f"colour images (SamplesPerPixel={samples}) are not supported")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise VolumeReadError(path, "float pixel data is not supported")
        raise VolumeReadError(path, "no pixel data (truncated file?)")
    syntax = _syntax_name(ds)
    uid = _transfer_syntax(ds)
    native = uid is None or str(uid) in _NATIVE_SYNTAXES
    if native:
        expected = _expected_bytes(ds, n, rows, cols)
        found = len(ds.PixelData)
        if found < expected:
            raise VolumeReadError(path, f"truncated pixel data ({found} of {expected} bytes)")
    rescaled = False
    if _pydicom_can_decode(ds):
        try:
            with _quiet_pydicom():
                array = ds.pixel_array
        except Exception as exc:
            raise VolumeReadError(
                path, f"pixel data ({syntax}) could not be decoded: {_library_text(exc, [ds])}"
            ) from exc
    elif n == 1:
        try:
            array = _decode_with_sitk(path)
        except Exception as exc:
            raise VolumeReadError(
                path,
                f"pixel data compressed as {syntax}: pydicom has no decoder installed for it (install pylibjpeg "
                "with pylibjpeg-libjpeg/-openjpeg, or python-gdcm) and SimpleITK/GDCM could not decode it "
                f"({_library_text(exc, [ds])})",
            ) from exc
        rescaled = True
    else:
        raise VolumeReadError(
            path,
            f"multi-frame pixel data compressed as {syntax}: no decoder installed for it "
            "(install pylibjpeg with pylibjpeg-libjpeg/-openjpeg, or python-gdcm)",
        )
    array = np.asarray(array)
    if array.size != n * rows * cols:
        raise VolumeReadError(
            path, f"decoded pixel data has {array.size} values, expected {n}x{rows}x{cols} (corrupt or truncated)"
        )
    return array.reshape(n, rows, cols), rescaled


def _stored_dtype(ds: Any) -> np.dtype:
    bits = int(_get(ds, "BitsAllocated", 16))
    signed = int(_get(ds, "PixelRepresentation", 0)) == 1
    if bits <= 8:
        return np.dtype(np.int8 if signed else np.uint8)
    if bits <= 16:
        return np.dtype(np.int16 if signed else np.uint16)
    return np.dtype(np.int32 if signed else np.uint32)


def _apply_rescale(raw: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """``raw * slope + intercept`` per slice: int16/int32 when every factor is an integer, else float32."""
    integral = raw.dtype.kind in "iu" and all(float(v).is_integer() for v in (*slopes, *intercepts))
    if integral and np.all(slopes == 1) and np.all(intercepts == 0):
        if raw.dtype.kind == "i":
            return raw
        top = int(raw.max()) if raw.size else 0
        for candidate in (np.int16, np.int32, np.int64):
            if top <= np.iinfo(candidate).max:
                return raw.astype(candidate)
    if integral:
        lo = raw.min(axis=(1, 2)).astype(np.float64)
        hi = raw.max(axis=(1, 2)).astype(np.float64)
        ends = np.stack([lo * slopes + intercepts, hi * slopes + intercepts])
        vmin, vmax = ends.min(), ends.max()
        if vmin >= np.iinfo(np.int16).min and vmax <= np.iinfo(np.int16).max:
            dtype: type[np.integer] = np.int16
        elif vmin >= np.iinfo(np.int32).min and vmax <= np.iinfo(np.int32).max:
            dtype = np.int32
        else:
            integral = False
    if integral:
        out = np.empty(raw.shape, dtype=dtype)
        for k in range(raw.shape[0]):
            out[k] = raw[k].astype(np.int64) * int(slopes[k]) + int(intercepts[k])
        return out
    out = np.empty(raw.shape, dtype=np.float32)
    for k in range(raw.shape[0]):
        out[k] = raw[k] * float(slopes[k]) + float(intercepts[k])
    return out


# --------------------------------------------------------------------------------------------- PET SUV


def suv_bw_factor(weight_kg: float, injected_dose_bq: float, half_life_s: float, decay_time_s: float) -> float:
    """Multiply Bq/ml by this to get body-weight SUV (g/ml): ``weight_g / (dose * 2^(-t / half_life))``."""
    if not (weight_kg > 0 and injected_dose_bq > 0 and half_life_s > 0):
        raise ValueError("weight, injected dose and half-life must be positive")
    if decay_time_s < 0:
        raise ValueError("decay time must not be negative")
    decayed = injected_dose_bq * math.exp(-math.log(2.0) * decay_time_s / half_life_s)
    return weight_kg * 1000.0 / decayed


def _moment(date: Any, time: Any) -> tuple[datetime | None, float | None]:
    """(datetime if a date is known, seconds since midnight) of a DICOM DA + TM pair."""
    from pydicom.valuerep import DA, TM

    if time is None:
        return None, None
    try:
        tm = TM(str(time).strip())
    except Exception:
        return None, None
    seconds = tm.hour * 3600 + tm.minute * 60 + tm.second + tm.microsecond / 1e6
    if date is not None:
        try:
            da = DA(str(date).strip())
            return datetime(da.year, da.month, da.day) + timedelta(seconds=seconds), seconds
        except Exception:
            pass
    return None, seconds


def suv_from_dataset(ds: Any, others: Sequence[Any] = ()) -> tuple[float | None, dict[str, Any]]:
    """Body-weight SUV factor of a PET dataset.

    Returns ``(factor, inputs)`` where ``inputs`` holds ``weight_kg``, ``injected_dose_bq``, ``half_life_s``,
    ``decay_time_s`` and ``decay_correction``; or ``(None, {"reason": ...})`` when it cannot be computed.
    Scan start is SeriesTime (with SeriesDate), else the earliest AcquisitionTime of ``ds`` and ``others``;
    DecayCorrection ``START`` decays the dose to scan start, ``ADMIN`` applies no decay.
    """
    with _quiet_pydicom():
        return _suv(ds, others)


def _suv(ds: Any, others: Sequence[Any]) -> tuple[float | None, dict[str, Any]]:
    units = str(_get(ds, "Units", "")).upper()
    if units != "BQML":
        return None, {"reason": f"Units is {units or 'missing'}, not BQML"}
    weight = _float(_get(ds, "PatientWeight"))
    if not weight or weight <= 0:
        return None, {"reason": "PatientWeight missing or zero"}
    info_seq = _get(ds, "RadiopharmaceuticalInformationSequence")
    if not info_seq:
        return None, {"reason": "RadiopharmaceuticalInformationSequence missing"}
    info = info_seq[0]
    dose = _float(_get(info, "RadionuclideTotalDose"))
    half_life = _float(_get(info, "RadionuclideHalfLife"))
    if not dose or dose <= 0:
        return None, {"reason": "RadionuclideTotalDose missing or zero"}
    if not half_life or half_life <= 0:
        return None, {"reason": "RadionuclideHalfLife missing or zero"}
    correction = str(_get(ds, "DecayCorrection", "")).upper()
    if correction == "ADMIN":
        decay = 0.0
    elif correction == "START":
        decay_or_reason = _decay_time(ds, info, others)
        if isinstance(decay_or_reason, str):
            return None, {"reason": decay_or_reason}
        decay = decay_or_reason
    else:
        return None, {"reason": f"DecayCorrection {correction or 'missing'} is not supported (START or ADMIN)"}
    inputs = {
        "weight_kg": weight,
        "injected_dose_bq": dose,
        "half_life_s": half_life,
        "decay_time_s": round(decay, 3),
        "decay_correction": correction,
    }
    return suv_bw_factor(weight, dose, half_life, decay), inputs


def _decay_time(ds: Any, info: Any, others: Sequence[Any]) -> float | str:
    """Seconds from injection to scan start, or the reason it is unknown."""
    from pydicom.valuerep import DT

    injection_dt: datetime | None = None
    injection_s: float | None = None
    start_datetime = _get(info, "RadiopharmaceuticalStartDateTime")
    if start_datetime is not None:
        try:
            parsed = DT(str(start_datetime).strip())
            injection_dt = datetime(
                parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second, parsed.microsecond
            )
            injection_s = parsed.hour * 3600 + parsed.minute * 60 + parsed.second + parsed.microsecond / 1e6
        except Exception:
            injection_dt = None
    if injection_s is None:
        _, injection_s = _moment(None, _get(info, "RadiopharmaceuticalStartTime"))
    if injection_s is None:
        return "injection time (RadiopharmaceuticalStartTime) missing or invalid"
    scan_dt, scan_s = _moment(_get(ds, "SeriesDate"), _get(ds, "SeriesTime"))
    if scan_s is None:
        candidates = [_moment(_get(d, "AcquisitionDate"), _get(d, "AcquisitionTime")) for d in (ds, *others)]
        candidates = [c for c in candidates if c[1] is not None]
        if not candidates:
            return "scan start (SeriesTime / AcquisitionTime) missing or invalid"
        with_dates = [c for c in candidates if c[0] is not None]
        scan_dt, scan_s = min(with_dates) if len(with_dates) == len(candidates) else min(candidates, key=lambda c: c[1])
    if injection_dt is not None and scan_dt is not None:
        decay = (scan_dt - injection_dt).total_seconds()
        if decay < 0:
            return "scan start is before the injection time"
        return decay
    decay = scan_s - injection_s
    if decay < 0:  # times only: the scan started after midnight
        decay += 86400.0
    return decay


# --------------------------------------------------------------------------------------------- reading


def read_dicom(path: str | os.PathLike[str], series: int | str | None = None) -> Volume:
    """Read a DICOM series (a folder) or a multi-frame DICOM file into a canonical :class:`Volume`.

    Args:
        path: a folder (searched recursively, any file names) or one multi-frame file.
        series: for folders holding several series, an index into :func:`list_series` or a key prefix;
            by default the series with the most slices (``meta["series_count"]`` tells how many there were).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(path, "file or folder not found")
    if path.is_dir():
        scan = _scan(path)
        if not scan.series:
            detail = f" ({scan.skipped} non-DICOM or non-image files skipped)" if scan.skipped else ""
            raise VolumeReadError(path, f"no DICOM image files found{detail}")
        chosen = _select(path, scan.series, series)
        items = scan.headers[chosen.key]
        skipped, n_series = scan.skipped, len(scan.series)
    else:
        header = _read_or_fail(path, headers_only=True)
        if "Rows" not in header:
            raise VolumeReadError(path, "DICOM file holds no image")
        info = _series_info(series_key(str(_get(header, "SeriesInstanceUID", ""))), [(path, header)])
        chosen = _select(path, [info], series)
        items = [(path, header)]
        skipped, n_series = 0, 1

    single_file = len(items) == 1
    frames: list[_Frame] = []
    for file, ds in items:
        frames.extend(_frames_of(file, ds, allow_derived=single_file))
    if len(frames) < 2:
        hint = "; pass the folder holding the whole series" if path.is_file() else ""
        raise VolumeReadError(path, f"only one slice (2D input); a 3D volume needs at least 2 slices{hint}")
    _check_consistent(path, frames)
    volume = _assemble(path, frames, items)
    volume.meta.update({"series_count": n_series, "series_key": chosen.key, "series_index": chosen.index})
    if skipped:
        volume.meta["files_skipped"] = skipped
    from rrg3d.io.readers import check_volume

    return check_volume(path, volume.to_canonical())


def _assemble(where: Path, frames: list[_Frame], items: list[tuple[Path, Any]]) -> Volume:
    """Sort, decode, rescale and de-duplicate the frames; build the affine and the metadata."""
    ref = frames[0]
    normal = _unit_normal(where, ref.orientation)
    projections = np.array([f.position @ normal for f in frames])
    order = np.argsort(projections, kind="stable")
    frames = [frames[k] for k in order]
    projections = projections[order]

    # Full reads (pixels), one file at a time, into a stack of stored values in sorted order.
    slot: dict[Path, list[tuple[int, int | None]]] = {}
    for k, frame in enumerate(frames):
        slot.setdefault(frame.path, []).append((k, frame.frame))
    headers = dict(items)
    dtype = np.result_type(*{_stored_dtype(ds) for _, ds in items})
    raw = np.empty((len(frames), ref.rows, ref.cols), dtype=dtype)
    slopes = np.array([f.slope for f in frames], dtype=np.float64)
    intercepts = np.array([f.intercept for f in frames], dtype=np.float64)
    decoders = set()
    for file, targets in slot.items():
        ds = _read_or_fail(file, headers_only=False)
        n_file = _n_frames(headers[file])
        array, rescaled = _decode(file, ds, n_file, ref.rows, ref.cols)
        decoders.add("SimpleITK/GDCM" if rescaled else "pydicom")
        if not np.can_cast(array.dtype, raw.dtype, "safe"):
            raw = raw.astype(np.promote_types(raw.dtype, array.dtype))
        for k, frame_index in targets:
            raw[k] = array[0 if frame_index is None else frame_index]
            if rescaled:
                slopes[k], intercepts[k] = 1.0, 0.0
        del ds, array
    values = _apply_rescale(raw, slopes, intercepts)
    del raw

    warnings_list: list[str] = []
    # Duplicate positions: identical pixels → keep one; different pixels → not one volume.
    keep = [0]
    for k in range(1, len(frames)):
        if projections[k] - projections[keep[-1]] < POSITION_TOLERANCE_MM:
            if not np.array_equal(values[k], values[keep[-1]]):
                raise VolumeReadError(
                    where,
                    f"two slices share a position ({frames[keep[-1]].path.name} and {frames[k].path.name}) but "
                    "hold different pixel data (several phases, echoes or acquisitions in one series?)",
                )
            continue
        keep.append(k)
    dropped = len(frames) - len(keep)
    if dropped:
        values = values[keep]
        frames = [frames[k] for k in keep]
        projections = projections[keep]
        warnings_list.append(f"dropped {dropped} duplicate slice(s) at repeated positions")
    if len(frames) < 2:
        raise VolumeReadError(where, "only one distinct slice position (2D input); a 3D volume needs at least 2")

    positions = np.array([f.position for f in frames])
    stack = positions[-1] - positions[0]
    stack_unit = stack / np.linalg.norm(stack)
    cos_tilt = float(np.clip(stack_unit @ normal, -1.0, 1.0))
    tilt = float(np.degrees(np.arccos(cos_tilt)))
    tilted = tilt > TILT_THRESHOLD_DEG
    direction = stack_unit if tilted else normal
    gaps = np.diff(projections) / (cos_tilt if tilted else 1.0)
    step = float(np.median(gaps))
    spread = float(gaps.max() - gaps.min())
    nonuniform = spread > max(0.01 * step, 0.01)
    missing = int(sum(max(round(g / step) - 1, 1) for g in gaps if g >= MISSING_GAP_FACTOR * step))
    if tilted:
        warnings_list.append(
            f"gantry tilt of {tilt:.2f} degrees: the affine follows the actual slice positions (sheared grid)"
        )
    if nonuniform:
        warnings_list.append(
            f"non-uniform slice gaps ({gaps.min():.3f} to {gaps.max():.3f} mm); the median step {step:.3f} mm "
            "is used, not resampled"
        )
    if missing:
        warnings_list.append(f"about {missing} missing slice(s) (gaps of 1.5 or more median steps)")
    relative = positions - positions[0]
    off_mm = float(np.linalg.norm(relative - np.outer(relative @ direction, direction), axis=1).max())
    if off_mm > max(0.1, 0.5 * min(ref.spacing)):
        warnings_list.append(f"slice positions deviate up to {off_mm:.2f} mm from one line (mixed stacks?)")

    affine = np.eye(4)
    affine[:3, 0] = direction * step
    affine[:3, 1] = ref.orientation[3:] * ref.spacing[0]
    affine[:3, 2] = ref.orientation[:3] * ref.spacing[1]
    affine[:3, 3] = positions[0]

    first = headers[frames[0].path]  # header of the first slice in position order (no pixel data)
    raw_modality = str(_get(first, "Modality", "OT")).upper()
    modality = _MODALITIES.get(raw_modality, "OT")
    with _quiet_pydicom():
        meta: dict[str, Any] = {"source_format": "dicom", **_plain(safe_meta(first))}
    meta.update(
        {
            "n_slices": len(frames),
            "n_files": len(items),
            "multi_frame": any(f.frame is not None for f in frames),
            "transfer_syntax": _syntax_name(first),
            "pixel_decoder": " + ".join(sorted(decoders)),
            "slice_spacing_mm": round(step, 6),
            "slice_gaps_mm": {
                "min": round(float(gaps.min()), 6),
                "max": round(float(gaps.max()), 6),
                "median": round(step, 6),
            },
            "nonuniform_spacing": bool(nonuniform),
            "gantry_tilt_deg": round(tilt, 3),
            "missing_slices": missing,
            "rescale_varies": bool(np.ptp(slopes) > 0 or np.ptp(intercepts) > 0),
        }
    )
    if dropped:
        meta["duplicates_dropped"] = dropped
    if modality == "CT" and str(_get(first, "RescaleType", "HU")).upper() in ("HU", "US"):
        meta["units"] = "HU"
    if modality == "PT":
        meta["pet_units"] = str(_get(first, "Units", "")).upper() or None
        others = [ds for _, ds in items if ds is not first]
        factor, info = suv_from_dataset(first, others)
        meta["suv_bw_factor"] = factor
        if factor is None:
            meta["suv_unavailable"] = info["reason"]
            warnings_list.append(f"no SUV factor: {info['reason']}")
        else:
            meta["suv_inputs"] = info
    for message in warnings_list:
        logger.warning("%s: %s", where, message)
    if warnings_list:
        meta["warnings"] = warnings_list
    return Volume(values, affine, modality, meta)
