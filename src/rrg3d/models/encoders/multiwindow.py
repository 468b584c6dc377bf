"""``multiwindow``: a fixed multi-window input stem in front of any registered encoder.

A radiologist reads a chest CT in several windows (lung, mediastinum, bone); one linear window over
[-1000, 1000] HU squeezes the lung's whole range (emphysema at -950, ground glass at -700) into a few hundredths of
the input. The stem takes the single-channel output of a windowing preset (``input_window`` HU mapped onto
``input_range``), recovers HU, cuts it into ``channels`` windows and reduces each over ``pool`` blocks with its own
statistic: ``mean`` keeps densities, ``max`` keeps the brightest voxel (a small nodule or calcification that
averaging would blur away), ``min`` the darkest (emphysema holes). The wrapped encoder then reads the
``len(channels)``-channel volume at ``1 / pool`` of the resolution — the same cost as reading a resized volume, with
what resizing loses kept in the channels. The stem has no parameters; it is stored in the model config, so training
and inference read the volume the same way::

    ENCODERS.build({"name": "multiwindow", "pool": [2, 2, 2],
                    "encoder": {"name": "resnet3d", "input_shape": [32, 64, 64], "layers": [1, 1], "widths": [16, 32]}})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrg3d.errors import ConfigError
from rrg3d.models.encoders.layers import Shape3, check_volume, to_3tuple
from rrg3d.models.registry import ENCODERS

REDUCTIONS = ("mean", "max", "min")

#: Chest CT: lung (mean, and its darkest voxel), solid tissue in the lung (brightest voxel: nodules, consolidation),
#: mediastinum (mean: nodes, fluid, heart) and dense material (brightest voxel: calcification, bone, devices).
CHEST_CHANNELS: tuple[tuple[float, float, str], ...] = (
    (-1000.0, -300.0, "mean"),
    (-1000.0, -300.0, "min"),
    (-500.0, 100.0, "max"),
    (-150.0, 250.0, "mean"),
    (200.0, 1000.0, "max"),
)


def _default_encoder() -> dict[str, Any]:
    return {"name": "resnet3d"}


@ENCODERS.register("multiwindow")
class MultiWindowEncoder(nn.Module):
    """Windows and block-reduces the input volume, then runs the wrapped ``encoder`` on the result."""

    @dataclass
    class Config:
        #: the wrapped encoder's mapping (``ENCODERS.build``); its ``in_channels`` is the number of ``channels``
        encoder: dict[str, Any] = field(default_factory=_default_encoder)
        #: one output channel per ``(low HU, high HU, reduction)``, reduction "mean", "max" or "min"
        channels: tuple[tuple[float, float, str], ...] = CHEST_CHANNELS
        pool: tuple[int, int, int] = (2, 2, 2)  # block size of the reductions (D, H, W)
        #: the HU window the preprocessing preset maps onto ``input_range`` (the preset's ``intensity.window``)
        input_window: tuple[float, float] = (-1000.0, 1000.0)
        input_range: tuple[float, float] = (0.0, 1.0)
        in_channels: int = 1
        #: reference input size: the wrapped encoder's ``input_shape`` × ``pool`` (filled in when built)
        input_shape: tuple[int, int, int] | None = None

        def __post_init__(self) -> None:
            self.pool = to_3tuple(self.pool, "pool")
            if min(self.pool) < 1:
                raise ValueError(f"pool must be ≥ 1 on every axis, got {self.pool}")
            if self.in_channels != 1:
                raise ValueError(f"the multi-window stem reads one windowed channel, not {self.in_channels}")
            low, high = (float(v) for v in self.input_window)
            r0, r1 = (float(v) for v in self.input_range)
            if not high > low or r0 == r1:
                raise ValueError(f"input_window needs low < high and input_range two distinct values, got "
                                 f"{self.input_window} -> {self.input_range}")
            self.input_window, self.input_range = (low, high), (r0, r1)
            channels = []
            for item in self.channels:
                if len(item) != 3:
                    raise ValueError(f"each channel is [low HU, high HU, reduction], got {item!r}")
                a, b, reduction = float(item[0]), float(item[1]), str(item[2])
                if not b > a:
                    raise ValueError(f"channel window [{a}, {b}] needs low < high")
                if reduction not in REDUCTIONS:
                    raise ValueError(f"channel reduction must be one of {REDUCTIONS}, got {reduction!r}")
                if b <= low or a >= high:
                    raise ValueError(f"channel window [{a}, {b}] HU lies outside the input window {self.input_window}:"
                                     " the channel would be constant")
                channels.append((a, b, reduction))
            if not channels:
                raise ValueError("the multi-window stem needs at least one channel")
            self.channels = tuple(channels)
            if not isinstance(self.encoder, dict) or "name" not in self.encoder:
                raise ValueError(f"encoder must be a mapping with a 'name', got {self.encoder!r}")
            if self.encoder["name"] == "multiwindow":
                raise ValueError("the multi-window stem cannot wrap another multi-window stem")
            inner_channels = self.encoder.get("in_channels", len(channels))
            if inner_channels != len(channels):
                raise ValueError(f"the wrapped encoder's in_channels ({inner_channels}) must equal the number of "
                                 f"channels ({len(channels)})")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.encoder = ENCODERS.build({**config.encoder, "in_channels": len(config.channels)})
        inner_shape = to_3tuple(self.encoder.config.input_shape, "input_shape")
        reference = tuple(n * p for n, p in zip(inner_shape, config.pool, strict=True))
        if config.input_shape is not None and tuple(config.input_shape) != reference:
            raise ConfigError(f"multiwindow: input_shape {tuple(config.input_shape)} is not the wrapped encoder's "
                              f"{inner_shape} × pool {config.pool} = {reference} (leave it out: it is derived)")
        config.input_shape = reference  # type: ignore[assignment]
        config.encoder = ENCODERS.describe(self.encoder)  # resolved: every key of the wrapped encoder, plain data
        self.in_channels = 1
        self.out_dim = int(self.encoder.out_dim)
        self.pool = config.pool
        self.reductions = [reduction for _, _, reduction in config.channels]
        low, high = config.input_window
        r0, r1 = config.input_range
        # HU = low + (x - r0) * scale, so window k, (HU - a_k) / (b_k - a_k), is x * s_k + o_k: plain floats (no
        # device copy, no host sync per forward)
        scale = (high - low) / (r1 - r0)
        self.channel_affine = [(scale / (b - a), (low - r0 * scale - a) / (b - a)) for a, b, _ in config.channels]

    def grid_shape(self, input_shape: tuple[int, int, int]) -> Shape3:
        reduced = tuple(int(n) // p for n, p in zip(input_shape, self.pool, strict=True))
        if min(reduced) < 1:
            raise ValueError(f"multiwindow: input {tuple(input_shape)} is smaller than one pool block {self.pool}")
        return self.encoder.grid_shape(reduced)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if hasattr(self.encoder, "set_gradient_checkpointing"):
            self.encoder.set_gradient_checkpointing(enabled)

    def windows(self, x: Tensor) -> Tensor:
        """The stem alone: ``[B, 1, D, H, W]`` preset output → ``[B, K, D // p, H // p, W // p]`` in [0, 1].

        A window is a non-decreasing map, so it commutes with max and min: those channels pool the input once
        (shared) and window the small result; only ``mean`` channels window every voxel."""
        check_volume(x, 1, "multiwindow")
        pooled: dict[str, Tensor] = {}
        out = []
        for k, reduction in enumerate(self.reductions):
            scale, offset = self.channel_affine[k]
            if reduction == "mean":
                out.append(F.avg_pool3d(torch.clamp_(x * scale + offset, 0, 1), self.pool))
                continue
            if reduction not in pooled:
                pooled[reduction] = (F.max_pool3d(x, self.pool) if reduction == "max"
                                     else -F.max_pool3d(-x, self.pool))
            out.append(torch.clamp_(pooled[reduction] * scale + offset, 0, 1))
        return torch.cat(out, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.windows(x))


def check_preset_window(encoder: dict[str, Any], preset: Any, where: str) -> None:
    """Raise :class:`ConfigError` unless the preprocessing ``preset`` (name, mapping or Preset) maps HU onto the
    range the multi-window ``encoder`` mapping expects (``input_window`` → ``input_range``): a stem reading another
    window would cut its channels at the wrong densities."""
    from rrg3d.preprocess.presets import load_preset

    defaults = MultiWindowEncoder.Config
    expected_window = tuple(float(v) for v in encoder.get("input_window", defaults.input_window))
    expected_range = tuple(float(v) for v in encoder.get("input_range", defaults.input_range))
    intensity = load_preset(preset).intensity
    window = tuple(float(v) for v in intensity.window) if intensity.window is not None else None
    out_range = tuple(float(v) for v in intensity.out_range)
    if intensity.kind != "window" or window != expected_window or out_range != expected_range:
        raise ConfigError(f"{where}: the multi-window stem expects HU {list(expected_window)} mapped onto "
                          f"{list(expected_range)}, but the preprocessing preset maps {intensity.kind} "
                          f"{list(window) if window else None} onto {list(out_range)}")
