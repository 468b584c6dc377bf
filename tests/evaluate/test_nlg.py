"""NLG metrics: the coco set against pycocoevalcap itself, hand-computed values, extras, and the no-Java fallback."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from rrg3d.evaluate.meteor import meteor_from_stats
from rrg3d.evaluate.nlg import (
    approx_ptb_tokenize,
    bleu_from_stats,
    coco_bleu,
    coco_rouge_l,
    lcs_length,
    nlg_metrics,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")

#: Hand-made pairs (reference, candidate): punctuation, numbers, parentheses, casing, an empty candidate.
HAND_PAIRS = [
    ("The heart is enlarged. Small right pleural effusion.",
     "Heart is enlarged; a small pleural effusion on the right."),
    ("No focal consolidation, (left) 4 mm nodule in the upper lobe.",
     "A 4 mm nodule (left upper lobe). No consolidation!"),
    ("Mild emphysema.", "Mild emphysema."),
    ("Trachea and main bronchi are patent", ""),
    ("Degenerative changes of the thoracic spine?", "THE THORACIC SPINE SHOWS DEGENERATIVE CHANGES -- NOTHING ELSE."),
]


def _pycoco(references, candidates):
    """pycocoevalcap called the usual way (tokenizer on each side, then the four scorers)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    meteor, meteor_each = meteor_scorer.compute_score(gts, res)
    del meteor_scorer
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    values = {f"bleu_{k + 1}": bleu[k] for k in range(4)}
    values.update(meteor=meteor, rouge_l=rouge, cider=cider)
    each = {f"bleu_{k + 1}": bleu_each[k] for k in range(4)}
    each.update(meteor=meteor_each, rouge_l=rouge_each, cider=cider_each)
    return values, each


@pytest.fixture(scope="module")
def coco_run(real_pairs):
    pairs = real_pairs + HAND_PAIRS
    references = [r for r, _ in pairs]
    candidates = [c for _, c in pairs]
    return references, candidates, nlg_metrics(references, candidates)


@needs_java
def test_coco_matches_pycocoevalcap_on_real_and_hand_made_pairs(coco_run):
    references, candidates, ours = coco_run
    assert len(references) >= 60
    expected, expected_each = _pycoco(references, candidates)
    assert ours.warnings == []
    for key, value in expected.items():
        assert ours.coco[key] == pytest.approx(value, abs=1e-4), key
        np.testing.assert_allclose(ours.per_sample[f"coco.{key}"], expected_each[key], atol=1e-4, err_msg=key)
    assert ours.per_sample["coco.meteor"][-2] == 0.0  # the empty candidate


@needs_java
def test_bootstrap_statistics_reproduce_corpus_values(coco_run):
    _, _, ours = coco_run
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"):
        assert ours.statistics[f"coco.{key}"].value() == pytest.approx(ours.coco[key], abs=1e-12), key
    # METEOR 1.5's aggregate, re-implemented from its statistics, against every per-segment score of the jar
    stats = ours.statistics["coco.meteor"].stats
    np.testing.assert_allclose(meteor_from_stats(stats), ours.per_sample["coco.meteor"], atol=1e-12)
    assert ours.statistics["extra.sacrebleu"].value() == pytest.approx(ours.extra["sacrebleu"], abs=1e-9)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours.statistics[f"extra.rouge_score.{key}"].value() == pytest.approx(ours.extra["rouge_score"][key])


@needs_java
def test_rouge_score_extra_matches_the_package(coco_run):
    from rouge_score import rouge_scorer

    references, candidates, ours = coco_run
    rows = list(range(20)) + list(range(len(references) - len(HAND_PAIRS), len(references)))  # the package is slow
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = [scorer.score(references[i], candidates[i])[key].fmeasure for i in rows]
        np.testing.assert_allclose(ours.per_sample[f"extra.rouge_score.{key}"][rows], expected, atol=1e-12,
                                   err_msg=key)


