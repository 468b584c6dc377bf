"""Readers for every supported scan format, behind one :func:`read_volume`.

Every reader returns a :class:`Volume` in the canonical orientation (see :mod:`rrg3d.io`) after the same
sanity checks (:func:`check_volume`). Any failure surfaces as :class:`VolumeReadError` naming the file and
the problem; library exceptions never escape.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.errors import VolumeReadError
from rrg3d.io.volume import Volume, affine_from_geometry

#: Largest edge (voxels) and voxel count accepted; anything above is treated as a corrupt header.
MAX_EDGE = 4096
MAX_VOXELS = 2_000_000_000
#: Largest plausible voxel edge in millimetres.
MAX_SPACING_MM = 100.0

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Every single-file suffix a reader knows, longest first (``.nii.gz`` before ``.nii``).
VOLUME_SUFFIXES = tuple(sorted({*NIFTI_SUFFIXES, *ITK_SUFFIXES, *NUMPY_SUFFIXES, *DICOM_SUFFIXES}, key=len,
                               reverse=True))


def scan_stem(path: str | os.PathLike[str]) -> str:
    """A scan's file or folder name without its volume suffix (``scans/a.nii.gz`` → ``a``, ``dicom/s1/`` → ``s1``):
    the name a scan goes by in study ids and in the label maps written for it, never anything from its headers."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name

# LPS <-> RAS: flip x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"nifti"``, ``"dicom"``, ``"itk"`` or ``"numpy"`` from the path (a directory means a DICOM series)."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if suffix in NUMPY_SUFFIXES:
        return "numpy"
    if suffix in DICOM_SUFFIXES or suffix == "":
        return "dicom"
    raise VolumeReadError(path, f"unsupported file type {suffix!r} (expected NIfTI, DICOM, NRRD/MHA/MHD or NPY/NPZ)")


def check_shape(path: str | os.PathLike[str], shape: Sequence[int]) -> None:
    """Reject 2D inputs, empty axes and absurd sizes (usually a corrupt header)."""
    dims = [int(n) for n in shape]
    if any(n <= 0 for n in dims):
        raise VolumeReadError(path, f"empty axis in shape {tuple(dims)}")
    if len(dims) < 3 or sum(n > 1 for n in dims[:3]) < 3:
        raise VolumeReadError(path, f"2D input (shape {tuple(dims)}); a 3D volume is needed")
    if any(n > MAX_EDGE for n in dims) or int(np.prod(dims, dtype=np.int64)) > MAX_VOXELS:
        raise VolumeReadError(path, f"absurd dimensions {tuple(dims)} (corrupt header?)")


def check_spacing(path: str | os.PathLike[str], spacing: Sequence[float]) -> None:
    values = [float(s) for s in spacing]
    if not all(np.isfinite(values)):
        raise VolumeReadError(path, f"non-finite voxel spacing {tuple(values)}")
    if any(s <= 0 for s in values):
        raise VolumeReadError(path, f"zero or negative voxel spacing {tuple(values)} mm")
    if any(s > MAX_SPACING_MM for s in values):
        raise VolumeReadError(path, f"implausible voxel spacing {tuple(values)} mm (> {MAX_SPACING_MM} mm)")


def check_volume(path: str | os.PathLike[str], volume: Volume) -> Volume:
    """The checks every reader applies before returning."""
    check_shape(path, volume.array.shape)
    check_spacing(path, volume.spacing)
    if abs(np.linalg.det(volume.direction)) < 1e-3:
        raise VolumeReadError(path, "degenerate orientation (direction cosines are not independent)")
    if volume.array.dtype.kind == "f":
        bad = ~np.isfinite(volume.array)
        count = int(bad.sum())
        if count:
            raise VolumeReadError(path, f"{count} NaN/inf voxel values")
    elif volume.array.dtype.kind not in "iub":
        raise VolumeReadError(path, f"unsupported voxel type {volume.array.dtype}")
    return volume


def _squeeze_to_3d(path: Path, array: np.ndarray, frame: int | None) -> np.ndarray:
    if array.ndim == 3:
        return array
    if array.ndim == 4:
        if array.shape[3] == 1:
            return array[..., 0]
        if frame is not None:
            if not 0 <= frame < array.shape[3]:
                raise VolumeReadError(path, f"frame {frame} out of range (4D input has {array.shape[3]} frames)")
            return array[..., frame]
        raise VolumeReadError(path, f"4D input with {array.shape[3]} frames; choose one with frame=")
    if array.ndim == 5 and array.shape[3] == 1 and array.shape[4] == 1:
        return array[..., 0, 0]
    if array.ndim < 3:
        raise VolumeReadError(path, f"2D input (shape {array.shape}); a 3D volume is needed")
    raise VolumeReadError(path, f"unsupported {array.ndim}D array of shape {array.shape}")


