"""Merge the shard files of a sharded `rrg3d generate` or `rrg3d preprocess` run into one.

    rrg3d merge predictions PRED.jsonl [--manifest M.jsonl]  # PRED.shard-I-of-N.jsonl -> PRED.jsonl
    rrg3d merge cache DIR                                     # DIR/*.shard-I-of-N.* -> DIR/manifest.jsonl etc.

Both check that all N shards are present, have finished (a shard writes its completion marker last: for predictions
PRED.shard-I-of-N.done.json, for a cache the "complete" flag of summary.shard-I-of-N.json; --allow-incomplete
merges anyway), were run on the same inputs, and share no study. Outputs are written atomically, so a merge can be
repeated at any time (a shard rerun to retry its failures is merged again).

predictions: one record per id (a shard's last good record for a study it retried); order: the ids of --manifest
(or any SCAN list, resolved as generate resolves it), else the input order the shards recorded, else sorted by id.
Label maps stay in PRED.shard-I-of-N.masks/, which the merged records point at. cache: DIR/manifest.jsonl,
errors.jsonl and summary.json in the source manifest's order, equal to an unsharded run's.

The last shard to finish merges on its own; this command is the step when that was turned off (--no-merge), failed,
or shards ran on machines that do not share the folder until afterwards. Exit 0 when merged; 2 when the shards
cannot be merged (missing, unfinished, overlapping) or on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

HELP = "merge the shard files of a sharded generate or preprocess run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="merge_command", metavar="WHAT")
    predictions = sub.add_parser("predictions", help="PRED.shard-I-of-N.jsonl files into PRED.jsonl",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predictions.add_argument("out", metavar="PRED.jsonl", help="the predictions file the shards were run with")
    predictions.add_argument("--manifest", action="append", metavar="SCAN",
                             help="order the records as these inputs (a manifest; repeat as in generate's SCAN "
                                  "list); default: the input order the shards recorded")
    cache = sub.add_parser("cache", help="a preprocessing cache's shard manifests, errors and summaries",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache.add_argument("out", metavar="DIR", help="the cache folder the shards wrote into")
    for command in (predictions, cache):
        command.add_argument("--shards", type=int, metavar="N",
                             help="the number of shards (needed only when files of several N are present)")
        command.add_argument("--allow-incomplete", action="store_true",
                             help="merge shards that have not finished (their studies so far)")


def run(args: argparse.Namespace) -> int:
    from rrg3d.errors import ConfigError

    what = getattr(args, "merge_command", None)
    if what not in ("predictions", "cache"):
        raise ConfigError("usage: rrg3d merge predictions PRED.jsonl | rrg3d merge cache DIR (see --help)")
    if args.shards is not None and args.shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {args.shards}")
    if what == "cache":
        from rrg3d.preprocess.batch import merge_cache

        summary = merge_cache(args.out, count=args.shards, allow_incomplete=args.allow_incomplete)
        print(f"merged -> {summary.merged}: {summary.succeeded}/{summary.total} studies ready, {summary.failed} "
              f"failed, {summary.invalid_lines} invalid manifest lines")
        return 0

    from rrg3d.models.inference import merge_predictions

    order = None
    if args.manifest:
        from rrg3d.models.inference import resolve_studies

        order = [study.id for study in resolve_studies(args.manifest)]
    merged = merge_predictions(args.out, count=args.shards, order=order, allow_incomplete=args.allow_incomplete)
    print(f"merged -> {merged.merged}: {merged.written} reports, {merged.failed} failed", file=sys.stderr)
    return 0
