"""Preference pairs for DPO: sample reports from an SFT checkpoint, score them with a judge, pair them.

    rrg3d prefs build phantoms/manifest.jsonl --model runs/sft/final --out prefs/pairs.jsonl
    rrg3d prefs build MANIFEST --model SFT --out PAIRS.jsonl --judge http:gpt-4o@https://api.openai.com/v1
    rrg3d prefs build MANIFEST --model SFT --out PAIRS_bw.jsonl --strategy best-worst \\
        --candidates PAIRS.jsonl.candidates.jsonl     # re-pair the same candidates, no sampling
    rrg3d prefs build MANIFEST --model SFT --out PAIRS_f1.jsonl --judge label:f1 \
        --rescore-from PAIRS.jsonl.candidates.jsonl   # the same candidates scored by another judge

Per training study: --samples reports at --temperature (seeded per study), each scored 1–5 by the judge
(label: the candidate's abnormality labels against the study's truth labels, or the reference's, 5 minus the wrong
ones; label:f1: 1 + 4 x the study's F1 of those labels; rule; local[:PATH]; http:MODEL@URL), then one pair: split
(a random candidate scoring >= --threshold chosen, one below rejected; --pairs-per-study K keeps up to K distinct
ones) or best-worst (the reference chosen when nothing reaches the threshold). Only the training split: val and test are
refused. Resumable: studies in the candidates file are skipped, judge answers cached; failures go to
PAIRS.jsonl.errors.jsonl and are retried next time. Train on the pairs with
`rrg3d train tiny_dpo data.pairs=PAIRS.jsonl model.init=SFT`.

Exit 0 when the batch ran, even if some studies failed (failures are recorded); 1 with --strict when any study
failed; 2 when nothing could run (every study failed, or bad arguments).
"""

from __future__ import annotations

import argparse
import json

from rrg3d.utils.exits import STRICT_HELP

HELP = "build judge-scored preference pairs for DPO from an SFT checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prefs_command", metavar="ACTION")
    build = sub.add_parser("build", help="sample, judge and pair reports for the studies of a manifest",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("manifest", metavar="MANIFEST", help="manifest JSONL (its training split is used)")
    build.add_argument("--model", required=True, metavar="SFT_CKPT", help="report-generator checkpoint (or run)")
    build.add_argument("--out", required=True, metavar="PAIRS.jsonl", help="the pairs file to write")
    build.add_argument("--judge", default="label", metavar="SPEC",
                       help="label (default: 5 − wrong abnormalities), label:f1 (1 + 4·F1 of the study), rule, "
                            "local[:PATH] or http:MODEL@BASE_URL")
    build.add_argument("--samples", type=int, default=6, help="reports sampled per study (default 6)")
    build.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    build.add_argument("--strategy", choices=("split", "best-worst"), default="split",
                       help="split: random >= threshold vs random < threshold (default); best-worst")
    build.add_argument("--threshold", type=float, default=3.0, help="score from which a candidate is good (3)")
    build.add_argument("--pairs-per-study", type=int, default=1, metavar="K",
                       help="split strategy: keep up to K distinct chosen/rejected pairs of a study (default 1)")
    build.add_argument("--split", default="train", help="the manifest split to use (never val or test)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--field", choices=("report", "findings", "impression"), default="report",
                       help="the reference text the model was trained to write (default report)")
    build.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's")
    build.add_argument("--candidates", default=None, metavar="PATH",
                       help="candidates file (default PAIRS.jsonl.candidates.jsonl); share it to re-pair")
    build.add_argument("--rescore-from", default=None, metavar="CANDIDATES",
                       help="another judge's candidates file of the same model and sampling settings: its candidates "
                            "are scored by --judge instead of being sampled again (compare judges on the same samples)")
    build.add_argument("--cache-dir", default=None, help="preprocessing cache root (default: on the fly)")
    build.add_argument("--limit", type=int, default=None, help="only the first N studies of the split (after --skip)")
    build.add_argument("--skip", type=int, default=0,
                       help="leave out the split's first N studies: those a finding classifier was fitted on "
                            "(data.fit_samples), where its calls are better than on unseen studies (default 0)")
    build.add_argument("--device", default=None, help="torch device (default cpu)")
    build.add_argument("--strict", action="store_true", help=STRICT_HELP)
    build.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rrg3d.errors import ConfigError

    if getattr(args, "prefs_command", None) != "build":
        raise ConfigError("usage: rrg3d prefs build MANIFEST --model SFT_CKPT --out PAIRS.jsonl (see --help)")
    from rrg3d.train.prefs import build_preferences
    from rrg3d.utils.exits import batch_exit_code

    summary = build_preferences(args.manifest, args.model, args.out, judge=args.judge, samples=args.samples,
                                temperature=args.temperature, strategy=args.strategy, threshold=args.threshold,
                                split=args.split, seed=args.seed, field=args.field,
                                max_new_tokens=args.max_new_tokens, candidates=args.candidates,
                                cache_dir=args.cache_dir, limit=args.limit, skip=args.skip, device=args.device,
                                progress=not args.no_progress, rescore_from=args.rescore_from,
                                pairs_per_study=args.pairs_per_study)
    rows = [("studies", summary.studies), ("sampled now", summary.sampled), ("resumed", summary.resumed),
            ("rescored", summary.rescored),
            ("failed", summary.failed), ("pairs", summary.pairs),
            *((f"dropped: {k}", v) for k, v in summary.dropped.items() if v),
            ("chosen = reference", summary.chosen_from_reference),
            ("mean score", "-" if summary.mean_score is None else f"{summary.mean_score:.3f}"),
            ("score histogram", json.dumps(summary.score_histogram)), ("minutes", f"{summary.seconds / 60:.1f}")]
    for name, value in rows:
        print(f"{name:28s} {value}")
    print(args.out)
    return batch_exit_code(summary.sampled + summary.resumed + summary.rescored, summary.failed, args.strict)
