"""Build a merged CT–report benchmark (CT-3DRRG style, Argus) from public dataset downloads.

    rrg3d benchmark build --source ctrate=/data/CT-RATE --source radgenome=/data/RadGenome-ChestCT \\
        --source ctrg=/data/CTRG-Chest-548K --out bench/

Each --source NAME=ROOT is converted by its adapter (any name `rrg3d convert` knows; adapter options as
--source-option NAME.OPTION=VALUE, e.g. ctrg.stack_slices=true or radgenome.ctrate_labels=/data/labels), then:
one manifest with ids prefixed by source; patient-level splits across sources (official splits kept, the strictest
winning a conflict: test > val > train; patients without one split by hash with --val-fraction/--test-fraction/
--seed); exact and near-duplicate reports of a patient removed (--near-duplicate, difflib word ratio); sections
normalised to findings and impression, records without report text dropped. Writes DIR/manifest.jsonl,
DIR/summary.json, DIR/datasheet.md, DIR/removed.jsonl, DIR/report_lengths.png and the per-source manifests under
DIR/sources/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "build a merged, patient-split benchmark from public CT–report datasets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark_command", metavar="ACTION")
    build = sub.add_parser("build", help="convert, merge, split and document several datasets",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--source", action="append", required=True, metavar="NAME=ROOT",
                       help="a dataset adapter name (ctrate, radgenome, ctrg, ...) and its download folder; repeat")
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="benchmark folder to write")
    build.add_argument("--source-option", action="append", default=[], metavar="NAME.OPTION=VALUE",
                       help="an adapter option for one source (switches: true/false; lists: comma-separated)")
    build.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                       help="val share of patients without an official split (default 0.1)")
    build.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                       help="test share of patients without an official split (default 0.1)")
    build.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the hash split (default 0)")
    build.add_argument("--near-duplicate", type=float, default=0.9, metavar="T",
                       help="difflib word ratio from which two reports of a patient are duplicates (default 0.9; "
                            "1 = exact only)")
    build.add_argument("--keep-duplicates", action="store_true", help="do not remove duplicate reports")
    build.add_argument("--resplit", action="append", default=[], metavar="NAME",
                       help="ignore this source's official splits and split its patients by hash; repeat")
    build.add_argument("--check-files", action="store_true",
                       help="open every image and mask of the merged manifest (slow on full datasets)")
    build.add_argument("--labeler", default=None, metavar="DIR",
                       help="learned labeler folder for the label prevalences (default: the rule labeler)")
    build.add_argument("--no-plot", action="store_true", help="skip the report length histogram")


def _sources(values: list[str]) -> dict[str, Path]:
    from rrg3d.data.adapters import get_adapter
    from rrg3d.errors import RRG3DError

    sources: dict[str, Path] = {}
    for value in values:
        name, sep, root = value.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise RRG3DError(f"--source {value!r}: expected NAME=ROOT (e.g. ctrate=/data/CT-RATE)")
        adapter = get_adapter(name)
        if adapter.name in sources:
            raise RRG3DError(f"--source {adapter.name} given twice")
        sources[adapter.name] = Path(root.strip())
    return sources


def run(args: argparse.Namespace) -> int:
    from rrg3d.errors import ConfigError

    if getattr(args, "benchmark_command", None) != "build":
        raise ConfigError("usage: rrg3d benchmark build --source NAME=ROOT [--source ...] --out DIR (see --help)")
    from rrg3d.data.benchmark import build_benchmark, parse_source_option

    options: dict[str, dict[str, Any]] = {}
    for text in args.source_option:
        name, key, value = parse_source_option(text)
        options.setdefault(name, {})[key] = value
    summary = build_benchmark(
        _sources(args.source), args.out, options=options, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, near_duplicate=args.near_duplicate,
        deduplicate_reports=not args.keep_duplicates, resplit=args.resplit, check_files=args.check_files,
        labeler=args.labeler, plot=not args.no_plot,
    )
    print(summary.text())
    return 0
