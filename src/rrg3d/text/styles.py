"""Style-adaptive prompts (PETRG-3D): per hospital and sex, a normal-study report written in that hospital's style.

Hospitals word and lay out their reports differently; a model trained on several must be told which style to write.
PETRG-3D puts, in the prompt, a normal report of the same hospital (and sex) between template tags. rrg3d builds the
templates from the *training* split of a manifest (:func:`build_style_templates`): for each ``style`` (hospital) and
sex, the report of a normal study — all 18 abnormality labels 0, and every PETRG region normal where the
manifest has that truth (PET phantoms) — of median length in that group, so the template is typical rather than the
shortest or the longest; a group without a normal study takes its least abnormal studies instead. ``any`` holds a
template for the style whatever the sex, used when a study's sex is unknown (a missing sex never fails).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rrg3d.errors import RRG3DError

SEXES = ("female", "male")
log = logging.getLogger(__name__)


def abnormality_count(record: Mapping[str, Any]) -> int | None:
    """How abnormal a record says its study is: positive labels plus PETRG regions with a non-normal status; None
    when the record has neither labels nor PETRG truth (unknown)."""
    labels = record.get("labels") or {}
    truth = record.get("petrg") or {}
    if not labels and not truth:
        return None
    count = sum(1 for value in labels.values() if value == 1)
    for status in truth.values():
        if isinstance(status, Mapping):
            count += status.get("pet") not in (None, "normal", "physiological")
            count += status.get("ct") not in (None, "normal")
    return count


def build_style_templates(manifest: str | os.PathLike[str], *, splits: str | Sequence[str] = "train",
                          field: str = "report") -> dict[str, dict[str, str]]:
    """Templates ``{style: {"female"|"male"|"any": report}}`` from ``splits``; ``field`` is the text the model is
    trained to write (whole report or a section). Per group, the candidates are the studies with the fewest
    abnormalities (normal ones when the group has any; studies without labels count as unknown and are used only
    when nothing else is), and the template is the one of median length. Raises when no study has a style."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.train.data import normalize_sex, record_text

    wanted = {splits} if isinstance(splits, str) else set(splits)
    groups: dict[str, dict[str, list[tuple[float, str]]]] = defaultdict(lambda: defaultdict(list))
    for record in load_manifest(manifest):
        style = record.get("style")
        if record.get("split") not in wanted or not isinstance(style, str) or not style:
            continue
        text = record_text(record, field)
        if not isinstance(text, str) or not text.strip():
            continue
        count = abnormality_count(record)
        rank = float("inf") if count is None else float(count)
        for key in (normalize_sex(record.get("sex")) or "unknown", "any"):
            groups[style][key].append((rank, text.strip()))
    if not groups:
        raise RRG3DError(f"{manifest}: no study of split(s) {sorted(wanted)} has a style and a {field!r} text: style "
                         "prompts need 'style' (the hospital) in the manifest")
    templates: dict[str, dict[str, str]] = {}
    for style, by_key in sorted(groups.items()):
        templates[style] = {}
        for key, ranked in sorted(by_key.items()):
            if key == "unknown":
                continue
            best = min(rank for rank, _ in ranked)
            templates[style][key] = median_length([text for rank, text in ranked if rank == best])
            if best:
                log.info("%s: style %s (%s) has no normal study; its template has the fewest abnormalities (%s)",
                         manifest, style, key, "unknown" if best == float("inf") else int(best))
    return templates


def median_length(texts: Sequence[str]) -> str:
    """The text of median word count (ties: the first in sorted order, so the choice is deterministic)."""
    ranked = sorted(texts, key=lambda t: (len(t.split()), t))
    return ranked[(len(ranked) - 1) // 2]


def pick_template(templates: Mapping[str, Mapping[str, str]], style: str | None, sex: str | None, *,
                  where: str = "study") -> str:
    """The template of ``style`` for ``sex`` (else the style's ``any``); a clear error for a missing or unknown
    style."""
    if not templates:
        raise RRG3DError("this model has a style prompt but no style templates (prompt.style_templates); a training "
                         "run fills them from its training split")
    known = ", ".join(sorted(templates))
    if not style:
        raise RRG3DError(f"{where}: no reporting style given; this model writes in the styles {known} (set the "
                         "study's 'style', --style, or prompt.default_style)")
    if style not in templates:
        raise RRG3DError(f"{where}: unknown reporting style {style!r}; this model knows {known}")
    by_sex = templates[style]
    if sex in SEXES and sex in by_sex:
        return by_sex[sex]
    if "any" in by_sex:
        return by_sex["any"]
    return next(iter(by_sex.values()))


_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def style_features(text: str) -> list[str]:
    """What a reporting style is made of, as tokens: words and bigrams (wording), punctuation and digits (notation),
    and each line's opening token and the section order (layout: headers, numbered lists, ``ORGAN:`` lines)."""
    features: list[str] = []
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        words = _TOKEN.findall(line.lower())
        features += words
        features += [f"{a}_{b}" for a, b in itertools.pairwise(words)]
        if words:
            features.append(f"^{words[0]}")
            if line.split(":")[0].isupper():
                features.append("^UPPER_HEADER")
    features.append(f"#lines={min(len(lines), 12)}")
    sections = [w.lower() for w in re.findall(r"\b(Findings|Impression)\s*:", text)]
    features.append("order=" + ">".join(sections))
    return features


class StyleClassifier:
    """A multinomial naive-Bayes classifier of a report's style (hospital) from :func:`style_features`: what
    ``benchmarks/petct.py`` uses to check that a model writes in the style it was asked for. Fit on the reports of
    the training split; :meth:`accuracy` on references first (how well styles can be told apart at all)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self.styles: list[str] = []
        self.log_prior: np.ndarray | None = None
        self.log_likelihood: dict[str, np.ndarray] = {}
        self.log_unseen: np.ndarray | None = None

    def fit(self, texts: Sequence[str], styles: Sequence[str]) -> StyleClassifier:
        if len(texts) != len(styles) or not texts:
            raise ValueError("fit needs one style per text, and at least one text")
        self.styles = sorted(set(styles))
        index = {s: i for i, s in enumerate(self.styles)}
        counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(self.styles)))
        prior = np.zeros(len(self.styles))
        for text, style in zip(texts, styles, strict=True):
            prior[index[style]] += 1
            for feature in style_features(text):
                counts[feature][index[style]] += 1
        totals = sum(counts.values()) + self.alpha * (len(counts) + 1)
        self.log_prior = np.log(prior / prior.sum())
        self.log_likelihood = {f: np.log((c + self.alpha) / totals) for f, c in counts.items()}
        self.log_unseen = np.log(self.alpha / totals)
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely style of each text (an empty text: the most frequent style)."""
        if self.log_prior is None or self.log_unseen is None:
            raise ValueError("the style classifier is not fitted")
        out = []
        for text in texts:
            score = self.log_prior.copy()
            for feature in style_features(text or ""):
                score += self.log_likelihood.get(feature, self.log_unseen)
            out.append(self.styles[int(np.argmax(score))])
        return out

    def accuracy(self, texts: Sequence[str], styles: Sequence[str]) -> float:
        predicted = self.predict(texts)
        return float(np.mean([p == s for p, s in zip(predicted, styles, strict=True)])) if predicted else float("nan")
