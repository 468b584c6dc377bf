"""Turn a public dataset's folder layout into an rrg3d manifest (CT-RATE, RadGenome-ChestCT,
CTRG-Chest-548K, AutoPET-style PET/CT, AutoPET-RG-Lym). Rows that cannot be used are listed with the reason and skipped.

    rrg3d convert ctrate /data/CT-RATE --out ctrate.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a public dataset layout into a manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rrg3d.data.adapters import ADAPTERS

    datasets = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, adapter in ADAPTERS.items():
        sub = datasets.add_parser(name, help=adapter.description, description=adapter.description)
        sub.add_argument("root", type=Path, help="dataset root folder")
        sub.add_argument("--out", type=Path, required=True, help="manifest to write (JSONL)")
        adapter.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    from rrg3d.data.adapters import get_adapter

    adapter = get_adapter(args.dataset)
    result = adapter.convert(args.root, args.out, **adapter.options_from_args(args))
    print(result.summary(max_skipped=50))
    return 0 if result.n_records > 0 else 1
