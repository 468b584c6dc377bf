"""Region inputs of region-guided models (Reg2RG), written once on arrays: masks, texture crops, geometry masks.

A *label map* is an integer volume on the model's input grid (the preset's output grid: the cache stores it beside
the image, see :func:`rrg3d.preprocess.batch.process_record`) and ``labels`` maps its values to region names. For
every region a model asks for, :func:`region_inputs` gives

* the **texture** input: the volume with everything outside the region set to air, cropped to the region's bounding
  box and resized (trilinear) to a fixed size — the region's own detail at a resolution that does not depend on its
  size;
* the **geometry** input: the *uncropped* binary mask resized with nearest-neighbour interpolation (never area or
  linear: the mask stays binary) — where the region is and how large, which the crop discards.

A region whose mask is missing or smaller than ``min_voxels`` is dropped and reported in ``dropped`` (name → reason),
never an error: an empty mask is a fact about a scan, not a bug. Which regions a study has comes from its label map
alone, never from which reference texts exist.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rrg3d.errors import RRG3DError

Shape3 = tuple[int, int, int]

#: Other spellings of region names found in datasets and model outputs → the name rrg3d uses.
REGION_ALIASES: dict[str, str] = {
    "lungs": "lung", "bones": "bone", "breasts": "breast", "oesophagus": "esophagus",
    "trachea and bronchie": "trachea and bronchi", "trachea & bronchi": "trachea and bronchi",
    "tra. & bro.": "trachea and bronchi", "trachea bronchi": "trachea and bronchi", "airway": "trachea and bronchi",
    "airways": "trachea and bronchi", "pleural": "pleura", "abdominal": "abdomen", "cardiac": "heart",
    "mediastinal": "mediastinum", "thyroid gland": "thyroid",
}


def region_key(name: object) -> str:
    """A region name as rrg3d spells it: lower case, single spaces, aliases merged (``Lungs`` → ``lung``)."""
    key = re.sub(r"\s+", " ", str(name).replace("_", " ").strip().lower())
    return REGION_ALIASES.get(key, key)


def air_value(preset: Any) -> float:
    """The model-input value of air (−1000 HU) under a preset: what texture crops put outside their region."""
    intensity = preset.intensity
    if intensity.kind == "minmax":  # air is (about) the scan's minimum
        return float(intensity.out_range[0])
    if intensity.kind != "window" or intensity.window is None:
        return 0.0 if intensity.kind == "suv" else -1000.0
    from rrg3d.preprocess.ops import window

    low, high = intensity.window
    return float(window(np.array([-1000.0], dtype=np.float32), low, high, intensity.out_range, intensity.clip)[0])


@dataclass
class RegionInputs:
    """The regions of one study in a fixed order: ``names`` (rrg3d spellings), ``label_ids`` (their values in the
    label map), ``texture`` [R, C, *texture_size] and ``geometry`` [R, 1, *geometry_size] (None when not asked for),
    ``dropped`` (name → why the region is left out) and, when asked for, each kept region's boolean ``masks`` on the
    volume's grid."""

    names: list[str]
    label_ids: list[int]
    texture: torch.Tensor | None
    geometry: torch.Tensor | None
    dropped: dict[str, str] = field(default_factory=dict)
    masks: list[np.ndarray] | None = None


