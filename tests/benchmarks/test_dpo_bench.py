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
    variants = ([], ["--prefs-from", "train"], ["--lr", "1e-3"], ["--beta", "0.2"], ["--epochs", "2"],
                ["--loss", "ipo"], ["--judge", "label"], ["--judge", "label:f0.5"], ["--pairs-per-study", "3"])
    names = {dpo.dpo_run_name("split", parse(extra)) for extra in variants}
    pairs = {dpo.pairs_name("split", parse(extra)) for extra in variants}
    assert len(names) == len(variants) and len(pairs) == 5  # pairs: by source, judge, pairs per study
    assert dpo.dpo_run_name("split", parse([])) != dpo.dpo_run_name("best-worst", parse([]))
    # the label judge's errors mode keeps the names its earlier runs have
    old = parse(["--judge", "label", "--loss", "sigmoid", "--lr", "1e-4"])
    assert dpo.pairs_name("split", old) == "pairs_fresh_split.jsonl"
    assert dpo.dpo_run_name("split", old) == "run_fresh_split_sigmoid_b0.1_lr0.0001_e1"
    assert dpo.dpo_run_name("split", parse([])) == "run_fresh_f0.75_split_rpo_b0.1_lr0.0002_e1"
    assert dpo.split_suffix(parse([])) == "" and dpo.split_suffix(parse(["--eval-split", "val"])) == "_val"


def test_the_pair_judge_is_a_label_judge(dpo):
    parse = dpo.build_parser().parse_args
    assert parse(["--judge", "label:errors"]).judge == "label" and parse(["--judge", "label:f0.75"]).judge == \
        "label:f0.75"
    for bad in ("rule", "label:f0", "label:precision"):
        with pytest.raises(SystemExit):
            parse(["--judge", bad])


def test_pair_contrast_counts_what_chosen_and_rejected_reports_get_wrong(dpo, tmp_path):
    from rrg3d.text.labeler import load_labeler
    from rrg3d.text.labels import CTRATE_LABELS as LABELS

    truth = dict.fromkeys(LABELS, 0) | {"Emphysema": 1}
    pairs = [{"id": "a", "chosen": "Mild centrilobular emphysema.", "chosen_index": 0,
              "rejected": "Mild centrilobular emphysema. Moderate right pleural effusion.", "labels": truth},
             {"id": "b", "chosen": "Moderate right pleural effusion.", "chosen_index": None,
              "rejected": "Normal CT of the chest.", "labels": truth}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    contrast = dpo.pair_contrast(path, load_labeler(None))
    assert contrast["pairs"] == 2 and contrast["chosen_from_reference"] == 1
    assert contrast["chosen"] == {"hallucinated": 0.5, "omitted": 0.5}
    assert contrast["rejected"] == {"hallucinated": 0.5, "omitted": 0.5}
    assert contrast["chosen_hallucinates_less"] == 0.5
    (tmp_path / "none.jsonl").write_text("")
    assert dpo.pair_contrast(tmp_path / "none.jsonl", None) == {"pairs": 0}
