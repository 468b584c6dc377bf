"""Preference pairing: the two strategies, the threshold, what is dropped and why, and the split rule."""

from __future__ import annotations

import json
import random

import pytest

from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.train.prefs import check_split, make_pair, pair_records, read_pairs, study_seed


def _pair(scores, strategy="split", threshold=3.0, reference="The reference.", seed=0, reference_score=5.0):
    candidates = [f"candidate {i}" for i in range(len(scores))]
    return make_pair(candidates, scores, strategy=strategy, threshold=threshold, rng=random.Random(seed),
                     reference=reference, reference_score=reference_score)


def test_split_pairs_a_random_good_with_a_random_bad_candidate():
    scores = [5.0, 1.0, 3.0, 2.0, 4.0, 2.0]
    seen_chosen, seen_rejected = set(), set()
    for seed in range(40):
        pair, reason = _pair(scores, seed=seed)
        assert reason is None and pair["chosen_score"] >= 3 > pair["rejected_score"]
        assert pair["chosen"] == f"candidate {pair['chosen_index']}"
        seen_chosen.add(pair["chosen_index"])
        seen_rejected.add(pair["rejected_index"])
    assert seen_chosen == {0, 2, 4} and seen_rejected == {1, 3, 5}  # random among each side, not best vs worst


def test_split_drops_one_sided_studies_and_honours_the_threshold():
    assert _pair([3.0, 4.0, 5.0]) == (None, "all_at_or_above_threshold")
    assert _pair([1.0, 2.0, 2.5]) == (None, "all_below_threshold")
    pair, _ = _pair([3.0, 4.0, 5.0], threshold=4.0)
    assert pair["rejected_index"] == 0 and pair["chosen_index"] in (1, 2)
    assert _pair([None, None]) == (None, "too_few_candidates")
    # candidates without a score or without text take no part
    pair, _ = make_pair(["", "good", "bad", "unjudged"], [5.0, 4.0, 1.0, None], strategy="split", threshold=3,
                        rng=random.Random(0))
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 2)


def test_best_worst_uses_the_reference_when_nothing_is_good():
    pair, _ = _pair([2.0, 5.0, 1.0, 5.0], strategy="best-worst")
    assert pair["chosen_index"] in (1, 3) and pair["rejected_index"] == 2
    pair, _ = _pair([1.0, 2.0, 1.0], strategy="best-worst")
    assert pair["chosen_index"] is None and pair["chosen"] == "The reference." and pair["chosen_score"] == 5.0
    assert pair["rejected_score"] == 1.0
    assert _pair([4.0, 4.0], strategy="best-worst") == (None, "all_equal")
    assert _pair([1.0, 2.0], strategy="best-worst", reference=None) == (None, "all_below_threshold")
    same = make_pair(["Same.", "Same."], [5.0, 1.0], strategy="split", threshold=3, rng=random.Random(0))
    assert same == (None, "identical")
    with pytest.raises(ConfigError, match="strategy"):
        _pair([1.0], strategy="best")


def test_pair_records_are_seeded_per_study_and_count_drops():
    records = [{"id": f"s{i}", "candidates": ["a", "b", "c", "d"], "scores": scores, "split": "train"}
               for i, scores in enumerate([[5, 1, 4, 2], [5, 5, 4, 3], [1, 1, 2, 2], [3, 1, 3, 1]])]
    pairs, dropped = pair_records(records, strategy="split", threshold=3, seed=0, judge="label:x")
    again, _ = pair_records(list(reversed(records)), strategy="split", threshold=3, seed=0, judge="label:x")
    assert [p["id"] for p in pairs] == ["s0", "s3"] and dict(dropped) == {"all_at_or_above_threshold": 1,
                                                                         "all_below_threshold": 1}
    assert sorted(json.dumps(p, sort_keys=True) for p in pairs) == sorted(json.dumps(p, sort_keys=True)
                                                                          for p in again)
    assert {"id", "chosen", "rejected", "chosen_score", "rejected_score", "judge", "strategy", "candidates",
            "scores"} <= set(pairs[0])
    assert study_seed(0, "a") == study_seed(0, "a") != study_seed(1, "a")


def test_held_out_splits_are_refused(tmp_path):
    check_split("train")
    for split in ("val", "test", "Validation"):
        with pytest.raises(ConfigError, match="training split only"):
            check_split(split)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"id": "a", "chosen": "x", "rejected": "y", "split": "test"}) + "\n")
    with pytest.raises(ConfigError, match="training split only"):
        read_pairs(path)
    path.write_text(json.dumps({"id": "a", "chosen": "x", "rejected": ""}) + "\n")
    with pytest.raises(RRG3DError, match=r"pairs.jsonl:1: 'rejected'"):
        read_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(RRG3DError, match="invalid JSON"):
        read_pairs(path)


def test_several_split_pairs_per_study_are_distinct_combinations():
    texts = [["a", "b", "c", "d", "e", "f"], ["a", "b", "c", "d", "e", "f"], ["a", "b", "b", "b", "a", "b"]]
    records = [{"id": f"s{i}", "candidates": candidates, "scores": scores, "split": "train"}
               for i, (candidates, scores) in enumerate(zip(texts, [[5, 1, 4, 2, 1, 3], [5, 5, 4, 3, 4, 4],
                                                                     [4, 1, 1, 1, 1, 1]], strict=True))]
    one, _ = pair_records(records, strategy="split", threshold=3, seed=0, judge="label")
    many, dropped = pair_records(records, strategy="split", threshold=3, seed=0, judge="label", pairs_per_study=4)
    assert dropped == {"all_at_or_above_threshold": 1}
    by_study = {}
    for pair in many:
        assert pair["chosen_score"] >= 3 > pair["rejected_score"] and pair["chosen"] != pair["rejected"]
        by_study.setdefault(pair["id"], []).append((pair["chosen_index"], pair["rejected_index"]))
    assert len(by_study["s0"]) == 4 and len(set(by_study["s0"])) == 4  # 3 good x 3 bad: 4 of the 9 combinations
    # one good candidate "a"; of the bad ones, candidate 4 has the same text: never paired with it
    assert sorted(by_study["s2"]) == [(0, 1), (0, 2), (0, 3), (0, 5)]
    assert [p["id"] for p in one] == ["s0", "s2"]
    again, _ = pair_records(records, strategy="split", threshold=3, seed=0, judge="label", pairs_per_study=4)
    assert again == many  # seeded per study
    with pytest.raises(ConfigError, match="split strategy"):
        pair_records(records, strategy="best-worst", threshold=3, seed=0, judge="label", pairs_per_study=2)
    with pytest.raises(ConfigError, match=">= 1"):
        pair_records(records, strategy="split", threshold=3, seed=0, judge="label", pairs_per_study=0)
