"""``rrg3d model import``: peer checkpoints (CT-CLIP's CTViT, RadFM's 3D ViT) mapped onto rrg3d's encoders.

No real weights are needed: each peer's key layout is generated here from tiny hyperparameters (names and shapes as
the peers' code defines them), and each peer's forward pass is written out here with einsum on the *peer-layout*
weights, so the imported encoder is checked number for number against an independent reading of the peer's maths.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from rrg3d.errors import RRG3DError
from rrg3d.models.checkpoint import CheckpointError, load_clip_encoder_state, load_encoder_checkpoint, read_manifest
from rrg3d.models.encoders import ENCODERS
from rrg3d.models.encoders.layers import PatchEmbed3D
from rrg3d.models.peers import (
    PEERS,
    PeerImportError,
    convert_peer,
    file_sha256,
    import_peer,
    mapping_table,
    read_peer_weights,
)
from rrg3d.preprocess.presets import Intensity, load_preset

CTCLIP_PREFIX = "visual_transformer."
RADFM_PREFIX = "embedding_layer.vision_encoder."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randn(gen: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm(gen: torch.Generator, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + _randn(gen, dim, scale=0.1), _randn(gen, dim, scale=0.1)


# -- CT-CLIP: key layout and forward pass, from the peer's definitions -------------------------------------------------
def ctclip_state(dim: int = 16, heads: int = 2, dim_head: int = 8, patch: tuple[int, int, int] = (2, 4, 4),
                 channels: int = 1, depths: tuple[int, int] = (1, 2), codes: int = 16, prefix: str = CTCLIP_PREFIX,
                 whole_model: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """CT-CLIP's state-dict layout (CTCLIP with a CTViT image encoder) for these hyperparameters."""
    gen = torch.Generator().manual_seed(seed)
    pt, p1, p2 = patch
    patch_dim, frame_dim, inner = channels * pt * p1 * p2, channels * p1 * p2, heads * dim_head
    hidden = int(4 * (2 / 3) * dim)  # FeedForward(mult=4): int(mult * 2/3 * dim)
    s: dict[str, torch.Tensor] = {}
    for name, width in (("to_patch_emb_first_frame", frame_dim), ("to_patch_emb", patch_dim)):
        s[f"{name}.1.weight"], s[f"{name}.1.bias"] = _norm(gen, width)
        s[f"{name}.2.weight"], s[f"{name}.2.bias"] = _randn(gen, dim, width), _randn(gen, dim)
        s[f"{name}.3.weight"], s[f"{name}.3.bias"] = _norm(gen, dim)
    s["spatial_rel_pos_bias.net.0.0.weight"], s["spatial_rel_pos_bias.net.0.0.bias"] = _randn(gen, dim, 2), \
        _randn(gen, dim)
    s["spatial_rel_pos_bias.net.1.0.weight"], s["spatial_rel_pos_bias.net.1.0.bias"] = _randn(gen, dim, dim), \
        _randn(gen, dim)
    s["spatial_rel_pos_bias.net.2.weight"], s["spatial_rel_pos_bias.net.2.bias"] = _randn(gen, heads, dim), \
        _randn(gen, heads)
    for stage, depth in zip(("enc_spatial_transformer", "enc_temporal_transformer"), depths, strict=True):
        for i in range(depth):
            layer = f"{stage}.layers.{i}"
            s[f"{layer}.0.dsconv.weight"], s[f"{layer}.0.dsconv.bias"] = _randn(gen, dim, 1, 3, 3, 3), _randn(gen, dim)
            s[f"{layer}.1.norm.gamma"], s[f"{layer}.1.norm.beta"] = _norm(gen, dim)
            s[f"{layer}.1.context_norm.gamma"], s[f"{layer}.1.context_norm.beta"] = _norm(gen, dim)
            s[f"{layer}.1.null_kv"] = torch.zeros(heads, 0, dim_head)  # num_null_kv = 0 in self-attention
            s[f"{layer}.1.to_q.weight"] = _randn(gen, inner, dim)
            s[f"{layer}.1.to_kv.weight"] = _randn(gen, 2 * inner, dim)
            s[f"{layer}.1.q_scale"], s[f"{layer}.1.k_scale"] = 1 + _randn(gen, dim_head), 1 + _randn(gen, dim_head)
            s[f"{layer}.1.to_out.weight"] = _randn(gen, dim, inner)
            s[f"{layer}.3.0.weight"], s[f"{layer}.3.0.bias"] = _norm(gen, dim)
            s[f"{layer}.3.1.weight"] = _randn(gen, 2 * hidden, dim)
            s[f"{layer}.3.4.weight"] = _randn(gen, dim, hidden)
        s[f"{stage}.norm_out.gamma"], s[f"{stage}.norm_out.beta"] = _norm(gen, dim)
    s["vq._codebook.initted"] = torch.ones(1)
    s["vq._codebook.cluster_size"] = torch.rand(1, codes, generator=gen)
    s["vq._codebook.embed"] = F.normalize(torch.randn(1, codes, dim, generator=gen), dim=-1)
    s["to_pixels_first_frame.0.weight"], s["to_pixels_first_frame.0.bias"] = _randn(gen, frame_dim, dim), \
        _randn(gen, frame_dim)
    s["to_pixels.0.weight"], s["to_pixels.0.bias"] = _randn(gen, patch_dim, dim), _randn(gen, patch_dim)
    state = {prefix + k: v for k, v in s.items()}
    if whole_model:  # the rest of CTCLIP: text tower (a stand-in BERT key or two), latents, temperature
        state["text_transformer.embeddings.word_embeddings.weight"] = _randn(gen, 30, 8)
        state["text_transformer.encoder.layer.0.attention.self.query.weight"] = _randn(gen, 8, 8)
        state["to_text_latent.weight"] = _randn(gen, 4, 8)
        state["to_visual_latent.weight"] = _randn(gen, 4, 3 * 3 * dim)
        state["temperature"] = torch.tensor(1.0)
    return state


