"""Preprocessing: HU/SUV, orientation, spacing, window, crop/pad/resize, named presets, batch cache."""

from rrg3d.preprocess.ops import centered_grid, crop_or_pad, resample_to_grid, resize, to_suv, window
from rrg3d.preprocess.presets import Intensity, Preset, list_presets, load_preset, preset_family

__all__ = [
    "Intensity",
    "Preset",
    "centered_grid",
    "crop_or_pad",
    "list_presets",
    "load_preset",
    "preset_family",
    "resample_to_grid",
    "resize",
    "to_suv",
    "window",
]
