"""Write a :class:`Volume` as a plain CT DICOM series (one file per axial slice).

For tests, demos and exporting preprocessed volumes to viewers. Headers carry geometry and rescale only:
no patient, study or institution information is ever written (identifiers are generated, anonymous UIDs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rrg3d.io.volume import Volume


def write_dicom_series(volume: Volume, folder: str | os.PathLike[str], series_description: str = "rrg3d") -> Path:
    """Write ``volume`` (HU) as ``folder/slice_0000.dcm ...``; slices stacked along the volume's D axis."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from rrg3d.utils.files import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = np.asarray(volume.array)
    intercept = -1024.0
    stored = np.clip(np.rint(array - intercept), 0, 65535).astype(np.uint16)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    row_dir = volume.direction[:, 2]  # along W (columns of a slice)
    col_dir = volume.direction[:, 1]  # along H (rows)
    sd, sh, sw = volume.spacing
    for index in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{index:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.SeriesDescription = series_description
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [float(v) for v in volume.index_to_world(np.array([index, 0, 0]))]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(sh), float(sw)]
        ds.SliceThickness = float(sd)
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.PixelData = stored[index].tobytes()
        target = folder / f"slice_{index:04d}.dcm"
        with atomic_path(target) as tmp:
            ds.save_as(str(tmp), enforce_file_format=True)
    return folder
