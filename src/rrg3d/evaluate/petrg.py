"""PETRG-Score: region-wise PET (uptake) and CT (structure) agreement of generated PET/CT reports (PETRG-3D).

Each report — generated and reference — is turned into a PET status and a CT status for each of the 24 regions of
:mod:`rrg3d.text.petrg` (an unmentioned region is normal). The statuses of all patient × region pairs are pooled and
four macro-F1 scores computed, the reference statuses being the truth:

- ``pet_all``: macro-F1 over the 5 PET classes; ``pet_abnormal``: over the 4 that are not ``normal`` (marked,
  mild/equivocal, physiological, reduced);
- ``ct_all``: over the 8 CT classes; ``ct_abnormal``: over the 7 that are not ``normal``.

A class's F1 is ``2 TP / (2 TP + FP + FN)`` over the pooled pairs (0 when it is predicted but never true, or true but
never predicted). A class that occurs in neither the references nor the generated reports has no F1 and is left out
of the mean (as scikit-learn's ``f1_score(..., zero_division=np.nan)``); a score whose every class is left out is
``None``. Per region, the confusion matrices (rows: reference, columns: generated) are reported too.

Bootstrap CIs resample patients: each patient's statistics are its per-class TP/FP/FN counts summed over its
regions, so a resample's scores are exact (:class:`~rrg3d.evaluate.bootstrap.Statistic`), and ``--compare`` gives
paired deltas through the same statistics.

Extractors: :class:`~rrg3d.text.petrg.RuleExtractor` (``rule``, offline default) or :class:`LLMExtractor`, any
language model behind the judge framework (``http:MODEL@BASE_URL``, ``local``, ``local:PATH``), asked with a prompt in
rrg3d's words for a JSON object of region → statuses; the answer is read strictly (unknown regions and classes are
recorded as problems and count as normal) and cached in the judge cache.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rrg3d.evaluate.bootstrap import Statistic, mean_statistic
from rrg3d.text.petrg import (
    CT_CLASSES,
    NORMAL,
    PET_CLASSES,
    PETRG_REGIONS,
    REGION_NAMES,
    Extraction,
    RuleExtractor,
    check_statuses,
    normal_statuses,
)

log = logging.getLogger(__name__)

__all__ = ["AXES", "SCORES", "LLMExtractor", "MemoExtractor", "build_prompt", "evaluate_petrg", "make_extractor",
           "parse_answer", "petrg_scores", "petrg_statistics"]

AXES: dict[str, tuple[str, ...]] = {"pet": PET_CLASSES, "ct": CT_CLASSES}
#: score name → (axis, classes averaged)
SCORES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pet_all": ("pet", PET_CLASSES),
    "pet_abnormal": ("pet", tuple(c for c in PET_CLASSES if c != NORMAL)),
    "ct_all": ("ct", CT_CLASSES),
    "ct_abnormal": ("ct", tuple(c for c in CT_CLASSES if c != NORMAL)),
}
Statuses = Mapping[str, Mapping[str, str]]


# --------------------------------------------------------------------------------------------------------- metric


def _regions_of(n: int, regions: Sequence[Sequence[str]] | None) -> list[Sequence[str]]:
    if regions is None:
        return [PETRG_REGIONS] * n
    if len(regions) != n:
        raise ValueError(f"{len(regions)} region lists for {n} patients")
    return list(regions)


def _status(statuses: Statuses, region: str, axis: str) -> str:
    return (statuses.get(region) or {}).get(axis, NORMAL)


def _counts(references: Sequence[Statuses], candidates: Sequence[Statuses], axis: str,
            regions: Sequence[Sequence[str]] | None) -> np.ndarray:
    """``(n, 3K)`` per-patient TP, FP and FN of each class of ``axis`` over the patient's regions."""
    classes = AXES[axis]
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    out = np.zeros((len(references), 3 * k), dtype=np.float64)
    for p, (ref, cand, names) in enumerate(zip(references, candidates, _regions_of(len(references), regions),
                                               strict=True)):
        for region in names:
            truth, guess = index[_status(ref, region, axis)], index[_status(cand, region, axis)]
            if truth == guess:
                out[p, truth] += 1
            else:
                out[p, k + guess] += 1
                out[p, 2 * k + truth] += 1
    return out


