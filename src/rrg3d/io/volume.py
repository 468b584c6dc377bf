"""The :class:`Volume` type: a 3D array plus the geometry that places it in the patient.

Geometry is held once, as a 4×4 ``affine`` that maps array indices ``(d, h, w, 1)`` to LPS world
millimetres; spacing, direction, origin and orientation codes are derived from it, so they can never
disagree. ``meta`` holds only non-identifying facts (see :mod:`rrg3d.io.phi`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

# World axes are LPS: +x patient Left, +y Posterior, +z Superior.
_POSITIVE_CODES = ("L", "P", "S")
_NEGATIVE_CODES = ("R", "A", "I")

#: Orientation codes of the canonical frame, one per array axis (D, H, W): each code names the
#: direction in which that index increases.
CANONICAL_CODES = ("S", "P", "L")

#: Direction matrix of the canonical frame: column ``a`` is the LPS unit vector of array axis ``a``.
CANONICAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

MODALITIES = ("CT", "PT", "MR", "SEG", "OT")


def affine_from_geometry(
    spacing: tuple[float, float, float] | np.ndarray,
    origin: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Build the index→LPS affine from spacing ``(sd, sh, sw)``, origin (LPS mm) and a 3×3 direction.

    ``direction`` columns are the unit vectors of the array axes; the canonical frame by default.
    """
    direction = CANONICAL_DIRECTION if direction is None else np.asarray(direction, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def orientation_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """Per array axis, the LPS letter of the world direction its index mostly increases toward."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    codes: list[str] = []
    used: set[int] = set()
    # Assign the most dominant axes first so that oblique volumes still get a permutation.
    order = np.argsort(-np.abs(columns).max(axis=0) / np.linalg.norm(columns, axis=0))
    result: dict[int, str] = {}
    for axis in order:
        magnitudes = np.abs(columns[:, axis]).copy()
        magnitudes[list(used)] = -1.0
        world = int(np.argmax(magnitudes))
        used.add(world)
        result[int(axis)] = _POSITIVE_CODES[world] if columns[world, axis] > 0 else _NEGATIVE_CODES[world]
    for axis in range(3):
        codes.append(result[axis])
    return codes[0], codes[1], codes[2]


@dataclasses.dataclass
class Volume:
    """A 3D scan in memory.

    Attributes:
        array: voxel values indexed ``[D, H, W]`` (canonical after reading; HU for CT, Bq/ml or SUV for PET).
        affine: 4×4 map from ``(d, h, w, 1)`` to LPS millimetres.
        modality: ``"CT"``, ``"PT"`` (PET), ``"MR"``, ``"SEG"`` (label map) or ``"OT"``.
        meta: non-identifying metadata (source format, units, series description-free acquisition facts).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "CT"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim != 3:
            raise ValueError(f"Volume arrays are 3D [D, H, W], got shape {self.array.shape}")

    @classmethod
    def from_spacing(
        cls,
        array: np.ndarray,
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        modality: str = "CT",
        meta: Mapping[str, Any] | None = None,
    ) -> Volume:
        """A volume already in canonical orientation with the given spacing ``(sd, sh, sw)`` in mm."""
        return cls(np.asarray(array), affine_from_geometry(spacing, origin), modality, dict(meta or {}))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (D, H, W)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix whose column ``a`` is the LPS unit vector of array axis ``a``."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position (mm) of the centre of voxel ``(0, 0, 0)``."""
        return float(self.affine[0, 3]), float(self.affine[1, 3]), float(self.affine[2, 3])

    @property
    def orientation(self) -> str:
        """Orientation codes of the array axes, e.g. ``"SPL"`` for the canonical frame."""
        return "".join(orientation_codes(self.affine))

    @property
    def is_canonical(self) -> bool:
        return tuple(self.orientation) == CANONICAL_CODES

    @property
    def obliqueness_deg(self) -> float:
        """Largest angle (degrees) between an array axis and the nearest world axis; 0 for axis-aligned scans."""
        direction = np.abs(self.direction)
        cosines = np.clip(direction.max(axis=0), -1.0, 1.0)
        return float(np.degrees(np.arccos(cosines)).max())

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Physical size along (D, H, W)."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))  # type: ignore[return-value]

    def replace(self, **changes: Any) -> Volume:
        """A copy with some fields replaced (meta is copied, never shared)."""
        fields = {"array": self.array, "affine": self.affine, "modality": self.modality, "meta": dict(self.meta)}
        fields.update(changes)
        return Volume(**fields)

    def to_canonical(self) -> Volume:
        """Permute and flip axes (no resampling) so that the orientation is :data:`CANONICAL_CODES`.

        Oblique scans are brought to the nearest canonical axes; their exact direction stays in the affine.
        """
        codes = orientation_codes(self.affine)
        if codes == CANONICAL_CODES:
            return self
        letters_to_world = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
        # canonical axis a (D,H,W) must point to world axis 2,1,0 respectively
        wanted_world = (2, 1, 0)
        source_axis_for = [next(i for i, c in enumerate(codes) if letters_to_world[c] == w) for w in wanted_world]
        array = np.transpose(self.array, source_axis_for)
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, source_axis_for]
        flips = [codes[src] != CANONICAL_CODES[dst] for dst, src in enumerate(source_axis_for)]
        for axis, flip in enumerate(flips):
            if flip:
                n = array.shape[axis]
                affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1)
                affine[:3, axis] = -affine[:3, axis]
        flip_axes = tuple(a for a, f in enumerate(flips) if f)
        if flip_axes:
            array = np.flip(array, axis=flip_axes)
        return self.replace(array=np.ascontiguousarray(array), affine=affine)

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` array indices to LPS mm."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary (no voxel data, no identifiers)."""
        finite = self.array[np.isfinite(self.array)] if self.array.dtype.kind == "f" else self.array
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "orientation": self.orientation,
            "oblique_deg": round(self.obliqueness_deg, 3),
            "origin_mm": [round(o, 3) for o in self.origin],
            "modality": self.modality,
            "dtype": str(self.array.dtype),
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "meta": dict(self.meta),
        }
