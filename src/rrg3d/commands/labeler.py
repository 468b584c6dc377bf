"""Label reports with the 18 CT-RATE abnormalities, or train the learned labeler.

    rrg3d labeler apply INPUT --out OUT.csv [--model DIR]
    rrg3d labeler train CSV --out DIR [--folds K] [--encoder PATH] [--no-rule-features]

INPUT is a CSV with ``report_text`` and ``AccessionNo`` or ``id``, or a JSONL with ``id`` and ``report``.
OUT.csv has ``id`` then the 18 label columns (0/1) under their CT-RATE names. Without --model the rule
labeler runs. Rows whose text is empty get all-zero labels and are listed on stderr by id.
CSV for training: the CT-RATE label layout (``report_text`` + the 18 label columns).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HELP = "label reports with the 18 CT-RATE abnormalities, or train the learned labeler"

ID_COLUMNS = ("id", "AccessionNo", "VolumeName")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    apply = actions.add_parser("apply", help="label reports (CSV or JSONL) into a CSV")
    apply.add_argument("input", type=Path, help="CSV with report_text (+ id/AccessionNo) or JSONL with id, report")
    apply.add_argument("--out", type=Path, required=True, help="output CSV")
    apply.add_argument("--model", default=None, help="learned labeler folder (default: the rule labeler)")
    train = actions.add_parser("train", help="train the learned labeler on a CT-RATE-style label CSV")
    train.add_argument("csv", type=Path, help="CSV with report_text and the 18 CT-RATE label columns")
    train.add_argument("--out", type=Path, required=True, help="folder for the trained labeler")
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds to pick the L2 penalty (0: off)")
    train.add_argument("--encoder", default=None, help="HF sentence encoder path or id (default: packaged MiniLM)")
    train.add_argument("--no-rule-features", action="store_true", help="embeddings only, no rule features")
    train.add_argument("--seed", type=int, default=0)


def read_reports(path: Path) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` from a report CSV or JSONL; clear errors for missing files, columns and fields."""
    from rrg3d.errors import RRG3DError

    if not path.is_file():
        raise RRG3DError(f"{path}: file not found")
    if path.suffix.lower() in (".jsonl", ".json"):
        from rrg3d.evaluate.records import load_predictions  # the same {"id", "report"} JSONL rules

        records = load_predictions(path)
        return [r.id for r in records], [r.report or "" for r in records]
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "report_text" not in columns:
            raise RRG3DError(f"{path}: no 'report_text' column (columns found: {', '.join(columns) or 'none'})")
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        ids: list[str] = []
        texts: list[str] = []
        for number, row in enumerate(reader, start=1):
            ids.append(str(row[id_column]) if id_column else str(number))
            texts.append(row.get("report_text") or "")
    return ids, texts


def run(args: argparse.Namespace) -> int:
    return _apply(args) if args.action == "apply" else _train(args)


def _apply(args: argparse.Namespace) -> int:
    from rrg3d.text.labeler import load_labeler
    from rrg3d.text.labels import CTRATE_LABELS
    from rrg3d.utils.files import atomic_path

    ids, texts = read_reports(args.input)
    labels = load_labeler(args.model).predict(texts)
    empty = [i for i, text in zip(ids, texts, strict=True) if not text.strip()]
    with atomic_path(args.out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *CTRATE_LABELS])
        for study_id, row in zip(ids, labels, strict=True):
            writer.writerow([study_id, *(int(v) for v in row)])
    if empty:
        shown = ", ".join(empty[:20]) + (" ..." if len(empty) > 20 else "")
        print(f"{len(empty)} report(s) with empty text got all-zero labels: {shown}", file=sys.stderr)
    print(f"labelled {len(ids)} reports → {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from rrg3d.errors import RRG3DError
    from rrg3d.text.labeler import LearnedLabeler
    from rrg3d.text.labels import CTRATE_LABELS

    if not args.csv.is_file():
        raise RRG3DError(f"{args.csv}: file not found")
    with open(args.csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in ("report_text", *CTRATE_LABELS) if c not in columns]
        if missing:
            raise RRG3DError(f"{args.csv}: missing column(s) {', '.join(missing)} (columns found: "
                             f"{', '.join(columns) or 'none'})")
        texts, rows = [], []
        for number, row in enumerate(reader, start=2):
            try:
                rows.append([int(float(row[label])) for label in CTRATE_LABELS])
            except ValueError as exc:
                raise RRG3DError(f"{args.csv}:{number}: label values must be 0 or 1 ({exc})") from exc
            texts.append(row["report_text"] or "")
    labeler = LearnedLabeler(encoder=args.encoder, rule_features=not args.no_rule_features)
    labeler.fit(texts, np.asarray(rows), folds=args.folds, seed=args.seed)
    labeler.save(args.out)
    cv = labeler.info.get("cv") or {}
    if cv:
        best = cv["scores"][f"{cv['l2']:g}"]
        print(f"cross-validated on {len(texts)} reports: micro-F1 {best['micro_f1']:.4f}, "
              f"macro-F1 {best['macro_f1']:.4f} (l2 {cv['l2']:g})")
    print(f"trained labeler saved in {args.out}")
    return 0
