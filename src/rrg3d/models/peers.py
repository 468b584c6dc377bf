"""Public pretrained 3D encoders ("peers") mapped onto rrg3d's encoders: ``rrg3d model import KIND PATH --out CKPT``.

Each peer KIND has a *table*: peer key patterns (``{i}`` stands for a layer index) → our key patterns, each with the
shape transform it needs (fused vs separate q/k/v, a Linear patch projection vs our Conv3d weight, factorised
position tables vs our grid), plus the peer keys dropped on purpose (each with its reason) and the keys of ours
that the peer does not store (filled with an exact constant, e.g. the zero bias of a bias-free Linear). Importing:

1. read the file (``.pt`` / ``.pth`` / ``.bin`` with ``torch.load(weights_only=True)``, or ``.safetensors``);
2. find the encoder inside it by an anchor key (a whole CT-CLIP or RadFM model, or the bare encoder);
3. infer the peer's hyperparameters from the weight shapes (what the shapes cannot tell, e.g. the patch size, comes
   from the peer's published configuration and can be overridden with ``options``) and build our encoder with the
   config options that reproduce the peer's layers exactly (see :mod:`rrg3d.models.encoders.ctvit` and
   :mod:`rrg3d.models.encoders.vit3d`);
4. apply the table. Every peer key must be mapped or dropped, every key of ours produced or filled, every shape
   equal: otherwise one :class:`PeerImportError` lists each unmapped key, missing key and shape mismatch;
5. save an ``encoder`` checkpoint (:func:`rrg3d.models.checkpoint.save_encoder_checkpoint`): the encoder mapping, the
   peer's preset and the provenance (peer, file sha256, mapped / dropped / filled counts), usable as a report
   generator's ``model.vision_init``.

Where the facts come from (read in the peers' public repositories; no weights were downloaded here):

* ``ctclip`` — github.com/ibrahimethemhamamci/CT-CLIP at commit a2a155c (2025-07-18):
  ``transformer_maskgit/transformer_maskgit/ctvit.py`` (CTViT), ``.../attention.py`` (Transformer, Attention, PEG,
  ContinuousPositionBias), ``CT_CLIP/ct_clip/ct_clip.py`` (CTCLIP: ``visual_transformer``, ``text_transformer``,
  ``to_text_latent``, ``to_visual_latent``, ``temperature``), ``scripts/run_zero_shot.py`` (the published sizes: dim
  512, codebook 8192, image 480, patch 20, temporal patch 10, depths 4 + 4, 8 heads of 32) and the pinned
  ``vector-quantize-pytorch==1.1.2`` (CosineSimCodebook: buffers ``initted``, ``cluster_size``, ``embed [1, K, D]``).
* ``radfm`` — github.com/chaoyi-wu/RadFM at commit 9efba84 (2025-05-05): ``Quick_demo/Model/RadFM/vit_3d.py`` (ViT,
  identical in ``src/``), ``position_encoding.py`` (PositionEmbeddingLearned3d), ``my_embedding_layer.py`` (the
  sizes: image 512, frames 512, patch 32, frame patch 4, dim 768, depth 12, 8 heads, mlp 2048, 3 channels;
  ``dim_head`` left at ViT's default 64) and ``multimodality_model.py`` (keys under ``embedding_layer.``). Reg2RG
  (github.com/zhi-xuan-chen/Reg2RG) loads the same ViT from a bare state dict, which is accepted as well.

Assumptions to check against the real files (not possible offline): that the public checkpoints hold exactly the
key sets above (e.g. no ``embed_avg`` or extra heads in other library versions — such keys are either listed as
dropped or reported), and the axis conventions discussed in ``docs/peer_weights.md``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rrg3d.errors import RRG3DError

log = logging.getLogger(__name__)

PEER_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
MAX_LISTED = 8  # problems of one kind listed in an error message


class PeerImportError(RRG3DError):
    """A peer checkpoint cannot be mapped onto rrg3d's encoder: unreadable, unmapped or missing keys, wrong shapes."""


Context = dict[str, Any]
Transform = Callable[[list[Tensor], Context], Tensor]


@dataclass(frozen=True)
class Rule:
    """One line of a table: peer key(s) → one key of ours. ``peer[0]`` triggers the rule; the others are read with
    it (same ``{i}``). ``how`` says what the transform does (shown in ``docs/peer_weights.md`` and errors)."""

    peer: tuple[str, ...]
    ours: str
    transform: Transform
    how: str = "copy"


@dataclass(frozen=True)
class Drop:
    """Peer keys left out on purpose (``*`` matches anything); ``check`` may refuse a value that would matter."""

    pattern: str
    reason: str
    check: Callable[[Tensor], str | None] | None = None


@dataclass(frozen=True)
class Fill:
    """A key of ours the peer does not store, set to an exact constant (``zeros``, ``ones`` or ``identity``)."""

    ours: str
    value: str
    reason: str


@dataclass
class Table:
    rules: list[Rule]
    drops: list[Drop]  # inside the peer's encoder
    fills: list[Fill]
    outside: list[Drop]  # the rest of a whole peer model (text tower, language model, ...)


@dataclass(frozen=True)
class PeerSpec:
    """Everything about one peer KIND."""

    kind: str
    title: str
    encoder: str  # our registry name
    anchor: str  # a key (relative to the encoder) that locates the encoder in a checkpoint
    home: str  # where the encoder sits in the peer's whole model; keys outside it are matched from that model's root
    preset: str  # our preset with the peer's preprocessing
    options: Mapping[str, Any]  # what the shapes cannot tell, with the peer's published values
    context: Callable[[dict[str, Tensor], dict[str, Any]], Context]
    mapping: Callable[[Context], dict[str, Any]]
    table: Callable[[Context], Table]
    source: str


