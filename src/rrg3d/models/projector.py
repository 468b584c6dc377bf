"""Projectors: compressed visual tokens ``[B, N, in_dim]`` → language-model embeddings ``[B, N, out_dim]``.

Registered in :data:`~rrg3d.models.registry.PROJECTORS` and built with both sizes as context::

    projector = PROJECTORS.build({"name": "mlp2x_gelu"}, in_dim=compressor.out_dim, out_dim=lm_hidden_size)

``linear`` is the single layer of LLaVA; ``mlp2x_gelu`` is the two-layer MLP of LLaVA-1.5 (and 3D-CT-GPT++):
``Linear(in, out) → GELU → Linear(out, out)``. Two optional input normalisations:

* ``layer_norm: true`` — a LayerNorm over each token's channels (useful when the compressor's scale varies,
  e.g. PCA scores);
* ``standardize: per_channel | per_token`` — fixed statistics fitted once on training features (:meth:`fit`; the
  training stages do it before the first step) and stored as buffers: each channel (``per_channel``) or each
  (token position, channel) pair (``per_token``) is shifted to mean 0 and scaled to standard deviation 1. A frozen
  encoder's tokens are mostly what every scan shares at each position, with a scale far above the LM's word
  embeddings; ``per_token`` removes that shared part, so what reaches the LM is what differs between studies.
  ``per_token`` is tied to one token count (one input size); ``per_channel`` works at any resolution.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rrg3d.errors import ConfigError
from rrg3d.models.fitted import adopt_incoming_shapes
from rrg3d.models.registry import PROJECTORS

__all__ = ["STANDARDIZE_MODES", "LinearProjector", "MLPProjector"]

STANDARDIZE_MODES = ("none", "per_channel", "per_token")


class _Projector(nn.Module):
    @dataclass
    class Config:
        layer_norm: bool = False  # LayerNorm(in_dim) on the input tokens
        bias: bool = True
        #: fixed input standardisation fitted on training features: none, per_channel or per_token
        standardize: Literal["none", "per_channel", "per_token"] = "none"

    def __init__(self, config: Config, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if config.standardize not in STANDARDIZE_MODES:
            raise ConfigError(f"projector: standardize must be one of {STANDARDIZE_MODES}, got {config.standardize!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.standardize = config.standardize
        if self.standardize != "none":
            # [positions, in_dim]; per_token buffers are resized by fit() or by a loaded state dict
            self.register_buffer("feature_mean", torch.zeros(1, in_dim))
            self.register_buffer("feature_std", torch.ones(1, in_dim))
            self.register_buffer("fitted", torch.tensor(False))
        self.norm = nn.LayerNorm(in_dim) if config.layer_norm else nn.Identity()
        self.layers = self._layers(config, in_dim, out_dim)

    def _layers(self, config: Config, in_dim: int, out_dim: int) -> nn.Sequential:
        raise NotImplementedError

    # -- fitted standardisation ---------------------------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        """True while a configured standardisation has no statistics yet."""
        return self.standardize != "none" and not bool(self.fitted.item())

    @torch.no_grad()
    def fit(self, features: Tensor | Iterable[Tensor], eps: float = 1e-4) -> _Projector:
        """Fit the standardisation on compressed tokens ``[B, N, in_dim]`` (one tensor or an iterable of batches).

        Sums run in float64. The variance is floored at ``eps`` × the mean variance, so a channel that barely varies
        (e.g. one a ReLU keeps at zero) is not blown up into noise.
        """
        if self.standardize == "none":
            raise RuntimeError("this projector has no standardisation to fit (standardize: none)")
        batches = [features] if isinstance(features, Tensor) else features
        count, s1, s2 = 0, None, None
        for batch in batches:
            if batch.ndim != 3 or batch.shape[-1] != self.in_dim:
                raise ValueError(f"projector.fit expects tokens [B, N, {self.in_dim}], got {tuple(batch.shape)}")
            x = batch.detach().to(torch.float64)
            if self.standardize == "per_channel":
                x = x.reshape(1, -1, self.in_dim).transpose(0, 1)  # every token of every study: one observation
            if s1 is not None and x.shape[1] != s1.shape[0]:
                raise ValueError(f"projector.fit: per_token statistics need one token count, got {s1.shape[0]} "
                                 f"and {x.shape[1]} (use standardize: per_channel for several input sizes)")
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
            count += x.shape[0]
        if s1 is None or s2 is None or count < 2:
            raise ValueError("projector.fit: at least two observations are needed")
        mean = s1 / count
        var = ((s2 - count * mean * mean) / (count - 1)).clamp_min(0)
        std = (var + eps * var.mean()).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant features (e.g. blank images): shift only
        device = self.feature_mean.device
        self.feature_mean = mean.to(device=device, dtype=torch.float32)
        self.feature_std = std.to(device=device, dtype=torch.float32)
        self.fitted = torch.tensor(True, device=device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if self.standardize != "none":  # per_token statistics are sized by the fit
            adopt_incoming_shapes(self, state_dict, prefix, ("feature_mean", "feature_std"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _standardized(self, tokens: Tensor) -> Tensor:
        if self.needs_fit:
            raise RuntimeError(f"the projector's {self.standardize} standardisation is not fitted: call "
                               "fit(compressed tokens) first (the align and sft stages fit it on training volumes)")
        positions = self.feature_mean.shape[0]
        if self.standardize == "per_token" and tokens.shape[-2] != positions:
            raise RuntimeError(f"the projector's per_token standardisation was fitted on {positions} tokens and got "
                               f"{tokens.shape[-2]} (another input size?); use standardize: per_channel to change "
                               "resolution")
        # in float32: under bf16 autocast the shared per-position part is large, and subtracting it in bf16 would
        # round away much of the between-study part that standardising is meant to keep
        return ((tokens.float() - self.feature_mean) / self.feature_std).to(tokens.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.standardize != "none":
            tokens = self._standardized(tokens)
        return self.layers(self.norm(tokens))


@PROJECTORS.register("linear")
class LinearProjector(_Projector):
    """One linear layer."""

    @dataclass
    class Config(_Projector.Config):
        pass

    def _layers(self, config: _Projector.Config, in_dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=config.bias))


@PROJECTORS.register("mlp2x_gelu")
class MLPProjector(_Projector):
    """LLaVA-1.5's projector: ``Linear(in, out) → GELU → Linear(out, out)``."""

    @dataclass
    class Config(_Projector.Config):
        pass

    def _layers(self, config: _Projector.Config, in_dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=config.bias), nn.GELU(),
                             nn.Linear(out_dim, out_dim, bias=config.bias))
