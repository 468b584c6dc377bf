"""A deterministic judge built on the abnormality labeler: no model, no cache, same answer every time.

Both reports are labelled (18 CT-RATE abnormalities); per pair, ``tp`` = abnormalities in both, ``fp`` = only in the
generated report, ``fn`` = only in the reference.

* ``score``: 5 when neither report has an abnormality, else ``1 + round(4 * tp / (tp + fp + fn))`` (Jaccard
  agreement of the abnormality sets mapped onto 1–5).
* ``findings_match``: matched findings = ``tp`` (or 1 when both reports are normal: "no abnormality" is the matched
  finding), significant errors (a) false finding = ``fp`` and (b) missing finding = ``fn``; the label set cannot see
  location, severity or comparisons, so (c)–(f) and all insignificant errors are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rrg3d.judge.base import Judge, JudgeResult
from rrg3d.judge.parsing import findings_match_score
from rrg3d.judge.prompts import ERROR_CATEGORIES, canonical_kind


class RuleJudge(Judge):
    """``RuleJudge(labeler=None)``: the labeler-agreement judge (``None`` loads the default labeler)."""

    def __init__(self, labeler: Any = None) -> None:
        if labeler is None:
            from rrg3d.text.labeler import load_labeler

            labeler = load_labeler(None)
        self.labeler = labeler
        self.id = f"rule:labeler-agreement-v1:{getattr(labeler, 'name', type(labeler).__name__)}"

    def evaluate(self, references: Sequence[str], candidates: Sequence[str], kind: str = "score",
                 progress: bool = False) -> list[JudgeResult]:
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        kind = canonical_kind(kind)
        if kind not in ("score", "findings_match"):
            raise ValueError(f"unknown judge prompt {kind!r}")
        if not candidates:
            return []
        labels = np.asarray(self.labeler.predict([*references, *candidates])).astype(bool)
        ref, cand = labels[: len(references)], labels[len(references):]
        tp = (ref & cand).sum(axis=1)
        fp = (~ref & cand).sum(axis=1)
        fn = (ref & ~cand).sum(axis=1)
        return [self._one(kind, int(a), int(b), int(c)) for a, b, c in zip(tp, fp, fn, strict=True)]

    @staticmethod
    def _one(kind: str, tp: int, fp: int, fn: int) -> JudgeResult:
        if kind == "score":
            score = 5.0 if tp + fp + fn == 0 else float(1 + round(4 * tp / (tp + fp + fn)))
            raw = f"Explanation: {tp} abnormalities agree, {fp} only generated, {fn} only in the reference.\n" \
                  f"Score: {score:g}"
            return JudgeResult(score, True, raw=raw, explanation=raw.split("\n")[0][len("Explanation: "):])
        matched = tp if tp + fp + fn else 1
        letters = [letter for letter, _ in ERROR_CATEGORIES]
        significant = dict.fromkeys(letters, 0)
        significant["a"], significant["b"] = fp, fn
        counts = {"significant": significant, "insignificant": dict.fromkeys(letters, 0), "matched": matched,
                  "missing": []}
        return JudgeResult(findings_match_score(matched, fp + fn), True, raw=None, counts=counts)