def _per_class_f1(sums: np.ndarray, k: int) -> np.ndarray:
    tp, fp, fn = sums[..., :k], sums[..., k:2 * k], sums[..., 2 * k:]
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), np.nan)


def _macro(sums: np.ndarray, k: int, columns: Sequence[int]) -> np.ndarray:
    f1 = _per_class_f1(sums, k)[..., list(columns)]
    defined = np.isfinite(f1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined.any(-1), np.where(defined, f1, 0).sum(-1) / defined.sum(-1), np.nan)


def _reducer(k: int, columns: Sequence[int]) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda sums, n: _macro(sums, k, columns)


def petrg_statistics(references: Sequence[Statuses], candidates: Sequence[Statuses],
                     regions: Sequence[Sequence[str]] | None = None) -> dict[str, Statistic]:
    """The four scores as bootstrap :class:`Statistic`\\ s over patients (keys of :data:`SCORES`)."""
    counts = {axis: _counts(references, candidates, axis, regions) for axis in AXES}
    out = {}
    for name, (axis, classes) in SCORES.items():
        columns = [AXES[axis].index(c) for c in classes]
        out[name] = Statistic(counts[axis], _reducer(len(AXES[axis]), columns))
    return out


def _confusion(references: Sequence[Statuses], candidates: Sequence[Statuses], axis: str,
               regions: Sequence[Sequence[str]] | None) -> dict[str, np.ndarray]:
    classes = AXES[axis]
    index = {c: i for i, c in enumerate(classes)}
    per_region: dict[str, np.ndarray] = {}
    for ref, cand, names in zip(references, candidates, _regions_of(len(references), regions), strict=True):
        for region in names:
            matrix = per_region.setdefault(region, np.zeros((len(classes), len(classes)), dtype=np.int64))
            matrix[index[_status(ref, region, axis)], index[_status(cand, region, axis)]] += 1
    return {region: per_region[region] for region in PETRG_REGIONS if region in per_region}


