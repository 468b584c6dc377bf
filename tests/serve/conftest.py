"""Shared fixtures of the serving tests: untrained tiny checkpoints (fast: a few generated tokens) and a phantom."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")


def _checkpoint(root: Path, name: str, max_new_tokens: int) -> Path:
    from rrg3d.models.checkpoint import save_checkpoint
    from rrg3d.models.config import load_model_config
    from rrg3d.models.vlm import ReportGenerator

    spec = load_model_config(name).to_dict()
    spec["generation"] = {**(spec.get("generation") or {}), "max_new_tokens": max_new_tokens}
    model = ReportGenerator.from_config(spec, seed=0).eval()
    return save_checkpoint(model, root / name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A CT-only model on the tiny preset (32×64×64), untrained; writes 8 tokens."""
    return _checkpoint(tmp_path_factory.mktemp("serve_ckpt"), "tiny_resnet3d", 8)


@pytest.fixture(scope="session")
def region_checkpoint(tmp_path_factory) -> Path:
    """A region-guided (Reg2RG) model on the tiny preset, untrained; writes 4 tokens per region."""
    return _checkpoint(tmp_path_factory.mktemp("serve_region_ckpt"), "tiny_reg2rg", 4)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Two phantom studies at 32×64×64 (``vols/phantom_0000N.nii.gz``, ``seg/``...)."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("serve_phantoms")
    generate_phantoms(PhantomConfig(n=2, seed=0, shape=(32, 64, 64)), out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def phantom_scan(phantom_dir) -> Path:
    return phantom_dir / "vols" / "phantom_00001.nii.gz"
