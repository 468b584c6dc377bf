"""Presets and preprocessing operations: geometry stays exact, HU are mapped as documented."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from rrg3d.errors import PresetError, RRG3DError
from rrg3d.io import Volume, read_volume
from rrg3d.preprocess import Preset, crop_or_pad, list_presets, load_preset, preset_family, resize, to_suv, window

REQUIRED = {"ctrate": (240, 480, 480), "m3d": (32, 256, 256), "reg2rg": (64, 256, 256), "merlin": (160, 224, 224)}


def test_required_presets_exist_with_their_shapes():
    names = list_presets()
    for name, shape in REQUIRED.items():
        assert name in names
        assert load_preset(name).shape == shape
    ctrate = load_preset("ctrate")
    assert ctrate.spacing == (1.5, 0.75, 0.75)
    assert ctrate.intensity.window == (-1000.0, 200.0)
    assert load_preset("merlin").spacing == (3.0, 1.5, 1.5)


def test_multiscale_family_is_ordered_up_to_256x512x512():
    family = preset_family("multiscale")
    shapes = [p.shape for p in family]
    assert shapes == sorted(shapes)
    assert shapes[-1] == (256, 512, 512)
    windows = {p.intensity.window for p in family}
    assert len(windows) == 1, "all stages must share one intensity mapping"


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_round_trips(name, tmp_path):
    preset = load_preset(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(preset.to_yaml())
    again = load_preset(path)
    assert again == preset
    assert again.sha256 == preset.sha256
    assert load_preset(preset.record()) == preset


def test_sha_changes_with_any_output_relevant_field():
    base = load_preset("ctrate")
    data = base.to_dict()
    data["intensity"]["window"] = [-1000, 400]
    assert Preset.from_dict(data).sha256 != base.sha256
    data = base.to_dict()
    data["description"] = "another wording"
    assert Preset.from_dict(data).sha256 == base.sha256


def test_bad_presets_are_rejected(tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "shape": [1, 2], "fit": "resize"}))
    with pytest.raises(PresetError, match="shape"):
        load_preset(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "shape": [8, 8, 8], "fit": "crop_pad"}))
    with pytest.raises(PresetError, match="needs a spacing"):
        load_preset(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "shape": [8, 8, 8], "fit": "resize", "colour": 1}))
    with pytest.raises(PresetError, match="unknown preset keys"):
        load_preset(bad)
    bad.write_text("name: [unclosed")
    with pytest.raises(PresetError, match="invalid YAML"):
        load_preset(bad)


def test_window_maps_and_clips():
    hu = np.array([-2000, -1000, -400, 200, 1500], dtype=np.int16)
    out = window(hu, -1000, 200)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32
    assert hu[0] == -2000  # input untouched


def test_crop_or_pad_keeps_world_positions(chest):
    out = crop_or_pad(chest, (50, 32, 80), fill=-1024)
    assert out.shape == (50, 32, 80)
    # a voxel that survives keeps its world position and value
    d, h, w = 20, 30, 30
    world = chest.index_to_world(np.array([d, h, w]))
    index = np.rint(np.linalg.solve(out.affine[:3, :3], world - out.affine[:3, 3])).astype(int)
    assert out.array[tuple(index)] == chest.array[d, h, w]
    assert (out.array[:5] == -1024).all()  # padded slices


def test_resize_affine_covers_the_same_extent(chest):
    out = resize(chest, (20, 32, 32))
    assert out.shape == (20, 32, 32)
    assert out.spacing == pytest.approx((5.0, 5.6, 5.6))
    # the outer voxel edges coincide: first-voxel centre is half a new voxel inside the old first edge
    old_edge = chest.index_to_world(np.array([-0.5, -0.5, -0.5]))
    new_edge = out.index_to_world(np.array([-0.5, -0.5, -0.5]))
    np.testing.assert_allclose(old_edge, new_edge, atol=1e-9)


def _point_volume(spacing=(2.0, 1.3, 0.9), shape=(40, 50, 60), where=(13, 22, 35)) -> Volume:
    array = np.full(shape, -1000, dtype=np.int16)
    array[where] = 150  # inside every preset window, so clipping cannot flatten the peak
    return Volume.from_spacing(array, spacing, origin=(-20.0, 15.0, 100.0))


@pytest.mark.parametrize("name", ["ctrate", "merlin", "m3d", "reg2rg", "multiscale_64"])
def test_presets_keep_a_landmark_at_its_world_position(name):
    """The brightest output voxel lies (within one output voxel) where the bright input voxel was."""
    volume = _point_volume()
    preset = load_preset(name)
    out = preset.apply(volume)
    assert out.shape == preset.shape
    assert out.array.dtype == np.float32
    assert out.array.min() >= 0.0 and out.array.max() <= 1.0
    source = volume.index_to_world(np.array([13, 22, 35]))
    peak = np.unravel_index(np.argmax(out.array), out.shape)
    found = out.index_to_world(np.array(peak))
    assert np.all(np.abs(found - source) <= np.asarray(out.spacing)[::-1] + 1e-6)
    assert out.meta["preprocess"] == {"preset": name, "sha256": preset.sha256}


def test_ctrate_on_real_ct_has_plausible_values(shared_data):
    volume = read_volume(shared_data / "ct/totalseg_chest_cta/ct_cropped.nii.gz")
    out = load_preset("ctrate").apply(volume)
    assert out.shape == (240, 480, 480)
    assert out.spacing == pytest.approx((1.5, 0.75, 0.75))
    assert out.orientation == "SPL"
    # the scan sits in the centre of the padded field of view; padding is air → 0
    assert out.array[0, 0, 0] == 0.0
    centre = out.array[120, 200:280, 200:280]
    hu = centre * 1200 - 1000  # invert the documented window
    assert np.median(hu) > -300  # mediastinum / heart in the middle of a chest CTA
    # physical centre preserved
    c_in = volume.index_to_world((np.array(volume.shape) - 1) / 2)
    c_out = out.index_to_world((np.array(out.shape) - 1) / 2)
    np.testing.assert_allclose(c_in, c_out, atol=1e-6)


def test_mask_follows_the_image_grid(chest):
    mask = chest.replace(array=(chest.array > 0).astype(np.uint8) * 2, modality="SEG")
    preset = load_preset("reg2rg")
    image, label = preset.apply(chest), preset.apply_mask(mask)
    assert label.shape == image.shape
    assert set(np.unique(label.array)) <= {0, 2}
    np.testing.assert_allclose(label.affine, image.affine)
    crop = load_preset("merlin")
    assert crop.apply_mask(mask).array.dtype == np.uint8


def test_suv_conversion():
    volume = Volume.from_spacing(np.full((4, 4, 4), 5000.0, dtype=np.float32), (2, 2, 2), modality="PT",
                                 meta={"suv_bw_factor": 70000 / 3.0e8})
    suv = to_suv(volume)
    assert suv.meta["pet_units"] == "SUVbw"
    np.testing.assert_allclose(suv.array, 5000 * 70000 / 3.0e8, rtol=1e-6)
    out = load_preset("petct_suv").apply(volume)
    assert out.shape == (192, 192, 192)
    with pytest.raises(RRG3DError, match="SUV"):
        to_suv(volume.replace(meta={}))
    already = volume.replace(meta={"pet_units": "SUVbw"})
    assert to_suv(already) is already


# Presets with outputs over 40 M voxels (ctrate, multiscale_256) run on real data in their own tests.
CT_PRESETS = [
    name for name in list_presets()
    if load_preset(name).modality == "CT" and np.prod(load_preset(name).shape) <= 40_000_000
]
REAL_SCANS = ["ct/totalseg_chest_cta/ct_cropped.nii.gz", "ct/totalseg_example/example_ct.nii.gz",
              "ct/totalseg_example/dicom"]


@pytest.mark.parametrize("scan", REAL_SCANS)
@pytest.mark.parametrize("name", CT_PRESETS)
def test_every_ct_preset_on_real_scans(shared_data, scan, name):
    """Shape, orientation, spacing and plausible HU (air near -1000, soft tissue near 0-100) after each preset."""
    preset = load_preset(name)
    volume = read_volume(shared_data / scan)
    out = preset.apply(volume)
    assert out.shape == preset.shape
    assert out.orientation == "SPL"
    if preset.fit == "crop_pad":
        assert out.spacing == pytest.approx(preset.spacing)
    else:  # resize keeps the physical extent
        assert np.asarray(out.extent_mm) == pytest.approx(np.asarray(volume.extent_mm), rel=1e-6)
    if preset.intensity.kind == "minmax":  # per-scan min-max (radfm): no fixed window to undo
        assert (float(out.array.min()), float(out.array.max())) == pytest.approx(preset.intensity.out_range)
        return
    low, high = preset.intensity.window
    hu = out.array * (high - low) + low  # undo the documented window
    body = hu > -500
    assert 0.05 < body.mean() < 0.95, "the scan must be neither empty nor all body"
    assert np.percentile(hu, 1) < -800  # air around the patient or in the lungs (the CTA is cropped to the chest)
    assert -100 < np.median(hu[body]) < 150  # soft tissue dominates inside the body


@pytest.mark.slow
def test_largest_multiscale_stage_on_real_ct(shared_data):
    out = load_preset("multiscale_256").apply(read_volume(shared_data / "ct/totalseg_chest_cta/ct_cropped.nii.gz"))
    assert out.shape == (256, 512, 512) and out.orientation == "SPL"
    assert float(out.array.min()) >= 0.0 and float(out.array.max()) <= 1.0
