"""Generate synthetic chest CT (+PET) phantoms with known findings, region masks and reports.

Writes DIR/manifest.jsonl (reports, sections, region reports, the 18 labels, region masks, style, and the
ground truth of every finding in meta) with the volumes beside it: DIR/vols, DIR/seg, DIR/pet. Deterministic
for a given --seed; re-running resumes.

    rrg3d phantom --n 100 --out phantoms --seed 0 --shape 64 128 128 --pet --styles 2 --preview

Exit 0 when the phantoms were written; 2 on bad arguments or when they cannot be written (phantoms record no
per-case failures: a failing case stops the run, and a rerun resumes; --strict is accepted so that every batch
command takes it, and changes nothing here).
"""

from __future__ import annotations

import argparse

from rrg3d.utils.exits import STRICT_HELP

HELP = "generate synthetic chest CT/PET phantoms with findings, masks and reports"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of cases")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"),
                        help="volume shape (default 64 128 128; up to 256 512 512)")
    parser.add_argument("--pet", action="store_true", help="also write an aligned PET volume in SUV")
    parser.add_argument("--styles", type=int, default=2, help="number of hospital reporting styles (1-3)")
    parser.add_argument("--style", default=None, choices=("hospital_a", "hospital_b", "hospital_c"),
                        help="write every report in this style (a: narrative, b: structured, c: terse); "
                             "default: drawn among --styles")
    parser.add_argument("--report-bank", default=None, metavar="CSV",
                        help="CT-RATE-style labelled report CSV to mine sentences from (used at run time only)")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    parser.add_argument("--preview", action="store_true", help="write DIR/preview.png of a few cases")
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP + " (phantoms record none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.errors import RRG3DError
    from rrg3d.utils.exits import batch_exit_code

    config = PhantomConfig(n=args.n, seed=args.seed, shape=tuple(args.shape), pet=args.pet, styles=args.styles,
                           style=args.style, report_bank=args.report_bank)
    try:
        manifest = generate_phantoms(config, args.out, workers=max(1, args.workers), progress=not args.no_progress)
    except OSError as exc:  # disk full, permissions: nothing usable was written
        raise RRG3DError(f"phantom: writing {args.out} failed ({type(exc).__name__}: {exc})") from exc
    print(f"wrote {config.n} phantom cases: {manifest}")
    if args.preview:
        from rrg3d.data.phantom.preview import render_preview

        print(f"preview: {render_preview(manifest, Path(args.out) / 'preview.png')}")
    return batch_exit_code(config.n, 0, args.strict)
