"""A verifiable judge: a candidate report's 18 abnormality labels against the study's truth.

The candidate is labelled by the abnormality labeler (18 CT-RATE abnormalities). The truth is the study's own labels
where the manifest has them (``truths``: the phantoms' labels are exact, CT-RATE's manual labels are close), and the
reference report's labels otherwise. Labels the truth leaves unknown (NaN or missing) are not counted. Per candidate,
``fp`` = abnormalities stated that the truth lacks (hallucinated), ``fn`` = true abnormalities not stated (omitted).

* ``score``, by the judge's ``mode``:

  - ``errors`` (spec ``label``): ``max(1, 5 − (fp + fn))`` — 5 when every known label agrees, one point off per
    wrong abnormality, 1 from four errors on. With the usual preference threshold of 3, a candidate is preferred when
    it gets at most two abnormalities wrong. An error is an error whichever side it is on, so where a model's stated
    findings are mostly wrong, dropping findings raises the score: the reward favours saying less.
  - ``f1`` (spec ``label:f1``): ``1 + 4 · F1`` with the study's ``F1 = 2·tp / (2·tp + fp + fn)`` (1 when the truth
    and the candidate both state no abnormality) — 5 when every known label agrees, 1 when no stated abnormality is
    true. A threshold of 3 prefers a candidate whose F1 is at least 0.5. The per-study twin of the CE micro-F1: a
    correct finding counts twice, so stating a finding pays when it is likely enough to be right, and saying nothing
    about an abnormal study scores 1.
  - ``fβ`` (spec ``label:f0.5``, any β > 0): ``1 + 4 · Fβ`` with ``Fβ = (1+β²)·tp / ((1+β²)·tp + β²·fn + fp)``.
    β < 1 weighs hallucinations more than omissions (β = 0.5: a hallucinated finding costs four times an omitted
    one) while a true finding still scores: the reward for "state what is there, not what is not".
* ``findings_match``: as the rule judge's (matched = ``tp``, or 1 when both sides are normal; significant errors
  (a) false finding = ``fp``, (b) missing finding = ``fn``).

No model and no cache: the same answer every time, computed in microseconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from rrg3d.judge.base import Judge, JudgeResult
from rrg3d.judge.prompts import canonical_kind
from rrg3d.judge.rule import RuleJudge

#: the score of a candidate with no wrong abnormality; each error costs one point down to the floor
TOP_SCORE, FLOOR = 5.0, 1.0
#: an ``f<β>`` mode (``f1``, ``f0.5``, ``f2``); the other mode is ``errors`` (the module doc)
_FBETA = re.compile(r"^f(?P<beta>\d+(?:\.\d+)?)$")


def label_score(fp: int, fn: int) -> float:
    """The ``errors`` score (1–5) of a candidate with ``fp`` hallucinated and ``fn`` omitted abnormalities."""
    return max(FLOOR, TOP_SCORE - float(fp + fn))


def fbeta_score(tp: int, fp: int, fn: int, beta: float = 1.0) -> float:
    """The ``fβ`` score (1–5) of a candidate: ``1 + 4 · Fβ`` over the study's known labels (5 when neither the truth
    nor the candidate has an abnormality)."""
    if tp + fp + fn == 0:
        return TOP_SCORE
    b2 = float(beta) ** 2
    return FLOOR + (TOP_SCORE - FLOOR) * (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)


def f1_score(tp: int, fp: int, fn: int) -> float:
    """The ``f1`` score (1–5): :func:`fbeta_score` with β = 1."""
    return fbeta_score(tp, fp, fn, 1.0)


def check_mode(mode: str) -> float | None:
    """β of an ``f<β>`` mode, None for ``errors``; ValueError for anything else."""
    if mode == "errors":
        return None
    match = _FBETA.match(str(mode))
    if match is None or float(match["beta"]) <= 0:
        raise ValueError(f"unknown label-judge mode {mode!r} (use errors, or f<beta> with beta > 0: f1, f0.5, f2)")
    return float(match["beta"])


def mode_score(mode: str, tp: int, fp: int, fn: int) -> float:
    """The 1–5 score of a candidate's counts under ``mode``."""
    beta = check_mode(mode)
    return label_score(fp, fn) if beta is None else fbeta_score(tp, fp, fn, beta)


