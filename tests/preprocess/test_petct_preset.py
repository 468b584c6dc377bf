"""PET/CT presets: the PET put on the CT's output grid by world coordinates, its two normalisations, padding, and the
errors for a pair that does not overlap."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.errors import PresetError
from rrg3d.io.volume import Volume
from rrg3d.preprocess import load_preset
from rrg3d.preprocess.batch import load_petct_input
from rrg3d.preprocess.presets import PetIntensity, Preset


def _ct(shape=(20, 40, 40), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Volume:
    array = np.full(shape, 40, dtype=np.int16)
    return Volume.from_spacing(array, spacing, origin, modality="CT")


def _pet(array: np.ndarray, spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0)) -> Volume:
    volume = Volume.from_spacing(array.astype(np.float32), spacing, origin, modality="PT")
    volume.meta["pet_units"] = "SUVbw"
    return volume


def test_ct_presets_keep_their_hash_and_pet_presets_record_the_pet_part():
    tiny = load_preset("tiny")
    assert "pet" not in tiny.to_dict() and tiny.channels == 1
    petct = load_preset("tiny_petct")
    assert petct.channels == 2 and petct.to_dict()["pet"]["norm"] == "suv_range"
    assert Preset.from_dict(petct.to_dict()).sha256 == petct.sha256
    assert load_preset("petct").sha256 != load_preset("petct_log").sha256
    with pytest.raises(PresetError, match=r"pet\.norm"):
        Preset.from_dict({**petct.to_dict(), "pet": {"norm": "zscore"}})
    with pytest.raises(PresetError, match="unknown pet keys"):
        Preset.from_dict({**petct.to_dict(), "pet": {"scale": 2}})


def test_suv_range_keeps_absolute_suv_and_log_percentile_is_relative():
    suv = np.array([0.0, 2.0, 10.0, 30.0], dtype=np.float32)
    fixed = PetIntensity(norm="suv_range", window=(0.0, 20.0)).apply(suv)
    np.testing.assert_allclose(fixed, [0.0, 0.1, 0.5, 1.0])
    # the same lesion (SUV 10) maps to the same value in a scan whose maximum is different
    np.testing.assert_allclose(PetIntensity().apply(suv * 0.5)[3], 0.75)
    relative = PetIntensity(norm="log_percentile", percentile=100.0).apply(suv)
    assert relative.max() == pytest.approx(1.0) and relative[0] == 0.0
    np.testing.assert_allclose(relative[2], np.log1p(10.0) / np.log1p(30.0), rtol=1e-6)
    doubled = PetIntensity(norm="log_percentile", percentile=100.0).apply(suv * 2)
    assert doubled.max() == pytest.approx(1.0)  # rescaled per scan: absolute SUV is lost
    clipped = PetIntensity(norm="log_percentile", percentile=50.0).apply(suv)
    assert (clipped == 1.0).sum() == 2  # everything above the median clipped to it


def test_pet_lands_on_the_ct_grid_by_world_coordinates():
    preset = Preset(name="t", shape=(20, 40, 40), spacing=(2.0, 1.0, 1.0), fit="crop_pad",
                    pet=PetIntensity(window=(0.0, 10.0)))
    ct = _ct()
    ct_out = preset.apply(ct)
    # a PET of coarser voxels, shifted in world space; a hot block around world point (z 20, y 20, x 20) mm
    pet_array = np.zeros((12, 14, 14), dtype=np.float32)
    origin = (-4.0, -8.0, -12.0)  # LPS x, y, z; array axes (D, H, W) run along z, y, x
    index = [round((20.0 - o) / 4.0) for o in origin[::-1]]
    pet_array[index[0] - 1: index[0] + 2, index[1] - 1: index[1] + 2, index[2] - 1: index[2] + 2] = 10.0
    out = preset.apply_pet(_pet(pet_array, origin=origin), ct_out)
    assert out.shape == ct_out.shape and np.allclose(out.affine, ct_out.affine)
    hot = np.argwhere(out.array > 0.5 * out.array.max()).mean(axis=0)  # the block's centre on the CT grid
    world = ct_out.index_to_world(hot)
    np.testing.assert_allclose(world, [20.0, 20.0, 20.0], atol=2.0)
    assert out.array.max() == pytest.approx(1.0, abs=1e-3)
    assert 0 < out.meta["pet_overlap"] <= 1


def test_pet_outside_its_field_of_view_is_suv_zero_and_disjoint_pairs_fail():
    preset = Preset(name="t", shape=(20, 40, 40), spacing=(2.0, 1.0, 1.0), fit="crop_pad", pet=PetIntensity())
    ct_out = preset.apply(_ct())
    half = _pet(np.full((5, 10, 10), 5.0), origin=(0.0, 0.0, 0.0))  # 20 mm of z: the first half of the grid only
    out = preset.apply_pet(half, ct_out).array
    assert out[:2, :30, :30].min() > 0 and out[-2:].max() == 0.0  # 0 SUV, not a CT value, where no PET
    far = _pet(np.ones((5, 5, 5)), origin=(5000.0, 0.0, 0.0))
    with pytest.raises(PresetError, match="do not overlap in world space"):
        preset.apply_pet(far, ct_out, where="pet.nii.gz on ct.nii.gz")


def test_load_petct_input_reads_both_files_and_names_a_missing_pet(tmp_path):
    from rrg3d.errors import RRG3DError
    from rrg3d.io import write_volume

    ct_path = write_volume(_ct(), tmp_path / "ct.nii.gz")
    pet = _pet(np.full((10, 10, 10), 4.0))
    pet_path = write_volume(pet, tmp_path / "pet.nii.gz")
    array = load_petct_input(ct_path, pet_path, load_preset("tiny_petct"), pet_units="SUVbw")
    assert array.shape == (2, 32, 64, 64) and array.dtype == np.float32
    assert array[1].max() == pytest.approx(0.2, abs=1e-3)  # SUV 4 of [0, 20]
    with pytest.raises(RRG3DError, match="needs the study's PET"):
        load_petct_input(ct_path, None, load_preset("tiny_petct"))
    with pytest.raises(RRG3DError, match="not a PET/CT preset"):
        load_petct_input(ct_path, pet_path, load_preset("tiny"))
