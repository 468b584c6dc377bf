"""A weight-free chest CT segmenter: HU thresholds, connected components, morphology and anatomical geometry.

Works on a canonical HU volume (``[D, H, W]`` = inferior→superior, anterior→posterior, right→left) downsampled by
whole-voxel block means to about :data:`WORK_SPACING_MM`, then copies each label back onto the input grid (nearest
neighbour). The steps, in order:

1. **body**: air (< -400 HU) that touches the in-plane border of the field of view and is pure air (median below
   -950 HU) is outside; the body is the largest tissue component (> -500 HU) plus the air it touches, holes filled
   per slice. Lungs cut by a cropped field of view are not pure air and stay inside.
2. **lungs**: inner air components of at least 15 ml that are parenchyma, not gas (median above -950 HU), and not
   far below the largest one; vessels inside them are filled per slice.
3. **airway** (trachea and bronchi): seeded at the most superior small, round, central air component that lies
   above the lungs or belongs to them (upper half only), grown at rising thresholds until it would leak into the
   parenchyma, plus a one-voxel wall.
4. **bone**: > 200 HU components grown into > 130 HU cancellous bone (within 12 mm), marrow and discs inside a
   cortical ring filled; large bright components between the lungs that do not reach the midline spine are
   contrast-filled blood (CT angiography), not bone. The vertebral body's centre and front edge are kept per slice.
5. **mediastinal space**: voxels whose nearest lung along their row is the right lung on one side and the left lung
   on the other (over a 2 cm slab), not lung/airway/bone, not behind the vertebral bodies.
6. **heart**: the thickest soft-tissue (or contrast) blob of that space, at least 25 mm thick, in its lower three
   quarters and the body's anterior half; an opening with a ball of ~0.6× its inscribed radius keeps the heart
   and drops the great vessels; grown by 4 mm for the epicardial fat.
7. **diaphragm**: per (y, x) column, under the lowest lung voxel (columns whose lung lies on the heart, or without
   lung, take the nearest lung column's height, never above the heart's bottom); everything below is removed from
   the mediastinal space, and the rest of the space not claimed below is **mediastinum**.
8. **esophagus**: an ~8 mm tube in front of the vertebral body (behind the trachea above the carina, drifting
   forward and left below it), snapped by up to 6 mm to non-fat tissue or air, from the lung bases up.
9. **thyroid**: hyperdense soft tissue (> 72 HU) beside and in front of the trachea around the lung apices, only
   when the apices are in view.
10. **breast**: tissue anterior to the chest wall on a side whose anterior body surface bulges beyond the midline.
11. **pleura**: a one-voxel shell around the lungs above the diaphragm, not claimed by another region.
12. **abdomen**: inside the abdominal wall (soft-tissue ring closed over 3 cm gaps and filled per slice, minus a
    1 cm wall; the body minus 2.5 cm where the ring stays open) below the diaphragm, not behind the spine.

Labels are painted from the lowest to the highest priority: abdomen, breast, mediastinum, pleura, thyroid,
esophagus, heart, lung, airway, bone. Without lungs in view there is no thorax/abdomen boundary: only bone (and
nothing else) is labelled.

Any step may find nothing (a partial field of view): its region stays empty and the others go on.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS

#: Label value of each region (1-based, RadGenome order).
REGION_ID: dict[str, int] = {name: index + 1 for index, name in enumerate(RADGENOME_REGIONS)}

#: Target voxel edge of the working grid (mm); finer scans are block-averaged by whole voxels.
WORK_SPACING_MM = 2.0

AIR_HU = -400.0
BODY_HU = -500.0
PURE_AIR_HU = -950.0
BONE_HU = 200.0
MARROW_HU = 60.0
SPONGY_HU = 130.0
SOFT_HU = -30.0
THYROID_HU = 72.0
MIN_LUNG_ML = 15.0
HEART_OPENING = 0.6
HEART_MAX_OPENING_MM = 26.0

# Per-slice (in-plane) structuring elements: no connectivity along D.
_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_PLANE_CROSS[1] = ndi.generate_binary_structure(2, 1)
_PLANE_SQUARE = np.zeros((3, 3, 3), dtype=bool)
_PLANE_SQUARE[1] = True


# ---------------------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------------------


def block_factors(spacing: tuple[float, float, float], target: float = WORK_SPACING_MM) -> tuple[int, int, int]:
    """Whole-voxel downsampling factors bringing each axis close to ``target`` mm (never coarser than ~1.3×)."""
    return tuple(max(1, math.floor(target / s + 0.25)) for s in spacing)  # type: ignore[return-value]


def block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors`` blocks (edges padded by repetition), as float32, slab by slab to bound memory."""
    if factors == (1, 1, 1):
        return np.asarray(array, dtype=np.float32).copy()
    fd, fh, fw = factors
    d, h, w = array.shape
    out_shape = (-(-d // fd), -(-h // fh), -(-w // fw))
    pad_h, pad_w = out_shape[1] * fh - h, out_shape[2] * fw - w
    out = np.empty(out_shape, dtype=np.float32)
    for index in range(out_shape[0]):
        slab = np.asarray(array[index * fd:(index + 1) * fd], dtype=np.float32)
        if slab.shape[0] < fd:
            slab = np.concatenate([slab, np.repeat(slab[-1:], fd - slab.shape[0], axis=0)])
        if pad_h or pad_w:
            slab = np.pad(slab, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")
        out[index] = slab.reshape(fd, out_shape[1], fh, out_shape[2], fw).mean(axis=(0, 2, 4))
    return out


def upsample_labels(labels: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`block_mean`: each working voxel fills its block, cropped to ``shape``."""
    out = labels
    for axis, factor in enumerate(factors):
        if factor > 1:
            out = np.repeat(out, factor, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _voxel_ml(spacing: tuple[float, float, float]) -> float:
    return float(np.prod(spacing)) / 1000.0


def _largest(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    labels, count = ndi.label(mask, structure=structure)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes independently in every axial slice."""
    return ndi.binary_fill_holes(mask, structure=_PLANE_CROSS)


def _plane_distance(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane distance (mm) of every voxel of ``mask`` to the nearest voxel outside it in the same slice."""
    return ndi.distance_transform_edt(mask, sampling=(1e6, spacing[1], spacing[2]))


def _dilate_mm(mask: np.ndarray, mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """3D dilation by a ball of ``mm`` (exact, through a distance transform)."""
    if mm <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=spacing) <= mm


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    found = ndi.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return None
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin))
                 for s, n in zip(found[0], mask.shape, strict=True))


def _fill_nan_1d(values: np.ndarray, smooth: int = 0) -> np.ndarray:
    """Linear interpolation over NaNs inside the known range (NaN kept outside it), optional running median."""
    out = values.astype(np.float64).copy()
    known = np.flatnonzero(np.isfinite(out))
    if known.size == 0:
        return out
    inside = np.arange(known[0], known[-1] + 1)
    out[inside] = np.interp(inside, known, out[known])
    if smooth > 1 and inside.size >= smooth:
        out[inside] = ndi.median_filter(out[inside], size=smooth, mode="nearest")
    return out


# ---------------------------------------------------------------------------------------------------------
# body and lungs
# ---------------------------------------------------------------------------------------------------------


def find_body(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(body, air_labels, inner_ids)``: the patient, the labelled air, the ids of the air inside it."""
    air = hu < AIR_HU
    labels, count = ndi.label(air)
    ids = np.arange(1, count + 1)
    outside = np.zeros(hu.shape, dtype=bool)
    if count:
        pure = np.asarray(ndi.mean((hu < PURE_AIR_HU).astype(np.float32), labels, ids))
        border = np.zeros(count + 1, dtype=bool)
        for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            border[np.unique(face)] = True
        border[0] = False
        is_outside = np.zeros(count + 1, dtype=bool)
        is_outside[1:] = border[1:] & (pure > 0.5)  # median below -950 HU: air, not lung
        outside = is_outside[labels]
    tissue = _largest(hu > BODY_HU)
    if not tissue.any():
        return tissue, labels, np.zeros(0, dtype=np.int64)
    ring = ndi.binary_dilation(tissue, iterations=1) & air & ~outside
    touching = np.unique(labels[ring])
    touching = touching[touching > 0]
    body = tissue | (np.isin(labels, touching) & ~outside)
    body = _fill_slices(body) & ~outside
    return body, labels, touching


def find_lungs(hu: np.ndarray, spacing: tuple[float, float, float], air_labels: np.ndarray,
               inner_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lung parenchyma components (with small holes filled per slice) and the label ids chosen."""
    if inner_ids.size == 0:
        return np.zeros(hu.shape, dtype=bool), inner_ids
    volume_ml = np.bincount(air_labels.ravel())[inner_ids] * _voxel_ml(spacing)
    pure = np.asarray(ndi.mean((hu < PURE_AIR_HU).astype(np.float32), air_labels, inner_ids))
    candidates = (volume_ml >= MIN_LUNG_ML) & (pure < 0.5)  # parenchyma, not bowel gas (median below -950 HU)
    if not candidates.any():
        return np.zeros(hu.shape, dtype=bool), inner_ids[:0]
    # lungs are the most superior parenchyma: drop smaller air far below the top of the largest one
    tops = np.array([s[0].stop if s is not None else 0 for s in ndi.find_objects(air_labels)])[inner_ids - 1]
    largest = int(np.argmax(np.where(candidates, volume_ml, -1)))
    far_below = (tops[largest] - tops) * spacing[0] > 60.0
    candidates &= ~far_below | (volume_ml >= 0.3 * volume_ml[largest])
    keep = inner_ids[candidates]
    lungs = np.isin(air_labels, keep)
    # vessels and small nodules are holes in the air mask: fill the small ones, slice by slice
    closed = ndi.binary_closing(lungs, structure=_PLANE_CROSS, iterations=2) | lungs
    holes = _fill_slices(closed) & ~closed
    hole_labels, n_holes = ndi.label(holes, structure=_PLANE_SQUARE)
    if n_holes:
        area = np.bincount(hole_labels.ravel()) * spacing[1] * spacing[2]
        small = area < 600.0
        small[0] = False
        closed |= small[hole_labels]
    return closed, keep


def find_airway(hu: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, lungs: np.ndarray,
                air_labels: np.ndarray, lung_ids: np.ndarray, midline: np.ndarray) -> np.ndarray:
    """Trachea and main bronchi: seeded near the top, grown with leak control, plus a one-voxel wall."""
    airway = np.zeros(hu.shape, dtype=bool)
    lumen = (hu < -900.0) & body
    if not lumen.any():
        return airway
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    if lung_slices.size == 0:
        return airway
    apex, base = int(lung_slices[-1]), int(lung_slices[0])
    # below the apices the airway is only searched in the upper half of lungs tall enough to hold the hila
    lowest_seed = apex + 1
    if (apex - base) * spacing[0] >= 80.0:
        lowest_seed = base + (apex - base) // 2
    lung_set = set(lung_ids.tolist())
    pixel_mm2 = spacing[1] * spacing[2]
    seed = None
    for z in range(hu.shape[0] - 1, lowest_seed - 1, -1):
        if not lumen[z].any() or not np.isfinite(midline[z]):
            continue
        labels2d, count = ndi.label(lumen[z])
        ids = np.arange(1, count + 1)
        areas = np.bincount(labels2d.ravel(), minlength=count + 1)[1:] * pixel_mm2
        centres = ndi.center_of_mass(lumen[z], labels2d, ids)
        for index, area, (_, cx) in zip(ids, areas, centres, strict=True):
            if not 40.0 <= area <= 900.0 or abs(cx - midline[z]) * spacing[2] > 20.0:
                continue
            ys, xs = np.nonzero(labels2d == index)
            extent = max(np.ptp(ys) * spacing[1], np.ptp(xs) * spacing[2]) + spacing[1]
            if extent > 2.6 * math.sqrt(area / math.pi) * 2:  # not round: an elongated gas pocket
                continue
            if z <= apex and air_labels[z, ys[0], xs[0]] not in lung_set:
                continue  # below the apices, only air connected to the lungs can be the airway
            seed = (z, int(ys[len(ys) // 2]), int(xs[len(xs) // 2]))
            break
        if seed is not None:
            break
    if seed is None:
        return airway
    previous = None
    for threshold in (-950.0, -925.0, -900.0, -875.0, -850.0, -825.0, -800.0):
        grown_labels, _ = ndi.label((hu < threshold) & body)
        index = grown_labels[seed]
        if index == 0:
            continue
        grown = grown_labels == index
        size = int(grown.sum())
        if previous is not None and size > 1.6 * previous[1] + 5.0 / _voxel_ml(spacing):
            break  # leaked into the parenchyma: keep the last tree
        previous = (grown, size)
    if previous is None:
        return airway
    grown = previous[0]
    return ndi.binary_dilation(grown, iterations=1) & body


# ---------------------------------------------------------------------------------------------------------
# bone, diaphragm, mediastinal space
# ---------------------------------------------------------------------------------------------------------


def body_midline(body: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Per slice x (W index): midway between the two lungs' centroids where both exist, else the body's centroid."""
    d, _, w = body.shape
    midline = np.full(d, np.nan)
    xs = np.arange(w, dtype=np.float64)
    body_x = body.sum(axis=1)
    for z in range(d):
        total = body_x[z].sum()
        if total:
            midline[z] = float((body_x[z] * xs).sum() / total)
    lung_x = lungs.sum(axis=1).astype(np.float64)
    for z in range(d):
        if lung_x[z].sum() < 20 or not np.isfinite(midline[z]):
            continue
        m = round(midline[z])
        right, left = lung_x[z, :m], lung_x[z, m:]
        if right.sum() > 10 and left.sum() > 10:
            cr = (right * xs[:m]).sum() / right.sum()
            cl = (left * xs[m:]).sum() / left.sum()
            midline[z] = (cr + cl) / 2
    return _fill_nan_1d(midline, smooth=5)


def find_bone(hu: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, lungs: np.ndarray,
              midline: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bone (> 200 HU) without contrast-filled blood pools; also per-slice vertebral body centre and front edge."""
    d, h, w = hu.shape
    candidate = (hu > BONE_HU) & body
    labels, count = ndi.label(candidate)
    spine = np.full((d, 2), np.nan)
    front = np.full(d, np.nan)
    if count == 0:
        return candidate, spine, front
    ids = np.arange(1, count + 1)
    sizes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * _voxel_ml(spacing)
    # spine seeds: per slice, the most posterior bright voxel on the midline (a spinous process or, in a cropped
    # field of view, the vertebral body); contrast-filled vessels are always in front of it
    seeds = np.zeros(hu.shape, dtype=bool)
    ys = np.arange(h)[None, :, None]
    xs = np.arange(w)[None, None, :]
    band = candidate & (np.abs(xs - midline[:, None, None]) * spacing[2] <= 7.0)
    has_band = band.any(axis=(1, 2))
    posterior_most = np.where(has_band, h - 1 - np.argmax(band.any(axis=2)[:, ::-1], axis=1), h + 1)
    seeds = band & (ys >= (posterior_most - 10.0 / spacing[1])[:, None, None])
    seed_count = np.bincount(labels[seeds].ravel(), minlength=count + 1)[1:]
    # the space between the lungs (as seen over a 2 cm slab) holds the heart and great vessels
    between = between_lungs(lungs, midline, spacing)
    in_between = np.asarray(ndi.mean(between.astype(np.float32), labels, ids)) if between.any() else np.zeros(count)
    blood = (sizes_ml > 3.0) & (in_between > 0.5) & (seed_count < 0.02 * sizes_ml / _voxel_ml(spacing))
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = (sizes_ml >= 0.1) & ~blood
    bone = keep[labels]
    # cancellous bone is often below 200 HU at this resolution: grow the cores into > 130 HU within 12 mm
    grow_labels, _ = ndi.label((hu > SPONGY_HU) & body)
    grown = np.isin(grow_labels, np.unique(grow_labels[bone])) & (grow_labels > 0)
    bone |= grown & _dilate_mm(bone, 12.0, spacing)
    # marrow and discs inside a cortical ring are bone; the spinal canal (fluid, ~30 HU) is not
    steps = max(1, round(3.0 / min(spacing[1], spacing[2])))
    closed = ndi.binary_closing(bone, structure=_PLANE_CROSS, iterations=steps) | bone
    holes = _fill_slices(closed) & ~closed
    hole_labels, n_holes = ndi.label(holes, structure=_PLANE_SQUARE)
    bone |= closed & (hu > 2 * MARROW_HU)
    if n_holes:
        dense = np.zeros(n_holes + 1, dtype=bool)
        dense[1:] = np.asarray(ndi.mean(hu, hole_labels, np.arange(1, n_holes + 1))) > MARROW_HU
        bone |= dense[hole_labels] & (hu > 0)
    # vertebral body per slice: the bone component holding the midline seeds, near the midline
    spine_ids = ids[(seed_count > 0) & keep[1:]]
    spine_mask = np.isin(labels, spine_ids) & (np.abs(xs - midline[:, None, None]) * spacing[2] <= 20.0)
    spine_mask &= ys >= (posterior_most - 110.0 / spacing[1])[:, None, None]
    for z in range(d):
        yy, xx = np.nonzero(spine_mask[z])
        if yy.size >= 3:
            spine[z] = (float(np.median(yy)), float(np.median(xx)))
            front[z] = float(np.percentile(yy, 5))
    spine[:, 0] = _fill_nan_1d(spine[:, 0], smooth=5)
    spine[:, 1] = _fill_nan_1d(spine[:, 1], smooth=5)
    front = _fill_nan_1d(front, smooth=5)
    return bone, spine, front


def find_below_diaphragm(lungs: np.ndarray, body: np.ndarray, heart: np.ndarray) -> np.ndarray:
    """Voxels under the diaphragm: per (y, x) column, below the lowest lung voxel or the heart's lowest voxel.

    A column whose lowest lung voxel lies on the heart says nothing about the diaphragm; such columns and those
    without lung take the height of the nearest lung column that does, but never above the heart's lowest voxel.
    """
    d, h, w = lungs.shape
    has = lungs.any(axis=0)
    has_heart = heart.any(axis=0)
    if not has.any():
        return np.zeros(lungs.shape, dtype=bool)
    lowest = np.argmax(lungs, axis=0)
    under = np.clip(lowest - 1, 0, d - 1)
    yy, xx = np.indices((h, w))
    on_heart = has & (lowest > 0) & ndi.binary_dilation(heart, iterations=2)[under, yy, xx]
    known = has & ~on_heart
    if not known.any():
        known = has
    _, (iy, ix) = ndi.distance_transform_edt(~known, return_indices=True)
    height = lowest[iy, ix].astype(np.float64)
    height = np.where(has_heart, np.minimum(height, np.argmax(heart, axis=0)), height)
    height = ndi.median_filter(height, size=5, mode="nearest")
    zs = np.arange(d)[:, None, None]
    return (zs < height[None]) & body


def between_lungs(lungs: np.ndarray, midline: np.ndarray, spacing: tuple[float, float, float],
                  max_gap_mm: float = 180.0) -> np.ndarray:
    """Voxels whose nearest lung along their row is the right lung on one side and the left lung on the other.

    Lungs are taken over a 2 cm slab (so the space reaches a little past where a lung ends) and split at the
    midline. Tissue that one lung wraps around (a diaphragm dome) has the same lung on both sides and is left out.
    """
    _d, _h, w = lungs.shape
    if not lungs.any():
        return np.zeros(lungs.shape, dtype=bool)
    slab = max(1, round(10.0 / spacing[0]))
    lung_slab = ndi.maximum_filter1d(lungs.astype(np.uint8), size=2 * slab + 1, axis=0).astype(bool)
    idx = np.arange(w)[None, None, :]
    right = lung_slab & (idx < midline[:, None, None])
    left = lung_slab & ~right
    last_any = np.maximum.accumulate(np.where(lung_slab, idx, -1), axis=2)
    last_right = np.maximum.accumulate(np.where(right, idx, -1), axis=2)
    first_any = np.minimum.accumulate(np.where(lung_slab, idx, w)[:, :, ::-1], axis=2)[:, :, ::-1]
    first_left = np.minimum.accumulate(np.where(left, idx, w)[:, :, ::-1], axis=2)[:, :, ::-1]
    between = (last_right >= 0) & (last_any == last_right) & (first_left < w) & (first_any == first_left)
    between &= (first_left - last_right) * spacing[2] <= max_gap_mm
    return between & ~lung_slab


def find_space(lungs: np.ndarray, airway: np.ndarray, bone: np.ndarray, body: np.ndarray,
               spacing: tuple[float, float, float], spine: np.ndarray, midline: np.ndarray) -> np.ndarray:
    """The mediastinal space: between the two lungs, in front of the vertebral bodies, not airway or bone."""
    space = between_lungs(lungs, midline, spacing) & body & ~lungs & ~airway & ~bone
    h = lungs.shape[1]
    ys = np.arange(h)[None, :, None]
    behind = ys > np.where(np.isfinite(spine[:, 0]), spine[:, 0], h + 1)[:, None, None]
    return space & ~behind


# ---------------------------------------------------------------------------------------------------------
# organs
# ---------------------------------------------------------------------------------------------------------


def find_heart(smooth: np.ndarray, space: np.ndarray, spacing: tuple[float, float, float],
               body: np.ndarray) -> np.ndarray:
    """The thickest soft-tissue (or contrast) blob of the space between the lungs, plus a 4 mm rim.

    An opening with a ball of about half the blob's inscribed radius (at most 24 mm) keeps the heart and drops the
    great vessels; the blob must be at least 25 mm thick, in the lower three quarters of the space and in the
    anterior half of the body (the liver dome or the crura between the lung bases are neither).
    """
    heart = np.zeros(space.shape, dtype=bool)
    box = _bbox(space, margin=2)
    if box is None:
        return heart
    local_space = space[box]
    tissue = local_space & (smooth[box] > SOFT_HU)
    if not tissue.any():
        return heart
    depth = ndi.distance_transform_edt(tissue, sampling=spacing)
    zs = np.flatnonzero(local_space.any(axis=(1, 2)))
    top = zs[0] + int((zs[-1] - zs[0]) * 0.75) + 1
    lower = depth.copy()
    lower[top:] = 0
    # anterior half of the body, slice by slice
    body_y = body.sum(axis=2)
    centre_y = (body_y * np.arange(body.shape[1])).sum(axis=1) / np.maximum(body_y.sum(axis=1), 1)
    ys = np.arange(box[1].start, box[1].stop)[None, :, None]
    lower[np.broadcast_to(ys > centre_y[box[0]][:, None, None], lower.shape)] = 0
    peak = float(lower.max())
    if peak < 25.0:
        return heart
    radius = min(HEART_OPENING * peak, HEART_MAX_OPENING_MM)
    core = ndi.distance_transform_edt(~(depth >= radius), sampling=spacing) <= radius
    core &= tissue
    labels, _ = ndi.label(core)
    index = labels[np.unravel_index(int(np.argmax(lower)), lower.shape)]
    if index == 0:
        return heart
    core = labels == index
    heart[box] = core | (_dilate_mm(core, 4.0, spacing) & local_space)
    return heart


def find_esophagus(smooth: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, taken: np.ndarray,
                   below: np.ndarray, spine: np.ndarray, front: np.ndarray, airway: np.ndarray,
                   lungs: np.ndarray, midline: np.ndarray) -> np.ndarray:
    """An ~8 mm soft-tissue/air tube in front of the vertebral body, from the top of the scan to the diaphragm.

    Above the carina it lies just behind the trachea, 1 cm in front of the spine and slightly left; below the
    carina it drifts forward and left toward the hiatus (2.5 cm in front, 2 cm left at the lung bases). The prior
    position is snapped (by up to 6 mm) to where most non-fat tissue or air is.
    """
    d, h, w = smooth.shape
    esophagus = np.zeros(smooth.shape, dtype=bool)
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    if lung_slices.size == 0:
        return esophagus
    base, apex = int(lung_slices[0]), int(lung_slices[-1])
    xs3 = np.arange(w)[None, None, :]
    central = airway & (np.abs(xs3 - midline[:, None, None]) * spacing[2] <= 8.0)
    central_slices = np.flatnonzero(central.any(axis=(1, 2)))
    carina = int(central_slices[0]) if central_slices.size else base + int(0.65 * (apex - base))
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    radius, window = 8.0, 6.0
    size = (max(1, round(2 * radius / spacing[1])), max(1, round(2 * radius / spacing[2])))
    for z in range(base, d):
        if not np.isfinite(front[z]) or not np.isfinite(spine[z, 1]):
            continue
        drift = float(np.clip((carina - z) / max(carina - base, 1), 0.0, 1.0))
        cy = front[z] - (11.0 + 14.0 * drift) / spacing[1]
        cx = spine[z, 1] + (6.0 + 14.0 * drift) / spacing[2]
        trachea = airway[z] & (np.abs(ys - front[z]) * spacing[1] < 60.0)
        if z > carina and trachea.any():  # in the neck and upper chest: right behind the trachea
            cy = min(cy, float(np.nonzero(trachea)[0].max()) + radius / spacing[1])
        tissue = ((smooth[z] > -60.0) | (smooth[z] < -500.0)) & body[z] & ~taken[z] & ~below[z]
        offset = ((ys - cy) * spacing[1]) ** 2 + ((xs - cx) * spacing[2]) ** 2
        if not (tissue & (offset <= (radius + window) ** 2)).any():
            continue
        score = np.where(offset <= window ** 2, ndi.uniform_filter(tissue.astype(np.float32), size=size), -1.0)
        by, bx = np.unravel_index(int(np.argmax(score)), score.shape)
        esophagus[z] = (((ys - by) * spacing[1]) ** 2 + ((xs - bx) * spacing[2]) ** 2 <= radius ** 2) & tissue
    return esophagus


def find_thyroid(smooth: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, taken: np.ndarray,
                 airway: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Hyperdense tissue beside and in front of the trachea, from 1 cm below to 6 cm above the lung apices."""
    d, h, w = smooth.shape
    thyroid = np.zeros(smooth.shape, dtype=bool)
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    if lung_slices.size == 0 or not airway.any():
        return thyroid
    apex = int(lung_slices[-1])
    if (d - 1 - apex) * spacing[0] < 10.0:
        return thyroid  # the apices reach the top of the scan: the neck is not in view
    lo = max(0, apex - round(20.0 / spacing[0]))
    hi = min(d, apex + round(60.0 / spacing[0]) + 1)
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    for z in range(lo, hi):
        if not airway[z].any():
            continue
        labels2d, count = ndi.label(airway[z])
        sizes = np.bincount(labels2d.ravel())
        sizes[0] = 0
        ty, tx = np.nonzero(labels2d == int(np.argmax(sizes)))
        cy, cx = ty.mean(), tx.mean()
        distance = np.sqrt(((ys - cy) * spacing[1]) ** 2 + ((xs - cx) * spacing[2]) ** 2)
        near = (distance <= 32.0) & ((ys - cy) * spacing[1] <= 8.0)
        thyroid[z] = near & (smooth[z] > THYROID_HU) & (smooth[z] < 250.0) & body[z] & ~taken[z] & ~lungs[z]
    labels, count = ndi.label(thyroid)
    if count:
        sizes_ml = np.bincount(labels.ravel()) * _voxel_ml(spacing)
        sizes_ml[0] = 0
        thyroid = (sizes_ml >= 0.4)[labels]
    if thyroid.sum() * _voxel_ml(spacing) < 1.0:
        thyroid[:] = False
    return thyroid


def find_breast(smooth: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, lungs: np.ndarray,
                bone: np.ndarray, space: np.ndarray, midline: np.ndarray) -> np.ndarray:
    """Tissue anterior to the chest wall on a side whose anterior surface bulges in front of the midline."""
    _d, h, w = smooth.shape
    breast = np.zeros(smooth.shape, dtype=bool)
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    if lung_slices.size < 3:
        return breast
    wall = lungs | bone | space
    ys = np.arange(h)[:, None]
    xs = np.arange(w)
    for z in lung_slices:
        if not np.isfinite(midline[z]):
            continue
        has_body = body[z].any(axis=0)
        if not has_body.any():
            continue
        surface = np.where(has_body, np.argmax(body[z], axis=0), h).astype(np.float64)
        has_wall = wall[z].any(axis=0)
        wall_front = np.where(has_wall, np.argmax(wall[z], axis=0), -1).astype(np.float64)
        body_cols = np.flatnonzero(has_body)
        half = (body_cols[-1] - body_cols[0]) / 2.0
        m = round(midline[z])
        mid_lo, mid_hi = max(0, m - 2), min(w, m + 3)
        mid_surface = float(surface[mid_lo:mid_hi].min())
        for sign in (-1, 1):
            offset = (xs - midline[z]) * sign
            lateral = (offset >= 0.2 * half) & (offset <= 0.75 * half) & has_wall
            if not lateral.any():
                continue
            bulge = (mid_surface - surface[lateral].min()) * spacing[1]
            if bulge < 8.0:
                continue
            limit = np.where(lateral, wall_front - 8.0 / spacing[1], -1)
            breast[z] |= body[z] & (ys < limit[None, :]) & lateral[None, :]
    labels, count = ndi.label(breast)
    if count:
        sizes_ml = np.bincount(labels.ravel()) * _voxel_ml(spacing)
        sizes_ml[0] = 0
        breast = (sizes_ml >= 20.0)[labels]
    return breast


def find_abdomen(smooth: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, below: np.ndarray,
                 spine: np.ndarray) -> np.ndarray:
    """The abdominal cavity under the diaphragm: the soft-tissue wall ring closed and filled per slice, eroded."""
    if not below.any():
        return np.zeros(body.shape, dtype=bool)
    slices = np.flatnonzero(below.any(axis=(1, 2)))
    sub = slice(int(slices[0]), int(slices[-1]) + 1)
    ring = (smooth[sub] > -40.0) & body[sub]
    # close gaps of up to ~3 cm in the muscle ring (in plane), fill it, then drop the ~1 cm muscle wall
    reach = 15.0
    grown = ndi.distance_transform_edt(~ring, sampling=(1e6, spacing[1], spacing[2])) <= reach
    closed = ~(ndi.distance_transform_edt(grown, sampling=(1e6, spacing[1], spacing[2])) <= reach) | ring
    filled = _fill_slices(closed) & body[sub]
    inner = _plane_distance(filled, spacing) > 10.0
    # where the wall ring is open, fall back to the body minus 2.5 cm
    coverage = inner.sum(axis=(1, 2)) / np.maximum(body[sub].sum(axis=(1, 2)), 1)
    fallback = _plane_distance(body[sub], spacing) > 25.0
    inner = np.where((coverage < 0.25)[:, None, None], fallback, inner)
    abdomen = np.zeros(body.shape, dtype=bool)
    abdomen[sub] = inner & below[sub]
    # the back muscles behind the vertebral bodies are not abdomen
    h, w = body.shape[1:]
    ys = np.arange(h)[None, :, None]
    xs = np.arange(w)[None, None, :]
    spine_y = np.where(np.isfinite(spine[:, 0]), spine[:, 0], h + 1)[:, None, None]
    spine_x = np.where(np.isfinite(spine[:, 1]), spine[:, 1], -1e6)[:, None, None]
    back = (ys > spine_y) & (np.abs(xs - spine_x) * spacing[2] < 60.0)
    return abdomen & ~back


# ---------------------------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------------------------


def segment_grid(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Segment a canonical HU array on its own grid into the 10-region label map (uint8)."""
    hu = np.clip(np.asarray(hu, dtype=np.float32), -1024.0, 3071.0)
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    smooth = ndi.gaussian_filter(hu, sigma=[min(1.0, 1.5 / s) for s in spacing])
    body, air_labels, inner_ids = find_body(hu)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if not body.any():
        return labels
    lungs, lung_ids = find_lungs(hu, spacing, air_labels, inner_ids)
    midline = body_midline(body, lungs)
    airway = find_airway(hu, spacing, body, lungs, air_labels, lung_ids, midline)
    lungs &= ~airway
    bone, spine, front = find_bone(hu, spacing, body, lungs, midline)
    bone &= ~airway
    space = find_space(lungs, airway, bone, body, spacing, spine, midline)
    heart = find_heart(smooth, space, spacing, body)
    below = find_below_diaphragm(lungs, body, heart)
    space &= ~below
    heart &= ~below
    taken = lungs | airway | bone | heart
    esophagus = find_esophagus(smooth, spacing, body, taken, below, spine, front, airway, lungs, midline)
    taken |= esophagus
    thyroid = find_thyroid(smooth, spacing, body, taken, airway, lungs)
    taken |= thyroid
    breast = find_breast(smooth, spacing, body, lungs, bone, space, midline) & ~taken
    abdomen = find_abdomen(smooth, spacing, body, below, spine)
    pleura = ndi.binary_dilation(lungs, iterations=1) & body & ~below & ~taken
    mediastinum = space & ~taken
    # paint from the lowest to the highest priority
    for name, mask in (("abdomen", abdomen), ("breast", breast), ("mediastinum", mediastinum), ("pleura", pleura),
                       ("thyroid", thyroid), ("esophagus", esophagus), ("heart", heart), ("lung", lungs),
                       ("trachea and bronchi", airway), ("bone", bone)):
        labels[mask] = REGION_ID[name]
    return labels


def segment_array(hu: np.ndarray, spacing: tuple[float, float, float],
                  work_spacing_mm: float = WORK_SPACING_MM) -> np.ndarray:
    """Segment a canonical HU array: downsample to the working grid, segment, copy labels back (nearest)."""
    factors = block_factors(spacing, work_spacing_mm)
    small = block_mean(hu, factors)
    work = tuple(s * f for s, f in zip(spacing, factors, strict=True))
    labels = segment_grid(small, work)  # type: ignore[arg-type]
    return upsample_labels(labels, factors, tuple(hu.shape))  # type: ignore[arg-type]
