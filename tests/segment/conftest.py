"""Phantoms shared by the segmentation tests (generated once per session, small and fast)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """Two phantom cases at 64×128×128: a folder with vols/ (CT) and seg/ (10-region truth)."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("segment_phantoms")
    generate_phantoms(PhantomConfig(n=2, seed=3, shape=(64, 128, 128)), out, workers=1, progress=False)
    return out
