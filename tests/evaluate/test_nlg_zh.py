"""Chinese NLG scoring (lang zh): character tokens, hand-computed BLEU, identical texts, English untouched."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.errors import RRG3DError
from rrg3d.evaluate import nlg
from rrg3d.evaluate.nlg import (
    ZH_METEOR_NOTE,
    check_lang,
    language_plan,
    meteor_zh_scores,
    nlg_metrics,
    zh_tokenize,
    zh_tokens,
)

ZH_PAIRS = [
    ("检查所见：双侧颈部及纵隔见多发肿大淋巴结，SUVmax 12.3。诊断意见：考虑淋巴瘤。",
     "检查所见：纵隔多发肿大淋巴结，SUVmax约11.8。诊断意见：淋巴瘤可能。"),
    ("脾脏增大，代谢弥漫性增高。", "脾脏稍大，FDG摄取增高。"),
    ("双肺未见异常。", "双肺未见明显异常。"),
    ("骨髓未见异常高代谢。", ""),
]


def test_mixed_text_tokenisation() -> None:
    text = "PET/CT示：右颈部淋巴结肿大，大小约3.2cm×2.1cm，SUVmax约１２．５（较前↑20%）。T1WI_a 2～3个"
    assert zh_tokens(text) == [
        "pet", "ct", "示", "右", "颈", "部", "淋", "巴", "结", "肿", "大", "大", "小", "约", "3.2cm", "×", "2.1cm",
        "suvmax", "约", "12.5", "较", "前", "↑", "20", "%", "t1wi", "a", "2", "~", "3", "个"]
    # whitespace and full-width forms never matter; sentence punctuation of both scripts is dropped
    assert zh_tokens("肝  脏\n未见\t异常 。") == zh_tokens("肝脏未见异常.") == ["肝", "脏", "未", "见", "异", "常"]
    assert zh_tokens("ＳＵＶ，（肺）【结节】“阴性”、end.") == ["suv", "肺", "结", "节", "阴", "性", "end"]
    assert zh_tokens("第1.5.3节 v2.0. 3.") == ["第", "1.5.3", "节", "v2.0", "3"]
    assert zh_tokens("사람 ひらがな") == ["사", "람", "ひ", "ら", "が", "な"]
    assert zh_tokens("") == zh_tokens(None) == [] and zh_tokenize(["", "肺 结节"]) == ["", "肺 结 节"]


def _one(reference: str, candidate: str) -> dict:
    return nlg_metrics([reference], [candidate], lang="zh", extra=False).coco


def test_bleu_and_rouge_by_hand() -> None:
    # 右 肺 结 节 vs 左 肺 结 节: 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1, no brevity penalty
    coco = _one("右肺结节。", "左肺结节。")
    assert coco["bleu_1"] == pytest.approx(3 / 4, abs=1e-8)
    assert coco["bleu_2"] == pytest.approx(np.sqrt(3 / 4 * 2 / 3), abs=1e-8)
    assert coco["bleu_3"] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3), abs=1e-8)
    assert coco["bleu_4"] < 1e-3
    assert coco["rouge_l"] == pytest.approx(3 / 4)  # LCS 3 of 4 on both sides
    # Latin words and decimals are one token each: suvmax 12.3 肝 大 vs suvmax 12.5 肝 大 -> 3/4, then 1/3
    coco = _one("SUVmax 12.3，肝大", "suvmax 12.5，肝大。")
    assert coco["bleu_1"] == pytest.approx(3 / 4, abs=1e-8)
    assert coco["bleu_2"] == pytest.approx(0.5, abs=1e-8)
    # brevity penalty: 3 of 4 reference characters, all matching -> exp(1 - 4/3)
    coco = _one("右肺结节", "肺结节")
    assert coco["bleu_1"] == pytest.approx(np.exp(1 - 4 / 3), abs=1e-8)
    assert coco["rouge_l"] == pytest.approx(2.44 * 0.75 / (0.75 + 1.44))  # P = 1, R = 3/4, beta 1.2


def test_identical_chinese_texts_score_one() -> None:
    texts = [r for r, _ in ZH_PAIRS]
    result = nlg_metrics(texts, texts, lang="zh")
    for k in range(1, 5):
        assert result.coco[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert result.coco["rouge_l"] == pytest.approx(1.0)
    assert result.coco["cider"] > 1.0
    assert result.coco["meteor"] is None and "coco.meteor" not in result.per_sample
    assert all(v == pytest.approx(1.0) for v in result.extra["rouge_score"].values())
    assert result.extra["sacrebleu"] == pytest.approx(100.0)
    assert result.extra["meteor_nltk"] > 0.95
    assert result.warnings == [ZH_METEOR_NOTE] and "WordNet synonymy does not apply to Chinese" in ZH_METEOR_NOTE
    assert result.implementation["lang"] == "zh" and "tok:zh" in result.implementation["extra"]["sacrebleu"]


def test_chinese_scores_are_per_character_and_bootstrappable() -> None:
    references = [r for r, _ in ZH_PAIRS]
    candidates = [c for _, c in ZH_PAIRS]
    result = nlg_metrics(references, candidates, lang="zh")
    assert 0 < result.coco["bleu_1"] < 1 and 0 < result.coco["rouge_l"] < 1
    assert result.per_sample["coco.rouge_l"][-1] == 0.0  # the empty candidate
    assert 0 < result.extra["rouge_score"]["rouge2"] < result.extra["rouge_score"]["rouge1"] < 1
    assert result.per_sample["extra.meteor_nltk"][2] > 0.5
    # the per-sample statistics reproduce the corpus values (bootstrap CIs resample them)
    for name in ("coco.bleu_4", "coco.rouge_l", "extra.sacrebleu"):
        statistic = result.statistics[name]
        value = float(statistic.reduce(statistic.stats.sum(0), len(candidates)))
        expected = result.extra["sacrebleu"] if name == "extra.sacrebleu" else result.coco[name.split(".")[1]]
        assert value == pytest.approx(expected, rel=1e-6), name
    # spaces and line breaks between characters do not change a score
    spaced = nlg_metrics([r.replace("，", " ， ").replace("。", "。\n").replace("脾脏", "脾 脏") for r in references],
                         candidates, lang="zh", extra=False)
    assert spaced.coco == result.coco


def test_meteor_has_no_synonym_stage_and_needs_no_wordnet(monkeypatch: pytest.MonkeyPatch) -> None:
    import rrg3d.evaluate.wordnet as wordnet

    def refuse() -> None:
        raise AssertionError("WordNet must not be loaded for zh")

    monkeypatch.setattr(wordnet, "ensure_wordnet", refuse)
    assert meteor_zh_scores(["large"], ["big"])[0] == 0.0  # WordNet synonyms in English, not matched here
    assert meteor_zh_scores(["nodules"], ["nodule"])[0] > 0.4  # stems still match
    assert meteor_zh_scores(["肺结节"], ["肺结节"])[0] > 0.9


def test_english_results_are_unchanged() -> None:
    references = ["The heart is enlarged. Small right pleural effusion.", "No nodules (left)."]
    candidates = ["Heart is enlarged with a small right effusion.", "No pulmonary nodules."]
    default = nlg_metrics(references, candidates, java=False)
    english = nlg_metrics(references, candidates, java=False, lang="EN")
    assert english.coco == default.coco and english.extra == default.extra
    assert english.implementation == default.implementation and "lang" not in english.implementation
    assert english.warnings == default.warnings and ZH_METEOR_NOTE not in english.warnings
    # the English path still tokenises with the PTB rules, not per character
    bleu, _, _ = nlg.coco_bleu(nlg.approx_ptb_tokenize(references), nlg.approx_ptb_tokenize(candidates))
    assert [english.coco[f"bleu_{k + 1}"] for k in range(4)] == pytest.approx(bleu, abs=1e-12)


def test_languages_plan_and_empty_input() -> None:
    assert check_lang(" ZH ") == "zh"
    with pytest.raises(RRG3DError, match="unknown report language 'fr'"):
        check_lang("fr")
    with pytest.raises(RRG3DError):
        nlg_metrics(["a"], ["a"], lang="fr")
    english, chinese = language_plan("en"), language_plan("zh")
    assert english.english_rules and not english.skipped
    assert not chinese.english_rules and any("clinical efficacy" in note for note in chinese.skipped)
    assert english.lengths(["two words", None]).tolist() == [2.0, 0.0]
    assert chinese.lengths(["肺结节 SUVmax 2.5。", ""]).tolist() == [5.0, 0.0]
    result = nlg_metrics([], [], lang="zh")
    assert result.coco["bleu_1"] is None and result.extra["sacrebleu"] is None
