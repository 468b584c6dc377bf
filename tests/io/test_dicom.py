"""DICOM reader: real series, PHI safety, and synthetic series with every geometry problem we handle."""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from rrg3d.errors import VolumeReadError
from rrg3d.io import dicom
from rrg3d.io.dicom import SeriesInfo, list_series, read_dicom, suv_bw_factor, suv_from_dataset
from rrg3d.io.volume import Volume

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

def assert_voxels_at_dicom_positions(volume: Volume, series, slices=None) -> None:
    """Every pixel (k, r, c) of the written slices sits at IPP_k + r·Δr·colcos + c·Δc·rowcos with its value."""
    slices = range(len(series.positions)) if slices is None else slices
    n_rows, n_cols = series.values.shape[1:]
    k, r, c = np.meshgrid(np.asarray(list(slices)), np.arange(n_rows), np.arange(n_cols), indexing="ij")
    row_cos, col_cos = series.orientation[:3], series.orientation[3:]
    world = (
        series.positions[k.ravel()]
        + np.outer(r.ravel() * series.spacing[0], col_cos)
        + np.outer(c.ravel() * series.spacing[1], row_cos)
    )
    inverse = np.linalg.inv(volume.affine)
    index = world @ inverse[:3, :3].T + inverse[:3, 3]
    rounded = np.rint(index).astype(int)
    np.testing.assert_allclose(index, rounded, atol=1e-3)
    got = volume.array[rounded[:, 0], rounded[:, 1], rounded[:, 2]]
    np.testing.assert_allclose(got, series.values[k.ravel(), r.ravel(), c.ravel()], rtol=1e-6, atol=1e-3)


# ------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_series(shared_data: Path) -> Path:
    folder = shared_data / "ct" / "totalseg_example" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.fixture(scope="module")
def planted_series(shared_data: Path) -> Path:
    folder = shared_data / "ct" / "phi_planted_dicom"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.fixture(scope="module")
def real_volume(real_series: Path) -> Volume:
    return read_dicom(real_series)


def test_real_series_geometry_and_hu(real_volume: Volume) -> None:
    volume = real_volume
    assert volume.shape == (20, 512, 512)
    np.testing.assert_allclose(volume.spacing, (2.0, 0.9765625, 0.9765625), atol=1e-4)
    assert volume.orientation == "SPL"
    assert volume.modality == "CT"
    assert volume.array.dtype == np.int16
    assert np.percentile(volume.array, 1) < -900  # air outside the body
    centre = volume.array[:, 200:312, 200:312]
    assert -100 < float(np.median(centre)) < 150  # soft tissue
    meta = volume.meta
    assert meta["source_format"] == "dicom"
    assert meta["n_slices"] == 20 and meta["series_count"] == 1
    assert meta["gantry_tilt_deg"] == 0.0 and not meta["nonuniform_spacing"] and meta["missing_slices"] == 0
    assert meta["units"] == "HU"
    json.dumps(volume.describe())  # JSON-safe


def test_real_series_matches_simpleitk(real_series: Path, real_volume: Volume) -> None:
    import SimpleITK as sitk

    from rrg3d.io.readers import volume_from_sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(real_series)))
    reference = volume_from_sitk(reader.Execute())
    assert reference.shape == real_volume.shape
    np.testing.assert_array_equal(reference.array.astype(np.int32), real_volume.array.astype(np.int32))
    np.testing.assert_allclose(reference.affine, real_volume.affine, atol=1e-3)


def test_gdcm_fallback_when_pydicom_has_no_decoder(real_series: Path, real_volume: Volume, monkeypatch) -> None:
    monkeypatch.setattr(dicom, "_pydicom_can_decode", lambda ds: False)
    volume = read_dicom(real_series)
    assert volume.meta["pixel_decoder"] == "SimpleITK/GDCM"
    np.testing.assert_array_equal(volume.array, real_volume.array)
    np.testing.assert_allclose(volume.affine, real_volume.affine)


# ------------------------------------------------------------------------------------------- PHI


def _collect(caplog, caught) -> str:
    return "\n".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in caught])


