"""Token compressors: shapes agree with num_tokens, pooling matches torch, PCA fits and round-trips, shuffle is a
permutation, the perceiver resamples any grid size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rrg3d.errors import ConfigError
from rrg3d.models.compress import sincos_position_embedding_3d
from rrg3d.models.registry import COMPRESSORS

GRIDS = [(4, 4, 4), (5, 6, 7), (1, 3, 2), (16, 16, 16)]
SPECS = [
    {"name": "pool"},
    {"name": "pool", "kernel": [2, 2, 2], "stride": [1, 2, 2]},
    {"name": "pool", "mode": "max", "kernel": [3, 1, 2]},
    {"name": "pixel_shuffle"},
    {"name": "pixel_shuffle", "factor": [1, 2, 3]},
    {"name": "perceiver", "num_latents": 5, "dim": 24, "depth": 2, "heads": 2, "dim_head": 8, "ff_mult": 2},
    {"name": "none"},
    {"name": "identity"},
    {"name": "pca", "num_components": 3, "axis": "channels"},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grid(shape: tuple[int, int, int], batch: int = 2, channels: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, channels, generator=torch.Generator().manual_seed(seed))


def test_registered_names() -> None:
    assert {"pool", "pca", "perceiver", "pixel_shuffle", "none", "identity"} <= set(COMPRESSORS.names())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("shape", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_shapes_agree_with_num_tokens(spec: dict, shape: tuple[int, int, int]) -> None:
    compressor = COMPRESSORS.build(spec, in_dim=8)
    if spec["name"] == "pca":
        compressor.fit(_grid((3, 3, 3), batch=4, seed=1))
    out = compressor(_grid(shape))
    assert out.shape == (2, compressor.num_tokens(shape), compressor.out_dim)
    assert torch.isfinite(out).all()
    assert COMPRESSORS.describe(compressor)["name"] == spec["name"]


def test_pool_matches_avg_pool3d() -> None:
    grid = _grid((16, 16, 16), channels=6)
    pool = COMPRESSORS.build({"name": "pool"}, in_dim=6)
    assert pool.num_tokens((16, 16, 16)) == 512
    expected = F.avg_pool3d(grid.permute(0, 4, 1, 2, 3), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool(grid), expected)


def test_pool_partial_windows_average_real_cells_only() -> None:
    grid = torch.ones(1, 3, 5, 1, 2)  # no side divisible by 2
    pool = COMPRESSORS.build({"name": "pool"}, in_dim=2)
    out = pool(grid)
    assert out.shape == (1, 2 * 3 * 1, 2)
    torch.testing.assert_close(out, torch.ones_like(out))  # zero padding would pull partial windows below 1
    dropped = COMPRESSORS.build({"name": "pool", "ceil_mode": False}, in_dim=2)
    assert dropped.num_tokens((3, 5, 2)) == 2 and dropped(torch.ones(1, 3, 5, 2, 2)).shape == (1, 2, 2)


def test_pixel_shuffle_is_an_invertible_permutation() -> None:
    shuffle = COMPRESSORS.build({"name": "pixel_shuffle"}, in_dim=3)
    grid = _grid((4, 6, 2), channels=3)
    out = shuffle(grid)
    assert out.shape == (2, 2 * 3 * 1, 24)
    torch.testing.assert_close(out.sum(), grid.sum())
    torch.testing.assert_close(out.flatten().sort().values, grid.flatten().sort().values)
    torch.testing.assert_close(shuffle.inverse(out, (4, 6, 2)), grid)
    # One token holds exactly one 2×2×2 block, channels ordered (offset_d, offset_h, offset_w, channel).
    torch.testing.assert_close(out[0, 0].view(2, 2, 2, 3), grid[0, :2, :2, :2])


def test_pixel_shuffle_pads_odd_sides_with_zeros() -> None:
    shuffle = COMPRESSORS.build({"name": "pixel_shuffle"}, in_dim=2)
    grid = _grid((3, 5, 1), channels=2)
    out = shuffle(grid)
    assert out.shape == (2, 2 * 3 * 1, 16)
    torch.testing.assert_close(out.sum(), grid.sum())
    assert (out == 0).sum() == 2 * 2 * (4 * 6 * 2 - 3 * 5 * 1)
    torch.testing.assert_close(shuffle.inverse(out, (3, 5, 1)), grid)


def test_identity_flattens_in_dhw_order() -> None:
    grid = _grid((2, 3, 4))
    out = COMPRESSORS.build({"name": "none"}, in_dim=8)(grid)
    torch.testing.assert_close(out[:, 1 * 12 + 2 * 4 + 3], grid[:, 1, 2, 3])


def _low_rank_grids(samples: int, shape: tuple[int, int, int], channels: int, rank: int, seed: int = 0):
    """Grids whose (sample, channel) columns lie near a ``rank``-dim affine subspace of R^N."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1] * shape[2]
    basis = torch.randn(rank, n, generator=g)
    mean = torch.randn(n, generator=g)
    coeffs = torch.randn(samples, channels, rank, generator=g)
    columns = coeffs @ basis + mean + 1e-3 * torch.randn(samples, channels, n, generator=g)  # [S, C, N]
    return columns.transpose(1, 2).reshape(samples, *shape, channels)


