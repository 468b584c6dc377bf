"""The label judge: a candidate's abnormality labels against the study's truth (or the reference's labels)."""

from __future__ import annotations

import math

import pytest

from rrg3d.judge import JudgeError, make_judge
from rrg3d.judge.label import LabelJudge, f1_score, fbeta_score, label_score
from rrg3d.text.labels import CTRATE_LABELS


def _truth(**present):
    """A truth vector: the named labels (keyword → 0/1/None), every other label 0."""
    names = {"cardiomegaly": "Cardiomegaly", "effusion": "Pleural effusion", "nodule": "Lung nodule",
             "emphysema": "Emphysema"}
    vector = [0.0] * len(CTRATE_LABELS)
    for key, value in present.items():
        vector[CTRATE_LABELS.index(names[key])] = math.nan if value is None else float(value)
    return vector


def test_the_score_is_five_minus_the_wrong_abnormalities():
    assert [label_score(0, 0), label_score(1, 0), label_score(0, 2), label_score(2, 1), label_score(3, 3)] == \
        [5.0, 4.0, 3.0, 2.0, 1.0]


def test_truth_labels_count_hallucinations_and_omissions(stub_labeler):
    judge = LabelJudge(stub_labeler)
    truth = _truth(cardiomegaly=1, effusion=1)
    candidates = ["Cardiomegaly and effusion.", "Cardiomegaly.", "Cardiomegaly, effusion and a nodule.",
                  "Nodule and emphysema."]
    results = judge.evaluate(["(reference not read)"] * 4, candidates, "score", truths=[truth] * 4)
    assert [r.score for r in results] == [5.0, 4.0, 4.0, 1.0]
    assert [(r.counts["tp"], r.counts["fp"], r.counts["fn"]) for r in results] == \
        [(2, 0, 0), (1, 0, 1), (2, 1, 0), (0, 2, 2)]
    # the reference's text plays no part when the truth is known: it may even disagree with it
    assert judge.evaluate(["Normal."], ["Cardiomegaly and effusion."], truths=[truth])[0].score == 5.0


def test_unknown_truth_labels_are_not_counted_and_missing_truth_falls_back_to_the_reference(stub_labeler):
    judge = LabelJudge(stub_labeler)
    unsure = _truth(cardiomegaly=1, nodule=None)  # the nodule is unknown: stating it is no error
    assert judge.evaluate(["x"], ["Cardiomegaly and a nodule."], truths=[unsure])[0].score == 5.0
    # no truth: the reference report's labels stand in (as the rule judge's set, scored by errors)
    results = judge.evaluate(["Cardiomegaly and effusion.", "Normal."], ["Cardiomegaly.", "Emphysema."])
    assert [r.score for r in results] == [4.0, 4.0]
    assert judge.evaluate(["Normal."], ["Nodule."], truths=[None])[0].counts["fp"] == 1
    assert [r.score for r in judge.evaluate(["Nodule."], ["Normal."], "findings_match")] == [0.0]
    with pytest.raises(ValueError, match="truth vectors"):
        judge.evaluate(["a", "b"], ["a", "b"], truths=[truth for truth in [_truth()]])
    with pytest.raises(ValueError, match="18 labels"):
        judge.evaluate(["a"], ["a"], truths=[[1.0, 0.0]])


def test_make_judge_builds_it_and_it_needs_no_cache(stub_labeler):
    judge = make_judge("label", labeler=stub_labeler, cache=False)
    assert isinstance(judge, LabelJudge) and judge.id.startswith("label:") and judge.uses_truth
    assert judge.label_names == tuple(CTRATE_LABELS)


def test_f1_mode_scores_one_plus_four_times_the_study_f1(stub_labeler):
    assert [f1_score(0, 0, 0), f1_score(2, 0, 0), f1_score(0, 3, 0), f1_score(0, 0, 2), f1_score(1, 1, 1)] == \
        [5.0, 5.0, 1.0, 1.0, 3.0]
    judge = make_judge("label:f1", labeler=stub_labeler, cache=False)
    assert isinstance(judge, LabelJudge) and judge.mode == "f1" and judge.id.startswith("label:f1-")
    assert judge.id != make_judge("label", labeler=stub_labeler, cache=False).id  # cached scores never mix
    truth = _truth(cardiomegaly=1, effusion=1)
    candidates = ["Cardiomegaly and effusion.", "Cardiomegaly.", "Cardiomegaly, effusion and a nodule.", "Normal.",
                  "Nodule and emphysema."]
    scores = [r.score for r in judge.evaluate(["x"] * 5, candidates, truths=[truth] * 5)]
    # F1 = 1, 2/3, 4/5, 0, 0: unlike the errors mode, saying nothing about an abnormal study is the worst answer
    assert scores == pytest.approx([5.0, 1 + 8 / 3, 1 + 16 / 5, 1.0, 1.0])
    errors = [r.score for r in LabelJudge(stub_labeler).evaluate(["x"] * 5, candidates, truths=[truth] * 5)]
    assert errors == [5.0, 4.0, 4.0, 3.0, 1.0]
    with pytest.raises(JudgeError, match="label-judge mode"):
        make_judge("label:recall", labeler=stub_labeler, cache=False)
    with pytest.raises(ValueError, match="label-judge mode"):
        LabelJudge(stub_labeler, mode="recall")


def test_fbeta_mode_weighs_hallucinations_over_omissions(stub_labeler):
    # beta 0.5: one hallucination costs what four omissions cost
    assert fbeta_score(2, 1, 0, 0.5) == pytest.approx(1 + 4 * 2.5 / 3.5)
    assert fbeta_score(2, 0, 1, 0.5) == pytest.approx(1 + 4 * 2.5 / 2.75)
    assert fbeta_score(2, 1, 1, 1.0) == f1_score(2, 1, 1) and fbeta_score(0, 0, 0, 0.5) == 5.0
    judge = make_judge("label:f0.5", labeler=stub_labeler, cache=False)
    assert judge.mode == "f0.5" and judge.id.startswith("label:f0.5-")
    truth = _truth(cardiomegaly=1, effusion=1)
    over, under = judge.evaluate(["x"] * 2, ["Cardiomegaly, effusion and a nodule.", "Cardiomegaly."],
                                 truths=[truth] * 2)
    assert over.score < under.score  # a hallucination costs more than an omission
    f1 = make_judge("label:f1", labeler=stub_labeler, cache=False)
    over1, under1 = f1.evaluate(["x"] * 2, ["Cardiomegaly, effusion and a nodule.", "Cardiomegaly."],
                                truths=[truth] * 2)
    assert over1.score > under1.score  # F1: one extra true finding outweighs one false one
    for bad in ("label:f0", "label:fx", "label:f-1"):
        with pytest.raises(JudgeError, match="label-judge mode"):
            make_judge(bad, labeler=stub_labeler, cache=False)