def named_masks(label_map: np.ndarray, labels: Mapping[Any, Any], names: Sequence[str], *, min_voxels: int = 1,
                where: str = "label map") -> tuple[list[tuple[str, int, np.ndarray]], dict[str, str]]:
    """``(name, label id, boolean mask)`` for each of ``names`` present in the label map (in ``names`` order) and the
    names left out with the reason. ``labels``: label value → region name (keys may be strings, as JSON has them)."""
    if label_map.ndim != 3:
        raise RRG3DError(f"{where}: a label map must be 3D, got shape {label_map.shape}")
    by_name: dict[str, int] = {}
    for value, name in labels.items():
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise RRG3DError(f"{where}: label value {value!r} is not an integer") from None
        by_name.setdefault(region_key(name), number)
    found, dropped = [], {}
    for name in names:
        key = region_key(name)
        if key not in by_name:
            dropped[key] = "not in the label map's labels"
            continue
        mask = label_map == by_name[key]
        count = int(mask.sum())
        if count < max(1, min_voxels):
            dropped[key] = "empty mask" if count == 0 else f"{count} voxels (< {min_voxels})"
            continue
        found.append((key, by_name[key], mask))
    return found, dropped


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box holding every true voxel of a non-empty 3D mask."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def texture_crop(volume: torch.Tensor, mask: np.ndarray, size: Sequence[int], air: float) -> torch.Tensor:
    """``volume`` [C, D, H, W] with air outside ``mask`` [D, H, W], cropped to the mask's box, resized to ``size``
    (trilinear) → [C, *size]."""
    box = bounding_box(mask)
    inside = torch.from_numpy(np.ascontiguousarray(mask[box]))
    crop = torch.where(inside, volume[(slice(None), *box)], torch.tensor(air, dtype=volume.dtype))
    return F.interpolate(crop[None].float(), size=tuple(int(s) for s in size), mode="trilinear",
                         align_corners=False)[0]


def geometry_mask(mask: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """The whole (uncropped) mask resized to ``size`` by nearest neighbour → float [1, *size] of 0/1."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(int(s) for s in size), mode="nearest-exact")[0]


def region_inputs(volume: torch.Tensor, label_map: np.ndarray, labels: Mapping[Any, Any], names: Sequence[str], *,
                  texture_size: Sequence[int] | None, geometry_size: Sequence[int] | None, air: float,
                  min_voxels: int = 1, where: str = "label map", keep_masks: bool = False) -> RegionInputs:
    """The region inputs of one study (see the module doc); ``texture_size`` / ``geometry_size`` None: that input is
    not made; ``keep_masks``: also return the kept regions' masks. ``volume`` [C, D, H, W] and ``label_map``
    [D, H, W] must share the grid."""
    if tuple(label_map.shape) != tuple(volume.shape[-3:]):
        raise RRG3DError(f"{where}: label map shape {tuple(label_map.shape)} differs from the volume's "
                         f"{tuple(volume.shape[-3:])}; both must be on the model's input grid")
    found, dropped = named_masks(label_map, labels, names, min_voxels=min_voxels, where=where)
    texture = geometry = None
    if texture_size is not None:
        texture = torch.stack([texture_crop(volume, m, texture_size, air) for _, _, m in found]) if found else \
            torch.zeros((0, volume.shape[0], *texture_size))
    if geometry_size is not None:
        geometry = torch.stack([geometry_mask(m, geometry_size) for _, _, m in found]) if found else \
            torch.zeros((0, 1, *geometry_size))
    return RegionInputs([n for n, _, _ in found], [i for _, i, _ in found], texture, geometry, dropped,
                        masks=[m for _, _, m in found] if keep_masks else None)


def load_label_map(path: str | os.PathLike[str], preset: Any, *, cached: bool,
                   header_overrides: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A study's label map on the preset's output grid and that grid's affine: a cache's array as is (``cached``;
    its affine is in the cache's record, None here), or read and brought onto the grid by nearest neighbour
    (:meth:`~rrg3d.preprocess.presets.Preset.apply_mask`)."""
    from rrg3d.io import read_volume

    affine = None
    try:
        if cached and str(path).lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            mask = read_volume(path, modality="SEG")
            spacing_fix = (header_overrides or {}).get("spacing_mm")
            if spacing_fix:
                from rrg3d.preprocess.ops import apply_header_overrides

                mask = apply_header_overrides(mask, {"spacing_mm": spacing_fix})
            if mask.array.dtype.kind == "f":
                mask = mask.replace(array=np.rint(mask.array).astype(np.int16))
            on_grid = preset.apply_mask(mask)
            array, affine = np.asarray(on_grid.array), on_grid.affine
    except RRG3DError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise RRG3DError(f"{path}: not a readable label map ({type(exc).__name__}: {exc})") from exc
    if tuple(array.shape) != tuple(preset.shape):
        raise RRG3DError(f"{path}: label map has shape {tuple(array.shape)} on the model grid, the preset gives "
                         f"{tuple(preset.shape)}")
    return np.asarray(array).astype(np.int32, copy=False), affine
