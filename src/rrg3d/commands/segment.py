"""Segment CT scans into the 10 anatomical regions of region-guided report generation.

Writes DIR/<name>.nii.gz label maps (1 lung, 2 trachea and bronchi, 3 mediastinum, 4 heart, 5 esophagus, 6 pleura,
7 bone, 8 thyroid, 9 breast, 10 abdomen) and DIR/masks.jsonl, one line per scan: {"image", "masks": {"path",
"labels"}, "empty", "backend", "seconds"}, or {"image", "error"} for a scan that failed (the batch goes on). A SCAN
is anything `rrg3d info` reads: NIfTI, NRRD/MHA, NPZ, or a DICOM series folder. Reruns skip scans already done.
Exit 0 when the batch ran, even if some scans failed (failures are recorded); 1 with --strict when any
failure was recorded; 2 when nothing could run.

    rrg3d segment scans/*.nii.gz dicom/series1 --out masks --workers 2
    rrg3d segment scan.nii.gz --out masks --backend totalsegmentator   # needs the package and its weights
"""

from __future__ import annotations

import argparse
import sys

from rrg3d.utils.exits import STRICT_HELP, batch_exit_code

HELP = "segment CT scans into the 10 anatomical region masks (rules or TotalSegmentator)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scans", nargs="+", metavar="SCAN", help="scan files or DICOM series folders")
    parser.add_argument("--out", required=True, help="output folder for the label maps and masks.jsonl")
    parser.add_argument("--backend", choices=("rules", "totalsegmentator"), default="rules",
                        help="rules (weight-free, default) or totalsegmentator (optional package with weights)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo every scan, even those already done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)


def run(args: argparse.Namespace) -> int:
    from rrg3d.segment.batch import MASKS_FILE, segment_scans

    summary = segment_scans(args.scans, args.out, backend=args.backend, workers=max(1, args.workers),
                            progress=not args.no_progress, overwrite=args.overwrite)
    print(summary.line())
    if summary.failed:
        print(f"failures recorded in {args.out}/{MASKS_FILE}", file=sys.stderr)
    return batch_exit_code(summary.segmented + summary.skipped_done, summary.failed, args.strict)
