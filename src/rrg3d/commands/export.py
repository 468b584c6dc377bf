"""Export a predictions file as FHIR DiagnosticReports or DICOM Comprehensive SR documents.

PRED.jsonl is what `rrg3d generate` writes. Each record with a report becomes OUT/<id>.fhir.json (a FHIR R5
DiagnosticReport, status preliminary) or OUT/<id>.dcm (a Comprehensive SR, PARTIAL and UNVERIFIED); records with an
"error" or without a report are skipped and listed in OUT/export_summary.json.

Neither format carries the scan's path, the checkpoint path or the record id, and no patient is named unless
--patient-reference (FHIR "subject", e.g. Patient/123) says so; an SR gets a new study and an anonymous patient.
File names do come from record ids, which `rrg3d generate` takes from scan file names: --anonymize-names names the
files study_0001, ... (in file order) and keeps ids out of the summary as well.
Exit 0 when the export ran, even if some records were skipped (they are listed); 1 with --strict when any was
skipped; 2 when none could be exported.
"""

from __future__ import annotations

import argparse
import sys

from rrg3d.utils.exits import STRICT_HELP, batch_exit_code

HELP = "export predictions as FHIR DiagnosticReports or DICOM Comprehensive SR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PRED.jsonl", help="predictions written by rrg3d generate")
    parser.add_argument("--format", required=True, choices=("fhir", "sr"), dest="fmt",
                        help="fhir: DiagnosticReport JSON; sr: DICOM Comprehensive SR")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the exported files")
    parser.add_argument("--patient-reference", metavar="REF",
                        help="FHIR reference put in every report's subject (e.g. Patient/123); default: none")
    parser.add_argument("--anonymize-names", action="store_true",
                        help="name files study_0001, ... instead of after record ids")
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)


def run(args: argparse.Namespace) -> int:
    from rrg3d.serve.export import export_predictions

    summary = export_predictions(args.predictions, args.fmt, args.out, patient_reference=args.patient_reference,
                                 anonymize_names=args.anonymize_names)
    for item in summary["skipped"]:
        name = f" ({item['id']})" if "id" in item else ""
        print(f"skipped line {item['line']}{name}: {item['reason']}", file=sys.stderr)
    print(f"{summary['written']} exported, {len(summary['skipped'])} skipped -> {args.out}", file=sys.stderr)
    return batch_exit_code(summary["written"], len(summary["skipped"]), args.strict)
