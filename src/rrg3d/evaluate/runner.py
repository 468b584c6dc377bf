"""The whole evaluation of a predictions file: pairing, NLG, CE, regions, judge, lengths, CIs, comparison, outputs.

:func:`score_system` scores one system on paired texts; :func:`evaluate_files` does everything ``rrg3d evaluate``
does and writes ``metrics.json``, ``metrics.md``, ``per_sample.csv``, ``lengths.png`` and ``report.html`` (see
:mod:`rrg3d.evaluate.render`). Temperature sweeps and averages over repeated generation runs are not here yet:
evaluate each run and aggregate the ``metrics.json`` files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.evaluate.bootstrap import Statistic, bootstrap_all, mean_statistic, paired_bootstrap, ratio_statistic
from rrg3d.evaluate.clinical import (
    REGIONS,
    clinical_efficacy,
    covered_regions,
    load_default_labeler,
    mentioned_regions,
    region_ce,
    region_recognition,
    slot_recognition,
)
from rrg3d.evaluate.lengths import length_analysis, word_counts
from rrg3d.evaluate.nlg import NLGResult, language_plan, nlg_metrics
from rrg3d.evaluate.records import Paired, load_predictions, load_references, pair

log = logging.getLogger(__name__)

#: The line that says why region recognition and region CE are left out (references with region reports, predictions
#: without any).
NO_REGION_REPORTS = ("no region reports in the predictions: region recognition and clinical efficacy per region not "
                     "computed")


@dataclasses.dataclass
class EvaluateOptions:
    """Settings of one evaluation (the ``rrg3d evaluate`` options)."""

    judge: str | None = None
    judge_prompts: tuple[str, ...] = ("score", "findings_match")
    judge_cache: str | os.PathLike[str] | bool | None = True
    judge_concurrency: int = 4
    judge_timeout: float = 60.0
    judge_retries: int = 3
    labeler_model: str | None = None
    labeler: Any = None  # an explicit labeler object (overrides labeler_model)
    bootstrap: int = 1000
    seed: int = 0
    missing: str = "score-empty"
    java: bool = True
    progress: bool = True
    compare: str | os.PathLike[str] | None = None
    petrg: bool = False  # PETRG-Score (PET/CT region statuses, rrg3d.evaluate.petrg)
    petrg_extractor: str = "rule"  # rule, or a language-model judge spec
    lang: str = "en"  # report language: "en" or "zh" (per-character NLG; English-rule metrics skipped)


@dataclasses.dataclass
class SystemScores:
    """Everything computed for one system."""

    name: str
    paired: Paired
    metrics: dict[str, Any]
    per_sample: dict[str, np.ndarray]
    statistics: dict[str, Statistic]
    warnings: list[str]
    implementation: dict[str, Any]
    timings: dict[str, float]
    judge_details: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    petrg_details: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    petrg_truth_statistics: dict[str, Statistic] = dataclasses.field(default_factory=dict)


def _judge_summary(kind: str, values: np.ndarray, valid: np.ndarray, results: list[Any], sent: int,
                   not_sent: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "mean": float(values[valid].mean()) if valid.any() else None,
        "n_scored": int(valid.sum()), "n_sent": sent,
        "n_not_sent": not_sent,
        "parse_failures": sum(1 for r in results if r.error is None and not r.parse_ok),
        "errors": sum(1 for r in results if r.error is not None),
        "cached": sum(1 for r in results if r.cached),
    }
    if kind == "score":
        rounded = np.rint(values[valid]).astype(int)
        summary["histogram"] = {str(k): int((rounded == k).sum()) for k in range(1, 6)}
    else:
        totals: dict[str, Any] = {"significant": {}, "insignificant": {}, "matched": 0}
        for result in results:
            if result.counts:
                for group in ("significant", "insignificant"):
                    for letter, count in result.counts[group].items():
                        totals[group][letter] = totals[group].get(letter, 0) + count
                totals["matched"] += result.counts["matched"]
        summary.update(totals)
    return summary


def _run_judge(scores: SystemScores, judge: Any, prompts: tuple[str, ...], progress: bool) -> None:
    paired = scores.paired
    sent = [i for i, s in enumerate(paired.status) if s == "ok"]
    out: dict[str, Any] = {"id": judge.id, "prompts": {}}
    from rrg3d.judge.prompts import canonical_kind, prompt_version

    for kind in dict.fromkeys(canonical_kind(k) for k in prompts):  # deprecated aliases → current names, once each
        start = time.perf_counter()
        results = judge.evaluate([paired.references[i] for i in sent], [paired.candidates[i] for i in sent], kind,
                                 progress=progress)
        n = len(paired.ids)
        values = np.full(n, np.nan)
        valid = np.zeros(n, dtype=bool)
        details: list[dict[str, Any]] = [{"status": "not sent (no usable prediction)"} for _ in range(n)]
        failed_value = 1.0 if kind == "score" else 0.0
        for i, status in enumerate(paired.status):
            if status != "ok":
                values[i], valid[i] = failed_value, True
        for i, result in zip(sent, results, strict=True):
            details[i] = result.as_dict()
            if result.score is not None:
                values[i], valid[i] = result.score, True
        scores.per_sample[f"judge.{kind}"] = values
        scores.judge_details[kind] = details
        scores.statistics[f"judge.{kind}"] = ratio_statistic(np.where(valid, values, 0.0), valid.astype(float))
        summary = _judge_summary(kind, values, valid, results, len(sent), n - len(sent))
        summary["prompt_version"] = prompt_version(kind)
        summary["seconds"] = time.perf_counter() - start
        out["prompts"][kind] = summary
        if summary["parse_failures"] or summary["errors"]:
            scores.warnings.append(f"judge {kind}: {summary['parse_failures']} unparseable answers, "
                                   f"{summary['errors']} failed calls (left out of the mean)")
    if any(paired.status[i] != "ok" for i in range(len(paired.ids))):
        out["note"] = ("reports without a usable prediction are not sent: they score 1 (score) and 0 "
                       "(findings_match)")
    scores.metrics["judge"] = out


def _run_petrg(scores: SystemScores, extractor: Any, progress: bool) -> None:
    from rrg3d.evaluate.petrg import evaluate_petrg

    paired = scores.paired
    start = time.perf_counter()
    result = evaluate_petrg(paired.ids, paired.references, paired.candidates, paired.status, extractor,
                            paired.reference_petrg or None, progress=progress)
    scores.metrics["petrg"] = result["metrics"]
    scores.per_sample.update(result["per_sample"])
    scores.statistics.update(result["statistics"])
    scores.warnings.extend(result["warnings"])
    scores.petrg_details = result["details"]
    scores.petrg_truth_statistics = result["truth_statistics"]
    scores.timings["petrg"] = time.perf_counter() - start


def score_system(name: str, paired: Paired, labeler: Any, judge: Any = None,
                 options: EvaluateOptions | None = None, petrg: Any = None) -> SystemScores:
    """All metrics of one system on paired texts (``petrg``: a PETRG status extractor, to add PETRG-Score)."""
    options = options or EvaluateOptions()
    plan = language_plan(options.lang)

    def labelling() -> tuple[Any, float]:  # runs while METEOR 1.5 is still busy in Java
        start = time.perf_counter()
        return clinical_efficacy(paired.references, paired.candidates, labeler), time.perf_counter() - start

    nlg: NLGResult = nlg_metrics(paired.references, paired.candidates, java=options.java,
                                 progress=options.progress, meanwhile=labelling if plan.english_rules else None,
                                 lang=plan.lang)
    metrics: dict[str, Any] = {"coco": nlg.coco, "extra": nlg.extra}
    per_sample = dict(nlg.per_sample)
    statistics = dict(nlg.statistics)
    warnings = list(nlg.warnings) + list(plan.skipped)
    timings = {f"nlg.{k}": v for k, v in nlg.timings.items()}
    implementation = dict(nlg.implementation)

    if plan.english_rules:
        ce, timings["ce"] = nlg.meanwhile
        metrics["ce"] = ce.metrics
        metrics["ce"]["labeler"] = getattr(labeler, "name", type(labeler).__name__)
        per_sample.update(ce.per_sample)
        statistics.update(ce.statistics)

    if any(paired.candidate_recognition):  # a region-guided model named the region of each slot it was shown
        recognition = slot_recognition(paired.candidate_recognition)
        recognition["source"] = "region-guided model: the region named for each region shown (region_recognition)"
        if any(paired.reference_regions) and plan.english_rules:
            metrics["ce_regions"] = region_ce(paired.reference_regions, paired.candidate_regions, labeler)
    elif any(paired.reference_regions) and not any(paired.candidate_regions):
        # every generated region set would be empty: the tables would be zeros that measure nothing
        recognition = None
        warnings.append(NO_REGION_REPORTS)
    elif any(paired.reference_regions):
        if plan.english_rules:
            metrics["ce_regions"] = region_ce(paired.reference_regions, paired.candidate_regions, labeler)
        recognition = region_recognition([covered_regions(r) for r in paired.reference_regions],
                                         [covered_regions(r) for r in paired.candidate_regions])
        recognition["source"] = "region reports"
    elif plan.english_rules:
        recognition = region_recognition([mentioned_regions(t) for t in paired.references],
                                         [mentioned_regions(t) for t in paired.candidates], regions=REGIONS)
        recognition["source"] = "regions mentioned in the report text (keyword rules)"
    else:
        recognition = None
    if recognition is not None:
        metrics["region_recognition"] = recognition

    if plan.english_rules:
        ref_len, gen_len = word_counts(paired.references), word_counts(paired.candidates)
    else:
        ref_len, gen_len = plan.lengths(paired.references), plan.lengths(paired.candidates)
    metrics["lengths"] = length_analysis(ref_len, gen_len)
    if plan.length_unit != "words":
        metrics["lengths"]["unit"] = plan.length_unit
    per_sample["lengths.reference"] = ref_len
    per_sample["lengths.generated"] = gen_len
    statistics["lengths.generated_mean"] = mean_statistic(gen_len)
    statistics["lengths.reference_mean"] = mean_statistic(ref_len)

    scores = SystemScores(name, paired, metrics, per_sample, statistics, warnings, implementation, timings)
    if petrg is not None:
        _run_petrg(scores, petrg, options.progress)
        if not plan.english_rules and str(getattr(petrg, "name", "")).startswith("rule"):
            scores.warnings.append(f"lang {plan.lang}: the rule PETRG extractor reads English reports only; its "
                                   "statuses of these reports are all normal (use --petrg-extractor with a "
                                   "language-model judge)")
    if judge is not None:
        start = time.perf_counter()
        _run_judge(scores, judge, options.judge_prompts, options.progress)
        timings["judge"] = time.perf_counter() - start
        if not plan.english_rules and str(getattr(judge, "id", "")).startswith(("rule:", "label:")):
            scores.warnings.append(f"lang {plan.lang}: the {judge.id.split(':')[0]} judge reads reports with the "
                                   "English labeler; its scores are not meaningful for this language")
    return scores


def _labeler(options: EvaluateOptions) -> Any:
    if options.labeler is not None:
        return options.labeler
    return load_default_labeler(options.labeler_model)


def _paired_comparison(a: SystemScores, b: SystemScores, options: EvaluateOptions) -> dict[str, Any]:
    rows_a = {i: k for k, i in enumerate(a.paired.ids)}
    rows_b = {i: k for k, i in enumerate(b.paired.ids)}
    common = [i for i in a.paired.ids if i in rows_b]
    index_a = np.array([rows_a[i] for i in common], dtype=int)
    index_b = np.array([rows_b[i] for i in common], dtype=int)
    out = {}
    for name in a.statistics:
        if name not in b.statistics or name.startswith("lengths.reference"):
            continue
        stat_a = Statistic(a.statistics[name].stats[index_a], a.statistics[name].reduce, a.statistics[name].method)
        stat_b = Statistic(b.statistics[name].stats[index_b], b.statistics[name].reduce, b.statistics[name].method)
        out[name] = paired_bootstrap(stat_a, stat_b, options.bootstrap or 1000, options.seed)
    return {"n_common": len(common), "metrics": out}


def evaluate_files(predictions: str | os.PathLike[str], references: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str], options: EvaluateOptions | None = None) -> dict[str, Any]:
    """Run the full evaluation and write its outputs into ``out_dir``; returns the ``metrics.json`` content."""
    from rrg3d import __version__
    from rrg3d.evaluate.render import write_outputs

    options = options or EvaluateOptions()
    started = time.perf_counter()
    refs, without = load_references(references)
    paired = pair(refs, load_predictions(predictions), options.missing, without)
    labeler = _labeler(options)
    judge = None
    if options.judge:
        from rrg3d.judge import make_judge

        judge = make_judge(options.judge, cache=options.judge_cache, labeler=labeler,
                           concurrency=options.judge_concurrency, timeout=options.judge_timeout,
                           retries=options.judge_retries)
    petrg = None
    if options.petrg:
        from rrg3d.evaluate.petrg import MemoExtractor, make_extractor

        petrg = MemoExtractor(make_extractor(options.petrg_extractor, cache=options.judge_cache,
                                             concurrency=options.judge_concurrency, timeout=options.judge_timeout,
                                             retries=options.judge_retries))
    try:
        system = score_system(Path(predictions).name, paired, labeler, judge, options, petrg)
        other = None
        if options.compare:
            paired_b = pair(refs, load_predictions(options.compare), options.missing, without)
            other = score_system(Path(options.compare).name, paired_b, labeler, judge, options, petrg)
    finally:
        if judge is not None:
            judge.close()
        if petrg is not None:
            petrg.close()

    start = time.perf_counter()
    ci = bootstrap_all(system.statistics, options.bootstrap, options.seed) if options.bootstrap > 0 else {}
    system.timings["bootstrap"] = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "rrg3d_version": __version__,
        "predictions": str(predictions),
        "references": str(references),
        "counts": paired.counts,
        "problems": {k: v for k, v in paired.problems.items() if v},
        **system.metrics,
        "ci": ci,
    }
    metrics["ci_settings"] = {"n_resamples": options.bootstrap, "seed": options.seed, "level": 0.95,
                              "method": "percentile bootstrap over samples"}
    if "petrg" in metrics:
        from rrg3d.evaluate.petrg import ci_entries

        metrics["petrg"]["ci"] = ci_entries(ci, "petrg")
        if system.petrg_truth_statistics and options.bootstrap > 0:
            truth_ci = bootstrap_all(system.petrg_truth_statistics, options.bootstrap, options.seed)
            metrics["petrg"]["extractor_vs_truth"]["ci"] = ci_entries(truth_ci, "petrg_truth")
    if other is not None:
        metrics["compare"] = {"predictions": str(options.compare), "counts": other.paired.counts,
                              **{k: v for k, v in other.metrics.items()},
                              "paired_bootstrap": _paired_comparison(system, other, options)}
    metrics["implementation"] = system.implementation
    metrics["warnings"] = system.warnings + ([f"compare: {w}" for w in other.warnings] if other else [])
    system.timings["total"] = time.perf_counter() - started
    metrics["timings_seconds"] = system.timings
    write_outputs(Path(out_dir), metrics, system, other)
    return metrics
