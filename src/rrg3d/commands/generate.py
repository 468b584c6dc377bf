"""Write radiology reports for scans with a trained model checkpoint.

SCAN is a NIfTI/NRRD/MHA/NPY file, a DICOM series folder, or a manifest (JSONL; a preprocessing cache made with the
model's preset is used as is). Each scan is preprocessed with the preset stored in the checkpoint, so inference sees
exactly the intensities and geometry training saw. Reports are appended to PRED.jsonl as {"id", "report", "meta"}
and printed; a scan that cannot be read gets a record with an "error" field and the rest go on. Re-running with the
same --out resumes: scans already reported are skipped (--overwrite starts over).

A region-guided model (Reg2RG) also reads each scan's anatomical label map: the manifest's "masks", --masks (a label
map for one scan, or a folder of <scan name>.nii.gz label maps and/or the masks.jsonl of `rrg3d segment`), or
--segment (segment each scan here: `rules` needs no weights). Its records gain "region_reports" ({region: text}),
"regions" ({region: label value}) in the label map written to PRED.masks/ ("masks"), and "region_recognition" (the
region the model named for each of them); "report" is the region reports merged.

A PET/CT model (PETRG-3D) reads each study's PET too (a manifest's images.pet, or --pet for one scan file), put on
the CT's grid by their affines. A style-prompted model writes in each study's hospital style (the manifest's "style"
and "sex"; --style/--sex for all scans); the style used is recorded in each record's meta.

Without --model the default model is used: $RRG3D_MODEL, else the checkpoint `rrg3d demo` trains
(~/.cache/rrg3d/models/demo).

Sharded inference: --shard I/N (or, without it, RANK/WORLD_SIZE as torchrun and `accelerate launch` set them, each
process then on cuda:$LOCAL_RANK) reports on shard I of N of the scans (assigned by a stable hash of the study id,
see rrg3d.utils.shards) into PRED.shard-I-of-N.jsonl (label maps in PRED.shard-I-of-N.masks/), resumable per shard.
The last shard to finish merges all N into PRED.jsonl in input order (--no-merge: leave that to
`rrg3d merge predictions PRED.jsonl`).

    accelerate launch --num_processes 4 -m rrg3d.cli generate M.jsonl --model CKPT --out PRED.jsonl

Exit 0 when the batch ran, even if some scans failed (each failure is a record with "error"); 1 with --strict when
any scan failed; 2 when none could be read (or bad arguments).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rrg3d.utils.exits import STRICT_HELP

HELP = "generate reports for scans (NIfTI, DICOM folders, manifests) with a model checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scans", nargs="+", metavar="SCAN", help="NIfTI file, DICOM folder or manifest (JSONL)")
    parser.add_argument("--model", metavar="CKPT", help="checkpoint directory (default: $RRG3D_MODEL or the demo's)")
    parser.add_argument("--out", required=True, metavar="PRED.jsonl", help="predictions JSONL to write")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy; default: checkpoint's)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default: checkpoint's)")
    parser.add_argument("--num-beams", type=int, help="beam search width (default: checkpoint's)")
    parser.add_argument("--repetition-penalty", type=float, help="HF-style repetition penalty (1.0 = none)")
    parser.add_argument("--max-new-tokens", type=int, help="longest report in tokens (default: checkpoint's)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=1, help="scans per forward pass (default 1)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="language-model dtype (default: checkpoint's)")
    parser.add_argument("--no-merge-lora", action="store_true",
                        help="keep a LoRA adapter separate (default: fold it into the weights, faster decoding)")
    parser.add_argument("--masks", metavar="DIR_OR_FILE",
                        help="region-guided models: label map(s) of the scans (a file, or a folder / masks.jsonl)")
    parser.add_argument("--segment", choices=("rules", "totalsegmentator"),
                        help="region-guided models: segment each scan with this backend (see rrg3d segment)")
    parser.add_argument("--pet", metavar="PET", help="PET/CT models: the PET of the one SCAN given as a file (a "
                                                      "manifest gives each study's images.pet)")
    parser.add_argument("--pet-units", choices=("SUVbw",),
                        help="--pet is already in body-weight SUV (NIfTI files carry no SUV factor)")
    parser.add_argument("--style", metavar="HOSPITAL", help="style-prompted models: write every report in this "
                                                            "hospital's style (default: each study's own)")
    parser.add_argument("--sex", choices=("female", "male"), help="style-prompted models: the sex whose template "
                                                                 "to use (default: each study's; unknown: any)")
    parser.add_argument("--overwrite", action="store_true", help="start PRED.jsonl over instead of resuming")
    parser.add_argument("--shard", metavar="I/N", help="report on shard I of N (0 <= I < N) into "
                                                       "PRED.shard-I-of-N.jsonl (default: from RANK and WORLD_SIZE "
                                                       "under torchrun/accelerate, else every scan)")
    parser.add_argument("--no-merge", action="store_true", help="sharded: do not merge into PRED.jsonl when the last "
                                                                "shard finishes (use `rrg3d merge predictions`)")
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)
    parser.add_argument("--quiet", action="store_true", help="do not print the reports")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from rrg3d.models.checkpoint import default_model_path, load_checkpoint
    from rrg3d.models.inference import generate_reports
    from rrg3d.utils.exits import batch_exit_code
    from rrg3d.utils.shards import resolve_shard

    shard = resolve_shard(args.shard)
    checkpoint = args.model or default_model_path()
    device = args.device or _default_device(torch, distributed=shard is not None and args.shard is None)
    model = load_checkpoint(checkpoint, device=device, dtype=args.dtype, merge_lora=not args.no_merge_lora)
    settings = model.config.generation.replace(
        temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)

    def show(record: dict) -> None:
        if args.quiet:
            return
        if record.get("error"):
            print(f"== {record['id']}: FAILED: {record['error']}", file=sys.stderr)
        else:
            print(f"== {record['id']}\n{record['report']}\n")

    summary = generate_reports(model, args.scans, args.out, settings=settings, batch_size=args.batch_size,
                               checkpoint=str(checkpoint), on_record=show, resume=not args.overwrite,
                               progress=not args.no_progress and sys.stderr.isatty(), masks=args.masks,
                               segment=args.segment, pet=args.pet, style=args.style, sex=args.sex,
                               pet_units=args.pet_units, shard=shard, merge=not args.no_merge)
    skipped = f", {summary.skipped} already done" if summary.skipped else ""
    where = f"shard {shard}: " if shard is not None else ""
    print(f"{where}{summary.written} reports, {summary.failed} failed{skipped} -> {summary.out} "
          f"({summary.seconds:.1f} s)", file=sys.stderr)
    if summary.merged:
        print(f"all {shard.count if shard else 1} shards done: merged into {summary.merged}", file=sys.stderr)
    elif summary.merge_error:
        print(f"merging the shards failed: {summary.merge_error}", file=sys.stderr)
    elif shard is not None and args.no_merge:
        print(f"once all {shard.count} shards have finished: rrg3d merge predictions {args.out}", file=sys.stderr)
    elif shard is not None:
        print(f"{args.out} is written when all {shard.count} shards have finished (or run `rrg3d merge predictions "
              f"{args.out}`)", file=sys.stderr)
    return batch_exit_code(summary.written + summary.skipped, summary.failed, args.strict)


def _default_device(torch: Any, distributed: bool) -> str:
    """cuda when available; under a launcher (shard from the environment), this process's GPU, cuda:$LOCAL_RANK."""
    cuda = torch.cuda
    if not cuda.is_available():
        return "cpu"
    local = os.environ.get("LOCAL_RANK", "")
    if distributed and local.isdigit() and cuda.device_count() > 1:
        return f"cuda:{int(local) % cuda.device_count()}"
    return "cuda"
