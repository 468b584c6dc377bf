"""Check a manifest against the schema and open every file it references.

Exit 0 when valid; otherwise exit 1 and print one line per problem (``FILE:LINE [field]: problem``).
Warnings (unknown fields, unusual splits) are printed to stderr and only fail with --strict.
"""

from __future__ import annotations

import argparse
import sys

HELP = "check a manifest and every file it references"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="JSONL manifest")
    parser.add_argument("--no-files", action="store_true", help="check the schema only, do not open the files")
    parser.add_argument("--strict", action="store_true", help="treat warnings as problems")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while opening files")


def run(args: argparse.Namespace) -> int:
    from rrg3d.data.manifest import validate_manifest

    records, problems = validate_manifest(args.manifest, check_files=not args.no_files, progress=args.progress)
    failing = [p for p in problems if p.severity == "error" or args.strict]
    for problem in problems:
        if problem not in failing:
            print(problem, file=sys.stderr)
    for problem in failing:
        print(problem)
    if failing:
        return 1
    from rrg3d.data.manifest import record_files

    n_files = sum(len(record_files(r)) for r in records)
    checked = "schema only" if args.no_files else f"all {n_files} referenced files open"
    print(f"OK: {len(records)} studies valid ({checked})", file=sys.stderr)
    return 0