def test_planted_identifiers_never_reach_outputs(planted_series: Path, caplog, tmp_path: Path, assert_no_phi) -> None:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_dicom(planted_series)
        infos = list_series(planted_series)
        # a second series in the same folder → a warning that lists the choices
        mixed = tmp_path / "mixed"
        shutil.copytree(planted_series, mixed)
        import pydicom

        for name in ("slice_000.dcm", "slice_001.dcm"):
            ds = pydicom.dcmread(mixed / name)
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99999.555"
            ds.save_as(mixed / name)
        mixed_volume = read_dicom(mixed)
    assert volume.shape == (20, 512, 512)
    assert mixed_volume.meta["series_count"] == 2
    assert any("2 series" in r.getMessage() for r in caplog.records)
    assert_no_phi(json.dumps(volume.describe()))
    assert_no_phi(json.dumps(mixed_volume.describe()))
    assert_no_phi(" ".join(info.describe() + repr(info) for info in infos))
    assert_no_phi(_collect(caplog, caught))


def _corrupt_copy(planted_series: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(planted_series, target)
    return target


def _modify(path: Path, **changes) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_planted_identifiers_never_reach_errors(
    planted_series: Path, tmp_path: Path, caplog, monkeypatch, assert_no_phi
) -> None:
    caplog.set_level(logging.DEBUG)
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        truncated = _corrupt_copy(planted_series, tmp_path, "truncated")
        data = (truncated / "slice_007.dcm").read_bytes()
        (truncated / "slice_007.dcm").write_bytes(data[: len(data) - 20000])
        with pytest.raises(VolumeReadError, match=r"slice_007\.dcm.*(truncated|pixel data)") as err:
            read_dicom(truncated)
        messages.append(str(err.value))

        rows = _corrupt_copy(planted_series, tmp_path, "rows")
        _modify(rows / "slice_003.dcm", Rows=256)
        with pytest.raises(VolumeReadError, match="Rows/Columns") as err:
            read_dicom(rows)
        messages.append(str(err.value))

        orientation = _corrupt_copy(planted_series, tmp_path, "orientation")
        _modify(orientation / "slice_004.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
        with pytest.raises(VolumeReadError, match="ImageOrientationPatient") as err:
            read_dicom(orientation)
        messages.append(str(err.value))

        no_position = _corrupt_copy(planted_series, tmp_path, "no_position")
        import pydicom

        ds = pydicom.dcmread(no_position / "slice_005.dcm")
        del ds.ImagePositionPatient
        ds.save_as(no_position / "slice_005.dcm")
        with pytest.raises(VolumeReadError, match=r"slice_005\.dcm: missing or invalid ImagePositionPatient") as err:
            read_dicom(no_position)
        messages.append(str(err.value))

        garbage = _corrupt_copy(planted_series, tmp_path, "garbage")
        (garbage / "slice_000.dcm").write_bytes(b"\x00" * 200 + b"Plantedname^Testpatient PHI-ID-7781234")
        with pytest.raises(VolumeReadError, match="not a DICOM file") as err:
            read_dicom(garbage / "slice_000.dcm")
        messages.append(str(err.value))

        # A decoder error that quotes header values must come out scrubbed.
        def failing_decoder(path: Path) -> np.ndarray:
            raise RuntimeError("decoder choked on Plantedname^Testpatient / ACC-55501234 at Planted General Hospital")

        monkeypatch.setattr(dicom, "_pydicom_can_decode", lambda ds: False)
        monkeypatch.setattr(dicom, "_decode_with_sitk", failing_decoder)
        with pytest.raises(VolumeReadError, match="JPEG 2000 Image Compression") as err:
            read_dicom(planted_series)
        assert "<redacted>" in str(err.value)
        messages.append(str(err.value))
    for message in messages:
        assert_no_phi(message)
    assert_no_phi(_collect(caplog, caught))


# ------------------------------------------------------------------------------------------- synthetic series


def test_sorted_by_position_not_by_name_or_instance_number(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(tmp_path / "s", n=7, seed=3)
    volume = read_dicom(series.folder)
    assert volume.shape == (7, 32, 32) and volume.orientation == "SPL"
    np.testing.assert_allclose(volume.spacing, (2.0, 0.8, 0.7))
    assert volume.array.dtype == np.int16
    assert_voxels_at_dicom_positions(volume, series)
    # the canonical first slice is the most inferior one: the smallest z
    np.testing.assert_allclose(volume.origin[2], series.positions[:, 2].min())


def test_per_slice_rescale(tmp_path: Path, make_dicom_series) -> None:
    n = 5
    integer = make_dicom_series(
        tmp_path / "int", n=n, intercepts=[-1024, -1000, -1024, -900, -1024], slopes=[1, 1, 2, 1, 1]
    )
    volume = read_dicom(integer.folder)
    assert volume.array.dtype == np.int16 and volume.meta["rescale_varies"]
    assert_voxels_at_dicom_positions(volume, integer)

    fractional = make_dicom_series(tmp_path / "float", n=n, slopes=[0.5, 0.25, 1.5, 1, 2], intercepts=[0, 1, 2, 3, 4.5])
    volume = read_dicom(fractional.folder)
    assert volume.array.dtype == np.float32
    assert_voxels_at_dicom_positions(volume, fractional)

    wide = make_dicom_series(tmp_path / "wide", n=3, intercepts=[40000] * 3)
    volume = read_dicom(wide.folder)
    assert volume.array.dtype == np.int32
    assert_voxels_at_dicom_positions(volume, wide)


def test_gantry_tilt_detected_and_geometry_kept(tmp_path: Path, make_dicom_series, caplog) -> None:
    series = make_dicom_series(tmp_path / "tilt", n=6, tilt_deg=15.0, step=2.5)
    with caplog.at_level(logging.WARNING):
        volume = read_dicom(series.folder)
    assert volume.meta["gantry_tilt_deg"] == pytest.approx(15.0, abs=0.01)
    assert any("gantry tilt" in r.getMessage() for r in caplog.records)
    assert volume.orientation == "SPL"
    # the slice axis follows the stacking vector: 2.5 mm along the normal plus tan(15°)·2.5 mm along the columns
    np.testing.assert_allclose(volume.spacing[0], 2.5 / math.cos(math.radians(15.0)), rtol=1e-5)
    assert_voxels_at_dicom_positions(volume, series)


def test_nonuniform_gaps_reported_not_resampled(tmp_path: Path, make_dicom_series, caplog) -> None:
    series = make_dicom_series(tmp_path / "gaps", n=6, gaps=[2.0, 2.0, 2.2, 2.0, 1.9])
    with caplog.at_level(logging.WARNING):
        volume = read_dicom(series.folder)
    meta = volume.meta
    assert volume.shape[0] == 6
    assert meta["nonuniform_spacing"] is True
    assert meta["slice_gaps_mm"] == pytest.approx({"min": 1.9, "max": 2.2, "median": 2.0})
    assert volume.spacing[0] == pytest.approx(2.0)
    assert meta["missing_slices"] == 0
    assert any("non-uniform" in r.getMessage() for r in caplog.records)

    uniform = read_dicom(make_dicom_series(tmp_path / "uniform", n=4, step=3.0).folder)
    assert uniform.meta["nonuniform_spacing"] is False


def test_missing_slice_detected(tmp_path: Path, make_dicom_series, caplog) -> None:
    series = make_dicom_series(tmp_path / "missing", n=6, gaps=[2.0, 2.0, 4.0, 2.0, 2.0])
    with caplog.at_level(logging.WARNING):
        volume = read_dicom(series.folder)
    assert volume.meta["missing_slices"] == 1
    assert volume.shape[0] == 6 and volume.spacing[0] == pytest.approx(2.0)
    assert any("missing slice" in r.getMessage() for r in caplog.records)
    assert_voxels_at_dicom_positions(volume, series, slices=[0, 1, 2])  # geometry exact before the gap


def test_duplicate_positions(tmp_path: Path, make_dicom_series) -> None:
    stored = np.stack([np.full((32, 32), 1000 + 10 * k, dtype=np.uint16) for k in range(5)])
    same = stored.copy()
    same[3] = same[2]
    series = make_dicom_series(tmp_path / "dup", n=5, gaps=[2.0, 2.0, 0.0, 2.0], stored=same)
    volume = read_dicom(series.folder)
    assert volume.shape[0] == 4 and volume.meta["duplicates_dropped"] == 1
    assert volume.meta["nonuniform_spacing"] is False

    different = make_dicom_series(tmp_path / "clash", n=5, gaps=[2.0, 2.0, 0.0, 2.0], stored=stored)
    with pytest.raises(VolumeReadError, match="share a position"):
        read_dicom(different.folder)


def test_two_series_listed_and_selectable(tmp_path: Path, make_dicom_series, caplog) -> None:
    folder = tmp_path / "two"
    big = make_dicom_series(folder / "a", n=6, seed=1, series_uid="1.2.826.0.1.3680043.99999.1001")
    small = make_dicom_series(folder / "b", n=4, seed=2, series_uid="1.2.826.0.1.3680043.99999.1002", step=3.0)
    (folder / "DICOMDIR").write_bytes(b"not really a dicomdir")
    (folder / "notes.txt").write_text("hello")
    infos = list_series(folder)
    assert [i.n_slices for i in infos] == [6, 4]
    assert [i.index for i in infos] == [0, 1]
    assert all(isinstance(i, SeriesInfo) and len(i.key) == 12 for i in infos)
    assert infos[0].key == dicom.series_key(big.series_uid)
    text = " ".join(i.describe() + repr(i) for i in infos)
    assert big.series_uid not in text and small.series_uid not in text
    assert "CT" in infos[0].describe() and "6 slices" in infos[0].describe()

    with caplog.at_level(logging.WARNING):
        default = read_dicom(folder)
    assert default.shape[0] == 6 and default.meta["series_count"] == 2 and default.meta["files_skipped"] == 2
    assert any(infos[1].key in r.getMessage() for r in caplog.records)  # the choices are listed

    by_index = read_dicom(folder, series=1)
    by_key = read_dicom(folder, series=infos[1].key[:6])
    assert by_index.shape[0] == by_key.shape[0] == 4
    assert by_key.spacing[0] == pytest.approx(3.0)
    assert_voxels_at_dicom_positions(by_key, small)

    with pytest.raises(VolumeReadError, match=r"no series matches 'zzz'.*\[0\].*\[1\]"):
        read_dicom(folder, series="zzz")
    with pytest.raises(VolumeReadError, match="out of range"):
        read_dicom(folder, series=5)


def test_single_slice_is_2d(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(tmp_path / "one", n=1)
    with pytest.raises(VolumeReadError, match="only one slice"):
        read_dicom(series.folder)
    with pytest.raises(VolumeReadError, match=r"only one slice.*folder"):
        read_dicom(series.files[0])


def test_not_dicom_and_empty_folders(tmp_path: Path) -> None:
    text = tmp_path / "scan.dcm"
    text.write_text("definitely not DICOM\n" * 20)
    with pytest.raises(VolumeReadError, match=r"scan\.dcm: not a DICOM file"):
        read_dicom(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeReadError, match="empty: no DICOM image files found"):
        read_dicom(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    with pytest.raises(VolumeReadError, match=r"no DICOM image files found \(1 non-DICOM"):
        read_dicom(junk)
    assert list_series(empty) == []


def test_inconsistent_rows_named(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(tmp_path / "rows", n=4)
    import pydicom

    ds = pydicom.dcmread(series.files[2])
    ds.Rows = 16
    ds.PixelData = ds.PixelData[: 16 * 32 * 2]
    ds.save_as(series.files[2])
    with pytest.raises(
        VolumeReadError, match=rf"inconsistent Rows/Columns.*16x32 in 1 slice.*{series.files[2].name}.*32x32"
    ):
        read_dicom(series.folder)


def test_truncated_native_pixel_data(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(tmp_path / "trunc", n=4)
    data = series.files[1].read_bytes()
    series.files[1].write_bytes(data[:-100])
    with pytest.raises(VolumeReadError, match=rf"{series.files[1].name}: truncated pixel data"):
        read_dicom(series.folder)


def test_compressed_without_decoder_names_transfer_syntax(tmp_path: Path, make_dicom_series) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    series = make_dicom_series(tmp_path / "jpeg", n=3)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.save_as(path)
    with pytest.raises(VolumeReadError, match="JPEG Lossless, Non-Hierarchical") as err:
        read_dicom(series.folder)
    assert "1.2.840.10008.1.2.4.70" not in str(err.value)


@pytest.mark.parametrize(("orientation", "normal_axis"), [(SAGITTAL, 0), (CORONAL, 1), (AXIAL, 2)])
def test_acquisition_planes_become_canonical(tmp_path: Path, make_dicom_series, orientation, normal_axis) -> None:
    series = make_dicom_series(tmp_path / "plane", n=5, rows=24, cols=28, orientation=orientation, step=1.5)
    info = list_series(series.folder)[0]
    assert info.plane == ("sagittal", "coronal", "axial")[normal_axis]
    volume = read_dicom(series.folder)
    assert volume.orientation == "SPL"
    assert volume.obliqueness_deg == pytest.approx(0.0, abs=1e-6)
    assert_voxels_at_dicom_positions(volume, series)
    # index_to_world of the voxel holding pixel (0, 0) of the first written slice is that slice's IPP
    inverse = np.linalg.inv(volume.affine)
    index = np.rint(series.positions[0] @ inverse[:3, :3].T + inverse[:3, 3])
    np.testing.assert_allclose(volume.index_to_world(index), series.positions[0], atol=1e-6)
    assert volume.array[tuple(index.astype(int))] == series.values[0, 0, 0]


def test_oblique_series(tmp_path: Path, make_dicom_series) -> None:
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    series = make_dicom_series(tmp_path / "oblique", n=4, orientation=(1, 0, 0, 0, c, s))
    volume = read_dicom(series.folder)
    assert volume.orientation == "SPL"
    assert volume.obliqueness_deg == pytest.approx(20.0, abs=1e-3)
    assert volume.meta["gantry_tilt_deg"] == 0.0
    assert_voxels_at_dicom_positions(volume, series)


def test_enhanced_multiframe_ct(tmp_path: Path, make_enhanced_dicom) -> None:
    series = make_enhanced_dicom(
        tmp_path / "enhanced" / "ct.dcm",
        n=5,
        frame_order=[3, 0, 4, 1, 2],
        slopes=[1, 1, 2, 1, 1],
        intercepts=[-1024, -1000, -1024, -1024, -900],
    )
    infos = list_series(series.files[0])
    assert infos[0].n_files == 1 and infos[0].n_slices == 5
    volume = read_dicom(series.files[0])
    assert volume.shape == (5, 24, 20) and volume.orientation == "SPL"
    np.testing.assert_allclose(volume.spacing, (2.5, 0.9, 0.6))
    assert volume.meta["multi_frame"] is True and volume.meta["n_files"] == 1
    assert_voxels_at_dicom_positions(volume, series)
    # also found inside a folder
    assert read_dicom(series.folder).shape == (5, 24, 20)


def test_enhanced_multiframe_sagittal(tmp_path: Path, make_enhanced_dicom) -> None:
    series = make_enhanced_dicom(tmp_path / "sag.dcm", n=4, orientation=SAGITTAL)
    volume = read_dicom(series.files[0])
    assert volume.orientation == "SPL"
    assert_voxels_at_dicom_positions(volume, series)


# ------------------------------------------------------------------------------------------- PET / SUV

PET_TAGS = {
    "weight_kg": 70.0,
    "dose_bq": 370e6,
    "half_life_s": 6586.2,
    "injection_time": "090000.00",
    "series_time": "100000.00",
}


def test_suv_formula() -> None:
    expected = 70_000.0 / (370e6 * math.exp(-math.log(2) * 3600 / 6586.2))
    assert suv_bw_factor(70.0, 370e6, 6586.2, 3600.0) == pytest.approx(expected, rel=1e-12)
    assert suv_bw_factor(70.0, 370e6, 6586.2, 0.0) == pytest.approx(70_000 / 370e6)
    with pytest.raises(ValueError):
        suv_bw_factor(0.0, 370e6, 6586.2, 0.0)


def test_pet_series_suv_factor(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(
        tmp_path / "pet", n=4, modality="PT", slopes=[0.5, 0.75, 1.25, 2.0], intercepts=[0] * 4, pet=PET_TAGS
    )
    volume = read_dicom(series.folder)
    assert volume.modality == "PT" and volume.array.dtype == np.float32
    assert_voxels_at_dicom_positions(volume, series)
    hand = 70.0 * 1000.0 / (370e6 * 0.5 ** (3600.0 / 6586.2))
    assert volume.meta["suv_bw_factor"] == pytest.approx(hand, rel=1e-9)
    assert volume.meta["suv_inputs"] == {
        "weight_kg": 70.0,
        "injected_dose_bq": 370e6,
        "half_life_s": 6586.2,
        "decay_time_s": 3600.0,
        "decay_correction": "START",
    }
    assert volume.meta["pet_units"] == "BQML"
    json.dumps(volume.describe())


def test_suv_variants(tmp_path: Path, make_dicom_series) -> None:
    import pydicom

    def header(name: str, **pet) -> pydicom.Dataset:
        series = make_dicom_series(tmp_path / name, n=2, modality="PT", pet={**PET_TAGS, **pet})
        return pydicom.dcmread(series.files[0], stop_before_pixels=True)

    factor, inputs = suv_from_dataset(header("admin", decay_correction="ADMIN"))
    assert factor == pytest.approx(70_000 / 370e6) and inputs["decay_time_s"] == 0.0

    # no SeriesTime: the earliest AcquisitionTime is the scan start
    late = header("late", series_time=None, acquisition_time="100500")
    early = header("early", series_time=None, acquisition_time="093000")
    factor, inputs = suv_from_dataset(late, [early])
    assert inputs["decay_time_s"] == pytest.approx(1800.0)

    # injection before midnight, scan after it (times only)
    factor, inputs = suv_from_dataset(header("midnight", injection_time="233000", series_time="003000"))
    assert inputs["decay_time_s"] == pytest.approx(3600.0)

    # RadiopharmaceuticalStartDateTime takes precedence and crosses the date properly
    factor, inputs = suv_from_dataset(
        header("datetime", injection_datetime="20240101233000", series_date="20240102", series_time="003000")
    )
    assert inputs["decay_time_s"] == pytest.approx(3600.0)

    for name, changes, reason in [
        ("noweight", {"weight_kg": None}, "PatientWeight"),
        ("nodose", {"dose_bq": None}, "RadionuclideTotalDose"),
        ("counts", {"units": "CNTS"}, "not BQML"),
        ("nodecay", {"decay_correction": "NONE"}, "DecayCorrection"),
    ]:
        factor, info = suv_from_dataset(header(name, **changes))
        assert factor is None and reason in info["reason"]


def test_pet_without_suv_tags_reads_with_reason(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(tmp_path / "pet", n=3, modality="PT", pet={**PET_TAGS, "weight_kg": None})
    volume = read_dicom(series.folder)
    assert volume.meta["suv_bw_factor"] is None
    assert "PatientWeight" in volume.meta["suv_unavailable"]


def test_recursive_scan_and_any_file_names(tmp_path: Path, make_dicom_series) -> None:
    series = make_dicom_series(tmp_path / "root" / "deep" / "er", n=4, prefix="IM_", suffix="")
    other = make_dicom_series(
        tmp_path / "root" / "x", n=3, seed=5, series_uid="1.2.826.0.1.3680043.99999.77", suffix=".dcm"
    )
    infos = list_series(tmp_path / "root")
    assert sorted(i.n_files for i in infos) == [3, 4]
    volume = read_dicom(tmp_path / "root")
    assert_voxels_at_dicom_positions(volume, series)
    assert read_dicom(tmp_path / "root", series=dicom.series_key(other.series_uid)).shape[0] == 3


def test_enhanced_multiframe_without_frame_position_fails(tmp_path: Path, make_enhanced_dicom) -> None:
    import pydicom

    series = make_enhanced_dicom(tmp_path / "broken.dcm", n=4)
    ds = pydicom.dcmread(series.files[0])
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(series.files[0])
    with pytest.raises(VolumeReadError, match=r"broken\.dcm: frame 3 has no PlanePositionSequence"):
        read_dicom(series.files[0])


def test_legacy_multiframe_positions_from_spacing(tmp_path: Path, make_enhanced_dicom) -> None:
    import pydicom

    series = make_enhanced_dicom(tmp_path / "legacy.dcm", n=4, step=2.5)
    ds = pydicom.dcmread(series.files[0])
    del ds.PerFrameFunctionalGroupsSequence
    del ds.SharedFunctionalGroupsSequence
    ds.ImagePositionPatient = [f"{v:.6f}" for v in series.positions[0]]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in series.orientation]
    ds.PixelSpacing = [f"{v:g}" for v in series.spacing]
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.SpacingBetweenSlices = "2.5"
    ds.save_as(series.files[0])
    assert_voxels_at_dicom_positions(read_dicom(series.files[0]), series)

    del ds.SpacingBetweenSlices
    ds.save_as(series.files[0])
    with pytest.raises(VolumeReadError, match="without per-frame positions"):
        read_dicom(series.files[0])