def truth_matrix(truths: Sequence[Sequence[float] | None], n_labels: int) -> np.ndarray:
    """Rows of 0/1/NaN (NaN: unknown) from per-study vectors; a missing vector is a row of NaN."""
    rows = np.full((len(truths), n_labels), np.nan)
    for i, truth in enumerate(truths):
        if truth is None:
            continue
        values = np.asarray([np.nan if v is None else float(v) for v in truth], dtype=float)
        if values.shape != (n_labels,):
            raise ValueError(f"truth {i}: expected {n_labels} labels, got {values.shape}")
        rows[i] = values
    return rows


class LabelJudge(Judge):
    """``LabelJudge(labeler=None, mode="errors")``; :meth:`evaluate` takes ``truths`` (per pair a vector of the
    labeler's labels, 0/1/NaN, or None for "use the reference's labels")."""

    uses_truth = True

    def __init__(self, labeler: Any = None, mode: str = "errors") -> None:
        check_mode(mode)
        if labeler is None:
            from rrg3d.text.labeler import load_labeler

            labeler = load_labeler(None)
        self.labeler = labeler
        self.mode = mode
        self.id = f"label:{mode}-v1:{getattr(labeler, 'name', type(labeler).__name__)}"

    @property
    def label_names(self) -> tuple[str, ...]:
        from rrg3d.evaluate.clinical import label_names

        return tuple(label_names(self.labeler))

    def counts(self, references: Sequence[str], candidates: Sequence[str],
               truths: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """``[n, 3]`` counts (tp, fp, fn) per candidate over the labels the truth knows."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        if truths is not None and len(truths) != len(candidates):
            raise ValueError(f"{len(truths)} truth vectors but {len(candidates)} candidates")
        if not candidates:
            return np.zeros((0, 3), dtype=int)
        predicted = np.asarray(self.labeler.predict(list(candidates))).astype(bool)
        n_labels = predicted.shape[1]
        truth = truth_matrix(truths or [None] * len(candidates), n_labels)
        missing = np.isnan(truth).all(axis=1)
        if missing.any():  # no truth for these: the reference report's labels stand in
            index = np.flatnonzero(missing)
            truth[index] = np.asarray(self.labeler.predict([references[i] or "" for i in index]), dtype=float)
        known = ~np.isnan(truth)
        positive = (truth == 1) & known
        negative = (truth == 0) & known
        tp = (predicted & positive).sum(axis=1)
        fp = (predicted & negative).sum(axis=1)
        fn = (~predicted & positive).sum(axis=1)
        return np.stack([tp, fp, fn], axis=1)

    def evaluate(self, references: Sequence[str], candidates: Sequence[str], kind: str = "score",
                 progress: bool = False, truths: Sequence[Sequence[float] | None] | None = None
                 ) -> list[JudgeResult]:
        kind = canonical_kind(kind)
        if kind not in ("score", "findings_match"):
            raise ValueError(f"unknown judge prompt {kind!r}")
        results = []
        for tp, fp, fn in self.counts(references, candidates, truths).tolist():
            if kind == "findings_match":
                results.append(RuleJudge._one(kind, tp, fp, fn))
                continue
            score = mode_score(self.mode, tp, fp, fn)
            explanation = f"{tp} true abnormalities stated, {fp} stated but absent, {fn} present but not stated"
            results.append(JudgeResult(score, True, raw=f"Explanation: {explanation}.\nScore: {score:g}",
                                       explanation=explanation, counts={"tp": tp, "fp": fp, "fn": fn}))
        return results


def labels_known(truth: Sequence[float] | None) -> bool:
    """Whether a truth vector knows at least one label."""
    return truth is not None and any(v is not None and not math.isnan(float(v)) for v in truth)