def _peg(x: torch.Tensor, grid: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """CT-CLIP's PEG written as a sum of 27 shifted copies: the memory of ``x`` read as [b, t, h, w, d] (its own
    ``x.reshape(*video_shape, -1)``), zero-padded (2, 0) along t and (1, 1) along h and w."""
    b, t, h, w = grid
    vol = x.reshape(b, t, h, w, -1)
    padded = F.pad(vol, (0, 0, 1, 1, 1, 1, 2, 0))
    out = bias.expand_as(vol).clone()
    for a in range(3):
        for c in range(3):
            for e in range(3):
                out = out + padded[:, a:a + t, c:c + h, e:e + w] * weight[:, 0, a, c, e]
    return out.reshape(x.shape)


def _ctclip_attention(x: torch.Tensor, s: dict, layer: str, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    xn = F.layer_norm(x, x.shape[-1:], s[f"{layer}.1.norm.gamma"], s[f"{layer}.1.norm.beta"])
    q = torch.einsum("nld,ed->nle", xn, s[f"{layer}.1.to_q.weight"])
    # CT-CLIP's Attention takes keys/values from its input *before* its LayerNorm (kv_input = x; x = norm(x))
    k, v = torch.einsum("nld,ed->nle", x, s[f"{layer}.1.to_kv.weight"]).chunk(2, dim=-1)
    q, k, v = (t.reshape(*t.shape[:2], heads, -1) for t in (q, k, v))
    q = F.normalize(q, dim=-1) * s[f"{layer}.1.q_scale"]
    k = F.normalize(k, dim=-1) * s[f"{layer}.1.k_scale"]
    sim = torch.einsum("nihd,njhd->nhij", q, k) * 8
    if bias is not None:
        sim = sim + bias
    out = torch.einsum("nhij,njhd->nihd", sim.softmax(-1), v).reshape(*x.shape[:2], -1)
    return torch.einsum("nle,de->nld", out, s[f"{layer}.1.to_out.weight"])


def _ctclip_ff(x: torch.Tensor, s: dict, layer: str) -> torch.Tensor:
    xn = F.layer_norm(x, x.shape[-1:], s[f"{layer}.3.0.weight"], s[f"{layer}.3.0.bias"])
    value, gate = torch.einsum("nld,ed->nle", xn, s[f"{layer}.3.1.weight"]).chunk(2, dim=-1)
    return torch.einsum("nle,de->nld", F.gelu(gate) * value, s[f"{layer}.3.4.weight"])


def ctclip_forward(state: dict, video: torch.Tensor, patch: tuple[int, int, int], heads: int,
                   prefix: str = CTCLIP_PREFIX, quantize: bool = True) -> torch.Tensor:
    """CTViT's ``forward(video, return_encoded_tokens=True)`` on ``video [b, c, f, H, W]`` → ``[b, t, h, w, d]``."""
    s = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    b, c, f, height, width = video.shape
    pt, p1, p2 = patch
    t, h, w = f // pt, height // p1, width // p2
    x = video.reshape(b, c, t, pt, h, p1, w, p2).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t, h, w, -1)
    x = F.layer_norm(x, x.shape[-1:], s["to_patch_emb.1.weight"], s["to_patch_emb.1.bias"])
    x = torch.einsum("bthwp,dp->bthwd", x, s["to_patch_emb.2.weight"]) + s["to_patch_emb.2.bias"]
    x = F.layer_norm(x, x.shape[-1:], s["to_patch_emb.3.weight"], s["to_patch_emb.3.bias"])
    d = x.shape[-1]
    # continuous position bias over the (h, w) grid
    pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).reshape(2, -1).T
    rel = (pos[:, None] - pos[None, :]).float()
    rel = torch.sign(rel) * torch.log(rel.abs() + 1)
    hid = F.leaky_relu(rel @ s["spatial_rel_pos_bias.net.0.0.weight"].T + s["spatial_rel_pos_bias.net.0.0.bias"], 0.1)
    hid = F.leaky_relu(hid @ s["spatial_rel_pos_bias.net.1.0.weight"].T + s["spatial_rel_pos_bias.net.1.0.bias"], 0.1)
    bias = (hid @ s["spatial_rel_pos_bias.net.2.weight"].T + s["spatial_rel_pos_bias.net.2.bias"]).permute(2, 0, 1)
    grid = (b, t, h, w)
    for stage, tokens_of in (("enc_spatial_transformer", lambda z: z.reshape(b * t, h * w, d)),
                             ("enc_temporal_transformer", lambda z: z.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d))):
        x = tokens_of(x)
        depth = len({k.split(".")[2] for k in s if k.startswith(f"{stage}.layers.")})
        for i in range(depth):
            layer = f"{stage}.layers.{i}"
            x = _peg(x, grid, s[f"{layer}.0.dsconv.weight"], s[f"{layer}.0.dsconv.bias"]) + x
            x = _ctclip_attention(x, s, layer, heads, bias if stage == "enc_spatial_transformer" else None) + x
            x = _ctclip_ff(x, s, layer) + x
        x = F.layer_norm(x, x.shape[-1:], s[f"{stage}.norm_out.gamma"], s[f"{stage}.norm_out.beta"])
        if stage == "enc_spatial_transformer":
            x = x.reshape(b, t, h, w, d)
        else:
            x = x.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)
    if quantize:
        embed = s["vq._codebook.embed"][0]
        index = (F.normalize(x, dim=-1) @ F.normalize(embed, dim=-1).T).argmax(-1)
        x = embed[index]
    return x


