"""Parsing judge answers. Never raises: a malformed answer is a :class:`Parsed` with ``ok=False`` and a reason."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rrg3d.judge.prompts import ERROR_CATEGORIES, canonical_kind

_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE = re.compile(r"score\s*(?:\(\s*1\s*[-–]\s*5\s*\))?\s*[:=：]?\s*[\[<(*\"']*\s*" + _NUMBER
                    + r"\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
_EXPLANATION = re.compile(r"explanation\s*[:：]\s*(.*?)(?=\n\s*\**\s*score\b|\Z)", re.IGNORECASE | re.DOTALL)
_CATEGORY = re.compile(r"\(?\b([a-f])\)\s*([a-z ]*?)\s*[:=\-–]\s*[<\[(*]*\s*(\d+)", re.IGNORECASE)
_CATEGORY_BY_NAME = re.compile(r"\b(" + "|".join(name for _, name in ERROR_CATEGORIES) + r")s?\s*[:=\-–]\s*[<\[(*]*\s*"
                               r"(\d+)", re.IGNORECASE)
_MATCHED = re.compile(r"matched\s+findings?\s*\]?\s*[:=\-–]?\s*[<\[(*]*\s*(\d+)", re.IGNORECASE)
_NAME_TO_LETTER = {name: letter for letter, name in ERROR_CATEGORIES}


@dataclasses.dataclass
class Parsed:
    """What a judge answer says: ``score`` (1–5, or the findings-match score in [0, 1]), explanation, error counts;
    or why not."""

    ok: bool
    score: float | None = None
    explanation: str | None = None
    counts: dict[str, Any] | None = None
    error: str | None = None


def _strip(text: str) -> str:
    return re.sub(r"[*_`#]+", "", text or "").strip()


def parse_score(text: str | None) -> Parsed:
    """``Explanation: … Score: n`` → score in 1..5 (the last ``Score`` wins; ``4/5`` and ``<4>`` accepted)."""
    clean = _strip(text or "")
    if not clean:
        return Parsed(False, error="empty answer")
    matches = list(_SCORE.finditer(clean))
    if not matches:
        return Parsed(False, error="no 'Score: n' in the answer")
    match = matches[-1]
    value = float(match.group(1))
    if match.group(2) is not None and float(match.group(2)) != 5:
        return Parsed(False, error=f"score given on a /{match.group(2)} scale, not 1-5")
    if not 1 <= value <= 5:
        return Parsed(False, error=f"score {match.group(1)} is outside 1-5")
    found = _EXPLANATION.search(clean)
    explanation = found.group(1).strip().strip("<>[]").strip() if found else None
    return Parsed(True, score=value, explanation=explanation or None)


def findings_match_score(matched: int, significant_errors: int) -> float:
    """matched / (matched + clinically significant errors); 0 when nothing matched (GREEN's ratio, our counts)."""
    if matched <= 0:
        return 0.0
    return matched / (matched + significant_errors)


def _sections(text: str) -> dict[str, str]:
    """Split the answer at its section headers (significant / insignificant / matched)."""
    lowered = text.lower()
    marks = []
    for name, pattern in (("insignificant", r"insignificant\s+errors?"), ("significant", r"(?<!in)significant\s+"
                                                                                           r"errors?"),
                          ("matched", r"matched\s+findings?")):
        for found in re.finditer(pattern, lowered):
            marks.append((found.start(), name))
    marks.sort()
    sections: dict[str, str] = {}
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        sections.setdefault(name, text[start:end])
    return sections


def _category_counts(section: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for letter, _, number in _CATEGORY.findall(section):
        counts.setdefault(letter.lower(), int(number))
    for name, number in _CATEGORY_BY_NAME.findall(section):
        counts.setdefault(_NAME_TO_LETTER[name.lower()], int(number))
    return counts


def parse_findings_match(text: str | None) -> Parsed:
    """Findings-match rubric answer → score and
    ``counts = {"significant": {a..f}, "insignificant": {a..f}, "matched": n}``.

    Needs the matched-findings count and at least one significant-error count; absent categories count 0 and are
    listed in ``counts["missing"]``.
    """
    clean = _strip(text or "")
    if not clean:
        return Parsed(False, error="empty answer")
    sections = _sections(clean)
    significant = _category_counts(sections.get("significant", ""))
    insignificant = _category_counts(sections.get("insignificant", ""))
    matched_match = _MATCHED.search(sections.get("matched", "")) or _MATCHED.search(clean)
    if matched_match is None:
        tail = re.search(r"(\d+)", sections.get("matched", "").split("\n", 1)[-1])
        matched = int(tail.group(1)) if tail else None
    else:
        matched = int(matched_match.group(1))
    if matched is None:
        return Parsed(False, error="no matched-findings count in the answer")
    if not significant:
        return Parsed(False, error="no clinically significant error counts in the answer")
    letters = [letter for letter, _ in ERROR_CATEGORIES]
    missing = [f"significant.{x}" for x in letters if x not in significant]
    missing += [f"insignificant.{x}" for x in letters if x not in insignificant]
    counts = {"significant": {x: significant.get(x, 0) for x in letters},
              "insignificant": {x: insignificant.get(x, 0) for x in letters},
              "matched": matched, "missing": missing}
    score = findings_match_score(matched, sum(counts["significant"].values()))
    return Parsed(True, score=score, counts=counts)


PARSERS = {"score": parse_score, "findings_match": parse_findings_match}


def parse(kind: str, text: str | None) -> Parsed:
    """Parse an answer to the ``kind`` prompt; any unexpected failure becomes a parse failure too."""
    try:
        return PARSERS[canonical_kind(kind)](text)
    except Exception as exc:  # a parser bug must never crash an evaluation
        return Parsed(False, error=f"parser error: {type(exc).__name__}: {exc}")
