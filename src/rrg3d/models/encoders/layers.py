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
    ``[B, d, h, w, dim]``, optionally followed by a LayerNorm over ``dim``. ``in_norm`` (linear stem only) also
    LayerNorms each flattened patch, in ``(C, pd, ph, pw)`` order, before the projection — the patch embedding of
    CT-CLIP's CTViT and of RadFM's 3D ViT (lucidrains-style ``Rearrange → LayerNorm → Linear → LayerNorm``); the
    projection keeps its Conv3d weight (``[dim, C, pd, ph, pw]``) and is applied as a Linear on the patch.
    """

    STEMS = ("linear", "conv")

    def __init__(self, in_channels: int, dim: int, patch_size: int | Sequence[int], norm: bool = False,
                 stem: str = "linear", in_norm: bool = False) -> None:
        super().__init__()
        self.patch_size = to_3tuple(patch_size, "patch_size")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if stem not in self.STEMS:
            raise ValueError(f"patch stem must be one of {self.STEMS}, got {stem!r}")
        self.stem = stem
        if in_norm and stem != "linear":
            raise ValueError("a LayerNorm of the flattened patch (in_norm) needs the linear patch stem")
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
        if in_norm:  # created last: the other parameters are initialised exactly as without it
            self.in_norm = nn.LayerNorm(in_channels * math.prod(self.patch_size))
        else:
            self.in_norm = None

    def grid_shape(self, input_shape: Sequence[int]) -> Shape3:
        return ceil_grid(input_shape, self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pad: list[int] = []
        for size, patch in zip(reversed(x.shape[2:]), reversed(self.patch_size), strict=True):  # W, H, D
            pad += [0, (-size) % patch]
        if any(pad):
            x = F.pad(x, pad)
        if self.in_norm is None:
            return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))
        b, c = x.shape[:2]
        (pd, ph, pw), (d, h, w) = self.patch_size, self.grid_shape(x.shape[2:])
        patches = x.reshape(b, c, d, pd, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d, h, w, -1)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        return self.norm(F.linear(self.in_norm(patches), weight, self.proj.bias))


class Attention(nn.Module):
    """Multi-head self-attention on ``[N, L, dim]`` via ``scaled_dot_product_attention``.

    ``bias`` is an additive float term on the attention logits, broadcastable to ``[N, heads, L, L]`` (for
    example a ``[heads, L, L]`` relative position bias); ``is_causal`` lets token ``i`` attend to ``j ≤ i`` only.
    Both may be given together (the causal mask is then folded into the bias).

    ``kind="cosine"`` is the attention of CT-CLIP's transformers (after Henry et al. 2020, "Query-key normalization
    for transformers"): ``q`` and ``k`` are L2-normalised per head, multiplied by learned per-channel scales
    ``q_scale`` / ``k_scale`` (``[dim_head]``, initialised to 1), and the logits are multiplied by the fixed
    ``logit_scale`` instead of divided by ``√dim_head``.
    """

    KINDS = ("dot", "cosine")

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        kind: str = "dot",
        logit_scale: float = 8.0,
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
        if kind not in self.KINDS:
            raise ValueError(f"attention must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.logit_scale: float | None = None
        if kind == "cosine":
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
            self.logit_scale = float(logit_scale)

    def forward(self, x: Tensor, bias: Tensor | None = None, is_causal: bool = False,
                kv_input: Tensor | None = None) -> Tensor:
        """``kv_input``: the tokens keys and values are computed from, when not ``x`` (CT-CLIP takes them from the
        block's input before its LayerNorm)."""
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_input is not None:
            _, k, v = self.qkv(kv_input).view(n, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        if self.kind == "cosine":
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        if bias is not None:
            bias = bias.to(q.dtype)
            if is_causal:
                future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu_(1)
                bias = bias.masked_fill(future, float("-inf"))
                is_causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal,
            scale=self.logit_scale,
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


class GegluMlp(nn.Module):
    """Linear → GEGLU → Linear, the feed-forward of CT-CLIP's transformers (Shazeer 2020): ``fc1`` makes
    ``2 · hidden`` channels, the first half the value and the second the gate, ``value · GELU(gate)``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.dropout(self.fc2(self.dropout(value * F.gelu(gate))))


MLPS = {"gelu": Mlp, "geglu": GegluMlp}


class PositionGenerator(nn.Module):
    """A depthwise 3×3×3 convolution over the token grid whose output is added to the tokens (a position-generating
    convolution, PEG: Chu et al. 2021), causal along the grid's first axis (two zero planes before, none after),
    as in CT-CLIP's CTViT.

    ``grid = (b, t, h, w)`` says how the memory of the ``[N, L, C]`` sequences is read as a ``[b, t, h, w, C]``
    volume: for the spatial stage of a factorised encoder that is its token grid. CTViT reads its *temporal* stage
    (sequences ``[(b h w), t, C]``) with the same ``(b, t, h, w)``, i.e. the memory reinterpreted rather than
    permuted, so the convolution there mixes tokens that are not grid neighbours; weights trained that way only mean
    the same when applied the same way, so this module does exactly that reshape.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        if len(grid) != 4 or math.prod(grid) * x.shape[-1] != x.numel():
            raise ValueError(f"position generator: grid {tuple(grid)} does not hold tokens of shape {tuple(x.shape)}")
        volume = x.reshape(*grid, x.shape[-1]).permute(0, 4, 1, 2, 3)
        out = self.conv(F.pad(volume, (1, 1, 1, 1, 2, 0)))
        return out.permute(0, 2, 3, 4, 1).reshape(x.shape)


class ContinuousPositionBias(nn.Module):
    """Attention-logit bias of a 2D token grid from a small MLP of the offset between two tokens (the continuous
    position bias of Swin-V2, Liu et al. 2022, as CT-CLIP's spatial transformer uses it).

    The offset ``(dy, dx) = pos_i − pos_j`` is log-scaled per axis, ``sign(v) · log(|v| + 1)``, then
    ``Linear(2, hidden) → LeakyReLU(0.1) → Linear(hidden, hidden) → LeakyReLU(0.1) → Linear(hidden, heads)``.
    :meth:`forward` returns ``[heads, h·w, h·w]`` for any grid (row-major ``(y, x)`` token order); the MLP runs once
    per distinct offset (``(2h − 1)(2w − 1)`` of them), not per token pair.
    """

    def __init__(self, heads: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.1), nn.Linear(hidden, heads))

    def forward(self, height: int, width: int) -> Tensor:
        device = self.net[0].weight.device
        dy = torch.arange(-(height - 1), height, device=device)
        dx = torch.arange(-(width - 1), width, device=device)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).float()  # [2h-1, 2w-1, 2]
        table = self.net(torch.sign(offsets) * torch.log(offsets.abs() + 1))  # [2h-1, 2w-1, heads]
        pos = torch.stack(torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                         indexing="ij"), dim=-1).reshape(-1, 2)
        rel = pos[:, None, :] - pos[None, :, :]  # [hw, hw, 2]
        return table[rel[..., 0] + height - 1, rel[..., 1] + width - 1].permute(2, 0, 1)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; with ``peg``, a
    :class:`PositionGenerator` term ``x + peg(x)`` comes first (it needs the forward's ``grid``)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        attention: str = "dot",
        logit_scale: float = 8.0,
        mlp: str = "gelu",
        peg: bool = False,
        kv_norm: bool = True,
    ) -> None:
        super().__init__()
        self.kv_norm = kv_norm  # False: keys/values from the un-normalised input (CT-CLIP's attention)
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {tuple(MLPS)}, got {mlp!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, qkv_bias=qkv_bias, attn_dropout=attn_dropout, dropout=dropout,
                              kind=attention, logit_scale=logit_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPS[mlp](dim, round(dim * mlp_ratio), dropout=dropout)
        self.peg = PositionGenerator(dim) if peg else None

    def forward(self, x: Tensor, bias: Tensor | None = None, is_causal: bool = False,
                grid: Sequence[int] | None = None) -> Tensor:
        if self.peg is not None:
            if grid is None:
                raise ValueError("a block with a position generator (peg) needs the token grid (b, t, h, w)")
            x = x + self.peg(x, grid)
        x = x + self.attn(self.norm1(x), bias=bias, is_causal=is_causal, kv_input=None if self.kv_norm else x)
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
        attention: str = "dot",
        logit_scale: float = 8.0,
        mlp: str = "gelu",
        peg: bool = False,
        kv_norm: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_ratio, qkv_bias, dropout, attn_dropout, attention, logit_scale, mlp, peg,
                  kv_norm)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, bias: Tensor | None = None, is_causal: bool = False,
                grid: Sequence[int] | None = None) -> Tensor:
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                x = checkpoint(block, x, bias, is_causal, grid, use_reentrant=False)
            else:
                x = block(x, bias, is_causal, grid)
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
