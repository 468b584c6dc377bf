"""``ctvit_v``: CTViT-V, the encoder of 3D-CT-GPT++.

Same factorised layout as CT-CLIP's CT-ViT (:mod:`rrg3d.models.encoders.ctvit`) with two changes from the
paper: the transformer along the slice axis (the *slice transformer*) is bidirectional — every slice group
attends to all others — and instead of absolute slice positions its attention logits get a learned *relative*
position bias (one scalar per head and relative distance, after Shaw et al., 2018), shared by all slice-transformer
layers. Because the bias depends only on the distance between slice groups, the same encoder handles other
slice counts; distances beyond the table are clamped to its last entry.

Default: 15×30×30 patches on 240×480×480 → a 16×16×16 grid of 512-d tokens. The paper then average-pools 2×2×2
to 8×8×8 = 512 tokens; that pooling is **not** part of this encoder — it is the ``pool`` compressor of the model
config, so the encoder output can be compressed in other ways too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rrg3d.models.encoders.ctvit import FactorisedEncoder
from rrg3d.models.encoders.layers import to_3tuple
from rrg3d.models.registry import ENCODERS


class RelativePositionBias(nn.Module):
    """Learned attention-logit bias per head and relative distance ``i − j`` (Shaw et al., 2018 style).

    The table holds ``2 · max_distance − 1`` scalars per head, for distances ``−(max_distance − 1) … max_distance
    − 1``; longer distances use the entry at the nearest end. :meth:`forward` returns the ``[heads, T, T]``
    bias of a length-``T`` sequence, a Toeplitz matrix per head.
    """

    def __init__(self, heads: int, max_distance: int) -> None:
        super().__init__()
        if max_distance < 1:
            raise ValueError(f"max_distance must be >= 1, got {max_distance}")
        self.heads, self.max_distance = heads, max_distance
        self.table = nn.Parameter(torch.zeros(heads, 2 * max_distance - 1))
        nn.init.trunc_normal_(self.table, std=0.02)

    def relative_index(self, length: int, device: torch.device | None = None) -> Tensor:
        """``[T, T]`` table index of ``i − j``, clamped to the table."""
        pos = torch.arange(length, device=device)
        distance = (pos[:, None] - pos[None, :]).clamp(-(self.max_distance - 1), self.max_distance - 1)
        return distance + (self.max_distance - 1)

    def forward(self, length: int) -> Tensor:
        return self.table[:, self.relative_index(length, self.table.device)]


@ENCODERS.register("ctvit_v")
class CTViTV(FactorisedEncoder):
    """CTViT-V: spatial transformer per slice group, then a bidirectional slice transformer with a learned
    relative position bias over slice groups. ``patch_size`` is (slices, height, width). Output ``[B, d, h, w,
    dim]`` before any pooling (see the module docstring: AvgPool3D(2) is the ``pool`` compressor)."""

    name = "ctvit_v"

    @dataclass
    class Config:
        in_channels: int = 1
        input_shape: tuple[int, int, int] = (240, 480, 480)  # reference (D, H, W) of the spatial position grid
        patch_size: tuple[int, int, int] = (15, 30, 30)  # (slices per group, H, W)
        patch_stem: str = "linear"  # "linear" (kernel = stride patchify) or "conv" (convolutional stem)
        dim: int = 512
        spatial_depth: int = 4
        slice_depth: int = 4
        heads: int = 8
        dim_head: int | None = 32  # None: dim // heads
        mlp_ratio: float = 4.0
        qkv_bias: bool = False
        max_distance: int = 32  # relative-distance table covers |i − j| < max_distance slice groups
        dropout: float = 0.0
        attn_dropout: float = 0.0

        def __post_init__(self) -> None:
            self.input_shape = to_3tuple(self.input_shape, "input_shape")
            self.patch_size = to_3tuple(self.patch_size, "patch_size")
            if self.dim_head is None and self.dim % self.heads:
                raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; set dim_head")
            if self.max_distance < 1:
                raise ValueError(f"max_distance must be >= 1, got {self.max_distance}")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self._build_spatial(config)
        self.slice_bias = RelativePositionBias(config.heads, config.max_distance)
        self.slice_transformer = self._transformer(config, config.slice_depth)

    def slice_stage(self, tokens: Tensor, grid: tuple[int, int, int, int] | None = None) -> Tensor:
        bias = self.slice_bias(tokens.shape[1])  # [heads, T, T], shared by every slice-transformer layer
        return self.slice_transformer(tokens, bias=bias)
