"""Training-time augmentation of model inputs: small translations, intensity jitter and noise.

Written once on a ``[C, D, H, W]`` tensor (:func:`augment_volume`), applied per item by :class:`AugmentedDataset`.
Everything random comes from a generator seeded by ``(seed, phase, epoch, index)``, so an item gets the same
augmentation whatever the worker, process or resume point — ``--resume`` stays bit for bit. There are no
flips: radiology reports name sides ("right lower lobe"), and a mirrored volume would contradict its report.
The input is the preset's output (already windowed), so the jitter is in model-input units (e.g. ``[0, 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rrg3d.errors import ConfigError
from rrg3d.models.encoders.layers import to_3tuple

__all__ = ["AugmentSettings", "AugmentedDataset", "augment_volume"]


@dataclass
class AugmentSettings:
    """``data.augment`` of a recipe; off unless ``enabled``."""

    enabled: bool = False
    #: largest translation in voxels per axis (D, H, W); the border voxels are repeated into the gap
    shift: tuple[int, int, int] = (2, 4, 4)
    scale: float = 0.05  # intensity × (1 + U(−scale, scale))
    offset: float = 0.02  # intensity + U(−offset, offset)
    noise: float = 0.01  # + N(0, noise²) per voxel
    prob: float = 1.0  # chance that an item is augmented at all

    def __post_init__(self) -> None:
        try:
            self.shift = to_3tuple(self.shift, "data.augment.shift")
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
        if min(self.shift) < 0:
            raise ConfigError(f"data.augment.shift must be 3 voxel counts >= 0, got {self.shift}")
        if min(self.scale, self.offset, self.noise) < 0 or not 0 <= self.prob <= 1:
            raise ConfigError("data.augment: scale, offset and noise must be >= 0 and prob in [0, 1]")


def _uniform(generator: torch.Generator, bound: float) -> float:
    return (torch.rand((), generator=generator).item() * 2 - 1) * bound


def augment_volume(volume: Tensor, settings: AugmentSettings, generator: torch.Generator) -> Tensor:
    """A randomly translated, intensity-jittered and noised copy of ``volume`` ``[C, D, H, W]`` (same shape)."""
    if volume.dim() != 4:
        raise ValueError(f"augment_volume expects [C, D, H, W], got shape {tuple(volume.shape)}")
    if torch.rand((), generator=generator).item() >= settings.prob:
        return volume
    out = volume
    shifts = [int(torch.randint(-s, s + 1, (), generator=generator)) if s else 0 for s in settings.shift]
    if any(shifts):
        pad: list[int] = []
        for s in reversed(shifts):  # F.pad order: W, H, D
            pad += [max(s, 0), max(-s, 0)]
        padded = F.pad(out[None], pad, mode="replicate")[0]
        d, h, w = out.shape[1:]
        starts = [max(-s, 0) for s in shifts]
        out = padded[:, starts[0]:starts[0] + d, starts[1]:starts[1] + h, starts[2]:starts[2] + w]
    scale = 1.0 + _uniform(generator, settings.scale)
    offset = _uniform(generator, settings.offset)
    out = out * scale + offset
    if settings.noise > 0:
        out = out + settings.noise * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return out.contiguous()


@dataclass
class AugmentedDataset(torch.utils.data.Dataset):
    """A training dataset whose ``volume`` is augmented; call :meth:`set_epoch` before each epoch's loader."""

    dataset: Any
    settings: AugmentSettings
    seed: int = 0
    phase: int = 0
    epoch: int = 0

    def set_epoch(self, phase: int, epoch: int) -> None:
        self.phase, self.epoch = int(phase), int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        if getattr(self.dataset, "blank_images", False):  # the zeros control stays zeros
            return item
        generator = torch.Generator().manual_seed(hash((self.seed, self.phase, self.epoch, int(i))) & (2**63 - 1))
        item["volume"] = augment_volume(item["volume"], self.settings, generator)
        return item

    def __getattr__(self, name: str) -> Any:  # ids, preset, shape, entries, label_matrix ... of the wrapped set
        if name.startswith("_") or name in ("dataset", "settings"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
