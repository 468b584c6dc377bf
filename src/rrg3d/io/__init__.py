"""Volume IO: one :class:`Volume` type and readers for NIfTI, DICOM, NRRD/MHA/MHD and NPY/NPZ.

Canonical orientation (everything downstream relies on it): arrays are indexed ``[D, H, W]`` where
``D`` runs inferior→superior, ``H`` anterior→posterior and ``W`` patient right→left. World
coordinates are DICOM/ITK patient coordinates (LPS, millimetres). In this frame ``array[d]`` is an
axial slice shown the radiological way (anterior at the top, patient right on the image's left).
"""

from rrg3d.io.readers import list_dicom_series, read_volume, write_volume
from rrg3d.io.volume import CANONICAL_CODES, Volume

__all__ = ["CANONICAL_CODES", "Volume", "list_dicom_series", "read_volume", "write_volume"]
