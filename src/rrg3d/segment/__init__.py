"""Region masks for region-guided report generation: the 10 RadGenome regions from a CT volume.

Two backends: ``"rules"`` (weight-free, :mod:`rrg3d.segment.rules`) and ``"totalsegmentator"`` (optional, used only
when the package and its weights are installed; its classes are mapped onto the regions by
:mod:`rrg3d.segment.totalseg`). Label maps use the region order of :data:`REGIONS` (1 = lung ... 10 = abdomen).

    from rrg3d.io import read_volume
    from rrg3d.segment import segment_volume
    result = segment_volume(read_volume("scan.nii.gz"))
    result.label_map  # Volume, uint8, modality "SEG", same grid as the scan
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS
from rrg3d.errors import RRG3DError
from rrg3d.io.volume import CANONICAL_CODES, Volume, orientation_codes

#: The 10 regions in label-map order (label ``i + 1`` is ``REGIONS[i]``).
REGIONS: tuple[str, ...] = tuple(RADGENOME_REGIONS)

#: Every label of a full map, as the manifest writes it: ``{"1": "lung", ...}``.
ALL_LABELS: dict[str, str] = {str(index + 1): name for index, name in enumerate(REGIONS)}

BACKENDS = ("rules", "totalsegmentator")


@dataclasses.dataclass
class Segmentation:
    """The outcome of :func:`segment_volume`.

    Attributes:
        label_map: uint8 region labels on the input's grid and affine, modality ``"SEG"``.
        labels: the regions found (non-empty), label value as a string → region name.
        empty: regions that were not found (left at 0), in region order.
        backend: the backend that made the map.
        seconds: wall time of the segmentation.
    """

    label_map: Volume
    labels: dict[str, str]
    empty: list[str]
    backend: str
    seconds: float


def canonical_transform(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """The axis permutation and flips that :meth:`Volume.to_canonical` applies for ``affine``.

    ``canonical = np.flip(np.transpose(array, perm), flips)``.
    """
    codes = orientation_codes(affine)
    world = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
    perm = tuple(next(i for i, c in enumerate(codes) if world[c] == w) for w in (2, 1, 0))
    flips = tuple(dst for dst, src in enumerate(perm) if codes[src] != CANONICAL_CODES[dst])
    return perm, flips  # type: ignore[return-value]


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Bring an array on the canonical grid of a volume with ``affine`` back to that volume's own layout."""
    perm, flips = canonical_transform(affine)
    if flips:
        array = np.flip(array, axis=flips)
    return np.ascontiguousarray(np.transpose(array, np.argsort(perm)))


def region_summary(array: np.ndarray) -> tuple[dict[str, str], list[str]]:
    """``(labels, empty)`` of a 10-region label map: the regions present (id → name) and those absent."""
    present = np.bincount(np.asarray(array, dtype=np.uint8).ravel(), minlength=len(REGIONS) + 1)
    labels = {str(i + 1): name for i, name in enumerate(REGIONS) if present[i + 1] > 0}
    empty = [name for i, name in enumerate(REGIONS) if present[i + 1] == 0]
    return labels, empty


def segment_volume(volume: Volume, backend: str = "rules") -> Segmentation:
    """Segment a CT volume (HU) into the 10 regions with ``backend`` (one of :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise RRG3DError(f"unknown segmentation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if volume.modality not in ("CT", "OT"):
        raise RRG3DError(f"segmentation needs a CT volume in HU, got modality {volume.modality!r}")
    start = time.perf_counter()
    if backend == "rules":
        from rrg3d.segment.rules import segment_array

        canonical = volume.to_canonical()
        labels = from_canonical(segment_array(canonical.array, canonical.spacing), volume.affine)
    else:
        from rrg3d.segment.totalseg import segment_totalsegmentator

        labels = segment_totalsegmentator(volume)
    seconds = time.perf_counter() - start
    label_map = Volume(labels.astype(np.uint8, copy=False), volume.affine.copy(), "SEG",
                       {"source_format": "segmentation", "backend": backend})
    found, empty = region_summary(label_map.array)
    return Segmentation(label_map=label_map, labels=found, empty=empty, backend=backend, seconds=round(seconds, 3))


__all__ = ["ALL_LABELS", "BACKENDS", "REGIONS", "Segmentation", "canonical_transform", "from_canonical",
           "region_summary", "segment_volume"]