def _value(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def petrg_scores(references: Sequence[Statuses], candidates: Sequence[Statuses],
                 regions: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """The four scores, per-class precision/recall/F1 and confusion matrices (pooled and per region).

    ``regions``: the regions scored for each patient (default: all 24 for everyone).
    """
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference and {len(candidates)} generated status sets")
    statistics = petrg_statistics(references, candidates, regions)
    out: dict[str, Any] = {name: _value(stat.value()) for name, stat in statistics.items()}
    out["per_class"] = {}
    out["confusion"] = {}
    for axis, classes in AXES.items():
        k = len(classes)
        sums = statistics["pet_all" if axis == "pet" else "ct_all"].stats.sum(axis=0)
        tp, fp, fn = sums[:k], sums[k:2 * k], sums[2 * k:]
        f1 = _per_class_f1(sums, k)
        out["per_class"][axis] = {
            cls: {"precision": _value(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else None,
                  "recall": _value(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else None,
                  "f1": _value(f1[i]), "support": int(tp[i] + fn[i]), "predicted": int(tp[i] + fp[i])}
            for i, cls in enumerate(classes)}
        per_region = _confusion(references, candidates, axis, regions)
        pooled = sum(per_region.values(), np.zeros((k, k), dtype=np.int64))
        out["confusion"][axis] = {"classes": list(classes), "rows": "reference", "columns": "generated",
                                  "pooled": pooled.tolist(),
                                  "per_region": {region: m.tolist() for region, m in per_region.items()}}
    out["n_patients"] = len(references)
    out["n_region_pairs"] = int(sum(len(r) for r in _regions_of(len(references), regions)))
    return out


# ------------------------------------------------------------------------------------------------ LLM extractor

PROMPT_VERSION = "petrg-v1"
_REGION_LINES = "\n".join(f"- {region}: {REGION_NAMES[region]}" for region in PETRG_REGIONS)

PROMPT_TEMPLATE = """\
You are a nuclear medicine physician. Read the PET/CT report below and write down, for every body region it \
describes as abnormal or with notable tracer uptake, the PET status and the CT status that the report gives it.

Regions (use these ids exactly):
{regions}

PET status (FDG uptake), one of:
- marked_uptake: clearly increased, intense or hypermetabolic uptake
- mild_uptake: mild, slight, low-grade or equivocal uptake
- physiological: uptake the report calls physiological or expected
- reduced: decreased, absent or photopenic uptake
- normal: nothing said about uptake in the region

CT status (structure), one of:
- enlarged_node: enlarged or pathological lymph nodes
- focal_lesion: a nodule, mass, tumour or metastasis (outside bone)
- lung_parenchymal_change: consolidation, ground-glass opacity, atelectasis, emphysema, fibrosis and similar
- wall_thickening: thickening of a bowel, bladder, esophageal or bronchial wall
- calcification: calcified plaques or other calcification
- bone_lesion: lytic, sclerotic or destructive bone lesion
- other: any other structural abnormality (effusion, hernia, cyst, fracture, enlarged organ, ...)
- normal: no structural abnormality

Rules: findings the report denies ("no ...", "without ...") do not count. When a region has several findings, give \
the most severe status: for PET marked_uptake > mild_uptake > reduced > physiological > normal; for CT bone_lesion > \
focal_lesion > enlarged_node > lung_parenchymal_change > wall_thickening > other > calcification > normal. Regions you \
leave out count as normal on both.

Report:
{report}

Answer with one JSON object and nothing else, for example:
{"lung": {"pet": "marked_uptake", "ct": "focal_lesion"}, "heart": {"pet": "physiological", "ct": "normal"}}
"""


def build_prompt(report: str) -> str:
    """The extraction prompt for one report."""
    prompt = PROMPT_TEMPLATE.replace("{regions}", _REGION_LINES)
    return prompt.replace("{report}", (report or "").strip() or "(empty)")


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_answer(answer: str | None) -> Extraction:
    """Statuses from a model's answer, read strictly (never raises). Unparseable → all normal, ``parse_ok=False``."""
    text = (answer or "").strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return Extraction(normal_statuses(), ["no JSON object in the answer"], parse_ok=False, raw=answer)
    try:
        data = json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        return Extraction(normal_statuses(), [f"invalid JSON ({exc.msg})"], parse_ok=False, raw=answer)
    if isinstance(data, dict) and set(data) == {"regions"} and isinstance(data["regions"], dict):
        data = data["regions"]
    statuses, problems = check_statuses(data)
    return Extraction(statuses, problems, parse_ok=isinstance(data, dict), raw=answer)


class LLMExtractor:
    """Region statuses from a language model of the judge framework (``complete(prompt)`` and its answer cache)."""

    def __init__(self, judge: Any) -> None:
        from rrg3d.judge.base import LLMJudge

        if not isinstance(judge, LLMJudge):
            raise TypeError(f"the PETRG extractor needs a language-model judge, got {type(judge).__name__}")
        self.judge = judge
        self.name = f"llm:{judge.id}|{PROMPT_VERSION}"

    def _ask(self, prompt: str) -> tuple[str, str | None]:
        try:
            return self.judge.complete(prompt), None
        except Exception as exc:  # a failed call is a recorded result, never a crash
            log.debug("PETRG extraction call failed", exc_info=True)
            return "", f"{type(exc).__name__}: {exc}"

    def extract_many(self, texts: Sequence[str | None], progress: bool = False) -> list[Extraction]:
        """One :class:`Extraction` per text; cached answers are reused, failed calls give all-normal statuses."""
        from rrg3d.judge.cache import cache_key

        cache = self.judge.cache
        results: list[Extraction | None] = [None] * len(texts)
        todo: list[tuple[int, str]] = []
        for i, text in enumerate(texts):
            key = cache_key(self.judge.id, PROMPT_VERSION, text or "", "")
            answer = cache.get(key) if cache is not None else None
            if answer is not None:
                results[i] = parse_answer(answer)
                results[i].cached = True  # type: ignore[union-attr]
            else:
                todo.append((i, key))
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="PETRG extraction", unit="report", leave=False)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.judge.concurrency) as pool:
                futures = {pool.submit(self._ask, build_prompt(texts[i] or "")): (i, key) for i, key in todo}
                for future in concurrent.futures.as_completed(futures):
                    i, key = futures[future]
                    answer, error = future.result()
                    if error is not None:
                        results[i] = Extraction(normal_statuses(), [f"extraction failed: {error}"], parse_ok=False,
                                                error=error)
                    else:
                        if cache is not None:
                            cache.put(key, answer, self.judge.id, PROMPT_VERSION)
                        results[i] = parse_answer(answer)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [r if r is not None else Extraction(normal_statuses(), ["not extracted"], parse_ok=False)
                for r in results]

    def close(self) -> None:
        self.judge.close()


class MemoExtractor:
    """Wraps an extractor so that a text is extracted once per evaluation (references shared by systems)."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor
        self.name = getattr(extractor, "name", type(extractor).__name__)
        self._seen: dict[str, Extraction] = {}

    def extract_many(self, texts: Sequence[str | None], progress: bool = False) -> list[Extraction]:
        new = sorted({t or "" for t in texts} - set(self._seen))
        for text, result in zip(new, self.extractor.extract_many(new, progress=progress), strict=True):
            self._seen[text] = result
        return [self._seen[t or ""] for t in texts]

    def close(self) -> None:
        if hasattr(self.extractor, "close"):
            self.extractor.close()


def make_extractor(spec: str = "rule", *, cache: Any = True, concurrency: int = 4, timeout: float = 60.0,
                   retries: int = 3) -> Any:
    """``rule`` → :class:`RuleExtractor`; a language-model judge spec (``http:MODEL@BASE_URL``, ``local``,
    ``local:PATH``) → :class:`LLMExtractor` with the judge cache (``cache`` as in :func:`rrg3d.judge.make_judge`)."""
    from rrg3d.judge import JudgeError, make_judge

    spec = (spec or "rule").strip()
    if spec == "rule":
        return RuleExtractor()
    if spec == "label":
        raise JudgeError("--petrg-extractor: 'label' is not a language model (use rule, http:MODEL@BASE_URL, local "
                         "or local:PATH)")
    return LLMExtractor(make_judge(spec, cache=cache, concurrency=concurrency, timeout=timeout, retries=retries))


# ------------------------------------------------------------------------------------------------------ evaluation


def _extract(extractor: Any, texts: Sequence[str], usable: Sequence[bool], progress: bool) -> list[Extraction]:
    """Extractions of the usable texts; the rest (failed or missing predictions) are all normal."""
    wanted = [t for t, ok in zip(texts, usable, strict=True) if ok and (t or "").strip()]
    found = iter(extractor.extract_many(wanted, progress=progress)) if wanted else iter(())
    return [next(found) if ok and (t or "").strip() else Extraction(normal_statuses())
            for t, ok in zip(texts, usable, strict=True)]


def _summary(extractions: Sequence[Extraction]) -> dict[str, int]:
    return {"problems": sum(len(e.problems) for e in extractions),
            "parse_failures": sum(1 for e in extractions if not e.parse_ok and e.error is None),
            "errors": sum(1 for e in extractions if e.error is not None),
            "cached": sum(1 for e in extractions if e.cached)}


def evaluate_petrg(ids: Sequence[str], references: Sequence[str], candidates: Sequence[str], status: Sequence[str],
                   extractor: Any, truths: Sequence[Statuses | None] | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """PETRG-Score of one system (see the module doc) and, where references carry truth, the extractor against it.

    Returns ``{"metrics", "statistics", "per_sample", "details", "warnings", "truth_statistics"}``: ``metrics`` is
    the ``metrics.json`` entry, ``statistics`` the bootstrap statistics of the four scores (``petrg.*``),
    ``truth_statistics`` those of ``extractor_vs_truth`` (empty without truth).
    """
    ref = _extract(extractor, references, [True] * len(references), progress)
    cand = _extract(extractor, candidates, [s == "ok" for s in status], progress)
    ref_statuses = [e.statuses for e in ref]
    cand_statuses = [e.statuses for e in cand]
    metrics = petrg_scores(ref_statuses, cand_statuses)
    metrics["extractor"] = getattr(extractor, "name", type(extractor).__name__)
    metrics["extraction"] = {"reference": _summary(ref), "generated": _summary(cand)}
    statistics = {f"petrg.{name}": stat for name, stat in petrg_statistics(ref_statuses, cand_statuses).items()}
    per_sample = {}
    for axis in AXES:
        agree = [np.mean([_status(r, region, axis) == _status(c, region, axis) for region in PETRG_REGIONS])
                 for r, c in zip(ref_statuses, cand_statuses, strict=True)]
        per_sample[f"petrg.{axis}_agreement"] = np.asarray(agree, dtype=np.float64)
    statistics.update({f"petrg.{axis}_agreement": mean_statistic(per_sample[f"petrg.{axis}_agreement"])
                       for axis in AXES})
    details = [{"reference": r.abnormal(), "generated": c.abnormal(),
                **({"problems": r.problems + c.problems} if r.problems or c.problems else {})}
               for r, c in zip(ref, cand, strict=True)]
    warnings = []
    for side, summary in metrics["extraction"].items():
        if summary["parse_failures"] or summary["errors"]:
            warnings.append(f"PETRG extraction ({side}): {summary['parse_failures']} unparseable answers and "
                            f"{summary['errors']} failed calls counted as all-normal reports")
    truth_statistics: dict[str, Statistic] = {}
    if truths is not None and any(t for t in truths):
        rows = [i for i, t in enumerate(truths) if t]
        checked = [check_statuses(truths[i], fill=False)[0] for i in rows]
        regions = [list(t) for t in checked]
        extracted = [ref_statuses[i] for i in rows]
        agreement = petrg_scores(checked, extracted, regions)
        agreement["note"] = ("the extractor's statuses of the reference reports against the truth field 'petrg' of "
                             "the references, over the regions each truth lists")
        agreement["ids_with_truth"] = len(rows)
        metrics["extractor_vs_truth"] = agreement
        truth_statistics = {f"petrg_truth.{name}": stat
                            for name, stat in petrg_statistics(checked, extracted, regions).items()}
        for i in rows:
            details[i]["truth_disagreements"] = {
                region: {"truth": status, "extracted": dict(ref_statuses[i][region])}
                for region, status in check_statuses(truths[i], fill=False)[0].items()
                if dict(status) != dict(ref_statuses[i][region])}
    for i, sample_id in enumerate(ids):
        details[i] = {"id": sample_id, **details[i]}
    return {"metrics": metrics, "statistics": statistics, "per_sample": per_sample, "details": details,
            "warnings": warnings, "truth_statistics": truth_statistics}


def ci_entries(ci: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The CIs of the four scores under ``prefix`` (``petrg`` or ``petrg_truth``) keyed by score name."""
    return {name: ci[f"{prefix}.{name}"] for name in SCORES if f"{prefix}.{name}" in ci}
