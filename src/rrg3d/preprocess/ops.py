"""Preprocessing operations, each written once on a :class:`Volume` (array + geometry travel together).

Geometry-changing operations return a new volume whose affine is exact for the new grid, so a
preprocessed tensor can always be mapped back to the patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from rrg3d.errors import RRG3DError
from rrg3d.io.volume import CANONICAL_DIRECTION, Volume, affine_from_geometry

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]


def window(
    array: np.ndarray,
    low: float,
    high: float,
    out_range: tuple[float, float] = (0.0, 1.0),
    clip: bool = True,
) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``out_range`` as float32, clipping outside values when ``clip``."""
    if not high > low:
        raise ValueError(f"window needs high > low, got [{low}, {high}]")
    scale = (out_range[1] - out_range[0]) / (high - low)
    result = np.subtract(array, np.float32(low), dtype=np.float32)  # always a new array
    result *= np.float32(scale)
    result += np.float32(out_range[0])
    if clip:
        np.clip(result, min(out_range), max(out_range), out=result)
    return result


def hu_from_stored(array: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Stored CT values → Hounsfield units (``slope * value + intercept``); identity keeps the dtype."""
    if slope == 1.0 and intercept == 0.0:
        return array
    if float(slope).is_integer() and float(intercept).is_integer() and array.dtype.kind in "iu":
        result = array.astype(np.int32) * int(slope) + int(intercept)
        fits = result.size == 0 or (result.min() >= -32768 and result.max() <= 32767)
        return result.astype(np.int16) if fits else result
    return array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def apply_header_overrides(volume: Volume, overrides: dict | None) -> Volume:
    """Correct a scan whose header is known to be wrong, from values a dataset ships separately.

    ``overrides`` (a manifest record's ``meta.header_overrides``): ``spacing_mm`` ``[sd, sh, sw]`` replaces
    the voxel size (directions and origin kept); ``rescale`` ``{"slope", "intercept"}`` turns stored values
    into HU. Used for CT-RATE's first release, whose metadata CSV holds the true spacing and rescale.
    """
    if not overrides:
        return volume
    if overrides.get("spacing_mm") is not None:
        affine = volume.affine.copy()
        affine[:3, :3] = volume.direction * np.asarray(overrides["spacing_mm"], dtype=np.float64)[None, :]
        volume = volume.replace(affine=affine)
    rescale = overrides.get("rescale")
    if rescale is not None:
        array = hu_from_stored(volume.array, float(rescale["slope"]), float(rescale["intercept"]))
        volume = volume.replace(array=array, meta=dict(volume.meta, rescaled_from_metadata=True))
    return volume


def to_suv(volume: Volume) -> Volume:
    """PET activity (Bq/ml) → body-weight SUV using the factor the DICOM reader stored in ``meta``.

    Volumes already in SUV (``meta["pet_units"] == "SUVbw"``, e.g. AutoPET's SUV.nii.gz) pass through.
    """
    units = str(volume.meta.get("pet_units", volume.meta.get("Units", ""))).upper()
    if units in ("SUV", "SUVBW", "GML"):
        return volume
    factor = volume.meta.get("suv_bw_factor")
    if not factor:
        reason = volume.meta.get("suv_unavailable", "no body-weight SUV factor in the metadata")
        raise RRG3DError(f"cannot convert PET to SUV: {reason}")
    array = volume.array.astype(np.float32) * np.float32(factor)
    meta = dict(volume.meta, pet_units="SUVbw")
    return volume.replace(array=array, meta=meta)


def centered_grid(volume: Volume, spacing: Spacing3, shape: Shape3) -> np.ndarray:
    """Affine of an axis-aligned (canonical) grid of ``shape`` voxels of ``spacing`` mm centred on the volume.

    Oblique scans are resampled onto world axes; the grid centre is the physical centre of the input.
    """
    corners = np.array([[d, h, w] for d in (0, 1) for h in (0, 1) for w in (0, 1)], dtype=np.float64)
    corners = (corners * (np.asarray(volume.shape) - 1)[None, :])
    center = volume.index_to_world(corners).mean(axis=0)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    half = (np.asarray(shape, dtype=np.float64) - 1) / 2.0 * spacing_arr
    origin = center - CANONICAL_DIRECTION @ half
    return affine_from_geometry(spacing_arr, origin)


def world_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned world bounding box (LPS mm, voxel edges included) of a volume's grid: ``(low, high)``."""
    corners = np.array([[d, h, w] for d in (-0.5, 1) for h in (-0.5, 1) for w in (-0.5, 1)], dtype=np.float64)
    corners = np.where(corners > 0, np.asarray(volume.shape, dtype=np.float64)[None, :] - 0.5, corners)
    world = volume.index_to_world(corners)
    return world.min(axis=0), world.max(axis=0)


def world_overlap(moving: Volume, fixed: Volume) -> float:
    """Share of ``fixed``'s world bounding box that ``moving``'s box covers (0: disjoint, 1: fully covered)."""
    low_m, high_m = world_box(moving)
    low_f, high_f = world_box(fixed)
    inter = np.clip(np.minimum(high_m, high_f) - np.maximum(low_m, low_f), 0.0, None)
    extent = np.clip(high_f - low_f, 1e-9, None)
    return float(np.prod(inter / extent))


def world_extent_text(volume: Volume) -> str:
    """A volume's world bounding box as text (for error messages)."""
    low, high = world_box(volume)
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(low, high, strict=True)) + "] mm"


def resample_to_grid(
    volume: Volume,
    affine: np.ndarray,
    shape: Shape3,
    order: int = 1,
    fill: float = 0.0,
) -> Volume:
    """Resample onto an arbitrary grid (``affine``, ``shape``) with SimpleITK (multi-threaded, exact geometry).

    ``order`` 1 is trilinear (images, float32 out), 0 nearest neighbour (label maps, dtype kept). Voxels
    outside the input get ``fill``.
    """
    import SimpleITK as sitk

    from rrg3d.io.readers import volume_to_sitk

    source = volume_to_sitk(volume)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing[None, :]
    reference = sitk.Image([int(shape[2]), int(shape[1]), int(shape[0])], sitk.sitkUInt8)
    reference.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    reference.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    reference.SetDirection(tuple(direction[:, ::-1].ravel()))
    out_type = sitk.sitkFloat32 if order == 1 else sitk.sitkUnknown  # labels keep their integer type
    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    resampled = sitk.Resample(source, reference, sitk.Transform(), interpolator, float(fill), out_type)
    array = sitk.GetArrayFromImage(resampled)
    return volume.replace(array=array, affine=np.array(affine, dtype=np.float64))


def crop_or_pad(volume: Volume, shape: Shape3, fill: float = 0.0) -> Volume:
    """Centre-crop and/or pad to ``shape`` without interpolation; the affine follows the shift."""
    array = volume.array
    out = np.full(shape, fill, dtype=array.dtype)
    src_slices, dst_slices, shift = [], [], []
    for n_in, n_out in zip(array.shape, shape, strict=True):
        start_in = max((n_in - n_out) // 2, 0)
        start_out = max((n_out - n_in) // 2, 0)
        length = min(n_in, n_out)
        src_slices.append(slice(start_in, start_in + length))
        dst_slices.append(slice(start_out, start_out + length))
        shift.append(start_in - start_out)
    out[tuple(dst_slices)] = array[tuple(src_slices)]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_world(np.asarray(shift, dtype=np.float64))
    return volume.replace(array=out, affine=affine)


def resize(volume: Volume, shape: Shape3, order: int = 1) -> Volume:
    """Resize the whole volume to ``shape`` (voxel edges aligned, like MONAI ``Resize``); affine rescaled.

    Trilinear for images (torch ``interpolate``, multi-threaded), nearest for label maps.
    """
    in_shape = np.asarray(volume.shape, dtype=np.float64)
    out_shape = np.asarray(shape, dtype=np.float64)
    if tuple(volume.shape) == tuple(shape):
        return volume
    if order == 1:
        tensor = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None, None]
        array = torch.nn.functional.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)
        array = array[0, 0].numpy()
    else:
        indices = [
            np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out), n_in - 1).astype(np.int64)
            for n_in, n_out in zip(volume.shape, shape, strict=True)
        ]
        array = volume.array[np.ix_(*indices)]
    scale = in_shape / out_shape
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * scale[None, :]
    # voxel-edge alignment: new voxel 0 centre sits at old index (scale - 1) / 2
    affine[:3, 3] = volume.index_to_world((scale - 1.0) / 2.0)
    return volume.replace(array=np.ascontiguousarray(array), affine=affine)


def resampled_shape(volume: Volume, spacing: Sequence[float]) -> Shape3:
    """Number of voxels that cover the volume's extent at ``spacing`` (rounded)."""
    return tuple(  # type: ignore[return-value]
        max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(volume.shape, volume.spacing, spacing, strict=True)
    )
