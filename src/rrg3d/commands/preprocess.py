"""Preprocess every study of a manifest with a named preset into a tensor cache.

Writes DIR/manifest.jsonl (records pointing at the cached tensors, preset recorded), DIR/errors.jsonl (one
record per failed study: id, file, error), DIR/preset.yaml and DIR/summary.json. Resumable: studies already
done with the same preset are skipped. Exit 0 when the batch ran, even if some studies failed; non-zero only
when nothing could run.
"""

from __future__ import annotations

import argparse
import sys

HELP = "preprocess a manifest into a tensor cache with a named preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="JSONL manifest")
    parser.add_argument("--preset", required=True, help="built-in preset name (see `rrg3d presets`) or a YAML path")
    parser.add_argument("--out", required=True, help="output folder (the cache)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo every study, even those already done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from rrg3d.preprocess.batch import preprocess_manifest

    summary = preprocess_manifest(args.manifest, args.preset, args.out, workers=max(1, args.workers),
                                  overwrite=args.overwrite, progress=not args.no_progress)
    print(summary.line())
    if summary.failed or summary.invalid_lines:
        print(f"failures recorded in {args.out}/errors.jsonl", file=sys.stderr)
    return 0 if summary.succeeded > 0 else 1
