"""Projectors: compressed visual tokens ``[B, N, in_dim]`` → language-model embeddings ``[B, N, out_dim]``.

Registered in :data:`~rrg3d.models.registry.PROJECTORS` and built with both sizes as context::

    projector = PROJECTORS.build({"name": "mlp2x_gelu"}, in_dim=compressor.out_dim, out_dim=lm_hidden_size)

``linear`` is the single layer of LLaVA; ``mlp2x_gelu`` is the two-layer MLP of LLaVA-1.5 (and 3D-CT-GPT++):
``Linear(in, out) → GELU → Linear(out, out)``. ``layer_norm: true`` normalises the incoming tokens first
(useful when the compressor's output scale varies, e.g. PCA scores).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from rrg3d.models.registry import PROJECTORS

__all__ = ["LinearProjector", "MLPProjector"]


class _Projector(nn.Module):
    @dataclass
    class Config:
        layer_norm: bool = False  # LayerNorm(in_dim) on the input tokens
        bias: bool = True

    def __init__(self, config: Config, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.norm = nn.LayerNorm(in_dim) if config.layer_norm else nn.Identity()
        self.layers = self._layers(config, in_dim, out_dim)

    def _layers(self, config: Config, in_dim: int, out_dim: int) -> nn.Sequential:
        raise NotImplementedError

    def forward(self, tokens: Tensor) -> Tensor:
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
