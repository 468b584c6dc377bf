"""rrg3d: radiology report generation from 3D medical volumes."""

from rrg3d.errors import ManifestError, PresetError, RRG3DError, VolumeReadError

__version__ = "0.1.0"

__all__ = ["ManifestError", "PresetError", "RRG3DError", "VolumeReadError", "__version__"]
