"""Projectors: output shapes, LLaVA-1.5's exact two-layer MLP, the optional input LayerNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rrg3d.errors import ConfigError
from rrg3d.models import projector as _projector  # noqa: F401  (registers the projectors)
from rrg3d.models.registry import PROJECTORS


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_shapes(name: str, layer_norm: bool) -> None:
    projector = PROJECTORS.build({"name": name, "layer_norm": layer_norm}, in_dim=12, out_dim=20)
    out = projector(torch.randn(3, 7, 12))
    assert out.shape == (3, 7, 20)
    assert projector.in_dim == 12 and projector.out_dim == 20
    assert any(isinstance(m, nn.LayerNorm) for m in projector.modules()) == layer_norm
    assert PROJECTORS.describe(projector) == {"name": name, "layer_norm": layer_norm, "bias": True,
                                              "standardize": "none"}


def test_mlp2x_gelu_is_exactly_two_linears_with_gelu() -> None:
    projector = PROJECTORS.build({"name": "mlp2x_gelu"}, in_dim=8, out_dim=16)
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16)]
    assert [type(m) for m in projector.layers] == [nn.Linear, nn.GELU, nn.Linear]
    x = torch.randn(2, 8)
    torch.testing.assert_close(projector(x), linears[1](nn.functional.gelu(linears[0](x))))


def test_linear_without_bias() -> None:
    projector = PROJECTORS.build({"name": "linear", "bias": False}, in_dim=4, out_dim=6)
    assert [p.shape for p in projector.parameters()] == [torch.Size([6, 4])]


def test_unknown_projector_and_key() -> None:
    with pytest.raises(ConfigError, match="known"):
        PROJECTORS.build({"name": "mlp3x_relu"}, in_dim=4, out_dim=4)
    with pytest.raises(ConfigError, match="unknown keys"):
        PROJECTORS.build({"name": "linear", "depth": 2}, in_dim=4, out_dim=4)


@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
def test_standardize_fit_centres_and_scales(mode: str) -> None:
    torch.manual_seed(0)
    offsets = torch.randn(5, 6) * 10  # a large per-(position, channel) constant, the same for every study
    features = offsets + torch.randn(64, 5, 6) * torch.linspace(0.5, 3, 6)
    projector = PROJECTORS.build({"name": "linear", "standardize": mode}, in_dim=6, out_dim=4)
    assert projector.needs_fit
    with pytest.raises(RuntimeError, match="not fitted"):
        projector(features)
    projector.fit(features[i: i + 16] for i in range(0, 64, 16))  # streamed batches = one tensor
    assert not projector.needs_fit
    standardized = projector._standardized(features)
    if mode == "per_token":
        torch.testing.assert_close(standardized.mean(0), torch.zeros(5, 6), atol=1e-5, rtol=0)
        torch.testing.assert_close(standardized.std(0), torch.ones(5, 6), atol=1e-3, rtol=0)
    else:
        flat = standardized.reshape(-1, 6)
        torch.testing.assert_close(flat.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(flat.std(0), torch.ones(6), atol=1e-3, rtol=0)
    whole = PROJECTORS.build({"name": "linear", "standardize": mode}, in_dim=6, out_dim=4).fit(features)
    torch.testing.assert_close(whole.feature_mean, projector.feature_mean)
    torch.testing.assert_close(whole.feature_std, projector.feature_std)


def test_standardize_per_token_is_tied_to_the_token_count_and_survives_a_state_dict() -> None:
    projector = PROJECTORS.build({"name": "mlp2x_gelu", "standardize": "per_token"}, in_dim=4, out_dim=8)
    projector.fit(torch.randn(10, 3, 4))
    with pytest.raises(RuntimeError, match="fitted on 3 tokens"):
        projector(torch.randn(2, 5, 4))
    fresh = PROJECTORS.build(PROJECTORS.describe(projector), in_dim=4, out_dim=8)
    assert fresh.needs_fit and fresh.feature_mean.shape == (1, 4)
    fresh.load_state_dict(projector.state_dict())
    assert not fresh.needs_fit
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(fresh(x), projector(x))


def test_standardize_constant_features_shift_only() -> None:
    projector = PROJECTORS.build({"name": "linear", "standardize": "per_token"}, in_dim=4, out_dim=2)
    projector.fit(torch.zeros(8, 3, 4))  # the zeros control: no variance anywhere
    assert torch.isfinite(projector.feature_std).all()
    torch.testing.assert_close(projector._standardized(torch.zeros(1, 3, 4)), torch.zeros(1, 3, 4))


def test_standardize_errors() -> None:
    with pytest.raises(ConfigError, match="standardize"):
        PROJECTORS.build({"name": "linear", "standardize": "whiten"}, in_dim=4, out_dim=4)
    plain = PROJECTORS.build({"name": "linear"}, in_dim=4, out_dim=4)
    assert not plain.needs_fit
    with pytest.raises(RuntimeError, match="standardize: none"):
        plain.fit(torch.randn(4, 2, 4))
    per_token = PROJECTORS.build({"name": "linear", "standardize": "per_token"}, in_dim=4, out_dim=4)
    with pytest.raises(ValueError, match="one token count"):
        per_token.fit([torch.randn(4, 2, 4), torch.randn(4, 3, 4)])