@dataclass
class PeerImport:
    """The result of :func:`convert_peer`: our encoder with the peer's weights, and what happened to every key."""

    kind: str
    encoder: nn.Module
    mapping: dict[str, Any]
    preset: Any
    report: dict[str, Any] = field(default_factory=dict)


# -- small helpers ----------------------------------------------------------------------------------------------------
def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\*", ".*") + r"\Z")


def _fill_index(pattern: str, index: str | None) -> str:
    return pattern if index is None else pattern.replace("{i}", index)


def _need(state: Mapping[str, Tensor], key: str, prefix: str, why: str) -> Tensor:
    if key not in state:
        raise PeerImportError(f"peer key {prefix}{key} is missing (needed to infer {why})")
    return state[key]


def _layers(state: Mapping[str, Tensor], stem: str) -> int:
    """How many layers ``{stem}.{i}.*`` the peer has (indices must run 0..n-1)."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(stem) + r"\.(\d+)\.", k))}
    if found and found != set(range(len(found))):
        raise PeerImportError(f"layers under {stem} are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    items = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(items) != 3 or min(items) < 1:
        raise PeerImportError(f"option {name} must be 3 positive integers (D, H, W), got {value!r}")
    return items  # type: ignore[return-value]


def _mlp_ratio(dim: int, hidden: int, key: str) -> float:
    ratio = hidden / dim
    if round(dim * ratio) != hidden:  # pragma: no cover - float division of two ints round-trips in practice
        raise PeerImportError(f"{key}: hidden width {hidden} cannot be written as round(dim {dim} × mlp_ratio)")
    return ratio


def copy(tensors: list[Tensor], ctx: Context) -> Tensor:
    """The tensor as it is."""
    return tensors[0]


def concat_rows(tensors: list[Tensor], ctx: Context) -> Tensor:
    """Separate projections stacked into one fused weight (rows: q, then k, then v)."""
    return torch.cat(tensors, dim=0)


# -- CT-CLIP ----------------------------------------------------------------------------------------------------------
CTCLIP_STAGES = (("enc_spatial_transformer", "spatial"), ("enc_temporal_transformer", "temporal"))


def _ctclip_context(state: dict[str, Tensor], options: dict[str, Any]) -> Context:
    p = options["_prefix"]
    weight = _need(state, "to_patch_emb.2.weight", p, "dim and the patch size")
    if weight.dim() != 2:
        raise PeerImportError(f"peer key {p}to_patch_emb.2.weight: expected a Linear weight [dim, patch], "
                              f"found shape {_shape(weight)}")
    dim, patch_dim = weight.shape
    patch = _triple(options["patch_size"], "patch_size")
    channels = int(options["in_channels"])
    if channels * math.prod(patch) != patch_dim:
        raise PeerImportError(f"peer key {p}to_patch_emb.2.weight has shape {_shape(weight)}: {patch_dim} inputs per "
                              f"patch, but in_channels × patch_size = {channels} × {' × '.join(map(str, patch))} = "
                              f"{channels * math.prod(patch)}; set the options patch_size / in_channels")
    depths = {ours: _layers(state, f"{peer}.layers") for peer, ours in CTCLIP_STAGES}
    if min(depths.values()) < 1:
        raise PeerImportError(f"no transformer layers under {p}enc_spatial_transformer / enc_temporal_transformer: "
                              "not a CTViT")
    dim_head = _need(state, "enc_spatial_transformer.layers.0.1.q_scale", p, "dim_head").numel()
    inner = _need(state, "enc_spatial_transformer.layers.0.1.to_q.weight", p, "the number of heads").shape[0]
    if inner % dim_head:
        raise PeerImportError(f"peer key {p}enc_spatial_transformer.layers.0.1.to_q.weight has {inner} rows, not a "
                              f"multiple of dim_head {dim_head} (from q_scale)")
    hidden = _need(state, "enc_spatial_transformer.layers.0.3.4.weight", p, "the feed-forward width").shape[-1]
    cpb = _need(state, "spatial_rel_pos_bias.net.0.0.weight", p, "the position-bias width")
    if _shape(cpb) != [dim, 2]:
        raise PeerImportError(f"peer key {p}spatial_rel_pos_bias.net.0.0.weight: expected shape [{dim}, 2] (rrg3d's "
                              f"continuous position bias is as wide as dim), found {_shape(cpb)}")
    codes = 0
    if options["quantizer"] and "vq._codebook.embed" in state:
        codes = int(state["vq._codebook.embed"].shape[-2])
    return {"dim": int(dim), "patch": patch, "channels": channels, "depths": depths, "dim_head": int(dim_head),
            "heads": int(inner // dim_head), "mlp_ratio": _mlp_ratio(int(dim), int(hidden), "feed-forward"),
            "codes": codes, "input_shape": _triple(options["input_shape"], "input_shape"),
            "attn_scale": float(options["attn_scale"]), "quantizer": bool(options["quantizer"])}


def _ctclip_mapping(ctx: Context) -> dict[str, Any]:
    return {"name": "ctvit", "in_channels": ctx["channels"], "input_shape": list(ctx["input_shape"]),
            "patch_size": list(ctx["patch"]), "dim": ctx["dim"], "spatial_depth": ctx["depths"]["spatial"],
            "temporal_depth": ctx["depths"]["temporal"], "heads": ctx["heads"], "dim_head": ctx["dim_head"],
            "mlp_ratio": ctx["mlp_ratio"], "qkv_bias": False, "patch_prenorm": True, "pos_embed": "none",
            "spatial_bias": "continuous", "peg": True, "attention": "cosine", "attn_scale": ctx["attn_scale"],
            "attn_kv_norm": False, "mlp": "geglu", "temporal_causal": False, "quantizer_codes": ctx["codes"]}


def _linear_to_conv(tensors: list[Tensor], ctx: Context) -> Tensor:
    """Linear ``[dim, (c pt p1 p2)]`` → Conv3d ``[dim, C, pd, ph, pw]``: CT-CLIP flattens each patch in our order."""
    return tensors[0].reshape(tensors[0].shape[0], ctx["channels"], *ctx["patch"])


def _codebook(tensors: list[Tensor], ctx: Context) -> Tensor:
    """``[1, K, D]`` (one codebook) → ``[K, D]``; several codebooks (heads) have no counterpart here."""
    embed = tensors[0]
    if embed.dim() == 3:
        if embed.shape[0] != 1:
            raise ValueError(f"{embed.shape[0]} codebooks (a multi-head quantiser): rrg3d's quantiser has one")
        embed = embed[0]
    return embed


def _empty(value: Tensor) -> str | None:
    return None if value.numel() == 0 else (f"holds {_shape(value)} null key/values; rrg3d's attention has none, "
                                            "so dropping them would change the attention")


def _ctclip_table(ctx: Context) -> Table:
    rules = [
        Rule(("to_patch_emb.1.weight",), "patch_embed.in_norm.weight", copy,
             "LayerNorm of the flattened patch; CT-CLIP flattens (c pt p1 p2) = our (C, pd, ph, pw)"),
        Rule(("to_patch_emb.1.bias",), "patch_embed.in_norm.bias", copy),
        Rule(("to_patch_emb.2.weight",), "patch_embed.proj.weight", _linear_to_conv,
             "Linear [dim, C·pd·ph·pw] → Conv3d [dim, C, pd, ph, pw] (reshape)"),
        Rule(("to_patch_emb.2.bias",), "patch_embed.proj.bias", copy),
        Rule(("to_patch_emb.3.weight",), "patch_embed.norm.weight", copy),
        Rule(("to_patch_emb.3.bias",), "patch_embed.norm.bias", copy),
        Rule(("spatial_rel_pos_bias.net.0.0.weight",), "spatial_bias.net.0.weight", copy,
             "continuous position bias: Linear(2, dim) of the log offsets"),
        Rule(("spatial_rel_pos_bias.net.0.0.bias",), "spatial_bias.net.0.bias", copy),
        Rule(("spatial_rel_pos_bias.net.1.0.weight",), "spatial_bias.net.2.weight", copy),
        Rule(("spatial_rel_pos_bias.net.1.0.bias",), "spatial_bias.net.2.bias", copy),
        Rule(("spatial_rel_pos_bias.net.2.weight",), "spatial_bias.net.4.weight", copy),
        Rule(("spatial_rel_pos_bias.net.2.bias",), "spatial_bias.net.4.bias", copy),
    ]
    drops = [
        Drop("to_patch_emb_first_frame.*", "first-frame patch embedding of the video model; never used by "
                                           "CTViT.forward"),
        Drop("to_pixels.*", "decoder back to voxels (VQ-VAE reconstruction)"),
        Drop("to_pixels_first_frame.*", "decoder back to voxels (VQ-VAE reconstruction)"),
        Drop("dec_spatial_transformer.*", "decoder transformer (VQ-VAE reconstruction)"),
        Drop("dec_temporal_transformer.*", "decoder transformer (VQ-VAE reconstruction)"),
        Drop("discr.*", "GAN discriminator of the VQ-VAE training"),
        Drop("vgg.*", "perceptual-loss network of the VQ-VAE training"),
        Drop("vq._codebook.initted", "EMA bookkeeping of the codebook's training"),
        Drop("vq._codebook.cluster_size", "EMA bookkeeping of the codebook's training"),
        Drop("vq._codebook.embed_avg", "EMA bookkeeping of the codebook's training"),
    ]
    fills = []
    for peer, ours in CTCLIP_STAGES:
        layer, block = f"{peer}.layers.{{i}}", f"{ours}.blocks.{{i}}"
        rules += [
            Rule((f"{layer}.0.dsconv.weight",), f"{block}.peg.conv.weight", copy,
                 "position generator: depthwise Conv3d(dim, dim, 3), causal along slices"),
            Rule((f"{layer}.0.dsconv.bias",), f"{block}.peg.conv.bias", copy),
            Rule((f"{layer}.1.norm.gamma",), f"{block}.norm1.weight", copy, "attention's own pre-norm"),
            Rule((f"{layer}.1.norm.beta",), f"{block}.norm1.bias", copy, "a zero buffer in CT-CLIP (bias-free norm)"),
            Rule((f"{layer}.1.to_q.weight", f"{layer}.1.to_kv.weight"), f"{block}.attn.qkv.weight", concat_rows,
                 "to_q [inner, dim] and to_kv [2·inner, dim] stacked into qkv [3·inner, dim]"),
            Rule((f"{layer}.1.q_scale",), f"{block}.attn.q_scale", copy, "cosine attention: learned query scale"),
            Rule((f"{layer}.1.k_scale",), f"{block}.attn.k_scale", copy, "cosine attention: learned key scale"),
            Rule((f"{layer}.1.to_out.weight",), f"{block}.attn.proj.weight", copy),
            Rule((f"{layer}.3.0.weight",), f"{block}.norm2.weight", copy, "feed-forward's LayerNorm"),
            Rule((f"{layer}.3.0.bias",), f"{block}.norm2.bias", copy),
            Rule((f"{layer}.3.1.weight",), f"{block}.mlp.fc1.weight", copy,
                 "GEGLU input [2·hidden, dim] (value, gate)"),
            Rule((f"{layer}.3.4.weight",), f"{block}.mlp.fc2.weight", copy),
            Rule((f"{peer}.norm_out.gamma",), f"{ours}.norm.weight", copy),
            Rule((f"{peer}.norm_out.beta",), f"{ours}.norm.bias", copy),
        ]
        drops += [
            Drop(f"{layer}.1.context_norm.gamma", "norm of a cross-attention context; self-attention never uses it"),
            Drop(f"{layer}.1.context_norm.beta", "norm of a cross-attention context; self-attention never uses it"),
            Drop(f"{layer}.1.null_kv", "null key/values: CTViT's self-attention has none (an empty tensor)", _empty),
        ]
        fills += [
            Fill(f"{block}.attn.proj.bias", "zeros", "CT-CLIP's to_out has no bias"),
            Fill(f"{block}.mlp.fc1.bias", "zeros", "CT-CLIP's feed-forward Linears have no bias"),
            Fill(f"{block}.mlp.fc2.bias", "zeros", "CT-CLIP's feed-forward Linears have no bias"),
        ]
    if ctx["quantizer"]:
        rules.append(Rule(("vq._codebook.embed",), "quantizer.codebook", _codebook,
                          "cosine-similarity codebook [1, K, dim] → [K, dim]"))
    else:
        drops.append(Drop("vq.*", "the vector quantiser, left out on request (option quantizer=false)"))
    outside = [
        Drop("text_transformer.*", "CT-CLIP's text encoder (CXR-BERT)"),
        Drop("to_text_latent.*", "text → latent projection of the CLIP loss"),
        Drop("to_text_latent_extra.*", "text → latent projection of the CLIP loss"),
        Drop("to_visual_latent.*", "image → latent projection of the CLIP loss: a Linear over the slice-averaged, "
                                   "flattened token grid (24·24·512 inputs), not part of the encoder"),
        Drop("to_visual_latent_extra.*", "image → latent projection of the CLIP loss"),
        Drop("temperature", "CLIP logit temperature"),
        Drop("mlm.*", "masked-language-model head of the text tower"),
        Drop("visual_ssl.*", "visual self-supervision wrapper"),
    ]
    return Table(rules, drops, fills, outside)


# -- RadFM ------------------------------------------------------------------------------------------------------------
def _radfm_context(state: dict[str, Tensor], options: dict[str, Any]) -> Context:
    p = options["_prefix"]
    weight = _need(state, "to_patch_embedding.2.weight", p, "dim and the patch size")
    if weight.dim() != 2:
        raise PeerImportError(f"peer key {p}to_patch_embedding.2.weight: expected a Linear weight [dim, patch], "
                              f"found shape {_shape(weight)}")
    dim, patch_dim = weight.shape
    patch = _triple(options["patch_size"], "patch_size")
    channels = int(options["in_channels"])
    if channels * math.prod(patch) != patch_dim:
        raise PeerImportError(f"peer key {p}to_patch_embedding.2.weight has shape {_shape(weight)}: {patch_dim} inputs "
                              f"per patch, but in_channels × patch_size = {channels} × {' × '.join(map(str, patch))} = "
                              f"{channels * math.prod(patch)}; set the options patch_size / in_channels")
    depth = _layers(state, "transformer.layers")
    if depth < 1:
        raise PeerImportError(f"no transformer layers under {p}transformer.layers: not a RadFM ViT")
    heads, dim_head = int(options["heads"]), int(options["dim_head"])
    qkv = _need(state, "transformer.layers.0.0.fn.to_qkv.weight", p, "the attention width")
    if qkv.shape[0] != 3 * heads * dim_head:
        raise PeerImportError(f"peer key {p}transformer.layers.0.0.fn.to_qkv.weight has {qkv.shape[0]} rows, but "
                              f"3 × heads × dim_head = 3 × {heads} × {dim_head} = {3 * heads * dim_head}; set the "
                              "options heads / dim_head (the weights cannot tell them apart)")
    hidden = _need(state, "transformer.layers.0.1.fn.net.0.weight", p, "the feed-forward width").shape[0]
    tables = {}
    for axis, key in (("h", "row_embed"), ("w", "col_embed"), ("d", "dep_embed")):
        table = _need(state, f"pos_embedding.{key}.weight", p, "the position tables")
        if table.dim() != 2 or 3 * table.shape[1] != dim:
            raise PeerImportError(f"peer key {p}pos_embedding.{key}.weight: expected shape [n, {dim // 3}] (a third "
                                  f"of dim {dim}), found {_shape(table)}")
        tables[axis] = int(table.shape[0])
    input_shape = _triple(options["input_shape"], "input_shape")
    grid = tuple(math.ceil(n / s) for n, s in zip(input_shape, patch, strict=True))
    for axis, n in zip("dhw", grid, strict=True):
        if n > tables[axis]:
            raise PeerImportError(f"input_shape {list(input_shape)} gives {n} patches along {axis.upper()}, more than "
                                  f"RadFM's position table holds ({tables[axis]})")
    return {"dim": int(dim), "patch": patch, "channels": channels, "depth": depth, "heads": heads,
            "dim_head": dim_head, "mlp_ratio": _mlp_ratio(int(dim), int(hidden), "feed-forward"),
            "input_shape": input_shape, "grid": grid, "tables": tables,
            "project_out": "transformer.layers.0.0.fn.to_out.0.weight" in state}


def _radfm_mapping(ctx: Context) -> dict[str, Any]:
    return {"name": "vit3d", "in_channels": 1, "input_shape": list(ctx["input_shape"]),
            "patch_size": list(ctx["patch"]), "dim": ctx["dim"], "depth": ctx["depth"], "heads": ctx["heads"],
            "dim_head": ctx["dim_head"], "mlp_ratio": ctx["mlp_ratio"], "qkv_bias": False, "pos_embed": "learned",
            "patch_prenorm": True, "patch_postnorm": True, "final_norm": False}


def _radfm_patch(t: Tensor, ctx: Context) -> Tensor:
    """RadFM's patch flattening ``(p1 p2 pf c)`` (H, W, D, C) → ours, as ``[..., C, pd, ph, pw]``."""
    pd, ph, pw = ctx["patch"]
    return t.reshape(*t.shape[:-1], ph, pw, pd, ctx["channels"]).movedim(-1, -4).movedim(-1, -3)


