"""Volume geometry, canonical orientation, and the NIfTI / ITK / NumPy readers, including bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from rrg3d.errors import RRG3DError, VolumeReadError
from rrg3d.io import CANONICAL_CODES, Volume, read_volume, write_volume
from rrg3d.io.readers import volume_from_sitk, volume_to_sitk


def test_canonical_volume_geometry(chest):
    assert chest.orientation == "SPL"
    assert chest.is_canonical
    assert chest.spacing == pytest.approx((2.5, 2.8, 2.8))
    assert chest.obliqueness_deg == pytest.approx(0.0)
    # index (d, h, w) = (1, 0, 0) moves one slice superior (+z in LPS)
    step = chest.index_to_world(np.array([1, 0, 0])) - chest.index_to_world(np.array([0, 0, 0]))
    assert step == pytest.approx([0, 0, 2.5])


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (2, 0, 1)])
@pytest.mark.parametrize("flips", [(), (0,), (1, 2), (0, 1, 2)])
def test_to_canonical_recovers_the_same_anatomy(chest, perm, flips):
    """Any permutation/flip of the axes, with the matching affine, reads back as the same canonical array."""
    array, affine = chest.array, chest.affine.copy()
    for axis in flips:
        n = array.shape[axis]
        array = np.flip(array, axis)
        affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1)
        affine[:3, axis] = -affine[:3, axis]
    array = np.transpose(array, perm)
    affine[:3, :3] = affine[:3, list(perm)]
    scrambled = Volume(np.ascontiguousarray(array), affine)
    back = scrambled.to_canonical()
    assert tuple(back.orientation) == CANONICAL_CODES
    np.testing.assert_array_equal(back.array, chest.array)
    np.testing.assert_allclose(back.affine, chest.affine, atol=1e-9)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".npz"])
def test_write_read_round_trip(tmp_path, chest, suffix):
    path = write_volume(chest, tmp_path / f"scan{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, chest.array)
    np.testing.assert_allclose(back.affine, chest.affine, atol=1e-4)
    assert back.orientation == "SPL"


def test_nifti_in_ras_and_lps_layouts_agree(tmp_path, chest):
    """A NIfTI stored with another voxel order (nibabel RAS i,j,k) reads identically after canonicalisation."""
    path = write_volume(chest, tmp_path / "a.nii.gz")
    image = nib.load(str(path))
    ras = nib.as_closest_canonical(image)  # nibabel RAS+ voxel order: a different array layout on disk
    nib.save(ras, str(tmp_path / "b.nii.gz"))
    a, b = read_volume(path), read_volume(tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_sitk_conversion_matches_itk_geometry(chest):
    image = volume_to_sitk(chest)
    assert image.GetSize() == (64, 64, 40)
    # ITK physical point of index (x=w, y=h, z=d) equals our index_to_world((d, h, w))
    point = image.TransformIndexToPhysicalPoint((5, 7, 3))
    assert np.allclose(point, chest.index_to_world(np.array([3, 7, 5])))
    back = volume_from_sitk(image)
    np.testing.assert_array_equal(back.array, chest.array)


def test_real_nifti_files(shared_data):
    small = read_volume(shared_data / "ct/totalseg_example/example_ct_sm.nii.gz")
    assert small.shape == (30, 101, 122)
    assert small.spacing == pytest.approx((3.0, 3.0, 3.0), abs=1e-3)
    assert small.orientation == "SPL"
    array = small.array.astype(np.float32)
    assert np.percentile(array, 1) < -900  # air around the patient
    centre = array[10:20, 40:60, 50:70]
    assert -150 < np.median(centre) < 150  # soft tissue in the middle of the abdomen
    cta = read_volume(shared_data / "ct/totalseg_chest_cta/ct_cropped.nii.gz")
    assert cta.spacing == pytest.approx((1.5, 1.5, 1.5), abs=1e-3)
    assert cta.orientation == "SPL"


def test_numpy_needs_spacing(tmp_path, chest):
    np.save(tmp_path / "a.npy", chest.array)
    with pytest.raises(VolumeReadError, match="spacing"):
        read_volume(tmp_path / "a.npy")
    volume = read_volume(tmp_path / "a.npy", spacing=(2.5, 2.8, 2.8))
    assert volume.spacing == pytest.approx((2.5, 2.8, 2.8))
    with_affine = read_volume(tmp_path / "a.npy", affine=chest.affine)
    np.testing.assert_allclose(with_affine.affine, chest.affine)


# --- bad input: every failure is a VolumeReadError naming the file and the problem ----------------------


def _nifti(tmp_path, array, zooms=(1.0, 1.0, 1.0), name="x.nii.gz"):
    image = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    path = tmp_path / name
    nib.save(image, str(path))
    return path


def test_truncated_gzip(tmp_path, chest):
    path = write_volume(chest, tmp_path / "ok.nii.gz")
    data = path.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeReadError, match="truncated") as info:
        read_volume(bad)
    assert str(bad) in str(info.value)


def test_truncated_uncompressed_nifti(tmp_path, chest):
    path = write_volume(chest, tmp_path / "ok.nii")
    data = path.read_bytes()
    bad = tmp_path / "cut.nii"
    bad.write_bytes(data[: len(data) - 5000])
    with pytest.raises(VolumeReadError, match=r"cut\.nii"):
        read_volume(bad)


@pytest.mark.parametrize("payload", [b"", b"hello world, not an image", b"\x00" * 400, gzip.compress(b"nope" * 100)])
def test_not_an_image(tmp_path, payload):
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(payload)
    with pytest.raises(VolumeReadError) as info:
        read_volume(bad)
    assert "junk.nii.gz" in str(info.value)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".npy", ".npz"])
def test_garbage_in_other_formats(tmp_path, suffix):
    bad = tmp_path / f"junk{suffix}"
    bad.write_bytes(b"NRRD0004\ngarbage\n" if suffix == ".nrrd" else b"\x93NUMPY garbage")
    with pytest.raises(VolumeReadError, match="junk"):
        read_volume(bad, spacing=(1, 1, 1))


def test_2d_input(tmp_path):
    path = _nifti(tmp_path, np.zeros((64, 64, 1), dtype=np.int16))
    with pytest.raises(VolumeReadError, match="2D input"):
        read_volume(path)
    path2 = _nifti(tmp_path, np.zeros((64, 64), dtype=np.int16), name="flat.nii.gz")
    with pytest.raises(VolumeReadError, match="2D input"):
        read_volume(path2)


@pytest.mark.parametrize("zooms", [(0.0, 1.0, 1.0), (1.0, -2.0, 1.0), (1.0, 1.0, float("nan"))])
def test_zero_negative_or_nan_spacing(tmp_path, zooms):
    path = _nifti(tmp_path, np.zeros((8, 8, 8), dtype=np.int16), name="z.nii")
    data = bytearray(path.read_bytes())
    data[80:92] = np.asarray(zooms, dtype="<f4").tobytes()  # NIfTI-1 pixdim[1..3]
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeReadError, match="spacing") as info:
        read_volume(path)
    assert "z.nii" in str(info.value)


def test_nan_and_inf_values(tmp_path):
    array = np.zeros((8, 8, 8), dtype=np.float32)
    array[1, 2, 3] = np.nan
    array[4, 4, 4] = np.inf
    with pytest.raises(VolumeReadError, match="2 NaN/inf"):
        read_volume(_nifti(tmp_path, array))


def test_absurd_dimensions_in_header(tmp_path, chest):
    path = write_volume(chest, tmp_path / "ok.nii")
    data = bytearray(path.read_bytes())
    # NIfTI-1 dim[1] is the int16 at byte offset 42: claim 30000 voxels along x
    data[42:44] = np.array([30000], dtype="<i2").tobytes()
    bad = tmp_path / "huge.nii"
    bad.write_bytes(bytes(data))
    with pytest.raises(VolumeReadError, match=r"absurd dimensions|truncated"):
        read_volume(bad)


def test_unsupported_and_missing(tmp_path):
    with pytest.raises(VolumeReadError, match="file not found"):
        read_volume(tmp_path / "nope.nii.gz")
    odd = tmp_path / "scan.jpg"
    odd.write_bytes(b"x")
    with pytest.raises(VolumeReadError, match="unsupported file type"):
        read_volume(odd)


def test_4d_needs_a_frame(tmp_path):
    path = _nifti(tmp_path, np.zeros((8, 8, 8, 3), dtype=np.int16))
    with pytest.raises(VolumeReadError, match="4D input with 3 frames"):
        read_volume(path)
    assert read_volume(path, frame=1).shape == (8, 8, 8)


def test_itk_vector_image_rejected(tmp_path):
    image = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3)
    path = tmp_path / "vec.mha"
    sitk.WriteImage(image, str(path))
    with pytest.raises(VolumeReadError, match="3-component"):
        read_volume(path)


def test_errors_are_one_family():
    assert issubclass(VolumeReadError, RRG3DError)


@pytest.mark.parametrize("seed", range(12))
def test_fuzzed_nifti_bytes_never_escape_as_library_errors(tmp_path, chest, seed):
    """Random byte corruption anywhere in a file gives a VolumeReadError or a valid volume, nothing else."""
    rng = np.random.default_rng(seed)
    path = write_volume(chest, tmp_path / "ok.nii")
    data = bytearray(path.read_bytes())
    for _ in range(int(rng.integers(1, 8))):
        position = int(rng.integers(0, 352))  # the header, where corruption hurts most
        data[position] = int(rng.integers(0, 256))
    if rng.random() < 0.5:
        data = data[: int(rng.integers(10, len(data)))]
    bad = tmp_path / "fuzz.nii"
    bad.write_bytes(bytes(data))
    try:
        volume = read_volume(bad)
    except VolumeReadError as exc:
        assert "fuzz.nii" in str(exc)
    else:
        assert volume.array.ndim == 3
