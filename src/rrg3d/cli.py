"""The ``rrg3d`` command: one console script, one module per subcommand (``rrg3d.commands.*``).

Each command module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` and imports its heavy
dependencies inside ``run``, so ``rrg3d --help`` stays fast. ``main(argv)`` is callable from Python and tests.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from rrg3d import __version__
from rrg3d.errors import RRG3DError

#: Subcommand name → module under rrg3d.commands, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "info": "info",
    "validate": "validate",
    "preprocess": "preprocess",
    "presets": "presets",
    "convert": "convert",
    "benchmark": "benchmark",
    "phantom": "phantom",
    "evaluate": "evaluate",
    "labeler": "labeler",
    "model": "model",
    "generate": "generate",
    "merge": "merge",
    "export": "export",
    "train": "train",
    "prefs": "prefs",
    "segment": "segment",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rrg3d",
        description="Radiology report generation from 3D medical volumes (chest CT, PET/CT).",
    )
    parser.add_argument("--version", action="version", version=f"rrg3d {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"rrg3d.commands.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except RRG3DError as exc:
        print(f"rrg3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rrg3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
