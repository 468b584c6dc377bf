"""The deterministic rule judge (labeler agreement)."""

from __future__ import annotations

import pytest

from rrg3d.judge.rule import RuleJudge


def test_rule_scores_by_hand(stub_labeler):
    judge = RuleJudge(stub_labeler)
    refs = ["Cardiomegaly and effusion.", "Normal.", "Nodule.", "Emphysema, nodule, effusion."]
    cands = ["Cardiomegaly and effusion.", "Normal.", "Normal.", "Emphysema and cardiomegaly."]
    scores = [r.score for r in judge.evaluate(refs, cands, "score")]
    # Jaccard 1 -> 5; both normal -> 5; 0 -> 1; emphysema shared of {emph, nodule, effusion, cardio} 1/4 -> 2
    assert scores == [5.0, 5.0, 1.0, 2.0]
    rubric = judge.evaluate(refs, cands, "findings_match")
    assert [r.score for r in rubric] == [1.0, 1.0, 0.0, pytest.approx(1 / 4)]
    assert rubric[3].counts["significant"]["a"] == 1 and rubric[3].counts["significant"]["b"] == 2
    assert all(r.parse_ok for r in rubric) and judge.evaluate([], [], "score") == []
    with pytest.warns(FutureWarning, match="deprecated"):
        assert [r.score for r in judge.evaluate(refs, cands, "green")] == [r.score for r in rubric]
    with pytest.raises(ValueError):
        judge.evaluate(["a"], ["b"], "stars")
