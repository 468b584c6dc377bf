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
    assert PROJECTORS.describe(projector) == {"name": name, "layer_norm": layer_norm, "bias": True}


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
