"""Parsing judge answers: the formats models actually produce, and garbage (a parse failure, never an exception)."""

from __future__ import annotations

import pytest

from rrg3d.errors import RRG3DError
from rrg3d.judge.parsing import findings_match_score, parse, parse_findings_match, parse_score
from rrg3d.judge.prompts import ERROR_CATEGORIES, build_prompt, prompt_version


@pytest.mark.parametrize(("text", "score"), [
    ("Explanation: fine.\nScore: 4", 4.0),
    ("**Explanation:** close match\n**Score:** 5", 5.0),
    ("Explanation: <partly right>\nScore: <3/5>", 3.0),
    ("score=2", 2.0),
    ("Explanation: The score of the report\nScore: 1", 1.0),
    ("Score: 2\n... on reflection ...\nScore: 3", 3.0),
    ("Explanation: ok\nScore (1-5): 4", 4.0),
])
def test_scores_that_parse(text, score):
    parsed = parse_score(text)
    assert parsed.ok and parsed.score == score


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty answer"), (None, "empty answer"), ("The report looks good.", "no 'Score: n'"),
    ("Score: 0", "outside 1-5"), ("Score: 12", "outside 1-5"), ("Score: 8/10", "/10 scale"),
])
def test_scores_that_do_not_parse(text, reason):
    parsed = parse_score(text)
    assert not parsed.ok and parsed.score is None and reason in parsed.error


def test_explanation_is_extracted():
    assert parse_score("Explanation: misses the effusion.\nScore: 3").explanation == "misses the effusion."


def test_findings_match_full_partial_and_garbage():
    lines = ["[Clinically significant errors]"] + [f"({x}) {n}: {i}" for i, (x, n) in enumerate(ERROR_CATEGORIES)]
    lines += ["[Clinically insignificant errors]"] + [f"({x}) {n}: 1" for x, n in ERROR_CATEGORIES]
    lines += ["[Matched findings]", "5"]
    parsed = parse_findings_match("\n".join(lines))
    assert parsed.ok and parsed.counts["significant"] == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "f": 5}
    assert parsed.counts["insignificant"] == dict.fromkeys("abcdef", 1) and parsed.counts["matched"] == 5
    assert parsed.score == pytest.approx(5 / (5 + 15))
    partial = parse_findings_match("Clinically significant errors: (a) false finding: 2\nMatched findings: 2")
    assert partial.ok and partial.score == 0.5 and "significant.b" in partial.counts["missing"]
    by_name = parse_findings_match("Significant errors\nfalse finding: 1\nmissing finding: 1\nMatched findings: 0")
    assert by_name.ok and by_name.score == 0.0  # nothing matched -> 0 (GREEN's ratio)
    assert not parse_findings_match("The reports agree.").ok
    assert not parse_findings_match("Matched findings: 3").ok  # no error counts at all
    assert findings_match_score(0, 0) == 0.0 and findings_match_score(4, 0) == 1.0


def test_parse_never_raises():
    assert not parse("score", "\x00" * 10).ok
    assert not parse("findings_match", "((((((((").ok


def test_prompts_hold_the_texts_and_criteria():
    prompt = build_prompt("score", "Reference {braces} text.", "")
    assert "Reference {braces} text." in prompt and "(empty)" in prompt
    for word in ("Accuracy", "Completeness", "Clarity", "Consistency", "Explanation:", "Score:"):
        assert word in prompt
    rubric = build_prompt("findings_match", "a", "b")
    assert all(f"({x}) {name}" in rubric for x, name in ERROR_CATEGORIES) and "[Matched findings]" in rubric
    assert "GREEN" not in rubric
    assert prompt_version("score") == "score-v1" and prompt_version("findings_match") == "findings-match-v1"


def test_green_is_a_deprecated_alias_of_findings_match():
    answer = "Clinically significant errors: (a) false finding: 1\nMatched findings: 3"
    with pytest.warns(FutureWarning, match="not the GREEN model"):
        assert parse("green", answer) == parse("findings_match", answer)
    with pytest.warns(FutureWarning, match="'findings_match'"):
        assert build_prompt("green", "a", "b") == build_prompt("findings_match", "a", "b")
    with pytest.warns(FutureWarning):  # one prompt, one version: the cache keys of both names are the same
        assert prompt_version("green") == prompt_version("findings_match")
    with pytest.raises(RRG3DError, match="unknown judge prompt 'stars'"):
        prompt_version("stars")
