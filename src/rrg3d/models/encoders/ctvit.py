"""``ctvit``: CT-CLIP's CT-ViT, a factorised (spatial, then temporal) transformer over 3D patches.

The volume is cut into patches of ``pd`` slices × ``ph`` × ``pw`` pixels; the ``pd`` slices of one patch row
form a *slice group* (CT-CLIP calls the slice axis "temporal", after the video model it derives from). Then:

1. a spatial transformer runs inside each slice group: the ``h × w`` tokens of a group attend to each other;
2. a temporal transformer runs along the slice axis for each spatial position ``(y, x)``: the ``d`` tokens of
   that position attend to each other, by default *causally* (slice group ``t`` sees groups ``≤ t`` only).

By default position information is learned: a 2D spatial grid (bilinearly resized for other in-plane sizes), added
before the spatial transformer, and a 1D slice-group table (linearly resized for other slice counts), added before
the temporal transformer; blocks are pre-norm ViT blocks (dot-product attention, GELU MLP). That default is a
simpler stand-in for CT-CLIP's layers. The options below rebuild CT-CLIP's CTViT exactly, so that its public
weights can be imported (:mod:`rrg3d.models.peers`); each is off by default and leaves the default model unchanged:

* ``patch_prenorm``: LayerNorm of each flattened patch before the projection (CT-CLIP's ``to_patch_emb``);
* ``pos_embed: none`` + ``spatial_bias: continuous`` + ``peg``: no absolute tables; a continuous position bias (MLP
  of the log-scaled in-plane offset) on the spatial logits, and a depthwise-conv position generator before every
  block of both stages (:class:`~rrg3d.models.encoders.layers.PositionGenerator`, which documents how CT-CLIP
  applies it in the temporal stage);
* ``attention: cosine`` (L2-normalised q, k with learned scales, logits × ``attn_scale``) and ``mlp: geglu``;
* ``temporal_causal: false``: CT-CLIP's temporal *attention* is bidirectional (only its position generator is
  causal);
* ``quantizer_codes``: the output tokens replaced by their nearest codebook entry (cosine similarity) — CT-CLIP's
  vector quantiser, which its ``forward(..., return_encoded_tokens=True)`` (what CTCLIP pools for its image latent)
  does apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrg3d.models.encoders.layers import (
    ContinuousPositionBias,
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

POS_EMBEDS = ("learned", "none")
SPATIAL_BIASES = ("none", "continuous")


class CosineQuantizer(nn.Module):
    """Each token replaced by the codebook entry of highest cosine similarity (CT-CLIP's ``VectorQuantize`` with
    ``use_cosine_sim=True`` and a single codebook, at inference): the argmax of ``normalise(x) · normalise(code)``,
    output the code *as stored*. In training the gradient passes straight through (``x + (q − x).detach()``); the
    codebook is a frozen buffer here (CT-CLIP updated it by EMA during training; rrg3d never does).
    """

    def __init__(self, codes: int, dim: int, chunk: int = 4096) -> None:
        super().__init__()
        self.register_buffer("codebook", F.normalize(torch.randn(codes, dim), dim=-1))
        self.chunk = chunk

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        codes = self.codebook.float()
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 similarities, as the original
            unit = F.normalize(codes, dim=-1)
            index = torch.cat([(F.normalize(part, dim=-1) @ unit.T).argmax(-1) for part in flat.split(self.chunk)])
        quantized = codes[index].view(x.shape).to(x.dtype)
        if self.training and torch.is_grad_enabled():
            return x + (quantized - x).detach()
        return quantized


def _option(config: Any, name: str, default: Any) -> Any:
    """A config field that only some factorised encoders declare (``ctvit_v`` keeps its original fields)."""
    return getattr(config, name, default)


class FactorisedEncoder(nn.Module):
    """Shared body of ``ctvit`` and ``ctvit_v``: patch embedding, learned 2D spatial positions and a spatial
    transformer per slice group; subclasses define the slice-axis stage in :meth:`slice_stage`."""

    name = "factorised"

    def _build_spatial(self, config) -> None:
        self.config = config
        self.in_channels = config.in_channels
        self.out_dim = config.dim
        self.patch_embed = PatchEmbed3D(config.in_channels, config.dim, config.patch_size, norm=True,
                                        stem=config.patch_stem, in_norm=_option(config, "patch_prenorm", False))
        self.reference_grid: Shape3 = self.patch_embed.grid_shape(config.input_shape)
        if _option(config, "pos_embed", "learned") == "learned":
            self.spatial_pos = nn.Parameter(torch.zeros(*self.reference_grid[1:], config.dim))
            nn.init.trunc_normal_(self.spatial_pos, std=0.02)
        else:
            self.register_parameter("spatial_pos", None)
        self.dropout = nn.Dropout(config.dropout)
        self.spatial = self._transformer(config, config.spatial_depth)
        if _option(config, "spatial_bias", "none") == "continuous":
            self.spatial_bias = ContinuousPositionBias(config.heads, config.dim)
        else:
            self.spatial_bias = None

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
            attention=_option(config, "attention", "dot"),
            logit_scale=_option(config, "attn_scale", 8.0),
            mlp=_option(config, "mlp", "gelu"),
            peg=_option(config, "peg", False),
            kv_norm=_option(config, "attn_kv_norm", True),
        )
        init_weights(transformer)
        return transformer

    def grid_shape(self, input_shape: tuple[int, int, int]) -> Shape3:
        return self.patch_embed.grid_shape(input_shape)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_checkpointing(self, enabled)

    def slice_stage(self, tokens: Tensor, grid: tuple[int, int, int, int]) -> Tensor:  # pragma: no cover - abstract
        """``[N, T, dim]`` sequences along the slice axis (one per batch item and in-plane position, memory order
        ``(b, h, w)``); ``grid`` is ``(b, t, h, w)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        check_volume(x, self.in_channels, self.name)
        tokens = self.patch_embed(x)  # [B, T, h, w, C]
        b, t, h, w, c = tokens.shape
        if self.spatial_pos is not None:
            tokens = tokens + resize_pos_embed(self.spatial_pos, (h, w)).to(tokens.dtype)
        bias = self.spatial_bias(h, w) if self.spatial_bias is not None else None
        # one sequence per slice group
        tokens = self.spatial(self.dropout(tokens.reshape(b * t, h * w, c)), bias=bias, grid=(b, t, h, w))
        tokens = tokens.view(b, t, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
        tokens = self.slice_stage(tokens, (b, t, h, w))  # one sequence per in-plane position
        return tokens.view(b, h, w, t, c).permute(0, 3, 1, 2, 4).contiguous()


@ENCODERS.register("ctvit")
class CTViT(FactorisedEncoder):
    """CT-CLIP's CT-ViT encoder (spatial transformer per slice group, temporal transformer along the slices).

    Defaults follow CT-CLIP's sizes: 10×20×20 patches on 240×480×480 → a 24×24×24 grid of 512-d tokens, spatial
    and temporal depth 4, 8 heads of 32 dims. ``patch_size`` is (slices, height, width). The layer options that
    rebuild CT-CLIP's exact layers are described in the module docstring.
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
        # CT-CLIP's exact layers (all off by default; see the module docstring)
        patch_prenorm: bool = False  # LayerNorm of each flattened patch before the projection
        pos_embed: str = "learned"  # "learned" (spatial grid + slice table) | "none"
        spatial_bias: str = "none"  # "none" | "continuous" (MLP of the in-plane offset → logit bias per head)
        peg: bool = False  # depthwise-conv position generator before every block (causal along slices)
        attention: str = "dot"  # "dot" | "cosine" (normalised q, k with learned scales, logits × attn_scale)
        attn_scale: float = 8.0  # logit scale of cosine attention
        attn_kv_norm: bool = True  # False: keys/values from the block input before its LayerNorm (CT-CLIP)
        mlp: str = "gelu"  # "gelu" | "geglu"
        temporal_causal: bool = True  # slice group t attends to groups <= t only
        quantizer_codes: int = 0  # > 0: output tokens → nearest of this many codebook entries (cosine)

        def __post_init__(self) -> None:
            self.input_shape = to_3tuple(self.input_shape, "input_shape")
            self.patch_size = to_3tuple(self.patch_size, "patch_size")
            if self.dim_head is None and self.dim % self.heads:
                raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; set dim_head")
            if self.pos_embed not in POS_EMBEDS:
                raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
            if self.spatial_bias not in SPATIAL_BIASES:
                raise ValueError(f"spatial_bias must be one of {SPATIAL_BIASES}, got {self.spatial_bias!r}")
            if self.attention not in ("dot", "cosine"):
                raise ValueError(f"attention must be 'dot' or 'cosine', got {self.attention!r}")
            if self.mlp not in ("gelu", "geglu"):
                raise ValueError(f"mlp must be 'gelu' or 'geglu', got {self.mlp!r}")
            if self.quantizer_codes < 0:
                raise ValueError(f"quantizer_codes must be >= 0, got {self.quantizer_codes}")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self._build_spatial(config)
        if config.pos_embed == "learned":
            self.temporal_pos = nn.Parameter(torch.zeros(self.reference_grid[0], config.dim))
            nn.init.trunc_normal_(self.temporal_pos, std=0.02)
        else:
            self.register_parameter("temporal_pos", None)
        self.temporal = self._transformer(config, config.temporal_depth)
        self.quantizer = CosineQuantizer(config.quantizer_codes, config.dim) if config.quantizer_codes else None

    def slice_stage(self, tokens: Tensor, grid: tuple[int, int, int, int]) -> Tensor:
        if self.temporal_pos is not None:
            tokens = tokens + resize_pos_embed(self.temporal_pos, (tokens.shape[1],)).to(tokens.dtype)
        tokens = self.temporal(tokens, is_causal=self.config.temporal_causal, grid=grid)
        return tokens if self.quantizer is None else self.quantizer(tokens)
