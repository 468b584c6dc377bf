"""``ctvit``: CT-CLIP's CT-ViT, a factorised (spatial, then temporal) transformer over 3D patches.

The volume is cut into patches of ``pd`` slices × ``ph`` × ``pw`` pixels; the ``pd`` slices of one patch row
form a *slice group* (CT-CLIP calls the slice axis "temporal", after the video model it derives from). Then:

1. a spatial transformer runs inside each slice group: the ``h × w`` tokens of a group attend to each other;
2. a temporal transformer runs along the slice axis for each spatial position ``(y, x)``: the ``d`` tokens of
   that position attend to each other *causally* (slice group ``t`` sees groups ``≤ t`` only).

Position information is learned: a 2D spatial grid (bilinearly resized for other in-plane sizes), added before
the spatial transformer, and a 1D slice-group table (linearly resized for other slice counts), added before the
temporal transformer. CT-CLIP itself uses a continuous (MLP) position bias in the spatial transformer and a
depthwise-conv position generator; the learned tables here are a simpler stand-in with the same role. Its
feed-forward is a GEGLU, here a GELU MLP. The vector quantiser of the original (a video-generation leftover that
CT-CLIP does not use for its embeddings) is not part of this encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rrg3d.models.encoders.layers import (
    PatchEmbed3D,
    Shape3,
    Transformer,
    check_volume,
    init_weights,
    resize_pos_embed,
    set_checkpointing,
    to_3tuple,
)
from rrg3d.models.registry import ENCODERS


class FactorisedEncoder(nn.Module):
    """Shared body of ``ctvit`` and ``ctvit_v``: patch embedding, learned 2D spatial positions and a spatial
    transformer per slice group; subclasses define the slice-axis stage in :meth:`slice_stage`."""

    name = "factorised"

    def _build_spatial(self, config) -> None:
        self.config = config
        self.in_channels = config.in_channels
        self.out_dim = config.dim
        self.patch_embed = PatchEmbed3D(config.in_channels, config.dim, config.patch_size, norm=True,
                                        stem=config.patch_stem)
        self.reference_grid: Shape3 = self.patch_embed.grid_shape(config.input_shape)
        self.spatial_pos = nn.Parameter(torch.zeros(*self.reference_grid[1:], config.dim))
        nn.init.trunc_normal_(self.spatial_pos, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.spatial = self._transformer(config, config.spatial_depth)

    @staticmethod
    def _transformer(config, depth: int) -> Transformer:
        transformer = Transformer(
            config.dim,
            depth,
            config.heads,
            config.dim_head,
            config.mlp_ratio,
            config.qkv_bias,
            config.dropout,
            config.attn_dropout,
        )
        init_weights(transformer)
        return transformer

    def grid_shape(self, input_shape: tuple[int, int, int]) -> Shape3:
        return self.patch_embed.grid_shape(input_shape)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_checkpointing(self, enabled)

    def slice_stage(self, tokens: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``[N, T, dim]`` sequences along the slice axis (one per batch item and in-plane position)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        check_volume(x, self.in_channels, self.name)
        tokens = self.patch_embed(x)  # [B, T, h, w, C]
        b, t, h, w, c = tokens.shape
        tokens = tokens + resize_pos_embed(self.spatial_pos, (h, w)).to(tokens.dtype)
        tokens = self.spatial(self.dropout(tokens.reshape(b * t, h * w, c)))  # one sequence per slice group
        tokens = tokens.view(b, t, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
        tokens = self.slice_stage(tokens)  # one sequence per in-plane position
        return tokens.view(b, h, w, t, c).permute(0, 3, 1, 2, 4).contiguous()


@ENCODERS.register("ctvit")
class CTViT(FactorisedEncoder):
    """CT-CLIP's CT-ViT encoder (spatial transformer per slice group, causal temporal transformer).

    Defaults follow CT-CLIP: 10×20×20 patches on 240×480×480 → a 24×24×24 grid of 512-d tokens, spatial and
    temporal depth 4, 8 heads of 32 dims. ``patch_size`` is (slices, height, width).
    """

    name = "ctvit"

    @dataclass
    class Config:
        in_channels: int = 1
        input_shape: tuple[int, int, int] = (240, 480, 480)  # reference (D, H, W) of the position tables
        patch_size: tuple[int, int, int] = (10, 20, 20)  # (slices per group, H, W)
        patch_stem: str = "linear"  # "linear" (kernel = stride patchify) or "conv" (convolutional stem)
        dim: int = 512
        spatial_depth: int = 4
        temporal_depth: int = 4
        heads: int = 8
        dim_head: int | None = 32  # None: dim // heads
        mlp_ratio: float = 4.0
        qkv_bias: bool = False
        dropout: float = 0.0
        attn_dropout: float = 0.0

        def __post_init__(self) -> None:
            self.input_shape = to_3tuple(self.input_shape, "input_shape")
            self.patch_size = to_3tuple(self.patch_size, "patch_size")
            if self.dim_head is None and self.dim % self.heads:
                raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; set dim_head")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self._build_spatial(config)
        self.temporal_pos = nn.Parameter(torch.zeros(self.reference_grid[0], config.dim))
        nn.init.trunc_normal_(self.temporal_pos, std=0.02)
        self.temporal = self._transformer(config, config.temporal_depth)

    def slice_stage(self, tokens: Tensor) -> Tensor:
        tokens = tokens + resize_pos_embed(self.temporal_pos, (tokens.shape[1],)).to(tokens.dtype)
        return self.temporal(tokens, is_causal=True)