def read_nifti(path: str | os.PathLike[str], frame: int | None = None) -> Volume:
    """Read ``.nii``/``.nii.gz`` with nibabel; the sform/qform (RAS) becomes an LPS index affine."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    _check_raw_nifti_pixdim(path)
    try:
        image = nib.load(str(path))
    except ImageFileError as exc:
        raise VolumeReadError(path, "not a NIfTI image (unrecognised header)") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise VolumeReadError(path, f"unreadable file ({_describe_io_error(exc)})") from exc
    except Exception as exc:
        raise VolumeReadError(path, f"invalid NIfTI header ({type(exc).__name__}: {exc})") from exc
    header_shape = tuple(int(n) for n in image.shape)
    if len(header_shape) < 3:
        raise VolumeReadError(path, f"2D input (shape {header_shape}); a 3D volume is needed")
    check_shape(path, header_shape[:3])
    try:
        array = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise VolumeReadError(path, f"truncated or corrupt image data ({_describe_io_error(exc)})") from exc
    array = _squeeze_to_3d(path, np.asarray(array), frame)
    zooms = image.header.get_zooms()[:3]
    check_spacing(path, zooms)
    affine_ras = image.affine
    if affine_ras is None or not np.all(np.isfinite(affine_ras)):
        raise VolumeReadError(path, "header has no usable affine")
    if abs(np.linalg.det(affine_ras[:3, :3])) < 1e-9:
        # Broken sform/qform: fall back to the voxel sizes, axis aligned, as nibabel would for analyse files.
        affine_ras = np.diag([*(float(z) for z in zooms), 1.0])
    affine = _RAS_TO_LPS @ affine_ras
    meta = {"source_format": "nifti"}
    intent = image.header.get_intent()[0] if hasattr(image.header, "get_intent") else None
    if intent == "label":
        meta["intent"] = "label"
    volume = Volume(array, affine, "CT", meta)
    return check_volume(path, volume.to_canonical())


def _check_raw_nifti_pixdim(path: Path) -> None:
    """nibabel silently replaces zero voxel sizes by 1 mm; read the raw header first and refuse them."""
    import nibabel as nib

    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            raw = handle.read(348)
        if len(raw) < 348:
            return  # too short for a header: nibabel's own error below names the problem
        header = nib.Nifti1Header(binaryblock=raw, check=False)
        pixdim = [float(v) for v in header["pixdim"][1 : 1 + max(3, min(int(header["dim"][0]), 3))]]
    except Exception:
        return  # unreadable header: reported by the full load
    if not all(np.isfinite(pixdim)):
        raise VolumeReadError(path, f"non-finite voxel spacing {tuple(pixdim)} in the header")
    if any(v <= 0 for v in pixdim):
        raise VolumeReadError(path, f"zero or negative voxel spacing {tuple(pixdim)} mm in the header")


def _describe_io_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError | gzip.BadGzipFile) or "gzip" in str(exc).lower() or "compressed" in str(exc).lower():
        return "truncated or corrupt gzip stream"
    if isinstance(exc, zlib.error):
        return "corrupt compressed data"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {exc}"


def volume_from_sitk(image: Any, meta: dict[str, Any] | None = None, modality: str = "CT") -> Volume:
    """Convert a SimpleITK image (x, y, z index order, LPS) into a canonical :class:`Volume`."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # [z, y, x]
    spacing_xyz = np.array(image.GetSpacing(), dtype=np.float64)
    direction_xyz = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    # numpy axis a corresponds to ITK index axis 2 - a
    direction = direction_xyz[:, ::-1]
    affine = affine_from_geometry(spacing_xyz[::-1], origin, direction)
    return Volume(array, affine, modality, dict(meta or {})).to_canonical()


def volume_to_sitk(volume: Volume) -> Any:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    spacing = volume.spacing
    image.SetSpacing((spacing[2], spacing[1], spacing[0]))
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction[:, ::-1].ravel()))
    return image