def test_pca_tokens_reconstructs_low_rank_features() -> None:
    shape = (4, 4, 4)
    grids = _low_rank_grids(samples=12, shape=shape, channels=16, rank=5)
    pca = COMPRESSORS.build({"name": "pca", "num_components": 5}, in_dim=16)
    assert list(pca.parameters()) == []
    pca.fit(grids.split(5))  # streamed in batches
    assert pca.is_fitted and pca.config.grid_shape == shape
    test = _low_rank_grids(samples=3, shape=shape, channels=16, rank=5, seed=0)
    tokens = pca(test)
    assert tokens.shape == (3, 5, 16) and pca.num_tokens(shape) == 5
    error = (pca.inverse(tokens) - test).norm() / (test - pca.mean.view(1, *shape, 1)).norm()
    assert error < 1e-2
    # Components are orthonormal and ordered by explained variance.
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(5), atol=1e-4, rtol=0)
    assert (pca.explained_variance[:-1] >= pca.explained_variance[1:]).all()


def test_pca_batched_fit_equals_single_fit() -> None:
    grids = _low_rank_grids(samples=8, shape=(2, 2, 3), channels=4, rank=3)
    whole = COMPRESSORS.build({"name": "pca", "num_components": 3}, in_dim=4).fit(grids)
    parts = COMPRESSORS.build({"name": "pca", "num_components": 3}, in_dim=4).fit(iter(grids.split(3)))
    torch.testing.assert_close(whole(grids), parts(grids), atol=1e-4, rtol=1e-4)


def test_pca_state_dict_round_trip() -> None:
    grids = _low_rank_grids(samples=6, shape=(2, 3, 4), channels=8, rank=4)
    pca = COMPRESSORS.build({"name": "pca", "num_components": 4}, in_dim=8).fit(grids)
    state = pca.state_dict()
    assert {"mean", "components", "explained_variance", "fitted", "grid_shape"} <= set(state)
    fresh = COMPRESSORS.build({"name": "pca", "num_components": 4}, in_dim=8)  # grid shape unknown yet
    fresh.load_state_dict(state)
    assert fresh.is_fitted and fresh.config.grid_shape == (2, 3, 4)
    assert torch.equal(fresh(grids), pca(grids))
    # The described config rebuilds buffers of the fitted size, so a strict load works as well.
    rebuilt = COMPRESSORS.build(COMPRESSORS.describe(pca), in_dim=8)
    assert rebuilt.mean.shape == pca.mean.shape
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt(grids), pca(grids))


