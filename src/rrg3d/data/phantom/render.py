"""Render a phantom :class:`Case` as a chest CT in HU, a 10-region label map and (optionally) a PET in SUV.

Geometry is physical: structures are placed in millimetres in a patient frame centred on the chest (x patient
right→left, y anterior→posterior, z inferior→superior) and sampled on the case's grid, so any output shape
(128×128×64 up to the ``ctrate`` 240×480×480) shows the same anatomy. Arrays are canonical ``[D, H, W]``
(D along z, H along y, W along x). Shapes are evaluated only inside their bounding boxes, which keeps a case
at 64×128×128 well under a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from rrg3d.data.phantom.model import LOBES, REGIONS, Case, Finding

REGION_ID = {name: index + 1 for index, name in enumerate(REGIONS)}

HU = {
    "air": -1000.0, "fat": -100.0, "muscle": 50.0, "lung": -860.0, "blood": 42.0, "myocardium": 45.0,
    "bone": 420.0, "cortex": 750.0, "marrow": 220.0, "disc": 80.0, "liver": 58.0, "spleen": 48.0,
    "stomach_wall": 40.0, "fluid": 12.0, "thyroid": 95.0, "gland": 25.0, "node": 38.0, "wall": 35.0,
    "metal": 3000.0, "calcium": 1200.0,  # dense calcified plaque (well above cortical bone's 750)
}


@dataclasses.dataclass
class RenderedCase:
    """The volumes of one case on one grid (canonical ``[D, H, W]``) plus the grid's geometry."""

    ct: np.ndarray  # int16 HU
    regions: np.ndarray  # uint8, 0 = outside every region, i + 1 = REGIONS[i]
    pet: np.ndarray | None  # float32 SUVbw, same grid
    spacing: tuple[float, float, float]  # (sd, sh, sw) mm
    origin_lps: tuple[float, float, float]  # LPS position of voxel (0, 0, 0)


