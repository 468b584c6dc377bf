"""Time every non-judge metric of ``rrg3d evaluate`` on 1,000 report pairs of about 200 words.

Texts: real chest CT reports from ``../shared/data/reports/ctrate_labeled_reports_train.csv`` (read at run time,
never stored), cut at sentence ends to about 200 words; each reference is paired with a different report as the
"generated" one. Without the shared data, deterministic synthetic report-like texts are used instead.

Measured in one fresh process (the METEOR JVM starts cold), restricted to 2 CPU cores where the OS allows it:
the NLG metrics (coco: PTB tokenisation, BLEU-1..4, METEOR 1.5 in its Java process beside the Python metrics,
ROUGE-L, CIDEr-D; extra: rouge-score, sacreBLEU, NLTK METEOR), clinical efficacy with the default labeler, the
length analysis, and 1,000-resample bootstrap CIs of every metric. Target: under 60 s in total.

    python benchmarks/nlg.py [--pairs 1000] [--words 200] [--synthetic] [--out benchmarks/results/nlg.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0

_SENTENCES = (
    "The trachea and both main bronchi are patent.", "No mediastinal or hilar lymphadenopathy is seen.",
    "Heart size is within normal limits and there is no pericardial effusion.",
    "The thoracic aorta has a normal calibre with scattered atherosclerotic calcifications.",
    "Coronary artery calcifications are present.", "A {n} mm nodule is seen in the {lobe}.",
    "There is a small {side} pleural effusion.", "No pleural effusion or pleural thickening is present.",
    "Subsegmental atelectasis is noted in the {lobe}.", "Centrilobular emphysema is seen in both upper lobes.",
    "Patchy ground-glass opacities are present in the {lobe}.", "Consolidation is seen in the {lobe}.",
    "Mild bronchiectasis and peribronchial thickening are noted in the lower lobes.",
    "Interlobular septal thickening is seen at the lung bases.", "Fibrotic bands are present in the {lobe}.",
    "A small hiatal hernia is present.", "The esophagus has a normal course and wall thickness.",
    "The visible upper abdominal organs are unremarkable.", "The liver has a normal size and attenuation.",
    "Degenerative changes are seen in the thoracic vertebrae.", "Bone structures are otherwise unremarkable.",
    "A mosaic attenuation pattern is seen in both lungs.", "A central venous catheter is in place.",
    "The thyroid gland is normal in size.", "No focal lesion is seen in the adrenal glands.",
)
_LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")


def synthetic_report(rng: random.Random, words: int) -> str:
    """A report-like text of about ``words`` words from a fixed sentence bank (deterministic given ``rng``)."""
    parts: list[str] = []
    count = 0
    while count < words:
        sentence = rng.choice(_SENTENCES).format(n=rng.randint(3, 18), lobe=rng.choice(_LOBES),
                                                 side=rng.choice(("right", "left")))
        parts.append(sentence)
        count += len(sentence.split())
    return "Findings: " + " ".join(parts) + " Impression: " + rng.choice(_SENTENCES[:4])


def trim(text: str, words: int) -> str:
    """Whole sentences from the start of ``text`` until about ``words`` words."""
    out, count = [], 0
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        if count >= words:
            break
        out.append(sentence)
        count += len(sentence.split())
    return " ".join(out)


def shared_reports() -> list[str] | None:
    env = os.environ.get("RRG3D_SHARED_DATA")
    for root in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        path = root / "reports" / "ctrate_labeled_reports_train.csv"
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as handle:
                return [row["report_text"] for row in csv.DictReader(handle) if row.get("report_text", "").strip()]
    return None


def make_pairs(n: int, words: int, seed: int = 0, synthetic: bool = False) -> tuple[list[str], list[str], str]:
    reports = None if synthetic else shared_reports()
    if reports and len(reports) > 10:
        texts = [trim(t, words) for t in reports]
        refs = [texts[i % len(texts)] for i in range(n)]
        cands = [texts[(i * 7 + 3) % len(texts)] if (i * 7 + 3) % len(texts) != i % len(texts)
                 else texts[(i + 1) % len(texts)] for i in range(n)]
        return refs, cands, "CT-RATE reports (shared data), trimmed at sentence ends"
    rng = random.Random(seed)
    refs = [synthetic_report(rng, words) for _ in range(n)]
    cands = [synthetic_report(rng, words) for _ in range(n)]
    return refs, cands, "synthetic report-like texts" + ("" if synthetic else " (shared data not found)")


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process, and of its reaped children (the METEOR and PTB JVMs)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def limit_cores(count: int = 2) -> int:
    """Pin this process (and the JVMs it starts) to ``count`` cores where supported; returns the cores used."""
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) > count:
            os.sched_setaffinity(0, cores[:count])
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true", help="synthetic texts even when the shared data exists")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nlg.json"))
    args = parser.parse_args(argv)
    cores = limit_cores(args.cores)
    refs, cands, source = make_pairs(args.pairs, args.words, synthetic=args.synthetic)
    mean_words = sum(len(t.split()) for t in refs + cands) / (2 * len(refs))

    from rrg3d.evaluate.bootstrap import bootstrap_all
    from rrg3d.evaluate.clinical import clinical_efficacy, load_default_labeler
    from rrg3d.evaluate.lengths import length_analysis, word_counts
    from rrg3d.evaluate.meteor import close_shared_meteor
    from rrg3d.evaluate.nlg import nlg_metrics
    from rrg3d.evaluate.render import jsonable

    labeler = None
    try:
        labeler = load_default_labeler(None)
    except ImportError as exc:
        print(f"CE skipped: labeler unavailable ({exc})", file=sys.stderr)

    def labelling() -> tuple[object, float]:
        start = time.perf_counter()
        result = clinical_efficacy(refs, cands, labeler) if labeler is not None else None
        return result, time.perf_counter() - start

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    nlg = nlg_metrics(refs, cands, progress=False, meanwhile=labelling)
    steps = {f"nlg: {k}": v for k, v in nlg.timings.items() if k != "total"}
    ce, steps["clinical efficacy (labeler, beside METEOR)"] = nlg.meanwhile
    steps["nlg + CE (wall)"] = nlg.timings["total"]
    statistics = dict(nlg.statistics)
    values: dict[str, float | None] = {f"coco.{k}": v for k, v in nlg.coco.items()}
    values.update({f"extra.rouge_score.{k}": v for k, v in nlg.extra["rouge_score"].items()})
    values["extra.sacrebleu"] = nlg.extra["sacrebleu"]
    values["extra.meteor_nltk"] = nlg.extra["meteor_nltk"]
    if ce is not None:
        statistics.update(ce.statistics)
        values.update({f"ce.{k}": ce.metrics[k] for k in ("micro_f1", "macro_f1")})

    start = time.perf_counter()
    lengths = length_analysis(word_counts(refs), word_counts(cands))
    steps["lengths (KDE, KL)"] = time.perf_counter() - start
    start = time.perf_counter()
    ci = bootstrap_all(statistics, n_resamples=1000, seed=0)
    steps["bootstrap CIs (1000 resamples, all metrics)"] = time.perf_counter() - start
    total = time.perf_counter() - started
    close_shared_meteor()  # reaps the JVM, so its CPU time is counted below
    cpu_after = cpu_seconds()
    cpu_python, cpu_java = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    width = max(len(k) for k in steps)
    print(f"{args.pairs} pairs, mean {mean_words:.0f} words, {source}; {cores} cores")
    print(f"{'step':<{width}}  seconds")
    for name, seconds in steps.items():
        print(f"{name:<{width}}  {seconds:7.2f}")
    print(f"{'TOTAL (wall)':<{width}}  {total:7.2f}  ({'PASS' if total < TARGET_SECONDS else 'FAIL'}: target "
          f"< {TARGET_SECONDS:.0f} s)")
    print(f"{'CPU: Python (all threads)':<{width}}  {cpu_python:7.2f}")
    print(f"{'CPU: Java (PTB tokenizer + METEOR 1.5)':<{width}}  {cpu_java:7.2f}")
    print(f"load average before/after: {load_before} / {load_after} (other jobs on the machine slow the wall time)")
    print()
    for name, value in values.items():
        interval = ci.get(name, {})
        shown = "n/a" if value is None else f"{value:.4f}"
        bounds = f"[{interval['low']:.4f}, {interval['high']:.4f}]" if interval.get("low") is not None else ""
        print(f"{name:<28} {shown:>9}  {bounds}")
    result = {
        "pairs": args.pairs, "mean_words": mean_words, "texts": source, "cores": cores,
        "python": platform.python_version(), "machine": platform.machine(),
        "seconds_total": total, "cpu_seconds": {"python": cpu_python, "java": cpu_java},
        "load_average_before_after": [load_before, load_after],
        "target_seconds": TARGET_SECONDS, "passed": total < TARGET_SECONDS,
        "seconds_by_step": steps, "values": values,
        "ci95": {k: [ci[k]["low"], ci[k]["high"]] for k in values if k in ci},
        "lengths": lengths, "warnings": nlg.warnings,
        "note": "METEOR 1.5 runs in one Java process beside the Python metrics; its time overlaps theirs",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(result), indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten {out}")
    return 0 if total < TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
