"""Clinical efficacy (CE): abnormality-label agreement between generated and reference reports; region recognition.

**CE** — a labeler (anything with ``predict(texts) -> (n, L)`` 0/1 array; by default
``rrg3d.text.labeler.load_labeler``, the 18 CT-RATE abnormalities) labels both reports of every pair, and the
generated labels are scored against the reference labels:

* per label: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = harmonic mean; an undefined ratio (no
  positives) is ``zero_division`` (0, as scikit-learn's default);
* micro: the same on TP/FP/FN summed over labels and samples;
* macro: the unweighted mean of the per-label values.

Labels come from the same labeler on both sides (manual reference labels, where a manifest has them, are not mixed
with labeler output). Region-level CE repeats this per anatomical region where reference region reports exist.

**Region recognition** (Reg2RG) — did the generated report cover the regions the reference covers? Per region over
studies: TP = in both, FP = only generated, FN = only reference; P/R/F1 per region, micro and macro. Region sets
come from region reports (``region_reports`` / predicted ``regions``; a region text that starts with Reg2RG's
"The region k is <area>" prefix counts as recognising that area) or, without them, from the regions a report
mentions (:func:`mentioned_regions`, keyword rules for the ten RadGenome-ChestCT regions).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from rrg3d.evaluate.bootstrap import Statistic


class Labeler(Protocol):
    def predict(self, texts: Sequence[str]) -> np.ndarray: ...


def load_default_labeler(model_dir: str | None = None) -> Labeler:
    """``rrg3d.text.labeler.load_labeler(model_dir)`` (the rule labeler when ``model_dir`` is ``None``)."""
    from rrg3d.text.labeler import load_labeler

    return load_labeler(model_dir)


def label_names(labeler: Any = None) -> tuple[str, ...]:
    names = getattr(labeler, "labels", None) or getattr(labeler, "label_names", None)
    if names and not callable(names):
        return tuple(str(n) for n in names)
    from rrg3d.text.labels import CTRATE_LABELS

    return CTRATE_LABELS


# ----------------------------------------------------------------------------------------------------- P/R/F1

def _divide(numerator: np.ndarray, denominator: np.ndarray, zero_division: float) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, zero_division)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, zero_division: float) -> tuple[np.ndarray, ...]:
    precision = _divide(tp, tp + fp, zero_division)
    recall = _divide(tp, tp + fn, zero_division)
    f1 = _divide(2 * tp, 2 * tp + fp + fn, zero_division)
    return precision, recall, f1


def prf_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, names: Sequence[str],
                    zero_division: float = 0.0) -> dict[str, Any]:
    """Micro, macro and per-name P/R/F1 from per-name TP/FP/FN counts."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    precision, recall, f1 = _prf(tp, fp, fn, zero_division)
    micro_p, micro_r, micro_f = (float(x) for x in _prf(tp.sum(), fp.sum(), fn.sum(), zero_division))
    per = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(tp[i] + fn[i]), "predicted": int(tp[i] + fp[i]),
                  "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i])} for i, name in enumerate(names)}
    return {"micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f,
            "macro_precision": float(precision.mean()) if len(names) else 0.0,
            "macro_recall": float(recall.mean()) if len(names) else 0.0,
            "macro_f1": float(f1.mean()) if len(names) else 0.0, "per_label": per}


def sample_counts(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample, per-label ``(n, L, 3)`` counts of TP, FP, FN."""
    predicted = np.asarray(predicted).astype(bool)
    reference = np.asarray(reference).astype(bool)
    if predicted.shape != reference.shape:
        raise ValueError(f"label arrays differ in shape: {predicted.shape} vs {reference.shape}")
    return np.stack([predicted & reference, predicted & ~reference, ~predicted & reference], axis=-1).astype(
        np.float64)


def label_metrics(predicted: np.ndarray, reference: np.ndarray, names: Sequence[str] | None = None,
                  zero_division: float = 0.0) -> dict[str, Any]:
    """CE P/R/F1 (micro, macro, per label) of generated-report labels against reference-report labels."""
    counts = sample_counts(predicted, reference)
    names = list(names) if names is not None else [f"label_{i}" for i in range(counts.shape[1])]
    totals = counts.sum(axis=0)
    out = prf_from_counts(totals[:, 0], totals[:, 1], totals[:, 2], names, zero_division)
    out["n"] = int(counts.shape[0])
    return out


def _ce_reduce(sums: np.ndarray, n: int, n_labels: int, which: str, zero_division: float) -> np.ndarray:
    counts = np.asarray(sums).reshape(*np.shape(sums)[:-1], n_labels, 3)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    average, metric = which.split("_")
    if average == "micro":
        p, r, f = _prf(tp.sum(-1), fp.sum(-1), fn.sum(-1), zero_division)
    else:
        p, r, f = (x.mean(-1) for x in _prf(tp, fp, fn, zero_division))
    return {"precision": p, "recall": r, "f1": f}[metric]


CE_KEYS = ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "macro_precision", "macro_recall")


def ce_statistics(predicted: np.ndarray, reference: np.ndarray, zero_division: float = 0.0,
                  prefix: str = "ce.") -> dict[str, Statistic]:
    """Bootstrap statistics of the six CE summary metrics (exact: TP/FP/FN per label add up over samples)."""
    counts = sample_counts(predicted, reference)
    n_labels = counts.shape[1]
    flat = counts.reshape(counts.shape[0], -1)
    return {f"{prefix}{key}": Statistic(flat, functools.partial(_ce_reduce, n_labels=n_labels, which=key,
                                                                zero_division=zero_division)) for key in CE_KEYS}


def sample_f1(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample F1 of the abnormality sets (1.0 when both reports have none)."""
    counts = sample_counts(predicted, reference).sum(axis=1)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 1.0)