class Grid:
    """Voxel-centre coordinates (mm) of a ``[D, H, W]`` grid centred on the patient frame's origin."""

    def __init__(self, shape: Sequence[int], fov_mm: Sequence[float]) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(f) / n for f, n in zip(fov_mm, self.shape, strict=True))
        self.z, self.y, self.x = (
            (np.arange(n, dtype=np.float32) + 0.5) * s - f / 2.0
            for n, s, f in zip(self.shape, self.spacing, fov_mm, strict=True)
        )

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray,
                                                                      np.ndarray] | None:
        """Slices of the voxels inside the mm box ``[lo, hi]`` (z, y, x) and their broadcastable coordinates."""
        slices = []
        for axis, (low, high) in zip((self.z, self.y, self.x), zip(lo, hi, strict=True), strict=True):
            start = int(np.searchsorted(axis, low, side="left"))
            stop = int(np.searchsorted(axis, high, side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        zz = self.z[slices[0]][:, None, None]
        yy = self.y[slices[1]][None, :, None]
        xx = self.x[slices[2]][None, None, :]
        return tuple(slices), zz, yy, xx

    def full(self) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
        return self.box((-1e9,) * 3, (1e9,) * 3)  # type: ignore[return-value]


class Canvas:
    """CT (HU), region ids and PET (SUV) painted together, shape by shape, on one :class:`Grid`."""

    def __init__(self, grid: Grid, pet: bool) -> None:
        self.grid = grid
        self.ct = np.full(grid.shape, HU["air"], dtype=np.float32)
        self.regions = np.zeros(grid.shape, dtype=np.uint8)
        self.pet = np.zeros(grid.shape, dtype=np.float32) if pet else None

    def paint(self, where: tuple[slice, ...], mask: np.ndarray, hu: float | np.ndarray | None = None,
              region: str | None = None, suv: float | None = None, within: np.ndarray | None = None) -> None:
        """Set HU, region and SUV inside ``mask`` (booleans over the ``where`` box); ``None`` leaves a layer as is."""
        if within is not None:
            mask = mask & within[where]
        if not mask.any():
            return
        if hu is not None:
            target = self.ct[where]
            target[mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, mask.shape)[mask]
        if region is not None:
            self.regions[where][mask] = REGION_ID[region]
        if suv is not None and self.pet is not None:
            self.pet[where][mask] = suv

    # -- shapes (each returns (where, mask) or None when outside the grid) ----------------------------------
    def _rho(self, center: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None
             ) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Normalised ellipsoidal radius (1 on the surface) over the ellipsoid's bounding box."""
        c = np.asarray(center, dtype=np.float32)
        r = np.asarray(radii, dtype=np.float32)
        reach = float(r.max()) if rotation is not None else r
        found = self.grid.box(c - reach, c + reach)
        if found is None:
            return None
        where, zz, yy, xx = found
        dz, dy, dx = zz - c[0], yy - c[1], xx - c[2]
        if rotation is not None:
            m = rotation.astype(np.float32)
            dz, dy, dx = (m[i, 0] * dz + m[i, 1] * dy + m[i, 2] * dx for i in range(3))
        return where, np.sqrt((dz / r[0]) ** 2 + (dy / r[1]) ** 2 + (dx / r[2]) ** 2)

    def ellipsoid(self, center: Sequence[float], radii: Sequence[float],
                  rotation: np.ndarray | None = None) -> tuple[tuple[slice, ...], np.ndarray] | None:
        found = self._rho(center, radii, rotation)
        return None if found is None else (found[0], found[1] <= 1.0)

    def ellipsoid_shell(self, center: Sequence[float], radii: Sequence[float], inner: float,
                        rotation: np.ndarray | None = None) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """The part of an ellipsoid outside the same ellipsoid scaled by ``inner`` (< 1)."""
        found = self._rho(center, radii, rotation)
        return None if found is None else (found[0], (found[1] <= 1.0) & (found[1] > inner))

    def tube(self, points: Sequence[Sequence[float]], radius: float | Sequence[float],
             inner: float = 0.0) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Voxels within ``radius`` of a polyline (z, y, x mm); a shell when ``inner`` > 0."""
        pts = np.asarray(points, dtype=np.float32)
        radii = np.broadcast_to(np.asarray(radius, dtype=np.float32), (len(pts),))
        reach = float(radii.max())
        found = self.grid.box(pts.min(axis=0) - reach, pts.max(axis=0) + reach)
        if found is None:
            return None
        where, zz, yy, xx = found
        best = np.full(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), np.inf, dtype=np.float32)
        best_r = np.zeros_like(best)
        for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:], strict=True):
            ab = b - a
            length2 = float(ab @ ab) or 1e-6
            t = np.clip(((zz - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (xx - a[2]) * ab[2]) / length2, 0, 1)
            d2 = (zz - a[0] - t * ab[0]) ** 2 + (yy - a[1] - t * ab[1]) ** 2 + (xx - a[2] - t * ab[2]) ** 2
            closer = d2 < best
            best = np.where(closer, d2, best)
            best_r = np.where(closer, ra + t * (rb - ra), best_r)
        distance = np.sqrt(best)
        mask = distance <= best_r
        if inner > 0:
            mask &= distance > best_r - inner
        return where, mask


# ---------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """Per-case anatomical parameters (mm), drawn once and shared by anatomy and findings."""

    body_a: float  # half width (x)
    body_b: float  # half depth (y)
    fat: float  # subcutaneous fat thickness
    diaphragm_right: float  # dome height (z) of the right hemidiaphragm
    diaphragm_left: float
    heart_center: np.ndarray
    heart_radii: np.ndarray
    heart_rotation: np.ndarray
    lung_top: float
    carina: np.ndarray
    hila: dict[str, np.ndarray]
    aorta: np.ndarray  # polyline
    spine_y: float


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Rotation in (z, y, x) coordinates: yaw about z, then pitch about y."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    about_z = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])
    about_y = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    return about_y @ about_z


def make_layout(case: Case, rng: np.random.Generator) -> Layout:
    a = case.anatomy.body_width_mm / 2
    b = a * rng.uniform(0.66, 0.74)
    heart_scale = case.anatomy.heart_scale
    heart_center = np.array([-28.0, -b * 0.22, 24.0]) + rng.normal(0, 4, 3)
    heart_center[2] += (heart_scale - 1.0) * 40.0  # a big heart extends toward the left lateral wall
    heart_radii = np.array([52.0, 42.0, 58.0]) * heart_scale * rng.uniform(0.95, 1.05)
    spine_y = b * 0.72
    carina = np.array([62.0, -2.0, 0.0]) + rng.normal(0, 2, 3)
    hila = {"right": carina + np.array([-18.0, 12.0, -48.0]), "left": carina + np.array([-24.0, 16.0, 46.0])}
    aorta = np.array([
        [heart_center[0] + 20, -b * 0.22, 6.0],
        [78.0, -b * 0.12, 4.0],
        [92.0, 0.0, 12.0],
        [80.0, spine_y - 38, 24.0],
        [40.0, spine_y - 30, 24.0],
        [-160.0, spine_y - 34, 18.0],
    ], dtype=np.float32)
    return Layout(
        body_a=a, body_b=b, fat=float(rng.uniform(8, 26)),
        diaphragm_right=float(rng.uniform(-75, -55)), diaphragm_left=float(rng.uniform(-90, -70)),
        heart_center=heart_center, heart_radii=heart_radii,
        heart_rotation=_rotation(math.radians(rng.uniform(25, 40)), math.radians(rng.uniform(15, 30))),
        lung_top=float(rng.uniform(115, 135)), carina=carina, hila=hila, aorta=aorta, spine_y=spine_y,
    )


def _diaphragm(layout: Layout, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """z of the diaphragm under each (y, x): two domes, the right one higher, sloping down posteriorly."""
    right = layout.diaphragm_right - 0.004 * ((xx + 75) ** 2 + (yy - 5) ** 2 * 0.7)
    left = layout.diaphragm_left - 0.004 * ((xx - 75) ** 2 + (yy - 5) ** 2 * 0.7)
    return np.maximum(right, left) - np.clip(yy, 0, None) * 0.25


def body_masks(canvas: Canvas, layout: Layout) -> dict[str, np.ndarray]:
    """Full-grid masks of the body, the inner thoracic/abdominal cavity, the lungs and the lung lobes."""
    grid = canvas.grid
    zz, yy, xx = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    taper = 1.0 - 0.12 * np.clip((zz - 60) / 90, 0, 1)
    body = (xx / (layout.body_a * taper)) ** 2 + (yy / layout.body_b) ** 2 <= 1.0
    inner_a, inner_b = layout.body_a - layout.fat - 14, layout.body_b - layout.fat - 12
    cavity = (xx / (inner_a * taper)) ** 2 + ((yy - 4) / inner_b) ** 2 <= 1.0
    cavity &= yy < layout.spine_y - 10
    below = zz < _diaphragm(layout, yy, xx)
    apex = layout.lung_top
    lung_shape = []
    for cx in (-inner_a * 0.5, inner_a * 0.5):
        rx = inner_a * 0.52 * np.clip(1.0 - np.clip((zz - 40) / (apex - 40), 0, 1) ** 2 * 0.7, 0.2, 1)
        ry = inner_b * 0.92 * np.clip(1.0 - np.clip((zz - 40) / (apex - 40), 0, 1) ** 2 * 0.6, 0.25, 1)
        shape = ((xx - cx) / rx) ** 2 + ((yy - 6) / ry) ** 2 <= 1.0
        corridor = np.abs(xx - 6) < 20 + 18 * np.clip((40 - zz) / 80, 0, 1) * (yy < 0)  # mediastinum
        lung_shape.append(shape & (zz < apex) & ~below & cavity & ~corridor)
    lungs = {"right": lung_shape[0], "left": lung_shape[1]}
    # the oblique fissure separates the lower lobes (posterior-inferior); the horizontal one the right middle lobe
    lower = zz < 35 + 0.9 * (yy - 10)
    lobes = {
        "right lower lobe": lungs["right"] & lower,
        "right middle lobe": lungs["right"] & ~lower & (zz < 25) & (yy < 20),
        "left lower lobe": lungs["left"] & lower,
    }
    lobes["right upper lobe"] = lungs["right"] & ~lobes["right lower lobe"] & ~lobes["right middle lobe"]
    lobes["left upper lobe"] = lungs["left"] & ~lobes["left lower lobe"]
    return {"body": np.broadcast_to(body, grid.shape), "cavity": np.broadcast_to(cavity, grid.shape),
            "below": np.broadcast_to(below, grid.shape), "right": lungs["right"], "left": lungs["left"],
            **lobes}


def paint_anatomy(canvas: Canvas, case: Case, layout: Layout, masks: dict[str, np.ndarray],
                  rng: np.random.Generator) -> None:
    grid = canvas.grid
    full = grid.full()[0]
    zz, yy, xx = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    body, cavity, below = masks["body"], masks["cavity"], masks["below"]
    canvas.paint(full, body, HU["fat"], suv=0.35)
    muscle = body & ~cavity & np.broadcast_to(
        (xx / (layout.body_a - layout.fat)) ** 2 + (yy / (layout.body_b - layout.fat)) ** 2 <= 1.0, grid.shape)
    canvas.paint(full, muscle, HU["muscle"], suv=0.7)
    thorax = cavity & ~below & np.broadcast_to(zz < layout.lung_top, grid.shape)
    canvas.paint(full, thorax, HU["fat"] + 15, region="mediastinum", suv=0.5)
    canvas.paint(full, cavity & np.broadcast_to(zz >= layout.lung_top, grid.shape), HU["muscle"], suv=0.7)
    abdomen = cavity & below
    canvas.paint(full, abdomen, HU["fat"] + 20, region="abdomen", suv=0.6)
    # upper abdomen organs: liver (right), stomach (left anterior, air fundus), spleen (left posterior)
    liver = abdomen & np.broadcast_to((xx < 40 - 0.3 * yy) & (yy < layout.spine_y - 25), grid.shape)
    canvas.paint(full, liver, HU["liver"], suv=2.2)
    stomach = canvas.ellipsoid((layout.diaphragm_left - 35, -20.0, 70.0), (40.0, 45.0, 40.0))
    if stomach:
        where, mask = stomach
        canvas.paint(where, mask, HU["stomach_wall"], suv=1.4, within=abdomen)
        fundus = mask & (zz[where[0]] > layout.diaphragm_left - 35)
        canvas.paint(where, fundus, HU["air"], within=abdomen)
    spleen = canvas.ellipsoid((layout.diaphragm_left - 30, 55.0, 100.0), (45.0, 35.0, 22.0))
    if spleen:
        canvas.paint(*spleen, HU["spleen"], suv=1.8, within=abdomen)
    # lungs with parenchymal texture
    lungs = masks["right"] | masks["left"]
    texture = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), 1.2) * 40
    canvas.paint(full, lungs, HU["lung"] + texture, region="lung", suv=0.4)
    # breast tissue (female): anterior to the pectoral muscles, fatty with glandular tissue
    if case.anatomy.sex == "female":
        for cx in (-layout.body_a * 0.45, layout.body_a * 0.45):
            breast = canvas.ellipsoid((35.0, -layout.body_b + 14, cx), (45.0, 28.0, 45.0))
            if breast:
                where, mask = breast
                mask = mask & (yy[:, where[1]] < -layout.body_b * 0.75)
                gland = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 1.5) > 0.3
                canvas.paint(where, mask, np.where(gland, HU["gland"], HU["fat"]), region="breast", suv=0.8)
    # bones: spine (vertebral bodies and discs), sternum, ribs
    spine_top, spine_bottom = float(grid.z[-1]) + 10, float(grid.z[0]) - 10
    vertebra = canvas.tube([(spine_bottom, layout.spine_y, 0.0), (spine_top, layout.spine_y, 0.0)], 19.0)
    if vertebra:
        where, mask = vertebra
        disc = (np.mod(zz[where[0]] + 7, 30.0) < 6)
        canvas.paint(where, mask, np.where(disc, HU["disc"], HU["marrow"]), region="bone", suv=1.5)
        canvas.paint(*canvas.tube([(spine_bottom, layout.spine_y, 0.0), (spine_top, layout.spine_y, 0.0)], 19.0,
                                  inner=3.0), HU["cortex"], region="bone")
    arch = canvas.tube([(spine_bottom, layout.spine_y + 28, 0.0), (spine_top, layout.spine_y + 28, 0.0)], 11.0)
    if arch:
        canvas.paint(*arch, HU["bone"], region="bone")
    sternum = canvas.tube([(-20.0, -layout.body_b + layout.fat + 10, 0.0),
                           (110.0, -layout.body_b + layout.fat + 14, 0.0)], 8.0)
    if sternum:
        canvas.paint(*sternum, HU["bone"], region="bone", suv=1.0)
    rib_ring_a, rib_ring_b = layout.body_a - layout.fat - 8, layout.body_b - layout.fat - 6
    radial = np.sqrt((xx / rib_ring_a) ** 2 + (yy / rib_ring_b) ** 2)
    ring = np.abs(radial - 1.0) * min(rib_ring_a, rib_ring_b) < 5.0
    rib_slope = 0.18 * (yy + layout.body_b)  # ribs descend anteriorly
    phase = np.mod(zz + rib_slope - layout.diaphragm_left, 26.0)
    ribs = ring & (phase < 9.0) & (zz > layout.diaphragm_left - 70) & (zz < layout.lung_top + 5)
    ribs &= ~((np.abs(xx) < 22) & (yy < 0))  # costal cartilage gap next to the sternum
    canvas.paint(full, np.broadcast_to(ribs, grid.shape) & body, HU["bone"], region="bone", suv=1.0)
    # pleura: the thin layer around each lung
    for side in ("right", "left"):
        shell = ndimage.binary_dilation(masks[side], iterations=1) & ~masks[side] & body & ~below
        canvas.paint(full, shell & (canvas.regions != REGION_ID["bone"]), region="pleura")
    paint_mediastinum(canvas, case, layout, rng)
    paint_airways(canvas, layout, lungs, rng)
    paint_lung_vessels(canvas, layout, lungs, rng)
    if case.anatomy.thyroid_in_view:
        for cx in (-17.0, 17.0):
            lobe = canvas.ellipsoid((layout.lung_top + 10, -18.0, cx), (22.0, 11.0, 9.0))
            if lobe:
                canvas.paint(*lobe, HU["thyroid"], region="thyroid", suv=1.2, within=body)


def paint_mediastinum(canvas: Canvas, case: Case, layout: Layout, rng: np.random.Generator) -> None:
    """Heart (with epicardial fat or effusion), great vessels, esophagus and small normal nodes."""
    effusion = next((f for f in case.findings if f.label == "Pericardial effusion"), None)
    radii = layout.heart_radii
    fat_rim = 4.0 if effusion is None else 2.0
    rim = canvas.ellipsoid(layout.heart_center, radii + fat_rim + (effusion.size_mm if effusion else 0.0),
                           layout.heart_rotation)
    if rim:
        canvas.paint(*rim, HU["fat"] - 10, region="heart", suv=0.5)
        if effusion is not None:
            fluid = canvas.ellipsoid(layout.heart_center, radii + effusion.size_mm, layout.heart_rotation)
            if fluid:
                canvas.paint(*fluid, HU["fluid"], region="heart", suv=0.4)
    heart = canvas.ellipsoid(layout.heart_center, radii, layout.heart_rotation)
    myocardial_suv = float(rng.uniform(2.0, 9.0))  # drawn always, so the anatomy stream is the same for every case
    if case.pet is not None:
        myocardial_suv = case.pet.myocardial_suv
    if heart:
        canvas.paint(*heart, HU["blood"], region="heart", suv=1.7)
    wall = canvas.ellipsoid_shell(layout.heart_center, radii * 0.72, 0.7, layout.heart_rotation)
    if wall:  # the left ventricular myocardium carries the physiological FDG uptake
        canvas.paint(*wall, HU["myocardium"], suv=myocardial_suv)
    aorta = canvas.tube(layout.aorta, [15.0, 15.0, 13.0, 12.0, 12.0, 11.0])
    if aorta:
        canvas.paint(*aorta, HU["blood"], region="mediastinum", suv=1.6)
    trunk = [layout.heart_center + np.array([18.0, -14.0, 14.0]), layout.carina + np.array([-14.0, -22.0, 10.0])]
    for hilum in layout.hila.values():
        artery = canvas.tube([trunk[0], trunk[1], hilum + np.array([0.0, -6.0, 0.0])], [13.0, 12.0, 9.0])
        if artery:
            canvas.paint(*artery, HU["blood"], region="mediastinum", suv=1.6)
    esophagus_path = [(canvas.grid.z[-1] + 5, layout.spine_y - 32, 8.0), (layout.carina[0], layout.spine_y - 34, 12.0),
                      (layout.diaphragm_left - 5, layout.spine_y - 45, 22.0), (layout.diaphragm_left - 30, 5.0, 55.0)]
    esophagus = canvas.tube(esophagus_path, 8.0)
    if esophagus:
        canvas.paint(*esophagus, HU["wall"] + 5, region="esophagus", suv=1.3)
    for _ in range(int(rng.integers(3, 7))):  # normal small nodes
        center = layout.carina + rng.normal(0, 12, 3) + np.array([5.0, -10.0, 0.0])
        node = canvas.ellipsoid(center, rng.uniform(2.5, 4.0, 3))
        if node:
            where, mask = node
            canvas.paint(where, mask & (canvas.regions[where] == REGION_ID["mediastinum"]), HU["node"], suv=0.9)


def _branch(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float, radius: float,
            depth: int, out: list[tuple[np.ndarray, np.ndarray, float, float]]) -> None:
    """A random binary tree of segments (start, end, radius at start, radius at end)."""
    direction = direction / (np.linalg.norm(direction) + 1e-6)
    end = start + direction * length
    out.append((start, end, radius, radius * 0.8))
    if depth == 0:
        return
    for _ in range(2):
        turn = direction + rng.normal(0, 0.55, 3)
        _branch(rng, end, turn, length * 0.72, radius * 0.72, depth - 1, out)


def airway_tree(layout: Layout, rng: np.random.Generator, depth: int = 3) -> list[tuple]:
    """Segmental bronchi beyond each main bronchus (shared by normal anatomy and airway findings)."""
    segments: list[tuple] = []
    for side, hilum in layout.hila.items():
        lateral = -1.0 if side == "right" else 1.0
        for direction in ((30.0, 5.0, lateral * 25.0), (-35.0, 20.0, lateral * 20.0), (-10.0, -30.0, lateral * 25.0)):
            _branch(rng, hilum, np.asarray(direction, dtype=np.float64), 28.0, 4.0, depth, segments)
    return segments


def paint_airways(canvas: Canvas, layout: Layout, lungs: np.ndarray, rng: np.random.Generator,
                  wall: float = 1.6) -> None:
    """Trachea and main bronchi (the airway region), then the segmental tree inside the lungs."""
    top = float(canvas.grid.z[-1]) + 5
    trachea = [(top, -16.0, 0.0), tuple(layout.carina)]
    for path, radius in ([trachea, 9.5], [[layout.carina, layout.hila["right"]], 6.5],
                         [[layout.carina, layout.hila["left"]], 6.0]):
        tube = canvas.tube(path, radius + 2.0)
        if tube:
            canvas.paint(*tube, HU["wall"], region="trachea and bronchi", suv=0.8)
        lumen = canvas.tube(path, radius)
        if lumen:
            canvas.paint(*lumen, HU["air"], region="trachea and bronchi")
    for start, end, r0, r1 in airway_tree(layout, rng):
        outer = canvas.tube([start, end], [r0 + wall, r1 + wall])
        if outer:
            canvas.paint(*outer, HU["wall"] - 20, region="trachea and bronchi", within=lungs)
        inner = canvas.tube([start, end], [r0, r1])
        if inner:
            canvas.paint(*inner, HU["air"], region="trachea and bronchi", within=lungs)


def paint_lung_vessels(canvas: Canvas, layout: Layout, lungs: np.ndarray, rng: np.random.Generator) -> None:
    for hilum in layout.hila.values():
        lateral = -1.0 if hilum[2] < 0 else 1.0
        segments: list[tuple] = []
        for direction in ((35.0, 15.0, lateral * 20.0), (-40.0, 25.0, lateral * 15.0), (-5.0, -25.0, lateral * 30.0),
                          (5.0, 40.0, lateral * 10.0)):
            _branch(rng, hilum + np.array([0.0, -4.0, 0.0]), np.asarray(direction), 30.0, 3.0, 3, segments)
        for start, end, r0, r1 in segments:
            vessel = canvas.tube([start, end], [r0, r1])
            if vessel:
                canvas.paint(*vessel, HU["blood"] - 10, suv=1.0, within=lungs)


# ---------------------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------------------


def _random_point(mask: np.ndarray, grid: Grid, rng: np.random.Generator, margin: np.ndarray | None = None
                  ) -> np.ndarray | None:
    """The mm coordinate of a random voxel of ``mask`` (optionally restricted to ``margin``)."""
    candidates = np.flatnonzero(mask if margin is None else (mask & margin))
    if candidates.size == 0:
        candidates = np.flatnonzero(mask)
        if candidates.size == 0:
            return None
    d, h, w = np.unravel_index(int(rng.choice(candidates)), mask.shape)
    return np.array([grid.z[d], grid.y[h], grid.x[w]], dtype=np.float64)


def _lobe_mask(masks: dict[str, np.ndarray], finding: Finding) -> np.ndarray:
    if finding.lobes:
        out = np.zeros_like(masks["right"])
        for lobe in finding.lobes:
            out |= masks[lobe]
        return out
    if finding.side in ("right", "left"):
        return masks[finding.side]
    return masks["right"] | masks["left"]


def _sides(finding: Finding) -> list[str]:
    return ["right", "left"] if finding.side in (None, "bilateral") else [finding.side]


def _blob_field(shape: Sequence[int], rng: np.random.Generator, sigma_vox: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma_vox)
    return field / (field.std() + 1e-6)


def render_findings(canvas: Canvas, case: Case, layout: Layout, masks: dict[str, np.ndarray],
                    rng: np.random.Generator) -> None:
    """Paint every finding of the case (lung-filling patterns first, focal lesions and devices last)."""
    order = {label: i for i, label in enumerate([
        "Emphysema", "Mosaic attenuation pattern", "Interlobular septal thickening", "Lung opacity",
        "Pulmonary fibrotic sequela", "Bronchiectasis", "Peribronchial thickening", "Consolidation", "Atelectasis",
        "Pleural effusion", "Lung nodule", "Lymphadenopathy", "Hiatal hernia", "Arterial wall calcification",
        "Coronary artery wall calcification", "Cardiomegaly", "Pericardial effusion", "Medical material"])}
    for finding in sorted(case.findings, key=lambda f: order[f.label]):
        RENDERERS[finding.label](canvas, finding, layout, masks, rng)


def _emphysema(canvas, finding, layout, masks, rng):
    grid = canvas.grid
    lungs = masks["right"] | masks["left"]
    full = grid.full()[0]
    zz = grid.z[:, None, None]
    fraction = {"mild": 0.12, "moderate": 0.25, "severe": 0.4}[finding.severity or "mild"]
    upper = np.broadcast_to(zz > 0, grid.shape)
    field = _blob_field(grid.shape, rng, 1.0 if finding.kind == "centrilobular" else 0.7)
    threshold = np.quantile(field[lungs], 1 - fraction * 1.6) if lungs.any() else 0
    holes = lungs & (field > threshold) & (upper | (field > threshold + 0.6))
    if finding.kind == "paraseptal":
        interior = ndimage.binary_erosion(lungs, iterations=max(1, round(10 / grid.spacing[1])))
        holes &= ~interior
    canvas.paint(full, holes, HU["air"] + 25)


def _mosaic(canvas, finding, layout, masks, rng):
    grid = canvas.grid
    lungs = masks["right"] | masks["left"]
    field = _blob_field(grid.shape, rng, 25.0 / min(grid.spacing))
    contrast = {"mild": 110.0, "moderate": 150.0, "severe": 190.0}[finding.severity or "mild"]
    full = grid.full()[0]
    canvas.paint(full, lungs & (field > 0.2), canvas.ct + contrast)
    canvas.paint(full, lungs & (field < -0.2), canvas.ct - contrast * 0.5)


def _septal(canvas, finding, layout, masks, rng):
    """A polygonal network of thickened septa in the lung periphery, drawn with partial-volume weighting."""
    grid = canvas.grid
    lungs = masks["right"] | masks["left"]
    zz, yy, xx = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    voxel = min(grid.spacing)
    cell = max(14.0, 4.0 * voxel)
    half = voxel / 2
    warp = _blob_field(grid.shape, rng, 4.0) * 2.5
    lines = ((np.abs(np.mod(xx + warp, cell) - cell / 2) > cell / 2 - half)
             | (np.abs(np.mod(yy - warp, cell) - cell / 2) > cell / 2 - half)
             | (np.abs(np.mod(zz + warp, cell) - cell / 2) > cell / 2 - half))
    depth = {"mild": 15.0, "moderate": 22.0, "severe": 30.0}[finding.severity or "mild"]
    interior = ndimage.binary_erosion(lungs, iterations=max(1, round(depth / grid.spacing[1])))
    periphery = lungs & ~interior & (np.broadcast_to(zz, grid.shape) < 60)
    weight = min(1.0, 2.0 / voxel)  # a 2 mm septum fills this fraction of a voxel
    canvas.paint(grid.full()[0], periphery & lines, canvas.ct + (-100.0 - canvas.ct) * weight)


def _ground_glass(canvas, finding, layout, masks, rng):
    grid = canvas.grid
    target = _lobe_mask(masks, finding)
    field = _blob_field(grid.shape, rng, 9.0 / min(grid.spacing))
    fraction = {"mild": 0.25, "moderate": 0.45, "severe": 0.7}[finding.severity or "mild"]
    if not target.any():
        return
    threshold = np.quantile(field[target], 1 - fraction)
    patch = target & (field > threshold)
    canvas.paint(grid.full()[0], patch, np.clip(canvas.ct + 300, -650, -450))


def _fibrotic(canvas, finding, layout, masks, rng):
    """Subpleural fibrotic bands with a little surrounding reticulation (parenchymal distortion)."""
    grid = canvas.grid
    for lobe in finding.lobes or ["right lower lobe"]:
        mask = masks[lobe]
        interior = ndimage.binary_erosion(mask, iterations=max(1, round(12 / grid.spacing[1])))
        for _ in range(int(rng.integers(3, 6))):
            center = _random_point(mask, grid, rng, mask & ~interior)
            if center is None:
                break
            direction = rng.normal(0, 1, 3)
            direction /= np.linalg.norm(direction)
            length = float(rng.uniform(25, 45))
            ends = [center - direction * length / 2, center + direction * length / 2]
            haze = canvas.tube(ends, 7.0)
            if haze:
                where, hmask = haze
                canvas.paint(where, hmask, np.maximum(canvas.ct[where], -600.0), within=mask)
            band = canvas.tube(ends, 2.8)
            if band:
                canvas.paint(*band, -60.0, within=mask)


def _airway_disease(canvas, finding, layout, masks, rng, dilate: bool):
    """Bronchiectasis (dilated lumen) or peribronchial thickening (thick wall) along the segmental bronchi."""
    target = _lobe_mask(masks, finding)
    tree_rng = np.random.default_rng(int(rng.integers(0, 2**31)))
    grid = canvas.grid
    for _ in range(3):  # extra, visible bronchi running into the affected lobes
        center = _random_point(target, grid, rng)
        if center is None:
            return
        hilum = layout.hila["right" if center[2] < 0 else "left"]
        direction = center - hilum
        segments: list[tuple] = []
        _branch(tree_rng, hilum, direction, float(np.linalg.norm(direction)) * 0.6, 4.5, 2, segments)
        for start, end, r0, r1 in segments:
            if dilate:
                radius = [max(r0 * 2.0, 4.5), max(r1 * 2.2, 4.0)]
                wall = canvas.tube([start, end], [radius[0] + 1.8, radius[1] + 1.8])
                if wall:
                    canvas.paint(*wall, HU["wall"] - 10, region="trachea and bronchi", within=target)
                lumen = canvas.tube([start, end], radius)
                if lumen:
                    canvas.paint(*lumen, HU["air"], region="trachea and bronchi", within=target)
            else:
                wall = canvas.tube([start, end], [r0 + 4.0, r1 + 3.5])
                if wall:
                    canvas.paint(*wall, HU["wall"] + 5, region="trachea and bronchi", within=target)
                lumen = canvas.tube([start, end], [max(r0 * 0.8, 1.5), max(r1 * 0.8, 1.2)])
                if lumen:
                    canvas.paint(*lumen, HU["air"], region="trachea and bronchi", within=target)


def _bronchiectasis(canvas, finding, layout, masks, rng):
    _airway_disease(canvas, finding, layout, masks, rng, dilate=True)


def _peribronchial(canvas, finding, layout, masks, rng):
    _airway_disease(canvas, finding, layout, masks, rng, dilate=False)


def _consolidation(canvas, finding, layout, masks, rng):
    grid = canvas.grid
    lobe = masks[finding.lobes[0]] if finding.lobes else _lobe_mask(masks, finding)
    center = _random_point(lobe, grid, rng)
    if center is None:
        return
    radius = (finding.size_mm or 50.0) / 2
    region = canvas.ellipsoid(center, (radius, radius * 0.8, radius * 0.9))
    if not region:
        return
    where, mask = region
    mask = mask & lobe[where]
    canvas.paint(where, mask, 35.0, suv=finding.suv_max)
    for _ in range(3):  # air bronchograms
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        bronchus = canvas.tube([center - direction * radius * 0.6, center + direction * radius * 0.6], 2.5)
        if bronchus:
            b_where, b_mask = bronchus
            canvas.paint(b_where, b_mask, HU["air"] + 100, within=lobe)


def _atelectasis(canvas, finding, layout, masks, rng):
    grid = canvas.grid
    for lobe in finding.lobes:
        mask = masks[lobe]
        if not mask.any():
            continue
        zz, yy = grid.z[:, None, None], grid.y[None, :, None]
        coords = np.argwhere(mask)
        z_min = float(grid.z[coords[:, 0].min()])
        if finding.kind == "lobar":
            band = mask & np.broadcast_to(yy > np.quantile(grid.y[coords[:, 1]], 0.45), grid.shape)
        else:  # subsegmental: a dependent posterior-basal band
            band = mask & np.broadcast_to((zz < z_min + 30) & (yy > np.quantile(grid.y[coords[:, 1]], 0.6)),
                                          grid.shape)
        canvas.paint(grid.full()[0], band, 25.0)


def _pleural_effusion(canvas, finding, layout, masks, rng):
    grid = canvas.grid
    depth = finding.size_mm or 20.0
    zz, yy = grid.z[:, None, None], grid.y[None, :, None]
    for side in _sides(finding):
        lung = masks[side]
        if not lung.any():
            continue
        coords = np.argwhere(lung)
        back = float(grid.y[coords[:, 1]].max())
        base = float(grid.z[coords[:, 0]].min())
        # dependent fluid: deepest posteriorly and at the base, thinning toward the apex
        fluid = lung & np.broadcast_to(yy > back - depth * np.clip(1.0 - (zz - base) / (depth * 3.5), 0, 1),
                                       grid.shape)
        shell = ndimage.binary_dilation(fluid, iterations=1) & ~lung & (canvas.regions == REGION_ID["pleura"])
        canvas.paint(grid.full()[0], fluid | shell, HU["fluid"], region="pleura", suv=0.3)


def _nodules(canvas, finding, layout, masks, rng):
    """Solid round nodules, mostly in the outer lung where they stand apart from the central vessels."""
    grid = canvas.grid
    zz, yy, xx = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    far = np.ones(grid.shape, dtype=bool)
    for hilum in layout.hila.values():
        far &= (zz - hilum[0]) ** 2 + (yy - hilum[1]) ** 2 + (xx - hilum[2]) ** 2 > 70.0 ** 2
    lobes = finding.lobes or ["right upper lobe"]
    for index in range(finding.count or 1):
        lobe = masks[lobes[index % len(lobes)]]
        interior = ndimage.binary_erosion(lobe, iterations=2)
        center = _random_point(lobe, grid, rng, interior & far)
        if center is None:
            continue
        size = (finding.size_mm or 6.0) * (1.0 if index == 0 else rng.uniform(0.6, 1.0))
        nodule = canvas.ellipsoid(center, (size / 2, size / 2, size / 2))
        if nodule:
            suv = finding.suv_max if index == 0 else (finding.suv_max * 0.6 if finding.suv_max else None)
            canvas.paint(*nodule, 45.0, suv=suv)


STATION_OFFSETS = {  # relative to the carina (z, y, x mm)
    "right paratracheal": (28.0, -10.0, -18.0), "left paratracheal": (26.0, -8.0, 16.0),
    "subcarinal": (-16.0, 10.0, 4.0), "right hilar": (-8.0, 12.0, -40.0), "left hilar": (-10.0, 15.0, 40.0),
    "prevascular": (35.0, -38.0, 8.0), "aortopulmonary window": (8.0, -8.0, 26.0),
}


def _outer_station(layout: Layout, station: str) -> np.ndarray:
    """Centre (z, y, x mm) of a supraclavicular or axillary node: above the lung apex, or in the axillary fat."""
    side = -1.0 if station.startswith("right") else 1.0
    if "supraclavicular" in station:
        return np.array([layout.lung_top + 8.0, -12.0, side * 52.0])
    return np.array([layout.carina[0] + 12.0, 8.0, side * (layout.body_a * 0.97 - layout.fat - 6.0)])


def _lymphoma_nodes(canvas, finding, layout, masks, rng):
    """The lymphoma-like pattern: one node per station with its own size and SUVmax (outer nodes keep the
    region map as it is: the 10 regions have no axilla or supraclavicular fossa)."""
    for node in finding.detail["nodes"]:
        station = node["station"]
        outer = station not in STATION_OFFSETS
        base = _outer_station(layout, station) if outer else layout.carina + np.asarray(STATION_OFFSETS[station])
        center = base + rng.normal(0, 2, 3)
        short = float(node["size_mm"]) / 2
        shape = canvas.ellipsoid(center, (short * 1.4, short, short * 1.1))
        if shape:
            where, mask = shape
            canvas.paint(where, mask, HU["node"], region=None if outer else "mediastinum", suv=node["suv_max"])


def _lymphadenopathy(canvas, finding, layout, masks, rng):
    if finding.detail.get("nodes"):
        _lymphoma_nodes(canvas, finding, layout, masks, rng)
        return
    for station in finding.detail.get("stations", ["subcarinal"]):
        center = layout.carina + np.asarray(STATION_OFFSETS[station]) + rng.normal(0, 2, 3)
        short = (finding.size_mm or 15.0) / 2
        node = canvas.ellipsoid(center, (short * 1.5, short, short * 1.1))
        if node:
            where, mask = node
            canvas.paint(where, mask, HU["node"], region="mediastinum", suv=finding.suv_max)


def _hiatal_hernia(canvas, finding, layout, masks, rng):
    size = (finding.size_mm or 40.0) / 2
    center = np.array([layout.diaphragm_left + size * 0.8, layout.spine_y - 45, 18.0])
    sac = canvas.ellipsoid(center, (size, size * 0.8, size * 0.9))
    if not sac:
        return
    where, mask = sac
    canvas.paint(where, mask, HU["stomach_wall"], region="esophagus", suv=1.3)
    air = canvas.ellipsoid(center + np.array([size * 0.3, -size * 0.1, 0.0]), (size * 0.55, size * 0.5, size * 0.6))
    if air:
        canvas.paint(*air, HU["air"])


def _arterial_calcification(canvas, finding, layout, masks, rng):
    """Calcified plaques in the aortic wall, on the part of the aorta inside the field of view."""
    path = layout.aorta
    lengths = np.linalg.norm(np.diff(path, axis=0), axis=1)
    ends = np.cumsum(lengths)
    z_low, z_high = float(canvas.grid.z[0]) + 8, float(canvas.grid.z[-1]) - 8
    drawn = 0
    for _ in range(50 * (finding.count or 4)):
        if drawn == (finding.count or 4):
            break
        t = rng.uniform(0, ends[-1])
        k = min(int(np.searchsorted(ends, t)), len(lengths) - 1)
        point = path[k] + (t - ends[k] + lengths[k]) / lengths[k] * (path[k + 1] - path[k])
        if not z_low < point[0] < z_high:
            continue
        axis = (path[k + 1] - path[k]) / lengths[k]
        normal = rng.normal(0, 1, 3)
        normal -= normal.dot(axis) * axis
        normal /= np.linalg.norm(normal) + 1e-6
        radius = float(np.interp(k, [0, len(lengths) - 1], [15.0, 11.0]))
        plaque = canvas.tube([point + normal * radius - axis * 5.0, point + normal * radius + axis * 5.0], 3.2)
        if plaque:
            canvas.paint(*plaque, HU["calcium"] + rng.uniform(-100, 300))  # 1100-1500 HU
            drawn += 1


def _coronary_calcification(canvas, finding, layout, masks, rng):
    center, radii, rotation = layout.heart_center, layout.heart_radii, layout.heart_rotation
    inverse = rotation.T
    courses = {"LAD": (0.6, -0.75, 0.25), "RCA": (0.3, -0.3, -0.9), "LCx": (0.45, 0.4, 0.8)}
    vessels = finding.detail.get("vessels", ["LAD"])
    for index in range(finding.count or 2):
        local = np.asarray(courses[vessels[index % len(vessels)]]) + rng.normal(0, 0.12, 3)
        local /= np.linalg.norm(local)
        point = center + inverse @ (local * radii * 1.02)
        along = np.cross(local, rng.normal(0, 1, 3))
        along = inverse @ (along / (np.linalg.norm(along) + 1e-6))
        spot = canvas.tube([point - along * 4.0, point + along * 4.0], 3.0)
        if spot:
            canvas.paint(*spot, HU["calcium"] + rng.uniform(-100, 300), region="heart")


def _cardiomegaly(canvas, finding, layout, masks, rng):
    """Drawn by the anatomy (the heart is scaled by ``Anatomy.heart_scale``); nothing to add."""


def _pericardial_effusion(canvas, finding, layout, masks, rng):
    """Drawn with the heart (a fluid rim replaces the epicardial fat); nothing to add."""


def _medical_material(canvas, finding, layout, masks, rng):
    kind = finding.kind
    if kind == "pacemaker":
        generator = canvas.ellipsoid((85.0, -layout.body_b + layout.fat * 0.5 + 4, 75.0), (22.0, 5.0, 24.0))
        if generator:
            canvas.paint(*generator, HU["metal"], region="heart")
        lead = canvas.tube([(85.0, -layout.body_b + 20, 70.0), (layout.carina[0] + 20, -30.0, -25.0),
                            tuple(layout.heart_center + np.array([-20.0, -10.0, -15.0]))], 1.6)
        if lead:
            canvas.paint(*lead, HU["metal"], region="heart")
    elif kind == "sternotomy wires":
        for z in np.linspace(0, 95, 5):
            front = -layout.body_b + layout.fat + 6
            wire = canvas.tube([(z, front, -10.0), (z, front, 10.0)], 1.8)
            if wire:
                canvas.paint(*wire, HU["metal"], region="bone")
    elif kind == "port catheter":
        port = canvas.ellipsoid((80.0, -layout.body_b + layout.fat * 0.5 + 4, -80.0), (12.0, 6.0, 12.0))
        if port:
            canvas.paint(*port, HU["metal"] * 0.6, region="mediastinum")
        catheter = canvas.tube([(80.0, -layout.body_b + 20, -75.0), (95.0, -20.0, -20.0),
                                (35.0, -20.0, -12.0)], 1.5)
        if catheter:
            canvas.paint(*catheter, HU["metal"] * 0.5, region="mediastinum")
    else:  # aortic stent: a metal mesh along the descending aorta
        stent = canvas.tube([*layout.aorta[3:5], (layout.aorta[4] + layout.aorta[5]) / 2], 11.0, inner=1.6)
        if stent:
            where, mask = stent
            zz = canvas.grid.z[where[0]][:, None, None]
            canvas.paint(where, mask & (np.mod(zz, 8.0) < 3.0), HU["metal"], region="mediastinum")


RENDERERS: dict[str, Callable] = {
    "Medical material": _medical_material,
    "Arterial wall calcification": _arterial_calcification,
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial_effusion,
    "Coronary artery wall calcification": _coronary_calcification,
    "Hiatal hernia": _hiatal_hernia,
    "Lymphadenopathy": _lymphadenopathy,
    "Emphysema": _emphysema,
    "Atelectasis": _atelectasis,
    "Lung nodule": _nodules,
    "Lung opacity": _ground_glass,
    "Pulmonary fibrotic sequela": _fibrotic,
    "Pleural effusion": _pleural_effusion,
    "Mosaic attenuation pattern": _mosaic,
    "Peribronchial thickening": _peribronchial,
    "Consolidation": _consolidation,
    "Bronchiectasis": _bronchiectasis,
    "Interlobular septal thickening": _septal,
}


def render_case(case: Case, shape: Sequence[int], rng: np.random.Generator) -> RenderedCase:
    """Draw the case's CT (int16 HU with scanner noise), region map and PET (when the case has one).

    Anatomy, findings and noise draw from separate streams, so the same case with and without a finding
    differs only where that finding is drawn.
    """
    anatomy_rng, findings_rng, noise_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=3))
    fov = (float(anatomy_rng.uniform(290, 330)), float(anatomy_rng.uniform(340, 380)),
           float(anatomy_rng.uniform(340, 380)))
    grid = Grid(shape, fov)
    canvas = Canvas(grid, pet=case.anatomy.has_pet)
    layout = make_layout(case, anatomy_rng)
    masks = body_masks(canvas, layout)
    paint_anatomy(canvas, case, layout, masks, anatomy_rng)
    lung_voxels = canvas.regions == REGION_ID["lung"]  # what the heart, vessels and airways left of the lungs
    for key in ("right", "left", *LOBES):
        masks[key] = masks[key] & lung_voxels
    render_findings(canvas, case, layout, masks, findings_rng)
    ct = ndimage.gaussian_filter(canvas.ct, 0.5)  # partial-volume blur
    noise_sd = float(noise_rng.uniform(8, 22))
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(grid.shape).astype(np.float32), 0.7)
    ct += noise * (noise_sd / (noise.std() + 1e-6)) * masks["body"]
    ct += float(noise_rng.uniform(-12, 12))  # per-scanner HU calibration offset
    pet = None
    if canvas.pet is not None:
        fwhm_mm = 6.0
        sigma = [fwhm_mm / 2.355 / s for s in grid.spacing]
        pet = ndimage.gaussian_filter(canvas.pet, sigma)
        pet *= 1.0 + 0.08 * noise_rng.standard_normal(grid.shape).astype(np.float32)
        pet = np.clip(pet, 0, None).astype(np.float32)
    # LPS origin of voxel (0, 0, 0): x = W axis, y = H axis, z = D axis
    origin = (float(grid.x[0]), float(grid.y[0]), float(grid.z[0]))
    return RenderedCase(ct=np.clip(np.rint(ct), -1024, 3071).astype(np.int16), regions=canvas.regions, pet=pet,
                        spacing=grid.spacing, origin_lps=origin)  # type: ignore[arg-type]
