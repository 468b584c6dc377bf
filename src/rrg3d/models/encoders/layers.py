"""Building blocks shared by the transformer encoders (written once, used by vit3d, ctvit and ctvit_v).

Layout conventions: volumes are ``[B, C, D, H, W]`` (D = slices); token grids are channel-last
``[B, d, h, w, dim]``; token sequences are ``[N, L, dim]``. Attention always goes through
:func:`torch.nn.functional.scaled_dot_product_attention`, so no token×token matrix is built here (the
fused CPU/GPU kernels tile it internally); an additive float bias and causal masking are optional.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Shape3 = tuple[int, int, int]


def to_3tuple(value: int | Sequence[int], name: str = "value") -> Shape3:
    """``16`` → ``(16, 16, 16)``; a 3-sequence is returned as a tuple; anything else is a ValueError."""
    if isinstance(value, int):
        return (value, value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 3:
        raise ValueError(f"{name} must be an int or 3 ints (D, H, W), got {value!r}")
    return items  # type: ignore[return-value]


def check_volume(x: Tensor, in_channels: int, who: str) -> None:
    """A clear error when ``x`` is not the ``[B, C, D, H, W]`` float volume an encoder expects."""
    if not isinstance(x, Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects a volume laid out as [B, C, D, H, W] (5-D), got shape {shape}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{who} expects [B, C, D, H, W] with C = in_channels = {in_channels}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{who} expects a floating-point volume [B, C, D, H, W], got dtype {x.dtype}")


def ceil_grid(input_shape: Sequence[int], patch: Sequence[int]) -> Shape3:
    """Grid of a patch embedding on ``input_shape`` after zero-padding up to a multiple of ``patch``."""
    d, h, w = (math.ceil(int(n) / int(p)) for n, p in zip(input_shape, patch, strict=True))
    return (d, h, w)


def conv_stem_strides(patch_size: Sequence[int]) -> list[Shape3]:
    """Strides of a convolutional stem for ``patch_size``: stride 2 on every axis whose remaining factor is even,
    as long as one is; the last entry is what is left (a kernel = stride patchify, ``(1, 1, 1)`` if nothing)."""
    remaining = list(to_3tuple(patch_size, "patch_size"))
    strides: list[Shape3] = []
    while any(r % 2 == 0 for r in remaining):
        step = tuple(2 if r % 2 == 0 else 1 for r in remaining)
        strides.append(step)  # type: ignore[arg-type]
        remaining = [r // s for r, s in zip(remaining, step, strict=True)]
    strides.append(tuple(remaining))  # type: ignore[arg-type]
    return strides


class PatchEmbed3D(nn.Module):
    """3D patches → ``dim`` channels, one token per ``patch_size`` block.

    ``stem="linear"`` (ViT/CTViT): a Conv3d with kernel = stride = ``patch_size``, i.e. a linear map of each
    flattened patch. ``stem="conv"``: a convolutional stem (Xiao et al. 2021, "Early convolutions help
    transformers see better") — 3×3×3 convolutions of stride 2 (GroupNorm, GELU) on every axis whose remaining
    patch factor is even, channels doubling up to ``dim``, then a kernel = stride convolution for what is left;
    the grid is the same, the optimisation far easier on small datasets.

    An input whose D, H or W is not a multiple of the patch is zero-padded *at the end* of that axis (after the
    last slice / row / column) up to the next multiple, so the grid is ``ceil(D / pd) × ceil(H / ph) ×
    ceil(W / pw)`` and the first patches are unchanged by the padding. Output is channel-last
    ``[B, d, h, w, dim]``, optionally followed by a LayerNorm over ``dim``.
    """

    STEMS = ("linear", "conv")

    def __init__(self, in_channels: int, dim: int, patch_size: int | Sequence[int], norm: bool = False,
                 stem: str = "linear") -> None:
        super().__init__()
        self.patch_size = to_3tuple(patch_size, "patch_size")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if stem not in self.STEMS:
            raise ValueError(f"patch stem must be one of {self.STEMS}, got {stem!r}")
        self.stem = stem
        if stem == "linear":
            self.proj: nn.Module = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
            # ViT/MAE practice: initialise the patch projection like a Linear layer on the flattened patch.
            nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
            nn.init.zeros_(self.proj.bias)
        else:
            strides = conv_stem_strides(self.patch_size)
            downs, last = strides[:-1], strides[-1]
            widths = [max(dim >> (len(downs) - i), 8) for i in range(len(downs))]
            layers: list[nn.Module] = []
            c_in = in_channels
            for width, stride in zip(widths, downs, strict=True):
                layers += [nn.Conv3d(c_in, width, 3, stride=stride, padding=1, bias=False),
                           nn.GroupNorm(min(8, width), width), nn.GELU()]
                c_in = width
            layers.append(nn.Conv3d(c_in, dim, kernel_size=last, stride=last))
            self.proj = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def grid_shape(self, input_shape: Sequence[int]) -> Shape3:
        return ceil_grid(input_shape, self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pad: list[int] = []
        for size, patch in zip(reversed(x.shape[2:]), reversed(self.patch_size), strict=True):  # W, H, D
            pad += [0, (-size) % patch]
        if any(pad):
            x = F.pad(x, pad)
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class Attention(nn.Module):
    """Multi-head self-attention on ``[N, L, dim]`` via ``scaled_dot_product_attention``.

    ``bias`` is an additive float term on the attention logits, broadcastable to ``[N, heads, L, L]`` (for
    example a ``[heads, L, L]`` relative position bias); ``is_causal`` lets token ``i`` attend to ``j ≤ i`` only.
    Both may be given together (the causal mask is then folded into the bias).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}; set dim_head")
            dim_head = dim // heads
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.attn_dropout = attn_dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor | None = None, is_causal: bool = False) -> Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        if bias is not None:
            bias = bias.to(q.dtype)
            if is_causal:
                future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu_(1)
                bias = bias.masked_fill(future, float("-inf"))
                is_causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal
        )
        out = out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head)
        return self.dropout(self.proj(out))