@needs_java
def test_identical_texts_score_one():
    texts = ["The heart is normal in size. No pleural effusion.", "Mild emphysema in both upper lobes."]
    result = nlg_metrics(texts, texts)
    for k in range(1, 5):
        assert result.coco[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert result.coco["rouge_l"] == pytest.approx(1.0)
    assert result.coco["meteor"] == pytest.approx(1.0, abs=1e-6)
    assert result.extra["sacrebleu"] == pytest.approx(100.0)
    assert all(v == pytest.approx(1.0) for v in result.extra["rouge_score"].values())
    assert result.extra["meteor_nltk"] > 0.95


def test_bleu_and_rouge_by_hand():
    # tokens as the PTB tokenizer leaves them (lower case, punctuation removed)
    bleu, _, stats = coco_bleu(["the cat is on the mat"], ["the cat sat on the mat"])
    # 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3, equal lengths (no brevity penalty)
    assert bleu[0] == pytest.approx(5 / 6, abs=1e-8)
    assert bleu[1] == pytest.approx(np.sqrt(5 / 6 * 3 / 5), abs=1e-8)
    assert bleu[2] == pytest.approx(0.5, abs=1e-8)
    assert bleu[3] < 1e-3
    assert stats.tolist() == [[6, 6, 6, 5, 4, 3, 5, 3, 1, 0]]
    assert bleu_from_stats(stats.sum(0), 1, order=2) == pytest.approx(bleu[1], abs=1e-12)
    # brevity penalty: 3 of 6 reference words -> exp(1 - 6/3)
    bleu, _, _ = coco_bleu(["a b c d e f"], ["a b c"])
    assert bleu[0] == pytest.approx(np.exp(1 - 2), abs=1e-8)
    # ROUGE-L with beta 1.2: LCS 5 of 6 on both sides -> 5/6; LCS 3, P = 1, R = 1/2 -> 2.44 * 0.5 / 1.94
    assert coco_rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert coco_rouge_l("a b c", "a b c d e f") == pytest.approx(2.44 * 0.5 / 1.94)
    assert coco_rouge_l("", "a b") == 0.0


def test_bit_parallel_lcs_equals_dynamic_programming():
    from pycocoevalcap.rouge.rouge import my_lcs

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcdefg") for _ in range(rng.randint(1, 90))]
        b = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 90))]
        assert lcs_length(a, b) == my_lcs(a, b)
    assert lcs_length([], ["a"]) == 0


def test_without_java_meteor_is_reported_only_as_meteor_nltk(monkeypatch):
    monkeypatch.setenv("RRG3D_NO_JAVA", "1")
    refs = ["The heart is enlarged. Small right pleural effusion.", "No nodules."]
    cands = ["Heart is enlarged with a small right effusion.", "No pulmonary nodules."]
    result = nlg_metrics(refs, cands)
    assert result.coco["meteor"] is None
    assert "coco.meteor" not in result.per_sample
    assert result.extra["meteor_nltk"] is not None and 0 < result.extra["meteor_nltk"] <= 1
    assert "NOT pycocoevalcap-identical" in result.implementation["coco"]["tokenizer"]
    assert any("Java not found" in w for w in result.warnings)
    assert result.coco["bleu_1"] > 0 and result.coco["rouge_l"] > 0


def test_approximate_tokenizer_is_close_to_ptb_rules():
    assert approx_ptb_tokenize(["No effusion, (left) 3.5 mm nodule?"]) == ["no effusion -lrb- left -rrb- 3.5 mm nodule"]
    assert approx_ptb_tokenize([""]) == [""]


def test_empty_input_gives_no_numbers():
    result = nlg_metrics([], [], java=False)
    assert result.coco["bleu_1"] is None and result.extra["sacrebleu"] is None
    with pytest.raises(ValueError):
        nlg_metrics(["a"], [], java=False)
