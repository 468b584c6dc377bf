"""The benchmark scripts' own logic that results depend on: how learnability names its CLIP runs (a run is reused
by folder, so two setups must never share one), its prompt wordings, and phantom_learnability's inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def learnability() -> ModuleType:
    return load("learnability")


def test_every_clip_setup_gets_its_own_run_folder(learnability: ModuleType) -> None:
    parser = learnability.build_parser()
    setups = [
        [],
        ["--clip-label-weight", "0"],
        ["--clip-prompt-weight", "1"],
        ["--clip-histogram-bins", "16"],
        ["--clip-text-pooling", "sentences"],
        ["--clip-text"],
        ["--clip-text-adapter", "1"],
        ["--clip-text-adapter", "2"],
        ["--clip-steps", "2000"],
        ["--clip-field", "findings"],
        ["--clip-field", "findings", "--clip-text-pooling", "sentences", "--clip-text-adapter", "1"],
    ]
    names = [learnability.clip_variant(parser.parse_args(setup)) for setup in setups]
    assert len(set(names)) == len(names), names
    assert names[0] == "_labels1"  # the default setup keeps the folder name of earlier results
    assert names[-1] == "_labels1_sent_adapter1_findings"
    assert learnability.clip_variant(parser.parse_args(["--clip-field", "impression"])) == "_labels1"
    assert learnability.clip_variant(parser.parse_args(["--clip-steps", "0"])) == "_labels1"  # no CLIP: arms as before


def test_prompt_wordings_are_valid_pairs_and_the_ensemble_holds_them_all(learnability: ModuleType) -> None:
    pytest.importorskip("transformers")
    from rrg3d.models.clip import CTCLIP

    wordings = learnability.PROMPT_WORDINGS
    assert wordings["is_present"] == [list(pair) for pair in CTCLIP.Config().zero_shot_prompts]
    for pairs in wordings.values():
        CTCLIP._check_prompts(pairs)
    singles = [pair for name, pairs in wordings.items() if name != "ensemble" for pair in pairs]
    assert wordings["ensemble"] == singles


def test_phantom_learnability_reads_windows_or_a_preset(tmp_path: Path) -> None:
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    module = load("phantom_learnability")
    manifest = generate_phantoms(PhantomConfig(n=2, seed=0, shape=(32, 64, 64)), tmp_path / "phantoms",
                                 workers=1, progress=False)
    windows, labels, ids = module.load_inputs(manifest, "windows")
    resized, same_labels, same_ids = module.load_inputs(manifest, "tiny")
    assert windows.shape == (2, 6, 16, 32, 32) and windows.dtype == np.float16
    assert resized.shape[:2] == (2, 1) and resized.shape[2:] == (32, 64, 64)
    assert ids == same_ids and np.array_equal(labels, same_labels) and labels.shape == (2, 18)
    assert float(windows.min()) >= 0.0 and float(windows.max()) <= 1.0