class Mlp(nn.Module):
    """Linear → GELU → Linear (with optional dropout)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, qkv_bias=qkv_bias, attn_dropout=attn_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: Tensor, bias: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), bias=bias, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block` plus a final LayerNorm.

    With ``gradient_checkpointing`` on, each block's activations are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant); this only happens in training mode with autograd enabled,
    so evaluation and inference are unaffected.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_ratio, qkv_bias, dropout, attn_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, bias: Tensor | None = None, is_causal: bool = False) -> Tensor:
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                x = checkpoint(block, x, bias, is_causal, use_reentrant=False)
            else:
                x = block(x, bias, is_causal)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """ViT-style initialisation: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def set_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch gradient checkpointing on every :class:`Transformer` inside ``module``."""
    for m in module.modules():
        if isinstance(m, Transformer):
            m.gradient_checkpointing = bool(enabled)


def sincos_pos_embed_3d(
    grid: Sequence[int],
    dim: int,
    reference_grid: Sequence[int] | None = None,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Fixed sine-cosine position embedding of a 3D grid, ``[d, h, w, dim]`` (float32).

    Each axis gets ``dim // 6`` frequencies (a sine and a cosine each); leftover channels (``dim % 6``) are
    zero. With ``reference_grid``, positions are expressed in reference-grid units (cell centres of the new
    grid mapped onto the reference grid, as ``align_corners=False`` interpolation does), so a coarser or finer
    grid covering the same field of view gets matching codes; without it, positions are the integer indices.
    """
    if dim < 6:
        raise ValueError(f"sin-cos position embedding needs dim >= 6, got {dim}")
    grid = tuple(int(g) for g in grid)
    reference = tuple(int(g) for g in reference_grid) if reference_grid is not None else grid
    n_freq = dim // 6
    omega = 1.0 / temperature ** (torch.arange(n_freq, dtype=torch.float64, device=device) / n_freq)
    parts = []
    for axis, (size, ref) in enumerate(zip(grid, reference, strict=True)):
        pos = (torch.arange(size, dtype=torch.float64, device=device) + 0.5) * (ref / size) - 0.5
        angles = pos[:, None] * omega[None, :]
        code = torch.cat([angles.sin(), angles.cos()], dim=1)  # [size, 2 * n_freq]
        view = [1, 1, 1, 2 * n_freq]
        view[axis] = size
        parts.append(code.view(view).expand(*grid, 2 * n_freq))
    out = torch.cat(parts, dim=-1)
    if out.shape[-1] < dim:
        out = F.pad(out, (0, dim - out.shape[-1]))
    return out.float()


def resize_pos_embed(pos: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a learned position-embedding grid ``[*grid, C]`` (1-, 2- or 3-D grid) to ``[*size, C]``.

    Linear / bilinear / trilinear interpolation with ``align_corners=False`` (cell centres line up, so the grid
    keeps covering the same field of view); returned unchanged when the size already matches.
    """
    size = tuple(int(s) for s in size)
    if tuple(pos.shape[:-1]) == size:
        return pos
    ndim = pos.dim() - 1
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]
    grid = pos.movedim(-1, 0).unsqueeze(0)  # [1, C, *grid]
    if grid.dtype not in (torch.float32, torch.float64):
        grid = grid.float()
    out = F.interpolate(grid, size=size, mode=mode, align_corners=False)
    return out.squeeze(0).movedim(0, -1).to(pos.dtype)
