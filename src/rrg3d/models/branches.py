"""Extra modality branches of a vision tower (PETRG-3D's dual-branch PET/CT encoding).

The tower's own encoder → compressor → projector is the CT branch. Each entry of ``vision.branches`` (today ``pet``)
adds a branch for the next channels of the input volume: its own compressor and projector, and either the CT
encoder (``encoder: shared``, as in PETRG-3D's code: one 3D ViT, a perceiver and a linear layer per modality) or an
encoder of its own (a registry mapping). The branches' tokens follow the CT tokens, and the prompt labels each
modality's run of image tokens (``CT: <image>… PET: <image>…``), so the LM knows which tokens are which.

Every branch must give as many tokens as the CT branch for the input size: the prompt splits the image tokens
evenly between modalities, and the tower checks the counts on every forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rrg3d.errors import ConfigError

#: modality names a branch may have, in input-channel order after the CT
BRANCH_NAMES = ("pet",)


@dataclass
class BranchSettings:
    """One extra modality branch (``vision.branches.<name>``)."""

    #: ``shared`` (the CT encoder, weights shared) or an encoder mapping ``{name: ..., ...}`` of its own
    encoder: Any = "shared"
    compressor: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    projector: dict[str, Any] = field(default_factory=lambda: {"name": "mlp2x_gelu"})
    #: input channels this branch reads (after the CT's and the previous branches')
    channels: int = 1
    #: the word before this modality's image tokens in the prompt; default the name in capitals
    label: str | None = None

    def __post_init__(self) -> None:
        if not (self.encoder == "shared" or (isinstance(self.encoder, Mapping) and "name" in self.encoder)):
            raise ConfigError(f"a branch encoder is 'shared' or an encoder mapping with a 'name', got {self.encoder!r}")
        for part in ("compressor", "projector"):
            value = getattr(self, part)
            if not isinstance(value, Mapping) or "name" not in value:
                raise ConfigError(f"a branch {part} must be a mapping with a 'name' key, got {value!r}")
        if self.channels < 1:
            raise ConfigError(f"a branch reads at least one channel, got channels={self.channels}")


def normalize_branches(vision: dict[str, Any], where: str) -> dict[str, Any]:
    """``vision`` with ``branches.ct`` folded into the top-level CT branch (``compressor``/``projector``), the
    canonical form a checkpoint records; the other branches checked. Returns a new mapping."""
    branches = vision.get("branches")
    if branches is None:
        return dict(vision)
    if not isinstance(branches, Mapping):
        raise ConfigError(f"{where}: vision.branches must be a mapping {{ct: ..., pet: ...}} or null")
    out = dict(vision)
    rest = dict(branches)
    ct = rest.pop("ct", None) or {}
    if not isinstance(ct, Mapping):
        raise ConfigError(f"{where}: vision.branches.ct must be a mapping")
    unknown_ct = sorted(set(ct) - {"encoder", "compressor", "projector", "label"})
    if unknown_ct:
        raise ConfigError(f"{where}: vision.branches.ct: unknown keys {unknown_ct} (encoder, compressor, projector)")
    for part in ("encoder", "compressor", "projector"):
        if part not in ct:
            continue
        if part in vision and dict(vision[part]) != dict(ct[part]):
            raise ConfigError(f"{where}: the CT branch's {part} is set twice (vision.{part} and "
                              f"vision.branches.ct.{part}) with different values; set it in one place")
        out[part] = dict(ct[part])
    unknown = sorted(set(rest) - set(BRANCH_NAMES))
    if unknown:
        raise ConfigError(f"{where}: vision.branches: unknown modalities {unknown} (known: ct, "
                          f"{', '.join(BRANCH_NAMES)})")
    if not rest:
        raise ConfigError(f"{where}: vision.branches names no modality beside ct (add pet, or drop branches)")
    from rrg3d.models.registry import config_from_mapping

    for name, data in rest.items():
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: vision.branches.{name} must be a mapping")
        config_from_mapping(BranchSettings, data, where=f"{where}: vision.branches.{name}")
    out["branches"] = {name: dict(data) for name, data in rest.items()}
    return out


class ModalityBranch(nn.Module):
    """An extra modality's encoder (None: the CT encoder, shared), compressor and projector."""

    def __init__(self, name: str, settings: BranchSettings, shared_encoder: nn.Module, lm_dim: int) -> None:
        super().__init__()
        from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS

        self.name = name
        self.settings = settings
        self.label = settings.label or name.upper()
        self.encoder = None if settings.encoder == "shared" else ENCODERS.build(dict(settings.encoder))
        encoder = self.encoder if self.encoder is not None else shared_encoder
        if int(getattr(encoder, "in_channels", 1)) != settings.channels:
            raise ConfigError(f"vision.branches.{name}: the encoder reads {getattr(encoder, 'in_channels', 1)} "
                              f"channel(s), the branch has channels={settings.channels}")
        self.compressor = COMPRESSORS.build(dict(settings.compressor), in_dim=encoder.out_dim)
        self.projector = PROJECTORS.build(dict(settings.projector), in_dim=self.compressor.out_dim, out_dim=lm_dim)

    def describe(self) -> dict[str, Any]:
        """The mapping that rebuilds this branch (fitted state of the live modules included)."""
        from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS

        data: dict[str, Any] = {
            "encoder": "shared" if self.encoder is None else ENCODERS.describe(self.encoder),
            "compressor": COMPRESSORS.describe(self.compressor),
            "projector": PROJECTORS.describe(self.projector),
            "channels": self.settings.channels,
        }
        if self.settings.label is not None:
            data["label"] = self.settings.label
        return data
