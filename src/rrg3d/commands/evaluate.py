"""Evaluate generated reports against references: NLG (pycocoevalcap-identical coco set plus rouge-score,
sacreBLEU and NLTK METEOR), clinical efficacy over the 18 CT-RATE abnormalities, region recognition, optional LLM
or rule judge, report lengths (KDE, KL divergence), bootstrap 95% CIs, and a paired bootstrap against a second
predictions file.

PRED.jsonl has one {"id", "report", ...} per line (a record with "error" counts as a failed generation). REFS is a
manifest, a JSONL of {"id", "report"} or a CSV with id and report columns. DIR receives metrics.json, metrics.md,
per_sample.csv, lengths.png, report.html and, with --judge, judge.jsonl (every judge answer).

--lang zh scores Chinese reports per character (BLEU, ROUGE, CIDEr, NLTK METEOR; see rrg3d.evaluate.nlg) and
skips the English-rule parts (clinical efficacy, keyword region recognition); lengths are then in characters.

Judge specs: rule | http:MODEL@BASE_URL (API key from $RRG3D_JUDGE_API_KEY) | local | local:PATH.

--petrg adds PETRG-Score for PET/CT reports (PET-All, PET-Abnormal, CT-All, CT-Abnormal macro-F1 over patient x region
statuses of 24 regions, per-region confusion matrices, DIR/petrg.jsonl); the statuses are read by rules or, with
--petrg-extractor SPEC, by a language model (the judge specs above, with the judge cache). References carrying a
"petrg" truth field (PET phantoms) also get the extractor's agreement with that truth.
Exit 0 when the evaluation ran, even if some references had no usable prediction (missing or failed predictions
are counted and reported, see --missing; an empty report is a result, not a failure); 1 with --strict when any
reference had a missing or failed prediction; 2 when nothing could be evaluated (no prediction matches a reference,
every matched prediction failed, --missing fail with a failure, or bad arguments).
"""

from __future__ import annotations

import argparse
import sys

HELP = "score predicted reports against references (NLG, clinical efficacy, judges, lengths, CIs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PRED.jsonl", help="predictions JSONL ({id, report, ...} per line)")
    parser.add_argument("--refs", required=True, help="references: manifest, {id, report} JSONL, or CSV")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--judge", metavar="SPEC", help="also judge the reports: rule, http:MODEL@BASE_URL, local, "
                                                        "local:PATH")
    parser.add_argument("--judge-prompts", default="score,findings_match",
                        help="comma-separated judge prompts: score (1-5), findings_match (matched-findings rubric: "
                             "error counts, matched / (matched + significant errors); not the GREEN model; 'green' "
                             "is a deprecated alias) (default: both)")
    parser.add_argument("--judge-cache", default=None,
                        help="judge answer cache (sqlite file; default ~/.cache/rrg3d/judge_cache.sqlite; 'none' to "
                             "disable)")
    parser.add_argument("--judge-concurrency", type=int, default=4, help="parallel HTTP judge calls (default 4)")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per HTTP judge call (default 60)")
    parser.add_argument("--judge-retries", type=int, default=3, help="retries per HTTP judge call (default 3)")
    parser.add_argument("--compare", metavar="B.jsonl", help="second predictions file: paired bootstrap A - B")
    parser.add_argument("--petrg", action="store_true",
                        help="also compute PETRG-Score (PET/CT region statuses; see rrg3d.evaluate.petrg)")
    parser.add_argument("--petrg-extractor", default="rule", metavar="rule|SPEC",
                        help="how region statuses are read: rule (default) or a language model judge spec "
                             "(http:MODEL@BASE_URL, local, local:PATH); uses the judge cache and HTTP options")
    parser.add_argument("--labeler-model", metavar="DIR", help="learned labeler folder (default: the rule labeler)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for 95%% CIs (default 1000; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--missing", choices=("score-empty", "skip", "fail"), default="score-empty",
                        help="references without a usable prediction: score them as empty reports (default), "
                             "leave them out of the metrics, or fail")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any reference had a missing or failed prediction (default: 0 once it ran)")
    parser.add_argument("--no-java", action="store_true",
                        help="do not use Java (coco METEOR is then not computed; see extra.meteor_nltk)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--lang", choices=("en", "zh"), default="en",
                        help="report language: en (PTB words, pycocoevalcap; default) or zh (per character; "
                             "clinical efficacy and English keyword rules skipped)")


def run(args: argparse.Namespace) -> int:
    from rrg3d.errors import RRG3DError
    from rrg3d.evaluate.render import headline_rows
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files
    from rrg3d.judge.base import KINDS
    from rrg3d.judge.prompts import canonical_kind
    from rrg3d.utils.exits import batch_exit_code

    prompts = tuple(dict.fromkeys(canonical_kind(p.strip()) for p in args.judge_prompts.split(",") if p.strip()))
    unknown = [p for p in prompts if p not in KINDS]
    if unknown or not prompts:
        raise RRG3DError(f"--judge-prompts: unknown prompt(s) {unknown or prompts} (use {', '.join(KINDS)})")
    cache: object = True
    if args.judge_cache is not None:
        cache = False if args.judge_cache.strip().lower() in ("none", "off", "") else args.judge_cache
    if args.bootstrap < 0:
        raise RRG3DError("--bootstrap must be 0 or more")
    options = EvaluateOptions(judge=args.judge, judge_prompts=prompts, judge_cache=cache,  # type: ignore[arg-type]
                              judge_concurrency=max(1, args.judge_concurrency), judge_timeout=args.judge_timeout,
                              judge_retries=max(0, args.judge_retries), labeler_model=args.labeler_model,
                              bootstrap=args.bootstrap, seed=args.seed, missing=args.missing, java=not args.no_java,
                              progress=not args.no_progress and sys.stderr.isatty(), compare=args.compare,
                              petrg=args.petrg or args.petrg_extractor != "rule", petrg_extractor=args.petrg_extractor,
                              lang=args.lang)
    metrics = evaluate_files(args.predictions, args.refs, args.out, options)
    counts = metrics["counts"]
    print(f"{counts['scored']} of {counts['references']} references scored ({counts['ok']} usable predictions, "
          f"{counts['missing_predictions']} missing, {counts['empty_predictions']} empty, {counts['errors']} failed, "
          f"{counts['extra_predictions']} extra)")
    width = max((len(label) for label, *_ in headline_rows(metrics)), default=10)
    for label, _, value, ci in headline_rows(metrics):
        print(f"  {label:<{width}}  {value:>8}  {ci}")
    for warning in metrics.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    extra = (", judge.jsonl" if args.judge else "") + (", petrg.jsonl" if args.petrg else "")
    print(f"outputs in {args.out}: metrics.json, metrics.md, per_sample.csv, lengths.png, report.html{extra}")
    if counts["ok"] < counts["references"]:
        print("unusable predictions are listed under 'problems' in metrics.json",
              file=sys.stderr)
    failed = counts["missing_predictions"] + counts["errors"]  # empty reports are results, scored as such
    return batch_exit_code(counts["references"] - failed, failed, args.strict)
