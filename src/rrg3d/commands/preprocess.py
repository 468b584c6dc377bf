"""Preprocess every study of a manifest with a named preset into a tensor cache.

Writes DIR/manifest.jsonl (records pointing at the cached tensors, preset recorded), DIR/errors.jsonl (one
record per failed study: id, file, error), DIR/preset.yaml and DIR/summary.json. Resumable: studies already
done with the same preset are skipped.

Sharded work: --shard I/N (or, without it, RANK/WORLD_SIZE as torchrun and `accelerate launch` set them) processes
only shard I of N (studies assigned by a stable hash of their id, see rrg3d.utils.shards) into the same DIR, writing
DIR/manifest.shard-I-of-N.jsonl, errors.shard-I-of-N.jsonl and summary.shard-I-of-N.json. The last shard to finish
merges them into DIR/manifest.jsonl etc. (--no-merge: leave that to `rrg3d merge cache DIR`).

    rrg3d preprocess M.jsonl --preset ctrate --out cache --shard 0/2 &
    rrg3d preprocess M.jsonl --preset ctrate --out cache --shard 1/2

Exit 0 when the batch ran, even if some studies failed (failures are recorded); 1 with --strict when any failure
was recorded; 2 when nothing could run (every study of the shard failed, or bad arguments).
"""

from __future__ import annotations

import argparse
import sys

from rrg3d.utils.exits import STRICT_HELP

HELP = "preprocess a manifest into a tensor cache with a named preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="JSONL manifest")
    parser.add_argument("--preset", required=True, help="built-in preset name (see `rrg3d presets`) or a YAML path")
    parser.add_argument("--out", required=True, help="output folder (the cache)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo every study, even those already done")
    parser.add_argument("--shard", metavar="I/N", help="process shard I of N (0 <= I < N; default: from RANK and "
                                                       "WORLD_SIZE under torchrun/accelerate, else everything)")
    parser.add_argument("--no-merge", action="store_true",
                        help="sharded: do not merge when the last shard finishes (use `rrg3d merge cache DIR`)")
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from rrg3d.preprocess.batch import preprocess_manifest
    from rrg3d.utils.exits import batch_exit_code
    from rrg3d.utils.shards import resolve_shard, shard_path

    shard = resolve_shard(args.shard)
    summary = preprocess_manifest(args.manifest, args.preset, args.out, workers=max(1, args.workers),
                                  overwrite=args.overwrite, progress=not args.no_progress, shard=shard,
                                  merge=not args.no_merge)
    print(summary.line())
    failed = summary.failed + summary.invalid_lines
    if failed:
        print(f"failures recorded in {shard_path(f'{args.out}/errors.jsonl', shard)}", file=sys.stderr)
    if summary.merged:
        print(f"all {shard.count if shard else 1} shards done: merged into {summary.merged}")
    elif summary.merge_error:
        print(f"merging the shards failed: {summary.merge_error}", file=sys.stderr)
    elif shard is not None and args.no_merge:
        print(f"once all {shard.count} shards have finished: rrg3d merge cache {args.out}", file=sys.stderr)
    elif shard is not None:
        print(f"shard {shard} done; {args.out}/manifest.jsonl is written when all {shard.count} shards have "
              f"finished (or run `rrg3d merge cache {args.out}`)", file=sys.stderr)
    return batch_exit_code(summary.succeeded, failed, args.strict)