@dataclasses.dataclass
class CEResult:
    metrics: dict[str, Any]
    predicted: np.ndarray
    reference: np.ndarray
    statistics: dict[str, Statistic]
    per_sample: dict[str, np.ndarray]


def clinical_efficacy(references: Sequence[str], candidates: Sequence[str], labeler: Labeler,
                      names: Sequence[str] | None = None, zero_division: float = 0.0,
                      reference_labels: np.ndarray | None = None) -> CEResult:
    """Label both sides with ``labeler`` (or take ``reference_labels``) and compute CE."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    names = tuple(names) if names is not None else label_names(labeler)
    texts = list(candidates) if reference_labels is not None else [*references, *candidates]
    labels = np.asarray(labeler.predict(texts)) if texts else np.zeros((0, len(names)), dtype=np.int8)
    if reference_labels is None:
        reference, predicted = labels[: len(references)], labels[len(references):]
    else:
        reference, predicted = np.asarray(reference_labels), labels
    if predicted.ndim != 2 or predicted.shape[1] != len(names):
        raise ValueError(f"labeler returned shape {predicted.shape}, expected (n, {len(names)})")
    metrics = label_metrics(predicted, reference, names, zero_division)
    counts = sample_counts(predicted, reference).sum(axis=1)
    per_sample = {"ce.tp": counts[:, 0], "ce.fp": counts[:, 1], "ce.fn": counts[:, 2],
                  "ce.f1": sample_f1(predicted, reference)}
    return CEResult(metrics, predicted.astype(np.int8), reference.astype(np.int8),
                    ce_statistics(predicted, reference, zero_division), per_sample)


# ---------------------------------------------------------------------------------------------------- regions

#: The ten RadGenome-ChestCT regions (canonical names) and keyword rules for mentions in free text.
REGION_PATTERNS: dict[str, str] = {
    "abdomen": r"abdom\w*|liver|hepat\w*|spleen|splenic|kidneys?|renal|adrenal|pancrea\w*|gall ?bladder|stomach",
    "bones": r"bones?|bony|osseous|vertebra\w*|ribs?|sternum|spine|spinal|skelet\w*|clavicles?|scapula\w*",
    "breasts": r"breasts?|mammary",
    "esophagus": r"o?esophag\w*",
    "heart": r"heart|cardiac|cardio\w*|pericard\w*|coronary",
    "lungs": r"lungs?|pulmonary|parenchyma\w*|lobes?|lobar|nodules?|emphysema\w*|atelecta\w*|consolidation"
             r"|ground[- ]glass|bronchiectasis",
    "mediastinum": r"mediastin\w*|lymph nodes?|lymphadenopathy|hil(?:ar|um|a)|thymus|prevascular|paratracheal"
                   r"|subcarinal",
    "pleura": r"pleura\w*",
    "thyroid": r"thyroid",
    "trachea and bronchi": r"trachea\w*|bronch(?!iectasis)\w*|airways?",
}
REGIONS = tuple(REGION_PATTERNS)
_REGION_RE = {name: re.compile(r"\b(?:" + pattern + r")\b", re.IGNORECASE) for name, pattern in REGION_PATTERNS.items()}
_ALIASES = {"lung": "lungs", "bone": "bones", "breast": "breasts", "oesophagus": "esophagus",
            "trachea & bronchi": "trachea and bronchi", "tra. & bro.": "trachea and bronchi",
            "trachea and bronchie": "trachea and bronchi", "trachea bronchi": "trachea and bronchi",
            "airway": "trachea and bronchi", "airways": "trachea and bronchi", "pleural": "pleura",
            "abdominal": "abdomen", "cardiac": "heart", "mediastinal": "mediastinum"}
_PREFIX = re.compile(r"^\s*the\s+region\s*\[?\s*\d*\s*\]?\s+is\s+(?:the\s+)?([a-z&.,' -]+?)\s*(?:[.:;,\n]|$)",
                     re.IGNORECASE)


def canonical_region(name: str) -> str:
    """Lower-case region name with RadGenome aliases merged (``lung`` → ``lungs``, ``Tra. & Bro.`` → …)."""
    key = re.sub(r"\s+", " ", str(name).replace("_", " ").strip().lower())
    return _ALIASES.get(key, key)


def region_prefix(text: str | None) -> tuple[str | None, str]:
    """Split Reg2RG's "The region k is <area>." prefix off a region report: ``(area or None, rest)``."""
    match = _PREFIX.match(text or "")
    if not match:
        return None, text or ""
    return canonical_region(match.group(1)), (text or "")[match.end():].strip()


