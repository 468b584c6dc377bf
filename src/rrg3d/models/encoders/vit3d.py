"""``vit3d``: a plain 3D Vision Transformer (the M3D / RadFM style volume encoder).

Cubic (or cuboid) non-overlapping patches → position embedding → ``depth`` pre-norm transformer blocks with
full attention over all tokens → the tokens reshaped back to their ``[B, d, h, w, dim]`` grid.

``patch_prenorm`` / ``patch_postnorm`` (LayerNorms of each flattened patch before, and of each token after, the patch
projection) and ``final_norm: false`` rebuild RadFM's 3D ViT (lucidrains' ``vit_pytorch`` layout, no LayerNorm after
the last block), so its weights can be imported (:mod:`rrg3d.models.peers`); the defaults leave the model unchanged.
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
    sincos_pos_embed_3d,
    to_3tuple,
)
from rrg3d.models.registry import ENCODERS

POS_EMBEDS = ("learned", "sincos")


@ENCODERS.register("vit3d")
class ViT3D(nn.Module):
    """Plain 3D ViT. Defaults: ViT-B (dim 768, 12 layers, 12 heads) on 16×16×16 patches.

    With the default ``input_shape`` 240×480×480 the grid is 15×30×30 (13 500 tokens); inputs that are not a
    multiple of the patch are zero-padded at the end of each axis. Position embeddings are made for the grid of
    ``input_shape``; other input sizes get the learned grid trilinearly resized (``pos_embed: learned``) or the
    sin-cos code evaluated at the matching reference positions (``pos_embed: sincos``).
    """

    @dataclass
    class Config:
        in_channels: int = 1
        input_shape: tuple[int, int, int] = (240, 480, 480)  # reference (D, H, W) of the position embedding
        patch_size: tuple[int, int, int] = (16, 16, 16)  # (D, H, W)
        patch_stem: str = "linear"  # "linear" (kernel = stride patchify) or "conv" (convolutional stem)
        dim: int = 768
        depth: int = 12
        heads: int = 12
        dim_head: int | None = None  # None: dim // heads
        mlp_ratio: float = 4.0
        qkv_bias: bool = True
        pos_embed: str = "learned"  # "learned" | "sincos"
        dropout: float = 0.0
        attn_dropout: float = 0.0
        patch_prenorm: bool = False  # LayerNorm of each flattened patch before the projection (RadFM)
        patch_postnorm: bool = False  # LayerNorm of each token after the projection (RadFM)
        final_norm: bool = True  # LayerNorm after the last block (RadFM's ViT has none)

        def __post_init__(self) -> None:
            self.input_shape = to_3tuple(self.input_shape, "input_shape")
            self.patch_size = to_3tuple(self.patch_size, "patch_size")
            if self.pos_embed not in POS_EMBEDS:
                raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
            if self.dim_head is None and self.dim % self.heads:
                raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; set dim_head")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_dim = config.dim
        self.patch_embed = PatchEmbed3D(config.in_channels, config.dim, config.patch_size, norm=config.patch_postnorm,
                                        stem=config.patch_stem, in_norm=config.patch_prenorm)
        self.reference_grid: Shape3 = self.patch_embed.grid_shape(config.input_shape)
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(*self.reference_grid, config.dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("pos_embed", None)
        self.dropout = nn.Dropout(config.dropout)
        self.transformer = Transformer(
            config.dim,
            config.depth,
            config.heads,
            config.dim_head,
            config.mlp_ratio,
            config.qkv_bias,
            config.dropout,
            config.attn_dropout,
            final_norm=config.final_norm,
        )
        init_weights(self.transformer)

    def grid_shape(self, input_shape: tuple[int, int, int]) -> Shape3:
        return self.patch_embed.grid_shape(input_shape)

    def position_embedding(self, grid: Shape3, device: torch.device | None = None) -> Tensor:
        """``[d, h, w, dim]`` position embedding for an output grid (resized / re-evaluated as needed)."""
        if self.pos_embed is not None:
            return resize_pos_embed(self.pos_embed, grid)
        return sincos_pos_embed_3d(grid, self.out_dim, self.reference_grid, device=device)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_checkpointing(self, enabled)

    def forward(self, x: Tensor) -> Tensor:
        check_volume(x, self.in_channels, "vit3d")
        tokens = self.patch_embed(x)  # [B, d, h, w, dim]
        b, d, h, w, c = tokens.shape
        tokens = tokens + self.position_embedding((d, h, w), tokens.device).to(tokens.dtype)
        tokens = self.transformer(self.dropout(tokens.reshape(b, d * h * w, c)))
        return tokens.view(b, d, h, w, c)
