"""The weight-free segmenter: Dice on phantoms, geometry of the output, partial and odd fields of view."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.errors import RRG3DError
from rrg3d.io import Volume, read_volume
from rrg3d.segment import ALL_LABELS, BACKENDS, REGIONS, canonical_transform, from_canonical, segment_volume
from rrg3d.segment.rules import block_factors, block_mean, upsample_labels

#: Conservative floors per region (measured on phantoms: see benchmarks/results/segment.json).
FLOORS = {"lung": 0.9, "trachea and bronchi": 0.2, "mediastinum": 0.45, "heart": 0.6, "esophagus": 0.1, "pleura": 0.6,
          "bone": 0.85, "abdomen": 0.7}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def test_regions_and_labels_follow_the_radgenome_order():
    assert REGIONS[0] == "lung" and REGIONS[6] == "bone" and REGIONS[-1] == "abdomen" and len(REGIONS) == 10
    assert ALL_LABELS["2"] == "trachea and bronchi" and ALL_LABELS["10"] == "abdomen"
    assert BACKENDS == ("rules", "totalsegmentator")


@pytest.mark.parametrize("case", ["phantom_00000", "phantom_00001"])
def test_phantom_dice(phantoms, case):
    ct = read_volume(phantoms / "vols" / f"{case}.nii.gz")
    truth = read_volume(phantoms / "seg" / f"{case}.nii.gz").array
    result = segment_volume(ct)
    assert result.backend == "rules" and result.seconds < 20
    labels = result.label_map
    assert labels.array.dtype == np.uint8 and labels.modality == "SEG"
    assert labels.shape == ct.shape and np.allclose(labels.affine, ct.affine)
    for name, floor in FLOORS.items():
        value = REGIONS.index(name) + 1
        assert _dice(labels.array == value, truth == value) >= floor, name
    assert set(result.labels.values()) | set(result.empty) == set(REGIONS)
    assert all(ALL_LABELS[key] == name for key, name in result.labels.items())


def test_output_is_on_the_input_grid_for_any_orientation(phantoms):
    ct = read_volume(phantoms / "vols" / "phantom_00000.nii.gz")
    reference = segment_volume(ct).label_map.array
    # the same scan stored as (W, D, H) with two axes reversed: a different array layout, the same patient
    array = np.flip(np.transpose(ct.array, (2, 0, 1)), axis=(0, 2))
    affine = ct.affine.copy()
    affine[:3, :3] = ct.affine[:3, [2, 0, 1]]
    affine[:3, 3] = ct.affine[:3, 3] + affine[:3, 0] * (array.shape[0] - 1) + affine[:3, 2] * (array.shape[2] - 1)
    affine[:3, 0] *= -1
    affine[:3, 2] *= -1
    odd = Volume(np.ascontiguousarray(array), affine, "CT")
    assert odd.orientation != "SPL"
    perm, flips = canonical_transform(odd.affine)
    assert np.array_equal(np.flip(np.transpose(odd.array, perm), flips), odd.to_canonical().array)
    result = segment_volume(odd)
    assert result.label_map.shape == odd.shape and np.allclose(result.label_map.affine, odd.affine)
    assert np.array_equal(from_canonical(reference, odd.affine), result.label_map.array)


def test_block_mean_and_upsampling_round_trip():
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(7, 11, 13)).astype(np.int16)
    assert block_factors((0.7, 0.7, 1.25)) == (3, 3, 1) and block_factors((5.0, 2.0, 1.0)) == (1, 1, 2)
    small = block_mean(array, (2, 3, 1))
    assert small.shape == (4, 4, 13)
    assert np.isclose(small[0, 0, 0], array[:2, :3, 0].mean())
    labels = np.arange(small.size, dtype=np.uint8).reshape(small.shape)
    up = upsample_labels(labels, (2, 3, 1), array.shape)
    assert up.shape == array.shape and up[1, 2, 5] == labels[0, 0, 5] and up[6, 10, 12] == labels[3, 3, 12]


def test_partial_fields_of_view_do_not_crash(phantoms):
    ct = read_volume(phantoms / "vols" / "phantom_00001.nii.gz")
    truth = read_volume(phantoms / "seg" / "phantom_00001.nii.gz").array
    lung = REGIONS.index("lung") + 1
    bases = np.flatnonzero((truth == lung).any(axis=(1, 2)))[:6]
    crops = {
        "abdomen with lung bases": (slice(0, int(bases[-1]) + 1), slice(None), slice(None)),
        "central crop (no outside air)": (slice(16, 48), slice(30, 98), slice(30, 98)),
        "one slab": (slice(30, 33), slice(None), slice(None)),
        "neck only": (slice(58, 64), slice(None), slice(None)),
    }
    for name, box in crops.items():
        part = ct.replace(array=np.ascontiguousarray(ct.array[box]))
        result = segment_volume(part)
        assert result.label_map.shape == part.shape, name
        assert set(result.labels.values()).isdisjoint(result.empty), name
    lower = segment_volume(ct.replace(array=np.ascontiguousarray(ct.array[crops["abdomen with lung bases"]])))
    assert "lung" in lower.labels.values() and "abdomen" in lower.labels.values()
    assert "thyroid" in lower.empty and "trachea and bronchi" in lower.empty


@pytest.mark.parametrize("fill", [-1000, 40, 1500])
def test_featureless_volumes_give_empty_maps(fill):
    volume = Volume.from_spacing(np.full((8, 24, 24), fill, dtype=np.int16), (2.0, 2.0, 2.0))
    result = segment_volume(volume)
    assert result.label_map.shape == (8, 24, 24)
    assert "lung" in result.empty and "heart" in result.empty


def test_bad_requests_are_clear_errors():
    volume = Volume.from_spacing(np.zeros((4, 8, 8), dtype=np.int16), (1.0, 1.0, 1.0))
    with pytest.raises(RRG3DError, match="unknown segmentation backend 'nnunet'"):
        segment_volume(volume, backend="nnunet")
    with pytest.raises(RRG3DError, match="needs a CT"):
        segment_volume(volume.replace(modality="PT"))
