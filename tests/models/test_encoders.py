"""3D vision encoders: the common interface, position resizing, checkpointing, bf16, causality and the
relative position bias of CTViT-V. Tiny configs only (the whole file runs in seconds on 2 CPU cores)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from rrg3d.errors import ConfigError
from rrg3d.models.encoders import ENCODERS, CTViTV, RelativePositionBias
from rrg3d.models.encoders.layers import (
    Attention,
    PatchEmbed3D,
    conv_stem_strides,
    resize_pos_embed,
    sincos_pos_embed_3d,
)

REFERENCE = (32, 64, 64)  # (D, H, W) the tiny position embeddings are made for
OTHER = (44, 80, 72)  # larger and not a multiple of any tiny patch: exercises padding and resizing

TINY: dict[str, dict] = {
    "vit3d": {"input_shape": REFERENCE, "patch_size": (8, 16, 16), "dim": 32, "depth": 2, "heads": 2},
    "vit3d_sincos": {
        "name": "vit3d", "input_shape": REFERENCE, "patch_size": (8, 16, 16), "dim": 36, "depth": 1, "heads": 2,
        "pos_embed": "sincos",
    },
    "ctvit": {
        "input_shape": REFERENCE, "patch_size": (4, 16, 16), "dim": 32, "spatial_depth": 1, "temporal_depth": 2,
        "heads": 2, "dim_head": 16,
    },
    "ctvit_v": {
        "input_shape": REFERENCE, "patch_size": (4, 16, 16), "dim": 32, "spatial_depth": 1, "slice_depth": 2,
        "heads": 2, "dim_head": 16, "max_distance": 6,
    },
    "ctvit_v_conv_stem": {
        "name": "ctvit_v", "input_shape": REFERENCE, "patch_size": (4, 8, 8), "dim": 32, "spatial_depth": 1,
        "slice_depth": 1, "heads": 2, "dim_head": 16, "max_distance": 6, "patch_stem": "conv",
    },
    "resnet3d": {"input_shape": REFERENCE, "layers": (1, 1, 1), "widths": (8, 12, 16)},
    "multiwindow": {  # the stem halves the input: the wrapped encoder's reference is half of REFERENCE
        "pool": (2, 2, 2), "encoder": {"name": "resnet3d", "input_shape": (16, 32, 32), "layers": (1, 1),
                                       "widths": (8, 8), "stem_kernel": (3, 3, 3)},
    },
    "resnet3d_group": {
        "name": "resnet3d", "input_shape": REFERENCE, "layers": (1, 2), "widths": (8, 16), "norm": "group",
        "norm_groups": 4, "stem_stride": (2, 2, 2), "stem_pool": False,
    },
}


def build(key: str, **overrides):
    data = dict(TINY[key])
    data.setdefault("name", key)
    data.update(overrides)
    torch.manual_seed(0)
    return ENCODERS.build(data)


def volume(shape=REFERENCE, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, *shape, generator=gen)


def test_every_registered_encoder_has_a_tiny_config():
    covered = {TINY[k].get("name", k) for k in TINY}
    assert covered == set(ENCODERS.names()) == {"vit3d", "ctvit", "ctvit_v", "resnet3d", "multiwindow"}


@pytest.mark.parametrize("key", sorted(TINY))
def test_output_grid_at_reference_and_other_size(key):
    model = build(key).eval()
    assert model.registry_name == TINY[key].get("name", key)
    assert model.in_channels == 1
    with torch.no_grad():
        for shape in (REFERENCE, OTHER):
            out = model(volume(shape))
            assert out.shape == (2, *model.grid_shape(shape), model.out_dim)
            assert torch.isfinite(out).all()
    assert model.grid_shape(OTHER) != model.grid_shape(REFERENCE)


@pytest.mark.parametrize("key", sorted(TINY))
def test_backward_gives_finite_gradients_to_every_parameter(key):
    model = build(key).train()
    model(volume(OTHER, batch=1)).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("key", sorted(TINY))
def test_gradient_checkpointing_matches_and_recomputes(key):
    model = build(key).train()
    x = volume(batch=2)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # count forward calls of one checkpointed unit: recomputation in backward calls it a second time
    unit = next(m for m in model.modules() if type(m).__name__ in ("Block", "BasicBlock3D"))
    calls = []
    unit.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
    out_off, grads_off = run()
    n_off = len(calls)
    model.set_gradient_checkpointing(True)
    out_on, grads_on = run()
    assert len(calls) - n_off == 2 * n_off, "checkpointing did not recompute the block in backward"
    torch.testing.assert_close(out_on, out_off)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, msg=name)
    # inference is untouched by the flag
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(x)
    assert len(calls) == 1


@pytest.mark.parametrize("key", sorted(TINY))
def test_bf16_autocast_forward_is_finite(key):
    model = build(key).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(volume(OTHER, batch=1))
    assert out.shape == (1, *model.grid_shape(OTHER), model.out_dim)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("key", sorted(TINY))
def test_bad_config_and_bad_input_are_clear_errors(key):
    with pytest.raises(ConfigError, match="unknown keys"):
        build(key, no_such_key=1)
    model = build(key)
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        model(torch.zeros(1, *REFERENCE))  # 4-D: channel axis missing
    with pytest.raises(ValueError, match=r"in_channels = 1"):
        model(torch.zeros(1, 2, *REFERENCE))


def test_invalid_values_become_config_errors():
    with pytest.raises(ConfigError, match="pos_embed"):
        ENCODERS.build({"name": "vit3d", "pos_embed": "rope"})
    with pytest.raises(ConfigError, match="divisible"):
        ENCODERS.build({"name": "vit3d", "dim": 30, "heads": 4})
    with pytest.raises(ConfigError, match="backend"):
        ENCODERS.build({"name": "resnet3d", "backend": "keras"})
    with pytest.raises(ConfigError, match="expected 3 values"):
        ENCODERS.build({"name": "ctvit_v", "patch_size": [15, 30]})


def test_yaml_lists_become_tuples_and_describe_round_trips():
    model = ENCODERS.build({"name": "ctvit_v", **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in TINY["ctvit_v"].items()}})
    assert model.config.patch_size == (4, 16, 16)
    again = ENCODERS.build(ENCODERS.describe(model))
    assert again.config == model.config


def _perturb_last_slice_group(model, x):
    depth = model.config.patch_size[0]
    y = x.clone()
    y[:, :, -depth:] += 3.0 * torch.randn_like(y[:, :, -depth:])
    with torch.no_grad():
        return model(x), model(y)


def test_ctvit_v_slice_transformer_is_bidirectional():
    model = build("ctvit_v").eval()
    a, b = _perturb_last_slice_group(model, volume(batch=1))
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4), "first slice group did not see the last one"
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_ctvit_temporal_transformer_is_causal():
    model = build("ctvit").eval()
    a, b = _perturb_last_slice_group(model, volume(batch=1))
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # every earlier slice group is unaffected
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_relative_position_bias_is_toeplitz_clamped_and_learnable():
    rpb = RelativePositionBias(heads=3, max_distance=4)
    bias = rpb(9)
    assert bias.shape == (3, 9, 9)
    for i in range(9):
        for j in range(9):
            d = max(-3, min(3, i - j))
            torch.testing.assert_close(bias[:, i, j], rpb.table[:, d + 3])  # i − j clamped to ±3
    # Toeplitz: constant along every diagonal
    for offset in range(-8, 9):
        diag = torch.diagonal(bias, offset=offset, dim1=1, dim2=2)
        torch.testing.assert_close(diag, diag[:, :1].expand_as(diag))
    assert not torch.allclose(bias[:, 0, 1], bias[:, 1, 0])  # direction matters (i − j, not |i − j|)

    model = build("ctvit_v").train()
    model(volume(batch=1)).sum().backward()
    grad = model.slice_bias.table.grad
    assert grad is not None and grad.abs().sum() > 0
    # the encoder's own bias is Toeplitz for another slice count too
    bias = model.slice_bias(11)
    for offset in range(-10, 11):
        diag = torch.diagonal(bias, offset=offset, dim1=1, dim2=2)
        torch.testing.assert_close(diag, diag[:, :1].expand_as(diag))


def test_attention_bias_and_causal_mask_match_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(3, 5, 16)
    bias = torch.randn(2, 5, 5)
    q, k, v = attn.qkv(x).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / 8**0.5 + bias
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)

    def reference(mask_future: bool):
        weights = logits.masked_fill(future, float("-inf")) if mask_future else logits
        out = (weights.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 16)
        return attn.proj(out)

    with torch.no_grad():
        torch.testing.assert_close(attn(x, bias=bias), reference(False))
        torch.testing.assert_close(attn(x, bias=bias, is_causal=True), reference(True))


@pytest.mark.parametrize("stem", PatchEmbed3D.STEMS)
def test_patch_embed_zero_pads_at_the_end(stem):
    torch.manual_seed(0)
    embed = PatchEmbed3D(1, 8, (4, 8, 8), stem=stem)
    x = torch.randn(1, 1, 10, 20, 17)
    assert embed.grid_shape(x.shape[2:]) == (3, 3, 3)
    padded = F.pad(x, (0, 7, 0, 4, 0, 2))  # W 17→24, H 20→24, D 10→12, zeros after the data
    torch.testing.assert_close(embed(x), embed(padded))
    assert embed(x).shape == (1, 3, 3, 3, 8)


def test_conv_stem_halves_even_factors_then_patchifies_the_rest():
    assert conv_stem_strides((4, 8, 8)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 1)]
    assert conv_stem_strides((15, 30, 30)) == [(1, 2, 2), (15, 15, 15)]
    assert conv_stem_strides(1) == [(1, 1, 1)]
    embed = PatchEmbed3D(1, 64, (15, 30, 30), stem="conv")
    assert embed(torch.randn(1, 1, 30, 60, 60)).shape == (1, 2, 2, 2, 64)
    convs = [m for m in embed.proj if isinstance(m, torch.nn.Conv3d)]
    assert [c.stride for c in convs] == [(1, 2, 2), (15, 15, 15)] and convs[-1].out_channels == 64
    with pytest.raises(ValueError, match="patch stem"):
        PatchEmbed3D(1, 8, 4, stem="overlapping")


def test_position_embedding_resizing():
    grid = torch.randn(4, 6, 8, 5)
    assert resize_pos_embed(grid, (4, 6, 8)) is grid
    constant = torch.full((4, 6, 8, 5), 0.7)
    torch.testing.assert_close(resize_pos_embed(constant, (7, 3, 11)), torch.full((7, 3, 11, 5), 0.7))
    assert resize_pos_embed(torch.randn(6, 5), (9,)).shape == (9, 5)
    assert resize_pos_embed(torch.randn(6, 6, 5), (3, 4)).shape == (3, 4, 5)
    # align_corners=False: new cell centres (i + 0.5) * 8 / 16 - 0.5 sample the old grid, clamped at the ends
    ramp = torch.arange(8.0).view(8, 1).expand(8, 3)
    centres = ((torch.arange(16.0) + 0.5) / 2 - 0.5).clamp(0, 7)
    torch.testing.assert_close(resize_pos_embed(ramp, (16,)), centres.view(16, 1).expand(16, 3))


def test_sincos_embedding_matches_reference_grid_positions():
    emb = sincos_pos_embed_3d((3, 4, 5), 32)
    assert emb.shape == (3, 4, 5, 32)
    assert torch.count_nonzero(emb[..., 30:]) == 0  # 32 % 6 leftover channels are zero
    assert len({tuple(v.tolist()) for v in emb.reshape(-1, 32)}) == 60  # every position has its own code
    torch.testing.assert_close(sincos_pos_embed_3d((3, 4, 5), 32, reference_grid=(3, 4, 5)), emb)
    # a grid twice as fine: the mean of two neighbouring positions' coordinates is the coarse centre
    fine = sincos_pos_embed_3d((6, 4, 5), 30, reference_grid=(3, 4, 5))
    coarse = sincos_pos_embed_3d((3, 4, 5), 30)
    torch.testing.assert_close(fine[:, :, :, 10:], coarse.repeat_interleave(2, 0)[:, :, :, 10:])


def test_full_size_defaults_grids_and_sizes():
    expected = {
        "vit3d": ((15, 30, 30), 768, (16, 32, 32)),
        "ctvit": ((24, 24, 24), 512, (26, 26, 26)),
        "ctvit_v": ((16, 16, 16), 512, (18, 18, 18)),
        "resnet3d": ((15, 15, 15), 512, (16, 16, 16)),
    }
    for name, (grid, dim, grid_512) in expected.items():
        with torch.device("meta"):  # full-size weights without allocating or initialising them
            model = ENCODERS.build({"name": name})
        assert model.grid_shape((240, 480, 480)) == grid, name
        assert model.grid_shape((256, 512, 512)) == grid_512, name
        assert model.out_dim == dim
        assert model.grid_shape((64, 128, 128)) == tuple(-(-n // s) for n, s in
                                                        zip((64, 128, 128), _total_stride(model), strict=True))
    with torch.device("meta"):
        ctvit_v = ENCODERS.build({"name": "ctvit_v"})
    assert isinstance(ctvit_v, CTViTV)
    n_params = sum(p.numel() for p in ctvit_v.parameters())
    # 8 layers of (qkv 512→768, proj 256→512, MLP 512→2048→512) + 15·30·30·512 patch projection + 16·16 positions
    assert 27e6 < n_params < 29e6, n_params
    assert ctvit_v.slice_bias.table.shape == (8, 2 * 32 - 1)


def _total_stride(model):
    if hasattr(model, "patch_embed"):
        return model.patch_embed.patch_size
    cfg = model.config
    return tuple(s * 2 ** (len(cfg.layers) - 1 + cfg.stem_pool) for s in cfg.stem_stride)


def test_resnet3d_monai_backend_runs_tiny():
    pytest.importorskip("monai")
    native = build("resnet3d", layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)).eval()
    model = build("resnet3d", backend="monai", layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)).eval()
    assert model.out_dim == 16
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # classifier stripped
    with torch.no_grad():
        for shape in (REFERENCE, OTHER):
            out = model(volume(shape, batch=1))
            assert out.shape == (1, *model.grid_shape(shape), 16) == (1, *native.grid_shape(shape), 16)
    # same architecture and parameter names as the native backend: weights move across, outputs agree
    native_state, monai_state = native.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in native_state.items()} == {k: v.shape for k, v in monai_state.items()}
    model.load_state_dict(native_state)
    x = volume(OTHER, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), native(x), rtol=1e-4, atol=1e-5)
    model.train()
    model(volume(batch=2)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet3d_monai_backend_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.networks.nets.resnet", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="MONAI"):
        ENCODERS.build({"name": "resnet3d", "backend": "monai"})


# -- multi-window stem -----------------------------------------------------------------------------------------------
def _preset_output(hu: torch.Tensor) -> torch.Tensor:
    """What a [-1000, 1000] → [0, 1] window preset writes for ``hu``."""
    return ((hu + 1000.0) / 2000.0).clamp(0, 1)


def test_multiwindow_channels_are_windows_reduced_by_their_statistic():
    model = build("multiwindow")
    assert model.config.input_shape == REFERENCE and model.encoder.in_channels == len(model.config.channels)
    hu = torch.empty(1, 1, 4, 4, 4).uniform_(-1000, 1000, generator=torch.Generator().manual_seed(0))
    out = model.windows(_preset_output(hu))
    assert out.shape == (1, len(model.config.channels), 2, 2, 2)
    for k, (low, high, reduction) in enumerate(model.config.channels):
        windowed = ((hu - low) / (high - low)).clamp(0, 1)
        expected = {"mean": F.avg_pool3d(windowed, 2), "max": F.max_pool3d(windowed, 2),
                    "min": -F.max_pool3d(-windowed, 2)}[reduction]
        torch.testing.assert_close(out[:, k: k + 1], expected, atol=1e-5, rtol=0)


def test_multiwindow_keeps_a_one_voxel_nodule_that_averaging_dilutes():
    model = build("multiwindow")
    hu = torch.full((1, 1, 2, 2, 2), -900.0)
    hu[0, 0, 1, 0, 1] = 0.0  # a solid voxel in aerated lung
    out = model.windows(_preset_output(hu))[0, :, 0, 0, 0]
    solid_max = next(k for k, (low, _, r) in enumerate(model.config.channels) if r == "max" and low == -500.0)
    assert out[solid_max] == pytest.approx(500 / 600, abs=1e-5)  # the nodule at full contrast
    averaged = ((_preset_output(hu).mean() * 2000 - 1000 + 500) / 600).clamp(0, 1)
    assert averaged < 0.1  # a resize to half would have left almost nothing of it in that window


def test_multiwindow_config_errors_name_the_problem():
    inner = dict(TINY["multiwindow"]["encoder"])
    cases = [
        ({"channels": [[1000, 2000, "max"]]}, "outside the input window"),
        ({"channels": [[-1000, -300, "median"]]}, "reduction"),
        ({"channels": [[-300, -1000, "mean"]]}, "low < high"),
        ({"channels": []}, "at least one channel"),
        ({"encoder": {**inner, "in_channels": 1}}, "in_channels"),
        ({"encoder": {"name": "multiwindow"}}, "cannot wrap"),
        ({"input_shape": (32, 64, 32)}, "derived"),
        ({"in_channels": 2}, "one windowed channel"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build("multiwindow", **overrides)
    again = ENCODERS.build(ENCODERS.describe(build("multiwindow")))  # the derived input_shape round-trips
    assert again.config == build("multiwindow").config


def test_multiwindow_stem_must_match_the_preprocessing_window():
    from rrg3d.models.config import ModelConfig
    from rrg3d.models.encoders.multiwindow import check_preset_window

    encoder = {"name": "multiwindow", **TINY["multiwindow"]}
    check_preset_window(encoder, "tiny", where="ok")  # [-1000, 1000] → [0, 1]
    with pytest.raises(ConfigError, match=r"expects HU \[-1000.0, 1000.0\].*maps window \[-1000.0, 200.0\]"):
        check_preset_window(encoder, "ctrate", where="model")
    vision = {"encoder": encoder, "compressor": {"name": "pool"}, "projector": {"name": "mlp2x_gelu"}}
    with pytest.raises(ConfigError, match=r"m\.yaml: the multi-window stem"):
        ModelConfig.from_dict({"name": "m", "vision": vision, "preprocess": "ctrate"}, source="m.yaml")
    assert ModelConfig.from_dict({"name": "m", "vision": vision, "preprocess": "tiny"}).preprocess == "tiny"
