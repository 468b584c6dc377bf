"""Negation and uncertainty of a finding mentioned in a sentence (NegEx-style, scope limited by clauses).

A sentence is cut into clauses (:func:`rrg3d.text.reports.split_clauses`) and each clause into comma
*fragments*. For a hit (the span of a finding) in a fragment:

* a *pre* cue ("no", "without", "free of", "absence of", "negative for", ...) before the hit in its fragment
  negates it, unless an affirming verb ("is observed", "there are", ...) stands between them;
* a *post* cue ("... was not observed", "... is not seen", "... ruled out", "... absent") after the hit in its
  fragment negates it, unless an affirming verb stands between them;
* a bare fragment (no cue, no verb: an item of a list) takes the polarity of its list: a pre cue in an earlier
  fragment of the clause ("no A, B or C") or a post cue in a later one ("A, B and C were not detected").

Uncertainty cues ("cannot be excluded", "possible", "suspicious for", "?", "may represent") mark every hit of
their clause as uncertain; they are masked before negation is looked for, so "cannot be ruled out" never
reads as a negation. Pseudo-negations ("no significant change in", "not reaching pathological size") are
masked too: they do not deny the finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rrg3d.text.reports import split_clauses

__all__ = ["Polarity", "polarity"]

_PSEUDO = re.compile(
    r"\bno\s+(?:\w+\s+)?(?:significant\s+|interval\s+|obvious\s+|marked\s+|apparent\s+)?(?:change|progression|"
    r"regression|difference|increase\s+in\s+(?:the\s+)?(?:size|number|dimension))\w*|"
    r"\bnot\s+(?:significantly\s+)?(?:changed|increased|progressed|regressed)|"
    r"\b(?:do|does|did|doesn't|don't|didn't)\s+not\s+(?:reach|exceed|meet|show\s+(?:a\s+)?(?:significant\s+)?"
    r"(?:change|progression))|"
    r"\b(?:not|non)\s*-?\s*(?:reaching|exceeding)|\bnot\s+only\b|\bno\s+longer\s+(?:increas|progress)\w*|"
    r"\bwithout\s+(?:a\s+)?(?:significant\s+)?(?:change|progression)|\bno\s+doubt\b|\bnot\s+well\s+defined|"
    r"\bnot\s+(?:clearly\s+)?(?:calcified|enhancing|cavitated)|\bnon\s*-?\s*(?:specific|calcified|enhancing)|"
    r"\bnot\s+to\s+be\s+(?:confused|mistaken)|\b(?:lack|absence)\s+of\s+(?:iv\s+|intravenous\s+)?contrast|"
    r"\b(?:without|no|non)[\s-]+(?:iv\s+|intravenous\s+)?contrast|\bnot\s+(?:been\s+)?(?:given|administered)|"
    r"\bcannot\s+be\s+(?:evaluated|assessed)|\bcould\s+not\s+be\s+(?:evaluated|assessed)",
    re.IGNORECASE,
)
_UNCERTAIN = re.compile(
    r"\b(?:can|could|cannot|can't|couldn't)\s*(?:not\s+)?be\s+(?:excluded|ruled\s+out|differentiated|"
    r"distinguished)|\bnot\s+(?:be\s+)?(?:excluded|ruled\s+out)|\bcannot\s+rule\s+out|"
    r"\b(?:possible|possibly|probable|probably|likely|unlikely|suspicious|suspected|suspicion|suspect|"
    r"questionable|equivocal|indeterminate|presumabl[ey]|presumed|doubtful|uncertain|vs\.?|versus|"
    r"differential(?:\s+diagnosis)?|considered|consider|rule\s+out|to\s+exclude|r/o)\b|"
    r"\b(?:may|might|could)\s+(?:\w+\s+)?(?:represent|be|indicate|reflect|correspond|belong|suggest)\w*|"
    r"\bcompatible\s+with\s+(?:an?\s+)?(?:early|possible)|\bin\s+favou?r\s+of\s+(?:a\s+)?possible|\?",
    re.IGNORECASE,
)
_NOT_VERB = (r"(?:observed|seen|detected|noted|present|identified|visuali[sz]ed|found|evident|demonstrated|"
             r"appreciated|monitored|distinguished|encountered|determined|recogni[sz]ed|shown|revealed|apparent|"
             r"depicted|visible|delineated|documented|viewed|followed|described|discerned|displayed|defined|"
             r"developed|reported|measured|there|available|existing|remarkable|significant)")
_POST = re.compile(
    rf"\b(?:(?:is|are|was|were|has|have|had|could|can|did|does|do)\s+)?(?:not|n't|never)\s+(?:been\s+|be\s+)?"
    rf"(?:clearly\s+|definitely\s+|significantly\s+|markedly\s+)?{_NOT_VERB}|"
    r"\b(?:is|are|was|were|has\s+been|have\s+been|been)\s+(?:\w+\s+)?(?:absent|excluded|ruled\s+out|"
    r"resolved|disappeared|removed|extracted|withdrawn)|\b(?:has|have)\s+(?:completely\s+)?(?:resolved|disappeared|regressed\s+completely)|"
    r"\bno\s+longer\s+(?:seen|present|observed|detected|visible|evident)|\b(?:absent|none|negative(?!\s+for))\b",
    re.IGNORECASE,
)
_PRE = re.compile(
    r"\b(?:no|not|without|neither|nor|never|none\s+of|free\s+of|absence\s+of|absent|negative\s+for|"
    r"lack\s+of|rather\s+than|instead\s+of|resolution\s+of|(?:there\s+(?:is|are|was|were)\s+)?no)\b",
    re.IGNORECASE,
)
_AFFIRM = re.compile(
    r"\b(?:is|are|was|were|there|observed|seen|noted|detected|present|identified|visuali[sz]ed|found|evident|"
    r"demonstrated|shows?|showed|showing|reveals?|revealed|contains?|has|have|appears?|appeared|exists?|"
    r"persists?|persisted|remains?|developed)\b",
    re.IGNORECASE,
)
# References to earlier studies ("..., which was observed in the previous examination, ...") affirm nothing now.
_NEUTRAL = re.compile(
    r"\b(?:(?:which|that)\s+)?(?:(?:was|were|is|are|had\s+been|has\s+been|have\s+been)\s+)?(?:previously\s+)?"
    r"(?:observed|seen|detected|described|noted|reported|evaluated|mentioned|defined)\s+(?:\w+\s+){0,3}?(?:in|on|at)"
    r"\s+the\s+(?:\w+\s+)?(?:previous|prior|old|earlier|last|former|preceding)\s+(?:\w+\s+)?(?:examinations?|"
    r"stud(?:y|ies)|ct|scans?|imaging)|\b(?:which|that)\s+(?:was|were)\s+(?:observed|seen|detected|described)\s+"
    r"previously",
    re.IGNORECASE,
)
_FRAGMENT = re.compile(r",\s*")


@dataclass(frozen=True)
class Polarity:
    """Whether a hit is negated, and whether it is hedged."""

    negated: bool
    uncertain: bool


def _mask(text: str, pattern: re.Pattern[str]) -> tuple[str, list[tuple[int, int]]]:
    spans = [m.span() for m in pattern.finditer(text)]
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars), spans


def _fragments(clause: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for match in _FRAGMENT.finditer(clause):
        bounds.append((start, match.start()))
        start = match.end()
    bounds.append((start, len(clause)))
    return bounds


class _Clause:
    """Cue positions of one clause, computed once and reused for all its hits."""

    def __init__(self, text: str) -> None:
        self.text = text
        masked, uncertain = _mask(text, _UNCERTAIN)
        self.uncertain_scopes = [self._uncertain_scope(text, start, end) for start, end in uncertain]
        masked, _ = _mask(masked, _PSEUDO)
        masked, _ = _mask(masked, _NEUTRAL)
        masked, self.post = _mask(masked, _POST)
        masked, self.pre = _mask(masked, _PRE)
        self.masked = masked  # cue-free text: what is left for the affirming-verb search
        self.fragments = _fragments(text)

    @staticmethod
    def _uncertain_scope(text: str, start: int, end: int) -> tuple[int, int]:
        """A "?" closing a parenthesis hedges only the parenthesis; other cues hedge the whole clause."""
        if text[start:end] == "?":
            opening = text.rfind("(", 0, start)
            if opening >= 0 and ")" not in text[opening:start]:
                return opening, end
        return 0, len(text)

    def uncertain(self, start: int, end: int) -> bool:
        return any(lo < end and start < hi for lo, hi in self.uncertain_scopes)

    def _affirm_between(self, start: int, end: int) -> bool:
        return start < end and bool(_AFFIRM.search(self.masked, start, end))

    def _cues_in(self, lo: int, hi: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return ([c for c in self.pre if lo <= c[0] < hi], [c for c in self.post if lo <= c[0] < hi])

    def negated(self, start: int, end: int) -> bool:
        index = next((i for i, (lo, hi) in enumerate(self.fragments) if lo <= start < hi + 2), 0)
        lo, hi = self.fragments[index]
        hi = max(hi, end)
        pre, post = self._cues_in(lo, hi)
        for _, cue_end in reversed(pre):
            if cue_end <= start and not self._affirm_between(cue_end, start):
                return True
        for cue_start, _ in post:
            if cue_start >= end and not self._affirm_between(end, cue_start):
                return True
        if any(c[1] <= start for c in pre) or any(c[0] >= end for c in post):
            return False  # a cue of its own fragment, but an affirming verb stands between
        # A list item ("no A, B or C was detected", "A, B and C were not observed"): the cue of an earlier
        # fragment reaches it when no affirming verb stands between; likewise a post cue of a later fragment.
        if not self._affirm_between(lo, start):
            for j in range(index - 1, -1, -1):
                f_lo, f_hi = self.fragments[j]
                f_pre, f_post = self._cues_in(f_lo, f_hi)
                if f_pre:
                    return not self._affirm_between(f_pre[-1][1], f_hi)
                if f_post or self._affirm_between(f_lo, f_hi):
                    break
        if not self._affirm_between(end, hi):
            for j in range(index + 1, len(self.fragments)):
                f_lo, f_hi = self.fragments[j]
                f_pre, f_post = self._cues_in(f_lo, f_hi)
                if f_post:
                    return not self._affirm_between(f_lo, f_post[0][0])
                if f_pre or self._affirm_between(f_lo, f_hi):
                    break
        return False


def polarity(sentence: str, spans: list[tuple[int, int]]) -> list[Polarity]:
    """Polarity of each ``(start, end)`` span of a sentence."""
    clauses = [(offset, text, _Clause(text)) for offset, text in split_clauses(sentence)]
    out = []
    for start, end in spans:
        chosen = next(((o, c) for o, t, c in clauses if o <= start < o + len(t)), None)
        if chosen is None:  # a span inside a clause separator: judge it on the whole sentence
            chosen = (0, _Clause(sentence))
        offset, clause = chosen
        begin, stop = start - offset, end - offset
        out.append(Polarity(negated=clause.negated(begin, stop), uncertain=clause.uncertain(begin, stop)))
    return out
