"""Token compressors: an encoder grid ``[B, d, h, w, C]`` (channel-last) becomes a token sequence ``[B, N, out_dim]``.

Every compressor is registered in :data:`~rrg3d.models.registry.COMPRESSORS` and built with the encoder's
channel count as context::

    compressor = COMPRESSORS.build({"name": "pool", "kernel": [2, 2, 2]}, in_dim=encoder.out_dim)
    tokens = compressor(encoder(volumes))          # [B, compressor.num_tokens(grid), compressor.out_dim]

=================  =========================================================================================
``pool``           3D average (or max) pooling, e.g. the AvgPool3D(2) of 3D-CT-GPT++: 16³ grid → 8³ = 512 tokens
``pca``            a fixed linear map fitted by PCA on encoder features (Argus): fewer tokens, or fewer channels
``perceiver``      a perceiver resampler (Flamingo, RadFM, Reg2RG): a fixed number of learned latent queries
``pixel_shuffle``  space-to-channel: each 2×2×2 block of cells becomes one token with 8× the channels
``none``           the grid flattened as is (``identity`` is the same thing under another name)
=================  =========================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrg3d.errors import ConfigError
from rrg3d.models.fitted import adopt_incoming_shapes
from rrg3d.models.registry import COMPRESSORS

__all__ = [
    "IdentityCompressor",
    "PCACompressor",
    "PerceiverResampler",
    "PixelShuffleCompressor",
    "PoolCompressor",
    "sincos_position_embedding_3d",
]

Grid = tuple[int, int, int]


def _check_grid(grid: Tensor, in_dim: int, who: str) -> None:
    if grid.ndim != 5:
        raise ValueError(f"{who} expects a channel-last grid [B, d, h, w, C], got shape {tuple(grid.shape)}")
    if grid.shape[-1] != in_dim:
        raise ValueError(f"{who} was built for {in_dim} channels, got a grid with {grid.shape[-1]}")


def _triple(value: Any, what: str) -> Grid:
    values = tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"{what} must be three positive integers, got {value!r}")
    return values  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- pool


def _pooled_size(n: int, kernel: int, stride: int, ceil_mode: bool) -> int:
    """Output length of a 1D pooling window over ``n`` cells (PyTorch's rule, no padding)."""
    if ceil_mode:
        out = max(math.ceil((n - kernel) / stride), 0) + 1
        if (out - 1) * stride >= n:  # the last window would start past the end
            out -= 1
        return out
    if n < kernel:
        raise ValueError(f"a grid side of {n} is smaller than the pooling kernel {kernel} (set ceil_mode: true)")
    return (n - kernel) // stride + 1


@COMPRESSORS.register("pool")
class PoolCompressor(nn.Module):
    """3D pooling over the grid, then flattened in (d, h, w) order.

    Grid sides not divisible by the stride: with ``ceil_mode`` (the default) the last, partial window is kept and
    averages only the cells that exist (no zero padding enters the mean), so no part of the volume is dropped, and a
    side shorter than the kernel is pooled whole; with ``ceil_mode: false`` the trailing cells that do not fill a
    whole window are dropped (and a side shorter than the kernel is an error).
    """

    @dataclass
    class Config:
        kernel: tuple[int, int, int] = (2, 2, 2)
        stride: tuple[int, int, int] | None = None  # None: equal to kernel (non-overlapping windows)
        mode: str = "avg"  # "avg" or "max"
        ceil_mode: bool = True

    def __init__(self, config: Config, in_dim: int) -> None:
        super().__init__()
        if config.mode not in ("avg", "max"):
            raise ConfigError(f"compressor 'pool': mode must be 'avg' or 'max', got {config.mode!r}")
        self.kernel = _triple(config.kernel, "compressor 'pool': kernel")
        self.stride = self.kernel if config.stride is None else _triple(config.stride, "compressor 'pool': stride")
        self.mode = config.mode
        self.ceil_mode = config.ceil_mode
        self.in_dim = in_dim
        self.out_dim = in_dim

    def output_grid(self, grid_shape: Grid) -> Grid:
        """The pooled grid ``(d', h', w')``."""
        return tuple(  # type: ignore[return-value]
            _pooled_size(n, k, s, self.ceil_mode) for n, k, s in zip(grid_shape, self.kernel, self.stride, strict=True)
        )

    def num_tokens(self, grid_shape: Grid) -> int:
        return math.prod(self.output_grid(grid_shape))

    def forward(self, grid: Tensor) -> Tensor:
        _check_grid(grid, self.in_dim, "pool")
        shape = tuple(grid.shape[1:4])
        self.output_grid(shape)  # type: ignore[arg-type]  # a clear error for sides shorter than the kernel
        kernel = tuple(min(k, n) for k, n in zip(self.kernel, shape, strict=True))  # short sides: one whole window
        x = grid.permute(0, 4, 1, 2, 3)  # [B, C, d, h, w]
        if self.mode == "avg":
            x = F.avg_pool3d(x, kernel, self.stride, ceil_mode=self.ceil_mode, count_include_pad=False)
        else:
            x = F.max_pool3d(x, kernel, self.stride, ceil_mode=self.ceil_mode)
        return x.flatten(2).transpose(1, 2)  # [B, d'h'w', C]


# ------------------------------------------------------------------------------------------------------ pca


@COMPRESSORS.register("pca")
class PCACompressor(nn.Module):
    """A fixed linear map fitted by PCA on encoder features; it has buffers, no parameters, and is never trained.

    ``axis: tokens`` (default, Argus-style) reduces the number of tokens: for a grid of ``N = d·h·w`` cells each
    (sample, channel) column is one observation of an N-vector, so the fit finds ``mean [N]`` and
    ``components [K, N]`` and the output is ``[B, K, C]`` — one token per principal spatial pattern. It only
    applies to the grid shape it was fitted on. ``axis: channels`` reduces the channels instead (each grid cell is
    an observation of a C-vector): ``[B, N, K]``, any grid size.

    Call :meth:`fit` once on encoder grids before use; the fit lives in the state dict (``mean``, ``components``,
    ``explained_variance``, ``fitted``, ``grid_shape``) so a checkpoint restores it exactly.
    """

    @dataclass
    class Config:
        num_components: int = 256
        axis: str = "tokens"  # "tokens" (fewer tokens) or "channels" (fewer channels per token)
        #: Grid the ``tokens`` fit is for; set by :meth:`fit`, so a saved config rebuilds buffers of the right size.
        grid_shape: tuple[int, int, int] | None = None

    def __init__(self, config: Config, in_dim: int) -> None:
        super().__init__()
        if config.axis not in ("tokens", "channels"):
            raise ConfigError(f"compressor 'pca': axis must be 'tokens' or 'channels', got {config.axis!r}")
        if config.num_components < 1:
            raise ConfigError(f"compressor 'pca': num_components must be ≥ 1, got {config.num_components}")
        if config.axis == "channels" and config.num_components > in_dim:
            raise ConfigError(f"compressor 'pca': num_components {config.num_components} > {in_dim} channels")
        self.config = config
        self.axis = config.axis
        self.num_components = config.num_components
        self.in_dim = in_dim
        self.out_dim = in_dim if config.axis == "tokens" else config.num_components
        size = self._observation_size(config.grid_shape)
        k = config.num_components
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("components", torch.zeros(k if size else 0, size))
        self.register_buffer("explained_variance", torch.zeros(k if size else 0))
        self.register_buffer("fitted", torch.tensor(False))
        grid = config.grid_shape if config.grid_shape is not None else (0, 0, 0)
        self.register_buffer("grid_shape", torch.tensor(grid, dtype=torch.long))

    def _observation_size(self, grid_shape: Grid | None) -> int:
        if self.axis == "channels":
            return self.in_dim
        return math.prod(grid_shape) if grid_shape is not None else 0

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        adopt_incoming_shapes(self, state_dict, prefix, ("mean", "components", "explained_variance", "grid_shape"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.axis == "tokens" and self.is_fitted:
            self.config.grid_shape = tuple(int(v) for v in self.grid_shape.tolist())  # type: ignore[assignment]

    def _observations(self, grid: Tensor) -> Tensor:
        """Rows to fit on: ``[B·C, N]`` for tokens, ``[B·N, C]`` for channels."""
        b, c = grid.shape[0], grid.shape[-1]
        x = grid.reshape(b, -1, c)
        return x.transpose(1, 2).reshape(-1, x.shape[1]) if self.axis == "tokens" else x.reshape(-1, c)

    @torch.no_grad()
    def fit(self, features: Tensor | Iterable[Tensor]) -> PCACompressor:
        """Fit on encoder grids ``[S, d, h, w, C]``: one tensor, or an iterable of batches (streamed).

        Sums and the scatter matrix are accumulated in float64, so memory is ``O(size²)`` whatever the number of
        samples (``size`` = N for ``tokens``, C for ``channels``). The sums, and the eigendecomposition after them,
        run on the features' GPU when they come from one; a 16³ grid (N = 4096) takes about a minute on two CPU cores.
        """
        batches = [features] if isinstance(features, Tensor) else features
        grid_shape: Grid | None = None
        total = 0
        s1: Tensor | None = None
        s2: Tensor | None = None
        for batch in batches:
            _check_grid(batch, self.in_dim, "pca.fit")
            shape = tuple(int(n) for n in batch.shape[1:4])
            if grid_shape is None:
                grid_shape = shape  # type: ignore[assignment]
            elif self.axis == "tokens" and shape != grid_shape:
                raise ValueError(f"pca.fit: all grids must have one shape, got {grid_shape} and {shape}")
            # float64 sums on the features' GPU when there is one (fast there), else on the CPU.
            device = batch.device if batch.device.type == "cuda" else torch.device("cpu")
            obs = self._observations(batch.detach()).to(device=device, dtype=torch.float64)
            if s1 is not None and s1.device != device:
                s1, s2 = s1.to(device), s2.to(device)  # type: ignore[union-attr]
            s1 = obs.sum(0) if s1 is None else s1 + obs.sum(0)
            s2 = obs.T @ obs if s2 is None else s2 + obs.T @ obs
            total += obs.shape[0]
        if s1 is None or s2 is None or grid_shape is None:
            raise ValueError("pca.fit: no features given")
        size = s1.shape[0]
        if self.num_components > size:
            raise ValueError(f"pca.fit: num_components {self.num_components} > {size} ({self.axis} per observation)")
        if total < 2:
            raise ValueError("pca.fit: at least two observations are needed")
        mean = s1 / total
        cov = (s2 - total * torch.outer(mean, mean)) / (total - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending order
        order = torch.argsort(eigenvalues, descending=True)[: self.num_components]
        components = eigenvectors[:, order].T  # [K, size]
        # Deterministic signs: the largest-magnitude entry of each component is positive.
        signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
        components = (components * torch.where(signs == 0, torch.ones_like(signs), signs)).contiguous()
        device = self.mean.device
        self.mean = mean.to(device=device, dtype=torch.float32)
        self.components = components.to(device=device, dtype=torch.float32)
        self.explained_variance = eigenvalues[order].clamp_min(0).to(device=device, dtype=torch.float32)
        self.fitted = torch.tensor(True, device=device)
        if self.axis == "tokens":
            self.grid_shape = torch.tensor(grid_shape, dtype=torch.long, device=device)
            self.config.grid_shape = grid_shape
        return self

    def _require_fit(self, grid_shape: Grid) -> None:
        if not self.is_fitted:
            raise RuntimeError("the PCA compressor is not fitted: call fit(encoder_grids) or load a fitted state dict")
        fitted = tuple(int(v) for v in self.grid_shape.tolist())
        if self.axis == "tokens" and tuple(grid_shape) != fitted:
            raise RuntimeError(f"the PCA compressor was fitted on {fitted} grids and cannot compress a "
                               f"{tuple(grid_shape)} grid (token PCA is tied to one grid shape; refit it, "
                               "or use axis: channels)")

    def num_tokens(self, grid_shape: Grid) -> int:
        if self.axis == "channels":
            return math.prod(grid_shape)
        if self.is_fitted:
            self._require_fit(grid_shape)
        return self.num_components

    def forward(self, grid: Tensor) -> Tensor:
        _check_grid(grid, self.in_dim, "pca")
        self._require_fit(tuple(grid.shape[1:4]))  # type: ignore[arg-type]
        b, c = grid.shape[0], grid.shape[-1]
        x = grid.reshape(b, -1, c)
        mean, components = self.mean.to(x.dtype), self.components.to(x.dtype)
        if self.axis == "tokens":
            return torch.einsum("kn,bnc->bkc", components, x - mean[None, :, None])
        return (x - mean) @ components.T

    def inverse(self, tokens: Tensor) -> Tensor:
        """Map compressed tokens back to a grid ``[B, d, h, w, C]`` (exact only in the fitted subspace)."""
        self._require_fit(tuple(self.grid_shape.tolist()) if self.axis == "tokens" else (0, 0, 0))
        mean, components = self.mean.to(tokens.dtype), self.components.to(tokens.dtype)
        if self.axis == "tokens":
            x = torch.einsum("kn,bkc->bnc", components, tokens) + mean[None, :, None]
            return x.reshape(tokens.shape[0], *self.grid_shape.tolist(), tokens.shape[-1])
        return tokens @ components + mean  # [B, N, C]; the caller knows the grid


# ------------------------------------------------------------------------------------------------ perceiver


def sincos_position_embedding_3d(grid_shape: Grid, dim: int, temperature: float = 10000.0,
                                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The encoders' fixed sine-cosine embedding of integer cell coordinates, flattened to ``[d·h·w, dim]``."""
    from rrg3d.models.encoders.layers import sincos_pos_embed_3d

    return sincos_pos_embed_3d(grid_shape, dim, temperature=temperature, device=device).reshape(-1, dim).to(dtype)


class _LatentCrossAttention(nn.Module):
    """Latents attend to the concatenation of the (normed) input tokens and themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, dh]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


@COMPRESSORS.register("perceiver")
class PerceiverResampler(nn.Module):
    """A perceiver resampler: ``num_latents`` learned queries read the grid through ``depth`` attention blocks.

    The grid is projected to ``dim`` (when ``in_dim != dim``) and a 3D sine-cosine position embedding is added to
    it, so any grid size works and the output is always ``[B, num_latents, dim]``. With ``position_embedding:
    false`` the output does not depend on the order of the grid cells.
    """

    @dataclass
    class Config:
        num_latents: int = 64
        dim: int = 512
        depth: int = 2
        heads: int = 8
        dim_head: int = 64
        ff_mult: int = 4
        position_embedding: bool = True

    def __init__(self, config: Config, in_dim: int) -> None:
        super().__init__()
        for key in ("num_latents", "dim", "depth", "heads", "dim_head", "ff_mult"):
            if getattr(config, key) < 1:
                raise ConfigError(f"compressor 'perceiver': {key} must be ≥ 1, got {getattr(config, key)}")
        if config.position_embedding and config.dim < 6:
            raise ConfigError("compressor 'perceiver': dim must be ≥ 6 for the 3D position embedding")
        self.in_dim = in_dim
        self.out_dim = config.dim
        self.num_latents = config.num_latents
        self.position_embedding = config.position_embedding
        self.gradient_checkpointing = False
        self.input_proj = nn.Linear(in_dim, config.dim) if in_dim != config.dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([_LatentCrossAttention(config.dim, config.heads, config.dim_head),
                           _FeedForward(config.dim, config.ff_mult)])
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def num_tokens(self, grid_shape: Grid) -> int:
        return self.num_latents

    def _block(self, attn: nn.Module, ff: nn.Module, media: Tensor, latents: Tensor) -> Tensor:
        latents = latents + attn(media, latents)
        return latents + ff(latents)

    def forward(self, grid: Tensor) -> Tensor:
        _check_grid(grid, self.in_dim, "perceiver")
        b = grid.shape[0]
        media = self.input_proj(grid.reshape(b, -1, grid.shape[-1]))
        if self.position_embedding:
            pos = sincos_position_embedding_3d(tuple(grid.shape[1:4]), media.shape[-1], device=media.device,
                                               dtype=media.dtype)
            media = media + pos
        latents = self.latents.to(media.dtype).expand(b, -1, -1)
        for attn, ff in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                latents = torch.utils.checkpoint.checkpoint(self._block, attn, ff, media, latents, use_reentrant=False)
            else:
                latents = self._block(attn, ff, media, latents)
        return self.norm(latents)


# -------------------------------------------------------------------------------------------- pixel shuffle


@COMPRESSORS.register("pixel_shuffle")
class PixelShuffleCompressor(nn.Module):
    """Space-to-channel: each ``factor`` block of cells becomes one token with ``prod(factor)·C`` channels.

    Sides not divisible by the factor are padded at the end with zero cells, so ``d' = ceil(d / f)``. Within a
    token the channels are ordered (offset_d, offset_h, offset_w, channel). It is a pure rearrangement;
    :meth:`inverse` undoes it.
    """

    @dataclass
    class Config:
        factor: tuple[int, int, int] = (2, 2, 2)

    def __init__(self, config: Config, in_dim: int) -> None:
        super().__init__()
        self.factor = _triple(config.factor, "compressor 'pixel_shuffle': factor")
        self.in_dim = in_dim
        self.out_dim = in_dim * math.prod(self.factor)

    def output_grid(self, grid_shape: Grid) -> Grid:
        return tuple(math.ceil(n / f) for n, f in zip(grid_shape, self.factor, strict=True))  # type: ignore[return-value]

    def num_tokens(self, grid_shape: Grid) -> int:
        return math.prod(self.output_grid(grid_shape))

    def forward(self, grid: Tensor) -> Tensor:
        _check_grid(grid, self.in_dim, "pixel_shuffle")
        b, c = grid.shape[0], grid.shape[-1]
        (fd, fh, fw), (d, h, w) = self.factor, self.output_grid(tuple(grid.shape[1:4]))
        pad = (0, 0, 0, w * fw - grid.shape[3], 0, h * fh - grid.shape[2], 0, d * fd - grid.shape[1])
        if any(pad):
            grid = F.pad(grid, pad)
        x = grid.reshape(b, d, fd, h, fh, w, fw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, d * h * w, fd * fh * fw * c)

    def inverse(self, tokens: Tensor, grid_shape: Grid) -> Tensor:
        """The grid ``[B, *grid_shape, C]`` that :meth:`forward` turned into ``tokens`` (padding removed)."""
        b = tokens.shape[0]
        (fd, fh, fw), (d, h, w) = self.factor, self.output_grid(grid_shape)
        x = tokens.reshape(b, d, h, w, fd, fh, fw, self.in_dim).permute(0, 1, 4, 2, 5, 3, 6, 7)
        x = x.reshape(b, d * fd, h * fh, w * fw, self.in_dim)
        return x[:, : grid_shape[0], : grid_shape[1], : grid_shape[2]]


# ------------------------------------------------------------------------------------------------- identity


@COMPRESSORS.register("none")
@COMPRESSORS.register("identity")
class IdentityCompressor(nn.Module):
    """No compression: the grid flattened to ``[B, d·h·w, C]`` in (d, h, w) order (for tiny models)."""

    @dataclass
    class Config:
        pass

    def __init__(self, config: Config, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = in_dim

    def num_tokens(self, grid_shape: Grid) -> int:
        return math.prod(grid_shape)

    def forward(self, grid: Tensor) -> Tensor:
        _check_grid(grid, self.in_dim, "identity")
        return grid.reshape(grid.shape[0], -1, grid.shape[-1])