# -- RadFM: key layout and forward pass --------------------------------------------------------------------------------
def radfm_state(dim: int = 24, depth: int = 2, heads: int = 2, dim_head: int = 8, mlp: int = 40,
                patch: tuple[int, int, int] = (2, 4, 4), channels: int = 3, image: int = 16, frames: int = 16,
                prefix: str = RADFM_PREFIX, whole_model: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """RadFM's state-dict layout (MultiLLaMAForCausalLM → embedding_layer.vision_encoder = ViT); ``patch`` is
    (frame_patch_size, patch_size, patch_size) = (D, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    pf, p1, p2 = patch
    patch_dim, inner = channels * pf * p1 * p2, heads * dim_head
    s: dict[str, torch.Tensor] = {}
    s["to_patch_embedding.1.weight"], s["to_patch_embedding.1.bias"] = _norm(gen, patch_dim)
    s["to_patch_embedding.2.weight"], s["to_patch_embedding.2.bias"] = _randn(gen, dim, patch_dim), _randn(gen, dim)
    s["to_patch_embedding.3.weight"], s["to_patch_embedding.3.bias"] = _norm(gen, dim)
    s["pos_embedding.row_embed.weight"] = torch.rand(image // p1, dim // 3, generator=gen)
    s["pos_embedding.col_embed.weight"] = torch.rand(image // p2, dim // 3, generator=gen)
    s["pos_embedding.dep_embed.weight"] = torch.rand(frames // pf, dim // 3, generator=gen)
    for i in range(depth):
        layer = f"transformer.layers.{i}"
        s[f"{layer}.0.norm.weight"], s[f"{layer}.0.norm.bias"] = _norm(gen, dim)
        s[f"{layer}.0.fn.to_qkv.weight"] = _randn(gen, 3 * inner, dim)
        s[f"{layer}.0.fn.to_out.0.weight"], s[f"{layer}.0.fn.to_out.0.bias"] = _randn(gen, dim, inner), _randn(gen, dim)
        s[f"{layer}.1.norm.weight"], s[f"{layer}.1.norm.bias"] = _norm(gen, dim)
        s[f"{layer}.1.fn.net.0.weight"], s[f"{layer}.1.fn.net.0.bias"] = _randn(gen, mlp, dim), _randn(gen, mlp)
        s[f"{layer}.1.fn.net.3.weight"], s[f"{layer}.1.fn.net.3.bias"] = _randn(gen, dim, mlp), _randn(gen, dim)
    state = {prefix + k: v for k, v in s.items()}
    if whole_model:  # a few keys of the rest of RadFM
        state["lang_model.model.embed_tokens.weight"] = _randn(gen, 40, 12)
        state["embedding_layer.weight"] = _randn(gen, 40, 12)
        state["embedding_layer.figure_token_weight"] = _randn(gen, 2, 12)
        state["embedding_layer.bert_model.embeddings.word_embeddings.weight"] = _randn(gen, 30, 8)
        state["embedding_layer.perceiver.latents"] = _randn(gen, 4, dim)
        state["embedding_layer.fc.weight"], state["embedding_layer.fc.bias"] = _randn(gen, 12, dim), _randn(gen, 12)
        state["embedding_layer.cls_head.weight"] = _randn(gen, 1, dim // 8)
    return state


def radfm_forward(state: dict, video: torch.Tensor, patch: tuple[int, int, int], heads: int,
                  prefix: str = RADFM_PREFIX) -> torch.Tensor:
    """RadFM's ``ViT.forward(video)[0]`` on ``video [B, C, H, W, D]`` → ``[B, (h w f), dim]``."""
    s = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    b, c, height, width, frames = video.shape
    pf, p1, p2 = patch
    h, w, f = height // p1, width // p2, frames // pf
    x = video.reshape(b, c, h, p1, w, p2, f, pf).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, h * w * f, -1)
    x = F.layer_norm(x, x.shape[-1:], s["to_patch_embedding.1.weight"], s["to_patch_embedding.1.bias"])
    x = torch.einsum("bnp,dp->bnd", x, s["to_patch_embedding.2.weight"]) + s["to_patch_embedding.2.bias"]
    x = F.layer_norm(x, x.shape[-1:], s["to_patch_embedding.3.weight"], s["to_patch_embedding.3.bias"])
    rows, cols, deps = (s[f"pos_embedding.{n}_embed.weight"] for n in ("row", "col", "dep"))
    i = (torch.arange(h) + 1) * (rows.shape[0] // h) - 1
    j = (torch.arange(w) + 1) * (cols.shape[0] // w) - 1
    k = (torch.arange(f) + 1) * (deps.shape[0] // f) - 1
    third = rows.shape[1]
    pos = torch.cat([rows[i][:, None, None].expand(h, w, f, third), cols[j][None, :, None].expand(h, w, f, third),
                     deps[k][None, None, :].expand(h, w, f, third)], dim=-1).reshape(h * w * f, -1)
    x = x + pos
    depth = len({key.split(".")[2] for key in s if key.startswith("transformer.layers.")})
    for n in range(depth):
        layer = f"transformer.layers.{n}"
        xn = F.layer_norm(x, x.shape[-1:], s[f"{layer}.0.norm.weight"], s[f"{layer}.0.norm.bias"])
        q, kk, v = torch.einsum("bnd,ed->bne", xn, s[f"{layer}.0.fn.to_qkv.weight"]).chunk(3, dim=-1)
        q, kk, v = (t.reshape(b, -1, heads, t.shape[-1] // heads) for t in (q, kk, v))
        attn = (torch.einsum("bihd,bjhd->bhij", q, kk) * q.shape[-1] ** -0.5).softmax(-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, x.shape[1], -1)
        x = torch.einsum("bne,de->bnd", out, s[f"{layer}.0.fn.to_out.0.weight"]) + s[f"{layer}.0.fn.to_out.0.bias"] + x
        xn = F.layer_norm(x, x.shape[-1:], s[f"{layer}.1.norm.weight"], s[f"{layer}.1.norm.bias"])
        hid = F.gelu(xn @ s[f"{layer}.1.fn.net.0.weight"].T + s[f"{layer}.1.fn.net.0.bias"])
        x = hid @ s[f"{layer}.1.fn.net.3.weight"].T + s[f"{layer}.1.fn.net.3.bias"] + x
    return x  # RadFM's transformer has no final norm


# -- the tests ---------------------------------------------------------------------------------------------------------
CTCLIP_OPTIONS = {"patch_size": [2, 4, 4], "input_shape": [8, 12, 16]}
RADFM_OPTIONS = {"patch_size": [2, 4, 4], "input_shape": [8, 8, 12], "heads": 2, "dim_head": 8}


def _volume(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantizer", [False, True])
def test_ctclip_import_maps_every_key_and_matches_the_peers_forward(quantizer):
    state = ctclip_state()
    result = convert_peer("ctclip", state, options={**CTCLIP_OPTIONS, "quantizer": quantizer})
    report = result.report
    assert report["prefix"] == CTCLIP_PREFIX and report["dropped_unknown"] == []
    assert report["mapped"] + report["dropped"] == len(state) == report["peer_keys"]
    assert "CT-CLIP's text encoder (CXR-BERT)" in report["dropped_by_reason"]
    assert len(report["filled"]) == 3 * 3  # per block: attention out bias, both feed-forward biases
    config = result.encoder.config
    assert (config.dim, config.heads, config.dim_head, config.spatial_depth, config.temporal_depth) == (16, 2, 8, 1, 2)
    assert config.quantizer_codes == (16 if quantizer else 0) and config.temporal_causal is False
    assert result.mapping["name"] == "ctvit" and result.preset.name == "ctclip"

    video = _volume((2, 1, 8, 12, 16))  # grid 4 × 3 × 4: the temporal PEG reads a non-cubic memory layout
    with torch.no_grad():
        ours = result.encoder.eval()(video)
    expected = ctclip_forward(state, video, (2, 4, 4), heads=2, quantize=quantizer)
    assert ours.shape == expected.shape == (2, 4, 3, 4, 16)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    if quantizer:  # every output token is one of the codes
        codes = state[CTCLIP_PREFIX + "vq._codebook.embed"][0]
        assert (ours.reshape(-1, 1, 16) == codes[None]).all(-1).any(-1).all()


def test_radfm_import_folds_three_identical_channels_and_matches_the_peers_forward():
    state = radfm_state()
    result = convert_peer("radfm", state, options=RADFM_OPTIONS)
    report = result.report
    assert report["prefix"] == RADFM_PREFIX and report["dropped_unknown"] == []
    assert report["mapped"] + report["dropped"] == len(state)
    assert sorted(report["filled"]) == ["patch_embed.in_norm.bias", "patch_embed.in_norm.weight"]
    assert result.encoder.in_channels == 1 and result.encoder.config.final_norm is False
    assert result.preset.name == "radfm"

    volume = _volume((2, 1, 8, 8, 12))  # ours: [B, 1, D, H, W]
    with torch.no_grad():
        ours = result.encoder.eval()(volume)  # [B, d, h, w, C] = [2, 4, 2, 3, 24]
    peer_video = volume.permute(0, 1, 3, 4, 2).repeat(1, 3, 1, 1, 1)  # RadFM: [B, 3, H, W, D], channel repeated
    expected = radfm_forward(state, peer_video, (2, 4, 4), heads=2)
    assert ours.shape == (2, 4, 2, 3, 24)
    torch.testing.assert_close(ours.permute(0, 2, 3, 1, 4).reshape(2, -1, 24), expected, rtol=1e-4, atol=1e-5)


def test_radfm_bare_single_channel_state_dict_as_reg2rg_loads_it():
    state = radfm_state(channels=1, prefix="", whole_model=False)
    result = convert_peer("radfm", state, options={**RADFM_OPTIONS, "in_channels": 1})
    assert result.report["prefix"] == "" and result.report["filled"] == []
    assert result.report["mapped"] == len(state)
    volume = _volume((1, 1, 8, 8, 12), seed=5)
    with torch.no_grad():
        ours = result.encoder.eval()(volume)
    expected = radfm_forward(state, volume.permute(0, 1, 3, 4, 2), (2, 4, 4), heads=2, prefix="")
    torch.testing.assert_close(ours.permute(0, 2, 3, 1, 4).reshape(1, -1, 24), expected, rtol=1e-4, atol=1e-5)


def test_patch_embedding_and_cosine_attention_by_hand():
    """The two layout-changing pieces on their own: RadFM's (p1 p2 pf c) Linear patch projection against einsum on
    the peer weight, and one cosine-attention block of CT-CLIP against the peer formula."""
    state = radfm_state(channels=1, prefix="", whole_model=False, depth=1)
    embed = convert_peer("radfm", state, options={**RADFM_OPTIONS, "in_channels": 1}).encoder.patch_embed
    assert isinstance(embed, PatchEmbed3D) and embed.in_norm is not None
    x = _volume((1, 1, 4, 8, 4), seed=7)  # [B, C, D, H, W]: one patch row of 2 × 2 × 1 patches
    patches = x[0, 0].reshape(2, 2, 2, 4, 1, 4).permute(2, 4, 0, 3, 5, 1)  # [h, w, f, p1, p2, pf] (C = 1 last)
    flat = F.layer_norm(patches.reshape(2, 1, 2, -1), (32,), state["to_patch_embedding.1.weight"],
                        state["to_patch_embedding.1.bias"])
    by_hand = torch.einsum("hwfp,dp->fhwd", flat, state["to_patch_embedding.2.weight"]) + \
        state["to_patch_embedding.2.bias"]
    by_hand = F.layer_norm(by_hand, (24,), state["to_patch_embedding.3.weight"], state["to_patch_embedding.3.bias"])
    with torch.no_grad():
        torch.testing.assert_close(embed(x)[0], by_hand, rtol=1e-5, atol=1e-5)

    clip = ctclip_state(depths=(1, 1), prefix="", whole_model=False)
    block = convert_peer("ctclip", clip, options={**CTCLIP_OPTIONS, "quantizer": False}).encoder.temporal.blocks[0]
    tokens = _volume((3, 5, 16), seed=8)
    with torch.no_grad():
        ours = block.attn(block.norm1(tokens), kv_input=tokens)  # as the block calls it (attn_kv_norm false)
    assert block.kv_norm is False
    torch.testing.assert_close(ours, _ctclip_attention(tokens, clip, "enc_temporal_transformer.layers.0", 2, None),
                               rtol=1e-5, atol=1e-5)


def test_mapping_tables_name_every_peer_key():
    for kind, state in (("ctclip", ctclip_state()), ("radfm", radfm_state())):
        rows = mapping_table(kind)
        assert rows and all(len(row) == 3 for row in rows)
        names = {kind: set(PEERS)}
        assert kind in names[kind]
        result = convert_peer(kind, state, options=CTCLIP_OPTIONS if kind == "ctclip" else RADFM_OPTIONS)
        assert result.report["mapped"] + result.report["dropped"] == len(state)


def _problem(kind: str, state: dict, **options) -> str:
    base = CTCLIP_OPTIONS if kind == "ctclip" else RADFM_OPTIONS
    with pytest.raises(PeerImportError) as info:
        convert_peer(kind, state, options={**base, **options})
    assert isinstance(info.value, RRG3DError)
    return str(info.value)


def test_renamed_missing_and_misshaped_keys_are_clear_errors():
    state = ctclip_state()
    key = CTCLIP_PREFIX + "enc_temporal_transformer.layers.1.1.to_out.weight"
    renamed = dict(state)
    renamed[key.replace("to_out", "to_output")] = renamed.pop(key)
    message = _problem("ctclip", renamed)
    assert "unmapped peer keys (1)" in message and "layers.1.1.to_output.weight [16, 16]" in message
    assert "missing keys (1)" in message and "our temporal.blocks.1.attn.proj.weight [16, 16]" in message
    assert key in message  # where that key of ours should have come from

    missing = dict(state)
    del missing[CTCLIP_PREFIX + "enc_spatial_transformer.layers.0.1.to_kv.weight"]
    message = _problem("ctclip", missing)
    assert "enc_spatial_transformer.layers.0.1.to_kv.weight" in message
    assert "spatial.blocks.0.attn.qkv.weight" in message

    wrong = dict(state)
    wrong[CTCLIP_PREFIX + "enc_temporal_transformer.layers.0.3.4.weight"] = torch.zeros(16, 9)
    message = _problem("ctclip", wrong)
    assert "shape mismatches (1)" in message and "missing" not in message
    assert "our temporal.blocks.0.mlp.fc2.weight: expected [16, 42], found [16, 9]" in message

    radfm = radfm_state()
    radfm[RADFM_PREFIX + "pos_embedding.dep_embed.weight"] = torch.zeros(8, 7)
    assert "pos_embedding.dep_embed.weight: expected shape [n, 8]" in _problem("radfm", radfm)


def test_hyperparameters_the_weights_cannot_tell_are_checked():
    assert "set the options patch_size / in_channels" in _problem("ctclip", ctclip_state(), patch_size=[2, 2, 4])
    assert "3 × heads × dim_head = 3 × 4 × 8" in _problem("radfm", radfm_state(), heads=4)
    assert "unknown option(s) ['depth']" in _problem("radfm", radfm_state(), depth=3)
    assert "more than RadFM's position table holds" in _problem("radfm", radfm_state(), input_shape=[64, 8, 8])
    nonempty = ctclip_state()
    nonempty[CTCLIP_PREFIX + "enc_spatial_transformer.layers.0.1.null_kv"] = torch.ones(2, 2, 8)
    assert "values that cannot be dropped" in _problem("ctclip", nonempty)
    assert "not a radfm checkpoint" in _problem("radfm", ctclip_state())
    two = {**radfm_state(), **radfm_state(prefix="embedding_layer.mask_encoder.", whole_model=False)}
    assert "several radfm encoders" in _problem("radfm", two)
    chosen = convert_peer("radfm", two, options={**RADFM_OPTIONS, "prefix": RADFM_PREFIX})
    assert chosen.report["dropped_unknown"][0].startswith("embedding_layer.mask_encoder.")


def test_unknown_keys_outside_the_encoder_are_dropped_or_refused_with_strict(caplog):
    state = ctclip_state()
    state["classifier.weight"] = torch.zeros(18, 512)  # e.g. a fine-tuned variant's head
    with caplog.at_level(logging.WARNING, logger="rrg3d.models.peers"):
        result = convert_peer("ctclip", state, options=CTCLIP_OPTIONS)
    assert result.report["dropped_unknown"] == ["classifier.weight"]
    assert "classifier.weight" in caplog.text
    with pytest.raises(PeerImportError, match=r"classifier\.weight \[18, 512\]: outside the ctclip encoder"):
        convert_peer("ctclip", state, options=CTCLIP_OPTIONS, strict=True)
    # CT-CLIP's ClassFine wraps the whole CTCLIP as trained_model: its parts are still recognised
    wrapped = {f"trained_model.{k}": v for k, v in ctclip_state().items()}
    wrapped["classifier.weight"], wrapped["classifier.bias"] = torch.zeros(18, 512), torch.zeros(18)
    result = convert_peer("ctclip", wrapped, options=CTCLIP_OPTIONS)
    assert result.report["prefix"] == "trained_model." + CTCLIP_PREFIX
    assert result.report["dropped_unknown"] == ["classifier.bias", "classifier.weight"]
    inside = ctclip_state()
    inside[CTCLIP_PREFIX + "extra_head.weight"] = torch.zeros(2)  # inside the encoder: always an error
    assert "extra_head.weight [2]: neither mapped nor dropped" in _problem("ctclip", inside)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_import_writes_a_checkpoint_the_encoder_init_path_loads(tmp_path, suffix):
    state = radfm_state()
    source = tmp_path / f"radfm{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": state}, source)  # nested: unwrapped on reading
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    out = tmp_path / "imported"
    result = import_peer("radfm", source, out, options=RADFM_OPTIONS)
    meta = read_manifest(out)
    assert meta["kind"] == "encoder" and meta["encoder"] == result.mapping
    assert meta["preprocess"]["preset"] == "radfm" and meta["preprocess"]["sha256"] == load_preset("radfm").sha256
    provenance = meta["extra"]["imported_from"]
    assert provenance["peer"] == "radfm" and provenance["source_sha256"] == file_sha256(source)
    assert provenance["mapped"] + provenance["dropped"] == len(state) and provenance["source_file"] == source.name

    # the path a report generator's model.vision_init takes (rrg3d.train.generator.build_report_generator)
    fresh = ENCODERS.build(result.mapping)
    fresh.load_state_dict(load_clip_encoder_state(out, ENCODERS.describe(fresh)), strict=True)
    loaded = load_encoder_checkpoint(out)
    volume = _volume((1, 1, 8, 8, 12))
    with torch.no_grad():
        reference = result.encoder.eval()(volume)
        torch.testing.assert_close(fresh.eval()(volume), reference, rtol=0, atol=0)
        torch.testing.assert_close(loaded(volume), reference, rtol=0, atol=0)
    other = dict(result.mapping, depth=1)
    with pytest.raises(CheckpointError, match=r"does not match the model's vision\.encoder \(depth: checkpoint 2"):
        load_clip_encoder_state(out, other)


def test_a_report_generator_recipe_starts_from_the_imported_encoder(tmp_path):
    """model.vision_init=IMPORTED_CKPT through the training code's own builder (tiny LM, no training step)."""
    from rrg3d.train.generator import build_report_generator
    from rrg3d.train.recipe import load_recipe

    result = import_peer("ctclip", _saved(tmp_path, ctclip_state()), tmp_path / "ctclip_ckpt",
                         options={**CTCLIP_OPTIONS, "input_shape": [32, 64, 64]}, preset="tiny")
    config = {"name": "peer_ctclip_test", "description": "imported CT-CLIP encoder (test)",
              "vision": {"encoder": result.mapping, "compressor": {"name": "pool", "kernel": [2, 2, 2]},
                         "projector": {"name": "mlp2x_gelu"}},
              "lm": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"}, "preprocess": "tiny",
              "generation": {"max_new_tokens": 8}}
    path = tmp_path / "peer_ctclip_test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    recipe = load_recipe("tiny_align", [f"model.config={path}", f"model.vision_init={tmp_path / 'ctclip_ckpt'}"])
    model = build_report_generator(recipe, load_preset("tiny"))
    for key, value in result.encoder.state_dict().items():
        assert torch.equal(model.vision.encoder.state_dict()[key], value), key


def _saved(folder: Path, state: dict) -> Path:
    path = folder / "peer.pth"
    torch.save(state, path)
    return path


def test_cli_import_and_its_errors(tmp_path, capsys):
    from rrg3d.cli import main

    source = _saved(tmp_path, ctclip_state())
    out = tmp_path / "ckpt"
    argv = ["model", "import", "ctclip", str(source), "--out", str(out), "--option", "patch_size=[2, 4, 4]",
            "--option", "input_shape=[8, 12, 16]"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mapped" in printed and "model.vision_init=" in printed and "name: ctvit" in printed
    assert read_manifest(out)["extra"]["imported_from"]["options"]["patch_size"] == [2, 4, 4]
    assert main(["model", "info", str(out)]) == 0
    assert "kind: encoder" in capsys.readouterr().out

    assert main(["model", "import", "ctclip", str(source), "--out", str(tmp_path / "bad")]) != 0
    assert "set the options patch_size / in_channels" in capsys.readouterr().err
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    assert main(["model", "import", "radfm", str(text), "--out", str(tmp_path / "bad")]) != 0
    assert "unsupported weights file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_reading_peer_files(tmp_path):
    state = {"module.a.weight": torch.ones(2), "module.b": torch.zeros(1)}
    torch.save(state, tmp_path / "ddp.bin")
    assert sorted(read_peer_weights(tmp_path / "ddp.bin")) == ["a.weight", "b"]
    torch.save({"weights": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(PeerImportError, match=r"entries that are not tensors: \['step'\]"):
        read_peer_weights(tmp_path / "mixed.pt")
    (tmp_path / "broken.pt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(PeerImportError, match="cannot read the weights"):
        read_peer_weights(tmp_path / "broken.pt")
    with pytest.raises(PeerImportError, match="no such file"):
        read_peer_weights(tmp_path / "absent.pt")


def test_imported_encoders_train_and_checkpoint():
    """The new layer options under training: finite gradients (the quantiser passes them straight through) and
    gradient checkpointing giving the same gradients."""
    encoder = convert_peer("ctclip", ctclip_state(), options=CTCLIP_OPTIONS).encoder.train()
    video = _volume((1, 1, 8, 12, 16))

    def grads() -> dict[str, torch.Tensor]:
        encoder.zero_grad(set_to_none=True)
        out = encoder(video)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return {n: p.grad.clone() for n, p in encoder.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert plain["spatial_bias.net.0.weight"].abs().sum() > 0 and plain["spatial.blocks.0.peg.conv.weight"].abs().sum()
    encoder.set_gradient_checkpointing(True)
    for name, grad in grads().items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_peer_presets_record_the_peers_preprocessing():
    ctclip, radfm = load_preset("ctclip"), load_preset("radfm")
    assert (ctclip.shape, ctclip.spacing, ctclip.fit) == ((240, 480, 480), (1.5, 0.75, 0.75), "crop_pad")
    assert ctclip.intensity == Intensity("window", (-1000.0, 1000.0), (-1.0, 1.0), True)
    assert ctclip.pad_value == -1000.0
    assert (radfm.shape, radfm.spacing, radfm.fit, radfm.intensity.kind) == ((64, 512, 512), None, "resize", "minmax")
    minmax = Intensity("minmax", None, (0.0, 1.0))
    array = np.array([[-1024.0, 0.0], [976.0, 1000.0]], dtype=np.float32)
    from rrg3d.io.volume import Volume

    volume = Volume(array=array[None], affine=np.eye(4), modality="CT")
    out = minmax.apply(volume).array
    assert out.min() == 0.0 and out.max() == 1.0 and math.isclose(float(out[0, 1, 0]), 2000 / 2024, rel_tol=1e-6)
    clipped = Intensity("minmax", (-1000.0, 500.0), (0.0, 1.0)).apply(volume).array
    assert float(clipped[0, 0, 1]) == pytest.approx(1000 / 1500)
    assert (Intensity("minmax", None).apply(volume.replace(array=np.ones((1, 2, 2), np.float32))).array == 0).all()
