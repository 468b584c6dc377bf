"""Small synthetic chest-like CT volumes with plausible HU, for IO/preprocessing checks and the demo.

This is not the phantom benchmark (``rrg3d.data.phantom``, with findings and reports); it only gives
anatomy-shaped HU values (air, fat, soft tissue, lungs, heart, aorta, spine) at any shape and spacing.
"""

from __future__ import annotations

import numpy as np

from rrg3d.io.volume import Volume

HU = {"air": -1000, "lung": -850, "fat": -100, "soft": 40, "blood": 50, "heart": 45, "bone": 700}


def synthetic_chest(
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.8, 2.8),
    seed: int = 0,
    noise_hu: float = 15.0,
) -> Volume:
    """A canonical ``[D, H, W]`` int16 HU volume of a chest-like body; per-seed variation of size and position."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    z = np.linspace(-1, 1, depth, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, height, dtype=np.float32)[None, :, None]  # anterior (-1) → posterior (+1)
    x = np.linspace(-1, 1, width, dtype=np.float32)[None, None, :]  # patient right (-1) → left (+1)
    dx, dy = rng.uniform(-0.04, 0.04, size=2)
    body_a, body_b = rng.uniform(0.78, 0.9), rng.uniform(0.55, 0.65)
    x, y = x - dx, y - dy
    body = (x / body_a) ** 2 + (y / body_b) ** 2 < 1
    inner = (x / (body_a - 0.07)) ** 2 + (y / (body_b - 0.07)) ** 2 < 1
    taper = np.clip(1.0 - 0.35 * np.abs(z), 0.4, 1.0)
    lung_r = ((x + 0.36) / (0.28 * taper)) ** 2 + ((y + 0.02) / (0.42 * taper)) ** 2 < 1
    lung_l = ((x - 0.38) / (0.26 * taper)) ** 2 + ((y + 0.02) / (0.42 * taper)) ** 2 < 1
    heart = ((x - 0.08) / 0.22) ** 2 + ((y + 0.12) / 0.2) ** 2 + ((z + 0.25) / 0.45) ** 2 < 1
    aorta = ((x + 0.02) / 0.06) ** 2 + ((y - 0.2) / 0.06) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y - 0.42) / 0.08) ** 2 < 1
    array = np.full(shape, HU["air"], dtype=np.float32)
    array[np.broadcast_to(body, shape)] = HU["fat"]
    array[np.broadcast_to(inner, shape)] = HU["soft"]
    array[np.broadcast_to(lung_r | lung_l, shape)] = HU["lung"]
    array[np.broadcast_to(heart, shape)] = HU["heart"]
    array[np.broadcast_to(aorta, shape)] = HU["blood"]
    array[np.broadcast_to(spine, shape)] = HU["bone"]
    array += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    array += rng.uniform(-10, 10)  # scanner calibration offset
    origin = (-depth * spacing[0] / 2, -height * spacing[1] / 2, -width * spacing[2] / 2)
    # origin is LPS (x, y, z); build it from the canonical axes (W→x, H→y, D→z)
    origin_lps = (origin[2], origin[1], origin[0])
    return Volume.from_spacing(np.clip(array, -1024, 3071).astype(np.int16), spacing, origin_lps,
                               meta={"source_format": "synthetic", "seed": seed})
