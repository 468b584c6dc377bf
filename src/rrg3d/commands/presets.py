"""List the built-in preprocessing presets, or print one as YAML."""

from __future__ import annotations

import argparse

HELP = "list preprocessing presets or show one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="preset to print in full")


def run(args: argparse.Namespace) -> int:
    from rrg3d.preprocess import list_presets, load_preset

    if args.name:
        preset = load_preset(args.name)
        print(f"# sha256: {preset.sha256}")
        print(preset.to_yaml(), end="")
        return 0
    for name in list_presets():
        preset = load_preset(name)
        print(f"{name:<16} {preset.description}")
    return 0