def read_itk(path: str | os.PathLike[str]) -> Volume:
    """Read NRRD/MHA/MHD (and anything else SimpleITK reads) into a canonical :class:`Volume`."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise VolumeReadError(path, "file not found")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = reader.GetSize()
        if len(size) < 3:
            raise VolumeReadError(path, f"2D input (size {size}); a 3D volume is needed")
        check_shape(path, size[:3])
        image = reader.Execute()
    except VolumeReadError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise VolumeReadError(path, f"cannot be read as an image ({first[:200]})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(path, f"{image.GetNumberOfComponentsPerPixel()}-component image; expected scalar voxels")
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise VolumeReadError(path, f"4D input with {image.GetSize()[3]} frames; a 3D volume is needed")
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise VolumeReadError(path, f"{image.GetDimension()}D input; a 3D volume is needed")
    check_spacing(path, image.GetSpacing())
    return check_volume(path, volume_from_sitk(image, {"source_format": _suffix(path).lstrip(".")}))


def read_numpy(
    path: str | os.PathLike[str],
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    affine: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> Volume:
    """Read ``.npy``/``.npz`` holding an array already in canonical ``[D, H, W]`` order.

    Arrays carry no geometry, so it must be given: a 4×4 index→LPS ``affine`` (what preprocessing caches
    record), or spacing ``(sd, sh, sw)`` (argument, or ``spacing``/``origin``/``affine`` entries of an ``.npz``).
    """
    path = Path(path)
    affine = None if affine is None else np.asarray(affine, dtype=np.float64)
    try:
        if _suffix(path) == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                key = "array" if "array" in keys else ("image" if "image" in keys else None)
                if key is None:
                    candidates = [k for k in keys if archive[k].ndim >= 2]
                    if len(candidates) != 1:
                        raise VolumeReadError(path, f"cannot tell which entry is the image among {keys}")
                    key = candidates[0]
                array = archive[key]
                if "affine" in keys and affine is None:
                    affine = np.asarray(archive["affine"], dtype=np.float64)
                if spacing is None and "spacing" in keys:
                    spacing = [float(s) for s in archive["spacing"]]
                if "origin" in keys:
                    origin = [float(o) for o in archive["origin"]]
        else:
            array = np.load(path, allow_pickle=False)
    except VolumeReadError:
        raise
    except FileNotFoundError as exc:
        raise VolumeReadError(path, "file not found") from exc
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise VolumeReadError(path, f"not a readable NumPy file ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise VolumeReadError(path, f"corrupt NumPy archive ({type(exc).__name__})") from exc
    if array.ndim != 3:
        raise VolumeReadError(path, f"{array.ndim}D array of shape {array.shape}; a 3D [D, H, W] array is needed")
    if affine is None:
        if spacing is None:
            raise VolumeReadError(path, "NumPy arrays carry no geometry: pass spacing=(sd, sh, sw) in mm")
        if len(spacing) != 3:
            raise VolumeReadError(path, f"spacing needs 3 values (sd, sh, sw), got {len(spacing)}")
        check_spacing(path, spacing)
        affine = affine_from_geometry(tuple(spacing), tuple(origin))  # type: ignore[arg-type]
    elif affine.shape != (4, 4):
        raise VolumeReadError(path, f"affine must be 4x4, got {affine.shape}")
    check_shape(path, array.shape)
    volume = Volume(array, affine, "CT", {"source_format": "numpy"})
    check_spacing(path, volume.spacing)
    return check_volume(path, volume.to_canonical())


def read_volume(
    path: str | os.PathLike[str],
    *,
    modality: str | None = None,
    spacing: Sequence[float] | None = None,
    series: int | str | None = None,
    frame: int | None = None,
    affine: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> Volume:
    """Read any supported scan into a canonical :class:`Volume`.

    Args:
        path: a NIfTI/NRRD/MHA/MHD/NPY/NPZ file, a DICOM file (Enhanced multi-frame) or a folder of DICOM files.
        modality: override the modality (``"CT"``, ``"PT"``, ``"SEG"``, ...); DICOM reports its own.
        spacing: voxel size ``(sd, sh, sw)`` for NumPy arrays, which carry none.
        affine: or the full 4×4 index→LPS affine for NumPy arrays (as preprocessing caches record it).
        series: which DICOM series of a folder holding several (index or SeriesInstanceUID hash prefix).
        frame: which frame of a 4D NIfTI.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(path, "file not found")
    kind = detect_format(path)
    if kind == "nifti":
        volume = read_nifti(path, frame=frame)
    elif kind == "itk":
        volume = read_itk(path)
    elif kind == "numpy":
        volume = read_numpy(path, spacing=spacing, affine=affine)
    else:
        from rrg3d.io.dicom import read_dicom

        volume = read_dicom(path, series=series)
    if modality is not None:
        volume.modality = modality
    return volume


def list_dicom_series(path: str | os.PathLike[str]) -> list[Any]:
    """The DICOM series found in a folder (see :func:`rrg3d.io.dicom.list_series`)."""
    from rrg3d.io.dicom import list_series

    return list_series(path)


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a volume as NIfTI (RAS affine) or NRRD/MHA (LPS) by suffix; atomic (temp file + rename)."""
    from rrg3d.utils.files import atomic_path

    path = Path(path)
    suffix = _suffix(path)
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            # nibabel indexes (i, j, k) = our (W, H, D) reversed order for the usual viewer layout.
            array = np.transpose(volume.array, (2, 1, 0))
            affine = volume.affine[:, [2, 1, 0, 3]]
            image = nib.Nifti1Image(np.ascontiguousarray(array), _RAS_TO_LPS @ affine)
            image.header.set_xyzt_units("mm")
            if volume.modality == "SEG":
                image.header.set_intent("label")
            nib.save(image, str(tmp))
        elif suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            sitk.WriteImage(volume_to_sitk(volume), str(tmp), useCompression=True)
        elif suffix == ".npz":
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, array=volume.array, affine=volume.affine)
        else:
            raise VolumeReadError(path, f"cannot write {suffix!r}; use .nii.gz, .nrrd, .mha or .npz")
    return path
