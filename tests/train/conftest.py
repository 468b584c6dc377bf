"""Training fixtures: a session-wide set of 8 tiny phantoms (32x64x64) and one preprocessing cache for all runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Manifest of 8 phantom studies (6 train, 1 val, 1 test) at the tiny preset's size."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    return generate_phantoms(PhantomConfig(n=8, seed=0, shape=(32, 64, 64)), out, workers=1, progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def base_overrides(phantoms, cache_dir) -> list[str]:
    """What every tiny training run in these tests shares: the data, one thread, no progress bar."""
    return [f"data.manifest={phantoms}", f"data.cache_dir={cache_dir}", "train.threads=1", "train.progress=false",
            "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