def _radfm_proj_weight(tensors: list[Tensor], ctx: Context) -> Tensor:
    """Linear → Conv3d weight with the patch reordered; several (identical) input channels are folded into one
    through the patch LayerNorm's weight: ``W'[p] = Σ_c W[c, p] · γ[c, p]``."""
    weight = _radfm_patch(tensors[0], ctx)  # [dim, C, pd, ph, pw]
    if ctx["channels"] == 1:
        return weight
    return (weight * _radfm_patch(tensors[1], ctx)).sum(1, keepdim=True)


def _radfm_proj_bias(tensors: list[Tensor], ctx: Context) -> Tensor:
    """With folded channels the patch LayerNorm's bias moves into the projection: ``b' = b + Σ W · β``."""
    bias, weight, beta = tensors
    return bias + (_radfm_patch(weight, ctx) * _radfm_patch(beta, ctx)).sum((1, 2, 3, 4))


def _radfm_norm(tensors: list[Tensor], ctx: Context) -> Tensor:
    """The patch LayerNorm's weight or bias reordered like the patch (single input channel)."""
    return _radfm_patch(tensors[0], ctx).reshape(-1)


def _radfm_pos(tensors: list[Tensor], ctx: Context) -> Tensor:
    """Three tables (H rows, W columns, D depths; a third of dim each) → our learned grid ``[d, h, w, dim]`` at the
    reference input shape, with RadFM's own choice of rows: patch ``k`` of ``n`` uses row ``(k + 1)·(N // n) − 1``
    of an ``N``-row table (exact at this shape; other shapes are resized trilinearly by rrg3d, unlike RadFM)."""
    row, col, dep = tensors
    d, h, w = ctx["grid"]

    def pick(table: Tensor, n: int) -> Tensor:
        return table[(torch.arange(n) + 1) * (table.shape[0] // n) - 1]

    rows, cols, deps = pick(row, h), pick(col, w), pick(dep, d)
    third = row.shape[1]
    return torch.cat([rows[None, :, None, :].expand(d, h, w, third), cols[None, None, :, :].expand(d, h, w, third),
                      deps[:, None, None, :].expand(d, h, w, third)], dim=-1).contiguous()


def _radfm_table(ctx: Context) -> Table:
    patch = "to_patch_embedding"
    if ctx["channels"] == 1:
        rules = [
            Rule((f"{patch}.1.weight",), "patch_embed.in_norm.weight", _radfm_norm,
                 "LayerNorm of the flattened patch, reordered (p1 p2 pf c) → (C, pd, ph, pw)"),
            Rule((f"{patch}.1.bias",), "patch_embed.in_norm.bias", _radfm_norm),
            Rule((f"{patch}.2.weight",), "patch_embed.proj.weight", _radfm_proj_weight,
                 "Linear [dim, ph·pw·pd·C] → Conv3d [dim, C, pd, ph, pw] (reordered)"),
            Rule((f"{patch}.2.bias",), "patch_embed.proj.bias", copy),
        ]
        fills: list[Fill] = []
    else:
        rules = [
            Rule((f"{patch}.2.weight", f"{patch}.1.weight"), "patch_embed.proj.weight", _radfm_proj_weight,
                 "Linear [dim, ph·pw·pd·C] → Conv3d [dim, 1, pd, ph, pw]: reordered, the C identical channels folded "
                 "into one through the patch LayerNorm's weight"),
            Rule((f"{patch}.2.bias", f"{patch}.2.weight", f"{patch}.1.bias"), "patch_embed.proj.bias",
                 _radfm_proj_bias, "bias plus the projected patch-LayerNorm bias (channel fold)"),
        ]
        fills = [Fill("patch_embed.in_norm.weight", "ones", "the patch LayerNorm's weight is folded into the "
                                                            "projection"),
                 Fill("patch_embed.in_norm.bias", "zeros", "the patch LayerNorm's bias is folded into the projection")]
    rules += [
        Rule((f"{patch}.3.weight",), "patch_embed.norm.weight", copy, "LayerNorm of the token"),
        Rule((f"{patch}.3.bias",), "patch_embed.norm.bias", copy),
        Rule(("pos_embedding.row_embed.weight", "pos_embedding.col_embed.weight", "pos_embedding.dep_embed.weight"),
             "pos_embed", _radfm_pos, "three factorised tables → our [d, h, w, dim] grid at input_shape (RadFM's "
                                      "row choice)"),
    ]
    layer, block = "transformer.layers.{i}", "transformer.blocks.{i}"
    rules += [
        Rule((f"{layer}.0.norm.weight",), f"{block}.norm1.weight", copy),
        Rule((f"{layer}.0.norm.bias",), f"{block}.norm1.bias", copy),
        Rule((f"{layer}.0.fn.to_qkv.weight",), f"{block}.attn.qkv.weight", copy,
             "fused qkv [3·heads·dim_head, dim], same (q, k, v) × (head, channel) order as ours"),
        Rule((f"{layer}.1.norm.weight",), f"{block}.norm2.weight", copy),
        Rule((f"{layer}.1.norm.bias",), f"{block}.norm2.bias", copy),
        Rule((f"{layer}.1.fn.net.0.weight",), f"{block}.mlp.fc1.weight", copy),
        Rule((f"{layer}.1.fn.net.0.bias",), f"{block}.mlp.fc1.bias", copy),
        Rule((f"{layer}.1.fn.net.3.weight",), f"{block}.mlp.fc2.weight", copy),
        Rule((f"{layer}.1.fn.net.3.bias",), f"{block}.mlp.fc2.bias", copy),
    ]
    if ctx["project_out"]:
        rules += [Rule((f"{layer}.0.fn.to_out.0.weight",), f"{block}.attn.proj.weight", copy),
                  Rule((f"{layer}.0.fn.to_out.0.bias",), f"{block}.attn.proj.bias", copy)]
    else:
        fills += [Fill(f"{block}.attn.proj.weight", "identity", "RadFM skips to_out with one head of width dim"),
                  Fill(f"{block}.attn.proj.bias", "zeros", "RadFM skips to_out with one head of width dim")]
    outside = [
        Drop("lang_model.*", "RadFM's language model (MedLLaMA-13B)"),
        Drop("embedding_layer.weight", "the language model's token embeddings (shared)"),
        Drop("embedding_layer.figure_token_weight", "embeddings of the image marker tokens"),
        Drop("embedding_layer.bert_model.*", "MedKEBERT keyword encoder (unused in RadFM's final version)"),
        Drop("embedding_layer.bert_projection_fc.*", "MedKEBERT keyword projection"),
        Drop("embedding_layer.perceiver.*", "perceiver resampler: the connector to the LM, not the encoder"),
        Drop("embedding_layer.fc.*", "projection to the LM width: the connector, not the encoder"),
        Drop("embedding_layer.output_upscaling.*", "segmentation upscaling head (unused)"),
        Drop("embedding_layer.transformer_decoder.*", "keyword-matching decoder (unused)"),
        Drop("embedding_layer.transformer_decoder_mlp.*", "keyword-matching decoder head (unused)"),
        Drop("embedding_layer.cls_head.*", "keyword-matching classifier (unused)"),
    ]
    return Table(rules, [], fills, outside)


PEERS: dict[str, PeerSpec] = {
    "ctclip": PeerSpec(
        kind="ctclip", title="CT-CLIP image encoder (CTViT)", encoder="ctvit", anchor="to_patch_emb.2.weight",
        home="visual_transformer.", preset="ctclip",
        options={"patch_size": (10, 20, 20), "in_channels": 1, "input_shape": None, "attn_scale": 8.0,
                 "quantizer": True, "prefix": None},
        context=_ctclip_context, mapping=_ctclip_mapping, table=_ctclip_table,
        source="github.com/ibrahimethemhamamci/CT-CLIP @ a2a155c (transformer_maskgit/ctvit.py, attention.py, "
               "CT_CLIP/ct_clip/ct_clip.py, scripts/run_zero_shot.py); vector-quantize-pytorch 1.1.2"),
    "radfm": PeerSpec(
        kind="radfm", title="RadFM 3D ViT (also Reg2RG's and PETRG-3D's frozen encoder)", encoder="vit3d",
        anchor="to_patch_embedding.2.weight", home="embedding_layer.vision_encoder.", preset="radfm",
        options={"patch_size": (4, 32, 32), "in_channels": 3, "input_shape": None, "heads": 8, "dim_head": 64,
                 "prefix": None},
        context=_radfm_context, mapping=_radfm_mapping, table=_radfm_table,
        source="github.com/chaoyi-wu/RadFM @ 9efba84 (Quick_demo/Model/RadFM/vit_3d.py, position_encoding.py, "
               "my_embedding_layer.py, multimodality_model.py)"),
}


# -- reading ----------------------------------------------------------------------------------------------------------
def read_peer_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A peer checkpoint's tensors by key: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with
    ``torch.load(weights_only=True)`` (no code from the file runs). A state dict nested under one of ``state_dict``,
    ``model`` or ``module`` is unwrapped; a ``module.`` prefix on every key (DataParallel) is removed."""
    path = Path(path)
    if not path.is_file():
        raise PeerImportError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in PEER_SUFFIXES:
        raise PeerImportError(f"{path}: unsupported weights file (expected one of {', '.join(PEER_SUFFIXES)})")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not a zip-format file: mmap impossible
                data = torch.load(str(path), map_location="cpu", weights_only=True)
    except PeerImportError:
        raise
    except Exception as exc:  # any reader failure is the file's problem, said in one line
        raise PeerImportError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    if isinstance(data, Mapping) and not all(isinstance(v, Tensor) for v in data.values()):
        nested = [k for k in ("state_dict", "model", "module") if isinstance(data.get(k), Mapping)]
        if len(nested) == 1:
            data = data[nested[0]]
    if not isinstance(data, Mapping):
        raise PeerImportError(f"{path}: holds a {type(data).__name__}, not a state dict")
    bad = sorted(str(k) for k, v in data.items() if not isinstance(v, Tensor))
    if bad:
        raise PeerImportError(f"{path}: entries that are not tensors: {bad[:MAX_LISTED]}")
    state = {str(k): v for k, v in data.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _locate(state: Mapping[str, Tensor], spec: PeerSpec, prefix: str | None) -> str:
    """The prefix of the peer's encoder inside ``state`` (``""`` for a bare encoder)."""
    if prefix is not None:
        if not any(k == prefix + spec.anchor for k in state):
            raise PeerImportError(f"no key {prefix}{spec.anchor}: option prefix={prefix!r} does not locate a "
                                  f"{spec.kind} encoder")
        return prefix
    found = sorted(k[: -len(spec.anchor)] for k in state
                   if k.endswith(spec.anchor) and (k == spec.anchor or k[-len(spec.anchor) - 1] == "."))
    if not found:
        sample = ", ".join(sorted(state)[:5])
        raise PeerImportError(f"no key ending in {spec.anchor!r}: not a {spec.kind} checkpoint ({spec.title}); "
                              f"its keys start {sample or '(none)'}")
    if len(found) > 1:
        raise PeerImportError(f"several {spec.kind} encoders in one file (prefixes {found}); choose one with the "
                              "option prefix=...")
    return found[0]


def _options(spec: PeerSpec, options: Mapping[str, Any] | None, preset: Any) -> dict[str, Any]:
    values = dict(spec.options)
    unknown = sorted(set(options or {}) - set(values))
    if unknown:
        raise PeerImportError(f"unknown option(s) {unknown} for {spec.kind}; known: {sorted(values)}")
    values.update(options or {})
    if values["input_shape"] is None:
        values["input_shape"] = tuple(preset.shape)  # the encoder's reference shape is what the preset makes
    if "quantizer" in values and not isinstance(values["quantizer"], bool):
        raise PeerImportError(f"option quantizer must be true or false, got {values['quantizer']!r}")
    return values


def _fill_value(kind: str, shape: Sequence[int]) -> Tensor:
    if kind == "zeros":
        return torch.zeros(*shape)
    if kind == "ones":
        return torch.ones(*shape)
    if kind == "identity" and len(shape) == 2 and shape[0] == shape[1]:
        return torch.eye(shape[0])
    raise PeerImportError(f"cannot fill a tensor of shape {list(shape)} with {kind!r}")


# -- converting -------------------------------------------------------------------------------------------------------
def convert_peer(kind: str, state: Mapping[str, Tensor], *, options: Mapping[str, Any] | None = None,
                 preset: Any = None, strict: bool = False) -> PeerImport:
    """Map a peer's weights (a state dict, e.g. from :func:`read_peer_weights`) onto our encoder.

    Keys of the peer's encoder that the table neither maps nor drops, keys of ours that nothing produces, and shape
    mismatches are all errors (one :class:`PeerImportError` listing them). Keys *outside* the encoder (the rest of a
    whole peer model) are dropped when the table names them; others are dropped with a warning and listed in the
    report (``dropped_unknown``), or refused with ``strict``.
    """
    from rrg3d.models.encoders import ENCODERS
    from rrg3d.preprocess.presets import load_preset

    if kind not in PEERS:
        raise PeerImportError(f"unknown peer kind {kind!r}; known: {', '.join(sorted(PEERS))}")
    spec = PEERS[kind]
    preset = load_preset(preset if preset is not None else spec.preset)
    values = _options(spec, options, preset)
    prefix = _locate(state, spec, values["prefix"])
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outer = {k: v for k, v in state.items() if not k.startswith(prefix)}
    ctx = spec.context(inner, {**values, "_prefix": prefix})
    mapping = spec.mapping(ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the weights are all replaced; a fixed seed keeps the build itself reproducible
        encoder = ENCODERS.build(mapping)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    table = spec.table(ctx)

    dropped: dict[str, str] = {}
    problems: dict[str, list[str]] = {"unmapped": [], "missing": [], "shape": [], "refused": []}
    for key in sorted(inner):
        for drop in table.drops:
            if _compile(drop.pattern).match(key):
                issue = drop.check(inner[key]) if drop.check is not None else None
                if issue:
                    problems["refused"].append(f"{prefix}{key}: {issue}")
                dropped[prefix + key] = drop.reason
                break

    produced: dict[str, Tensor] = {}
    consumed: set[str] = set()
    reported: set[str] = set()  # keys of ours already named in a problem
    for rule in table.rules:
        trigger = _compile(rule.peer[0])
        for key in sorted(inner):
            match = trigger.match(key)
            if match is None:
                continue
            index = match.groupdict().get("i")
            sources = [_fill_index(p, index) for p in rule.peer]
            target = _fill_index(rule.ours, index)
            absent = [s for s in sources if s not in inner]
            reported.add(target)
            if absent:
                problems["missing"].append(f"{prefix}{absent[0]} (read with {prefix}{key} for our {target})")
                consumed.update(s for s in sources if s in inner)
                continue
            consumed.update(sources)
            peer_shapes = ", ".join(f"{prefix}{s} {_shape(inner[s])}" for s in sources)
            if target not in expected:
                problems["unmapped"].append(f"{prefix}{key} {_shape(inner[key])}: maps to our {target}, which the "
                                            f"encoder built from the inferred config does not have")
                continue
            try:
                value = rule.transform([inner[s] for s in sources], ctx)
            except (RuntimeError, ValueError, IndexError) as exc:
                problems["shape"].append(f"our {target}: expected {list(expected[target])}, cannot be made from "
                                         f"{peer_shapes} ({exc})")
                continue
            if tuple(value.shape) != expected[target]:
                problems["shape"].append(f"our {target}: expected {list(expected[target])}, found "
                                         f"{_shape(value)} (from {peer_shapes})")
                continue
            produced[target] = value.detach().to(dtype=torch.float32).contiguous()

    for key in sorted(inner):
        if key not in consumed and prefix + key not in dropped:
            problems["unmapped"].append(f"{prefix}{key} {_shape(inner[key])}: neither mapped nor dropped by the "
                                        f"{kind} table")

    filled: list[str] = []
    for target, shape in expected.items():
        if target in produced:
            continue
        fill = next((f for f in table.fills if _compile(f.ours).match(target)), None)
        if fill is not None:
            produced[target] = _fill_value(fill.value, shape)
            filled.append(target)
            continue
        sources = _expected_sources(table, target, prefix)
        if target not in reported:
            problems["missing"].append(f"our {target} {list(shape)}: comes from {sources}, which the checkpoint "
                                       "does not hold")

    unknown_outside: list[str] = []
    root = prefix[: -len(spec.home)] if prefix.endswith(spec.home) else ""  # e.g. a wrapper's "trained_model."
    for key in sorted(outer):
        relative = key[len(root):] if key.startswith(root) else ""
        drop = next((d for d in table.outside if relative and _compile(d.pattern).match(relative)), None)
        if drop is not None:
            dropped[key] = drop.reason
        else:
            unknown_outside.append(key)
    if unknown_outside and strict:
        problems["unmapped"] += [f"{key} {_shape(outer[key])}: outside the {kind} encoder and not named by the table "
                                 "(--strict)" for key in unknown_outside]

    _raise_problems(kind, problems)
    if unknown_outside:
        log.warning("%d key(s) outside the %s encoder are not named by the table and were dropped: %s",
                    len(unknown_outside), kind, ", ".join(unknown_outside[:MAX_LISTED]))
    encoder.load_state_dict(produced, strict=True)
    report = {
        "peer": kind,
        "title": spec.title,
        "facts_from": spec.source,
        "prefix": prefix,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
        "peer_keys": len(state),
        "mapped": len(consumed),
        "dropped": len(dropped) + len(unknown_outside),
        "dropped_by_reason": dict(Counter(dropped.values()).most_common()),
        "dropped_unknown": unknown_outside,
        "filled": filled,
        "our_keys": len(expected),
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }
    return PeerImport(kind=kind, encoder=encoder, mapping=ENCODERS.describe(encoder), preset=preset, report=report)


def _expected_sources(table: Table, target: str, prefix: str) -> str:
    for rule in table.rules:
        match = _compile(rule.ours).match(target)
        if match is not None:
            index = match.groupdict().get("i")
            return " + ".join(prefix + _fill_index(p, index) for p in rule.peer)
    return "no rule of the table"


def _raise_problems(kind: str, problems: dict[str, list[str]]) -> None:
    titles = {"unmapped": "unmapped peer keys", "missing": "missing keys", "shape": "shape mismatches",
              "refused": "values that cannot be dropped"}
    lines = []
    for what, entries in problems.items():
        if entries:
            shown = entries[:MAX_LISTED] + ([f"... and {len(entries) - MAX_LISTED} more"]
                                            if len(entries) > MAX_LISTED else [])
            lines.append(f"{titles[what]} ({len(entries)}):\n  " + "\n  ".join(shown))
    if lines:
        raise PeerImportError(f"cannot import the {kind} weights:\n" + "\n".join(lines))


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_peer(kind: str, path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                options: Mapping[str, Any] | None = None, preset: Any = None, strict: bool = False) -> PeerImport:
    """Read a peer checkpoint, map it (:func:`convert_peer`) and save an ``encoder`` checkpoint at ``out`` whose
    ``rrg3d.yaml`` records the encoder mapping, the preset and the provenance (``extra.imported_from``)."""
    from rrg3d.models.checkpoint import save_encoder_checkpoint

    state = read_peer_weights(path)
    result = convert_peer(kind, state, options=options, preset=preset, strict=strict)
    result.report.update(source_file=Path(path).name, source_sha256=file_sha256(path),
                         source_bytes=Path(path).stat().st_size)
    save_encoder_checkpoint(result.encoder, out, preprocess=result.preset,
                            extra={"trained": True, "imported_from": result.report})
    return result


def mapping_table(kind: str, options: Mapping[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """The table of a peer kind for its published configuration, as ``(peer, ours, how)`` rows; drops have ``ours``
    ``-`` and fills have ``peer`` ``-``. (Used for documentation and by the tests.)"""
    spec = PEERS[kind]
    ctx = {"channels": (options or {}).get("in_channels", spec.options["in_channels"]), "quantizer": True,
           "project_out": True}
    table = spec.table(ctx)
    rows = [(" + ".join(r.peer), r.ours, r.how) for r in table.rules]
    rows += [(d.pattern, "-", d.reason) for d in table.drops + table.outside]
    rows += [("-", f.ours, f"{f.value}: {f.reason}") for f in table.fills]
    return rows
