"""Describe a scan (NIfTI, DICOM folder or file, NRRD/MHA, NPY/NPZ): shape, spacing, orientation, range.

For a DICOM folder, also lists the series it holds. Prints no patient identifiers.
"""

from __future__ import annotations

import argparse
import json

HELP = "describe a scan: geometry, value range, DICOM series"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan", help="file or DICOM folder")
    parser.add_argument("--series", default=None, help="DICOM series to read (index or key) when a folder has several")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SD", "SH", "SW"), help="spacing for NPY input")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rrg3d.io import list_dicom_series, read_volume

    series = int(args.series) if args.series is not None and args.series.isdigit() else args.series
    info: dict = {}
    if Path(args.scan).is_dir():
        info["series"] = [s.describe() for s in list_dicom_series(args.scan)]
    volume = read_volume(args.scan, series=series, spacing=args.spacing)
    info.update(volume.describe())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "series":
            print("series:")
            for line in value:
                print(f"  {line}")
        else:
            print(f"{key}: {value}")
    return 0