def test_pca_state_survives_safetensors(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    grids = _low_rank_grids(samples=5, shape=(2, 2, 2), channels=4, rank=2)
    pca = COMPRESSORS.build({"name": "pca", "num_components": 2}, in_dim=4).fit(grids)
    safetensors_torch.save_file(pca.state_dict(), tmp_path / "pca.safetensors")
    fresh = COMPRESSORS.build({"name": "pca", "num_components": 2}, in_dim=4)
    fresh.load_state_dict(safetensors_torch.load_file(tmp_path / "pca.safetensors"))
    assert torch.equal(fresh(grids), pca(grids))


def test_pca_channels_axis() -> None:
    g = torch.Generator().manual_seed(0)
    grids = (torch.randn(4, 3, 3, 3, 2, generator=g) @ torch.randn(2, 10, generator=g)) + 5.0  # rank-2 channels
    pca = COMPRESSORS.build({"name": "pca", "num_components": 2, "axis": "channels"}, in_dim=10).fit(grids)
    assert pca.out_dim == 2
    other = _grid((2, 5, 3), channels=10)  # any grid size works on this axis
    assert pca(other).shape == (2, 30, 2)
    recon = pca.inverse(pca(grids)).reshape(grids.shape)
    torch.testing.assert_close(recon, grids, atol=1e-3, rtol=1e-3)


def test_pca_errors() -> None:
    pca = COMPRESSORS.build({"name": "pca", "num_components": 2}, in_dim=4)
    with pytest.raises(RuntimeError, match="not fitted"):
        pca(_grid((2, 2, 2), channels=4))
    pca.fit(_grid((2, 2, 2), batch=3, channels=4))
    with pytest.raises(RuntimeError, match="fitted on"):
        pca(_grid((2, 2, 3), channels=4))
    with pytest.raises(ValueError, match="num_components"):
        COMPRESSORS.build({"name": "pca", "num_components": 9}, in_dim=4).fit(_grid((2, 2, 2), channels=4))
    with pytest.raises(ConfigError, match="axis"):
        COMPRESSORS.build({"name": "pca", "axis": "space"}, in_dim=4)


def test_perceiver_any_grid_and_gradients() -> None:
    spec = {"name": "perceiver", "num_latents": 4, "dim": 12, "depth": 1, "heads": 2, "dim_head": 6}
    perceiver = COMPRESSORS.build(spec, in_dim=8)
    for shape in [(2, 2, 2), (3, 5, 4)]:
        assert perceiver(_grid(shape)).shape == (2, 4, 12)
    grid = _grid((2, 3, 2)).requires_grad_()
    perceiver.set_gradient_checkpointing(True)
    perceiver(grid).sum().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0
    assert perceiver.latents.grad is not None


def test_perceiver_position_embedding() -> None:
    spec = {"name": "perceiver", "num_latents": 3, "dim": 12, "depth": 2, "heads": 2, "dim_head": 4}
    grid = _grid((2, 3, 4))
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shuffled = grid.reshape(2, 24, 8)[:, order].reshape(grid.shape)
    torch.manual_seed(0)
    plain = COMPRESSORS.build({**spec, "position_embedding": False}, in_dim=8).eval()
    torch.testing.assert_close(plain(grid), plain(shuffled), atol=1e-5, rtol=1e-5)  # a set function without it
    torch.manual_seed(0)
    placed = COMPRESSORS.build(spec, in_dim=8).eval()
    assert not torch.allclose(placed(grid), placed(shuffled), atol=1e-4)  # positions matter with it
    emb = sincos_position_embedding_3d((2, 3, 4), 14)
    assert emb.shape == (24, 14) and (emb[:, 12:] == 0).all()
    assert len({tuple(row.tolist()) for row in emb}) == 24  # every cell gets its own code


@pytest.mark.parametrize(
    "spec",
    [{"name": "pool", "kernal": [2, 2, 2]}, {"name": "pixelshuffle"}, {"name": "pool", "kernel": [2, 2]},
     {"name": "pool", "mode": "median"}, {"name": "perceiver", "heads": 0}],
)
def test_bad_configs_raise_config_error(spec: dict) -> None:
    with pytest.raises(ConfigError):
        COMPRESSORS.build(spec, in_dim=8)


def test_wrong_channel_count_is_reported() -> None:
    with pytest.raises(ValueError, match="channels"):
        COMPRESSORS.build({"name": "pool"}, in_dim=8)(_grid((2, 2, 2), channels=4))
