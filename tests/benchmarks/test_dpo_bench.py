"""benchmarks/dpo.py's own logic that its verdict depends on: the pairs come from phantoms the SFT model never saw
(a fresh set like the benchmark's, enough training studies), and runs with other settings keep their own folders."""

from __future__ import annotations

import json
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def dpo(load_benchmark) -> ModuleType:
    return load_benchmark("dpo")


def test_fresh_phantoms_match_the_benchmark_set_with_enough_training_studies(dpo, tmp_path, monkeypatch):
    import rrg3d.data.phantom as phantom

    (tmp_path / "phantoms").mkdir()
    (tmp_path / "phantoms" / "phantom.json").write_text(json.dumps({"n": 1200, "seed": 0, "shape": [32, 64, 64],
                                                                    "styles": 2}))
    seen = {}

    def fake(config, out, **kwargs):
        seen["config"], seen["out"] = config, out
        return out / "manifest.jsonl"

    monkeypatch.setattr(phantom, "generate_phantoms", fake)
    args = dpo.build_parser().parse_args(["--prefs-studies", "300"])
    assert args.prefs_from == "fresh"
    manifest = dpo.fresh_phantoms(tmp_path, tmp_path / "dpo", args)
    config = seen["config"]
    assert config.seed == args.prefs_seed != 0 and tuple(config.shape) == (32, 64, 64) and config.styles == 2
    assert int(config.n * 0.8) >= 300  # phantoms split 80/10/10: the training split alone holds the studies
    assert manifest.parent.name == f"prefs_phantoms_seed{args.prefs_seed}"


def test_runs_with_other_settings_keep_their_own_folders(dpo):
    parse = dpo.build_parser().parse_args
    names = {dpo.dpo_run_name("split", parse(extra)) for extra in
             ([], ["--prefs-from", "train"], ["--lr", "1e-3"], ["--beta", "0.2"], ["--epochs", "2"], ["--loss", "ipo"])}
    assert len(names) == 6
    assert dpo.dpo_run_name("split", parse([])) != dpo.dpo_run_name("best-worst", parse([]))