def mentioned_regions(text: str | None) -> set[str]:
    """The RadGenome regions a report mentions (keyword rules; negated mentions count — the region is covered)."""
    return {name for name, pattern in _REGION_RE.items() if pattern.search(text or "")}


def covered_regions(regions: Mapping[str, str] | None) -> set[str]:
    """Regions with a non-empty report in a region dict; a Reg2RG prefix names the recognised area."""
    out = set()
    for key, text in (regions or {}).items():
        if not isinstance(text, str) or not text.strip():
            continue
        area, _ = region_prefix(text)
        out.add(area or canonical_region(key))
    return out


def region_recognition(reference_sets: Sequence[set[str]], generated_sets: Sequence[set[str]],
                       regions: Sequence[str] | None = None, zero_division: float = 0.0) -> dict[str, Any]:
    """Per-region P/R/F1 of the regions covered by generated vs reference reports (plus micro and macro)."""
    if len(reference_sets) != len(generated_sets):
        raise ValueError("reference and generated region sets differ in length")
    names = list(regions) if regions is not None else sorted(set().union(*reference_sets, *generated_sets))
    index = {name: i for i, name in enumerate(names)}
    tp, fp, fn = (np.zeros(len(names)) for _ in range(3))
    for ref, gen in zip(reference_sets, generated_sets, strict=True):
        for name in ref | gen:
            if name not in index:
                continue
            i = index[name]
            tp[i] += name in ref and name in gen
            fp[i] += name in gen and name not in ref
            fn[i] += name in ref and name not in gen
    out = prf_from_counts(tp, fp, fn, names, zero_division)
    out["per_region"] = out.pop("per_label")
    out["n"] = len(reference_sets)
    return out


def slot_recognition(recognitions: Sequence[Mapping[str, str | None] | None], regions: Sequence[str] | None = None,
                     zero_division: float = 0.0) -> dict[str, Any]:
    """Region recognition of a region-guided model from what it named each region it was shown (Reg2RG's
    measure, per slot): for region ``r`` shown and named ``n``, ``n == r`` is a true positive of ``r``; otherwise a
    false negative of ``r`` and (when it named something) a false positive of ``n``. P/R/F1 per region, micro,
    macro; names compared in canonical form (whole names)."""
    shown: list[str] = []
    named: list[str | None] = []
    for recognition in recognitions:
        for region, name in (recognition or {}).items():
            shown.append(canonical_region(region))
            named.append(canonical_region(name) if isinstance(name, str) and name.strip() else None)
    names = list(regions) if regions is not None else sorted(set(shown))
    index = {name: i for i, name in enumerate(names)}
    tp, fp, fn = (np.zeros(len(names)) for _ in range(3))
    for truth, guess in zip(shown, named, strict=True):
        if guess == truth:
            if truth in index:
                tp[index[truth]] += 1
            continue
        if truth in index:
            fn[index[truth]] += 1
        if guess is not None and guess in index:
            fp[index[guess]] += 1
    out = prf_from_counts(tp, fp, fn, names, zero_division)
    out["per_region"] = out.pop("per_label")
    out["n"] = sum(1 for r in recognitions if r)
    out["slots"] = len(shown)
    out["unnamed_slots"] = sum(1 for n in named if n is None)
    return out


def region_ce(reference_regions: Sequence[Mapping[str, str] | None], generated_regions: Sequence[Mapping[str, str]
              | None], labeler: Labeler, names: Sequence[str] | None = None,
              zero_division: float = 0.0) -> dict[str, Any]:
    """CE per region, over the studies whose reference has a report for that region (missing generated = empty)."""
    names = tuple(names) if names is not None else label_names(labeler)
    jobs: list[tuple[str, str, str]] = []
    for ref_regions, gen_regions in zip(reference_regions, generated_regions, strict=True):
        generated = {}
        for key, text in (gen_regions or {}).items():
            if isinstance(text, str):
                area, rest = region_prefix(text)
                generated.setdefault(area or canonical_region(key), rest)
        for key, text in (ref_regions or {}).items():
            if isinstance(text, str) and text.strip():
                region = canonical_region(key)
                jobs.append((region, region_prefix(text)[1], generated.get(region, "")))
    if not jobs:
        return {}
    labels = np.asarray(labeler.predict([j[1] for j in jobs] + [j[2] for j in jobs]))
    reference, predicted = labels[: len(jobs)], labels[len(jobs):]
    out: dict[str, Any] = {}
    regions = np.array([j[0] for j in jobs])
    for region in sorted(set(regions)):
        mask = regions == region
        metrics = label_metrics(predicted[mask], reference[mask], names, zero_division)
        out[region] = {key: metrics[key] for key in (*CE_KEYS, "n")}
    pooled = label_metrics(predicted, reference, names, zero_division)
    out["all_regions"] = {key: pooled[key] for key in (*CE_KEYS, "n")}
    return out
