"""Run the main rrg3d job end to end on data that exists on any machine.

The demo writes synthetic chest CTs in every supported format (NIfTI in two
orientations, a DICOM series, NRRD, NPZ), adds the real CTs of ../shared/data when present plus a 2D DICOM
slice shipped with pydicom and a truncated file (both must be rejected cleanly), builds a manifest,
validates it, preprocesses it with the ``ctrate`` and ``m3d`` presets (resumable cache, errors recorded),
checks HU plausibility and geometry, prints a table and writes a preview PNG. Then the model side: it
generates phantoms with known findings (CTs, region masks, structured reports of findings and impression), trains a
diagnosis-prompted report generator on their training split (recipe ``small_dx_sft``: the finding classifier of
``small_resnet3d_dx`` is fitted on the training phantoms, then LoRA + projector learn to write the report for the
findings listed in the prompt), writes reports for the held-out test phantoms and for a synthetic chest CT with
`rrg3d generate`'s code, and evaluates them against the phantoms' truth beside two constant baselines (the
majority-class report and the best constant report; the HTML report and a metric table). The staged recipe is one
flag away: ``--clip-steps N`` pretrains the encoder with CT-CLIP first, ``--align-steps N`` adds projector
alignment. The trained checkpoint is installed as the default model of `rrg3d generate` ($RRG3D_MODEL, else
~/.cache/rrg3d/models/demo). Re-running resumes finished training runs instead of repeating them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

HELP = "run the end-to-end demo on generated and package-shipped volumes"

#: phantoms and SFT steps of the default demo: measured to fit the 10-minute budget on 2 CPU cores (README)
DEFAULT_PHANTOMS = 400
DEFAULT_SFT_STEPS = 100

SHARED_CANDIDATES = ("RRG3D_SHARED_DATA",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="rrg3d_demo", help="output folder (default ./rrg3d_demo)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    parser.add_argument("--presets", nargs="+", default=["ctrate", "m3d"], help="presets to run")
    parser.add_argument("--no-shared", action="store_true", help="ignore ../shared/data even when present")
    parser.add_argument("--phantoms", type=int, default=DEFAULT_PHANTOMS,
                        help="phantom cases (80%% train, 10%% val, 10%% test; 0: skip phantoms and training)")
    parser.add_argument("--style", default="hospital_c", choices=("hospital_a", "hospital_b", "hospital_c"),
                        help="the phantoms' reporting style (a: long narrative, b: structured, c: terse)")
    parser.add_argument("--architecture", default="small_resnet3d_dx", help="model to train (see `rrg3d model list`)")
    parser.add_argument("--recipe", default="small_dx_sft", help="the SFT recipe (see `rrg3d train --list`)")
    parser.add_argument("--clip-steps", type=int, default=0,
                        help="CT-CLIP pretraining steps of the encoder first, batch 16 (default 0: none)")
    parser.add_argument("--align-steps", type=int, default=0,
                        help="align-stage steps before SFT, batch 4 (default 0: none; SFT fits the classifier)")
    parser.add_argument("--sft-steps", type=int, default=DEFAULT_SFT_STEPS, help="SFT steps (batch 4)")
    parser.add_argument("--no-train", action="store_true", help="skip training: score the baseline only")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install the trained checkpoint as the default model of `rrg3d generate`")


def shared_data_dir() -> Path | None:
    """``$RRG3D_SHARED_DATA`` or ``../shared/data`` beside the repository/working directory, if it exists."""
    env = os.environ.get("RRG3D_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in (Path.cwd().parent, *here.parents)]
    return next((p for p in candidates if (p / "ct").is_dir()), None)


def _write_inputs(out: Path, use_shared: bool) -> list[dict[str, Any]]:
    from rrg3d.data.synthetic import synthetic_chest
    from rrg3d.io import write_volume
    from rrg3d.io.dicom_write import write_dicom_series

    scans = out / "scans"
    records: list[dict[str, Any]] = []
    report = ("Findings: The lungs are clear. No pleural effusion. Heart size is normal. "
              "Impression: No acute cardiopulmonary abnormality.")

    def add(study_id: str, path: Path, source: str, **extra: Any) -> None:
        records.append({"id": study_id, "split": "train", "images": {"ct": os.path.relpath(path, out)},
                        "report": report, "meta": {"source": source}, **extra})

    chest = synthetic_chest(shape=(96, 160, 160), spacing=(2.5, 2.2, 2.2), seed=1)
    add("synth_nifti", write_volume(chest, scans / "synth_nifti.nii.gz"), "synthetic (NIfTI)")
    flipped = chest.replace(array=np.ascontiguousarray(chest.array[::-1, :, ::-1].transpose(2, 1, 0)),
                            affine=_flip_affine(chest))
    add("synth_nifti_flipped", write_volume(flipped, scans / "synth_nifti_flipped.nii.gz"),
        "synthetic (NIfTI, permuted and flipped axes)")
    add("synth_dicom", write_dicom_series(synthetic_chest(shape=(60, 128, 128), spacing=(3.0, 2.7, 2.7), seed=2),
                                          scans / "synth_dicom"), "synthetic (DICOM series)")
    add("synth_nrrd", write_volume(synthetic_chest(seed=3), scans / "synth_nrrd.nrrd"), "synthetic (NRRD)")
    add("synth_npz", write_volume(synthetic_chest(seed=4), scans / "synth_npz.npz"), "synthetic (NPZ)")

    truncated = scans / "truncated.nii.gz"
    data = (scans / "synth_nifti.nii.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    add("bad_truncated", truncated, "corrupt on purpose (truncated gzip)")
    try:
        from pydicom.data import get_testdata_file

        slice_2d = get_testdata_file("CT_small.dcm")
        if slice_2d:
            add("bad_single_slice", Path(slice_2d), "pydicom test data (one 2D CT slice)")
    except Exception:  # pydicom data is optional here
        pass

    shared = shared_data_dir() if use_shared else None
    if shared is not None:
        for study_id, rel in (("real_abdomen_ct", "ct/totalseg_example/example_ct.nii.gz"),
                              ("real_chest_cta", "ct/totalseg_chest_cta/ct_cropped.nii.gz"),
                              ("real_dicom_series", "ct/totalseg_example/dicom")):
            if (shared / rel).exists():
                add(study_id, shared / rel, f"shared data: {rel}")
    return records


def _flip_affine(volume: Any) -> np.ndarray:
    """Affine of ``array[::-1, :, ::-1].transpose(2, 1, 0)`` of a volume, so it shows the same anatomy."""
    d, _, w = (n - 1 for n in volume.shape)
    # new index (a, b, c) = old index (d - c, b, w - a)
    old = np.array([[0, 0, -1, d], [0, 1, 0, 0], [-1, 0, 0, w], [0, 0, 0, 1]], dtype=np.float64)
    return volume.affine @ old


def _hu_check(path: Path) -> dict[str, float]:
    from rrg3d.io import read_volume

    array = read_volume(path).array.astype(np.float32)
    return {"p1": float(np.percentile(array, 1)), "median": float(np.median(array)),
            "p99": float(np.percentile(array, 99))}


def _preview(cache: Path, out_png: Path, limit: int = 6) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rrg3d.data.manifest import load_manifest

    records = load_manifest(cache / "manifest.jsonl")[:limit]
    if not records:
        return None
    fig, axes = plt.subplots(2, len(records), figsize=(2.6 * len(records), 5.2), squeeze=False)
    for col, record in enumerate(records):
        array = np.load(cache / record["images"]["ct"], mmap_mode="r")
        axes[0, col].imshow(array[array.shape[0] // 2], cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(record["id"], fontsize=7)
        axes[1, col].imshow(array[:, array.shape[1] // 2][::-1], cmap="gray", vmin=0, vmax=1, aspect="auto")
        for row in (0, 1):
            axes[row, col].axis("off")
    axes[0, 0].text(-0.1, 0.5, "axial", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "coronal", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run(args: argparse.Namespace) -> int:
    from rrg3d.data.manifest import validate_manifest, write_manifest
    from rrg3d.preprocess.batch import preprocess_manifest

    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/9] writing demo scans to {out / 'scans'}")
    records = _write_inputs(out, use_shared=not args.no_shared)
    manifest = write_manifest(records, out / "manifest.jsonl")
    print(f"      {len(records)} studies in {manifest}")

    print("[2/9] rrg3d validate: schema + opening every file")
    _, problems = validate_manifest(manifest)
    for problem in problems:
        print(f"      problem: {problem}")

    summaries = {}
    for step, preset in enumerate(args.presets, start=3):
        print(f"[{min(step, 3)}/9] rrg3d preprocess --preset {preset} (workers={args.workers})")
        summary = preprocess_manifest(manifest, preset, out / f"cache_{preset}", workers=args.workers,
                                      progress=True)
        summaries[preset] = summary
        print(f"      {summary.line()}")

    print("[4/9] checks on the preprocessed tensors")
    from rrg3d.data.manifest import load_manifest

    rows = []
    first = args.presets[0]
    cache = out / f"cache_{first}"
    originals = {r["id"]: r for r in records}
    for record in load_manifest(cache / "manifest.jsonl"):
        source = out / originals[record["id"]]["images"]["ct"]
        hu = _hu_check(source)
        tensor = np.load(cache / record["images"]["ct"], mmap_mode="r")
        geometry = record["preprocess"]["images"]["ct"]
        spacing = np.linalg.norm(np.asarray(geometry["affine"])[:3, :3], axis=0)
        spacing_text = " x ".join(f"{s:.3g}" for s in spacing)
        rows.append((record["id"], hu["p1"], hu["median"], tuple(tensor.shape), spacing_text, float(tensor.mean())))
    print(f"      {'study':<22}{'HU p1':>8}{'HU median':>11}  {'tensor shape':<18}{'spacing mm':<22}{'mean':>6}")
    for study_id, p1, median, shape, spacing, mean in rows:
        print(f"      {study_id:<22}{p1:>8.0f}{median:>11.0f}  {shape!s:<18}{spacing!s:<22}{mean:>6.3f}")
    errors = [json.loads(line) for line in (cache / "errors.jsonl").read_text().splitlines() if line.strip()]
    for error in errors:
        print(f"      recorded failure: {error['id']}: {error['error']}")
    preview = _preview(cache, out / "preview.png")
    if preview:
        print(f"      preview of the {first} tensors: {preview}")
    ok = all(s.succeeded > 0 for s in summaries.values())
    if args.phantoms > 0:
        ok = _phantoms_and_evaluation(out, args) and ok
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {out}")
    return 0 if ok else 1


def _phantoms_and_evaluation(out: Path, args: argparse.Namespace) -> bool:
    """Phantoms with known findings → diagnosis-prompted SFT → reports for held-out phantoms and a CT → evaluation."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.data.phantom.preview import render_preview
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files
    from rrg3d.train.data import best_constant_text, majority_text, write_references

    print(f"[5/9] rrg3d phantom --n {args.phantoms} --style {args.style}: synthetic chest CTs with known findings")
    tick = time.perf_counter()
    manifest = generate_phantoms(PhantomConfig(n=args.phantoms, seed=0, shape=(64, 128, 128), pet=False, styles=1,
                                               style=args.style),
                                 out / "phantoms", workers=args.workers, progress=False)
    records = load_manifest(manifest)
    splits = {name: sum(r.get("split") == name for r in records) for name in ("train", "val", "test")}
    positives = sum(sum(r["labels"].values()) for r in records)
    print(f"      {len(records)} cases ({splits['train']} train, {splits['val']} val, {splits['test']} test), "
          f"{positives} findings, {time.perf_counter() - tick:.0f} s; "
          f"preview: {render_preview(manifest, out / 'phantoms' / 'preview.png')}")
    references = write_references(manifest, out / "test_references.jsonl", split="test", field=FIELD)
    test_ids = [r["id"] for r in load_manifest(references)]
    baselines = {}
    for name, text in (("majority-class report", majority_text(manifest, split="train", field=FIELD)),
                       ("best constant report", best_constant_text(manifest, split="train", field=FIELD))):
        path = out / f"baseline_{name.split()[0].replace('-', '_')}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "report": text}) + "\n" for i in test_ids))
        baselines[name] = path
    baseline = baselines["majority-class report"]
    options = EvaluateOptions(bootstrap=200, progress=False, judge="rule", judge_cache=False)
    if args.no_train:
        print("[6/9] --no-train: scoring the constant baselines only")
        _print_metrics({name: evaluate_files(path, references, out / f"evaluation_{path.stem}", options)
                        for name, path in baselines.items()})
        return True

    final = _train(out, manifest, args)
    print(f"[9/9] rrg3d generate on the {len(test_ids)} held-out phantoms (+ a CT), then rrg3d evaluate")
    predictions = _generate(final, references, out, args)
    metrics = evaluate_files(predictions, references, out / "evaluation",
                             dataclasses.replace(options, compare=str(baseline)))
    rows = {f"{args.architecture} (trained here)": metrics}
    rows.update({name: evaluate_files(path, references, out / f"evaluation_{path.stem}", options)
                 for name, path in baselines.items()})
    _print_metrics(rows)
    print(f"      checkpoint: {final}")
    print(f"      HTML evaluation report: {out / 'evaluation' / 'report.html'}")
    if not args.no_install:
        from rrg3d.models.checkpoint import default_model_dir, install_checkpoint

        installed = install_checkpoint(final, default_model_dir())
        print(f"      installed as the default model of `rrg3d generate`: {installed}")
    return True


#: The demo trains and scores the whole report (findings and impression), as the field evaluates.
FIELD = "report"


def _train(out: Path, manifest: Path, args: argparse.Namespace) -> Path:
    from rrg3d.train import run_recipe

    common = [f"model.config={args.architecture}", f"data.manifest={manifest}", f"data.report_field={FIELD}",
              f"data.cache_dir={out / 'train_cache'}", f"data.preprocess_workers={args.workers}",
              "train.progress=false", "train.save_every=0", f"train.threads={os.cpu_count() or 1}"]
    vision_init: list[str] = []
    if args.clip_steps > 0:
        tick = time.perf_counter()
        print(f"[6/9] rrg3d train tiny_clip: CT-CLIP pretraining of the encoder, {args.clip_steps} steps (batch 16)")
        clip = run_recipe("tiny_clip", [*common, f"run_dir={out / 'runs' / 'clip'}", "data.batch_size=16",
                                        "data.max_length=160", "data.report_field=impression",
                                        f"phases.0.steps={args.clip_steps}", "phases.0.preset=null", "optim.lr=5e-4"],
                          resume=True)
        vision_init = [f"model.vision_init={clip}"]
        print(f"      {time.perf_counter() - tick:.0f} s -> {clip}")
    else:
        print("[6/9] CT-CLIP pretraining of the encoder: skipped (--clip-steps N runs it)")
    init = vision_init
    if args.align_steps > 0:
        tick = time.perf_counter()
        print(f"[7/9] rrg3d train tiny_align: projector and finding classifier, {args.align_steps} steps "
              f"({args.architecture}, packaged SmolLM2 frozen)")
        align = run_recipe("tiny_align", [*common, *vision_init, f"run_dir={out / 'runs' / 'align'}",
                                          "data.batch_size=4", "data.max_length=320", "data.max_val_samples=null",
                                          f"phases.0.steps={args.align_steps}", "phases.0.preset=null"], resume=True)
        init = [f"model.init={align}"]
        print(f"      {time.perf_counter() - tick:.0f} s -> {align}")
    else:
        print("[7/9] align stage: skipped (--align-steps N runs it; SFT fits the finding classifier itself)")
    tick = time.perf_counter()
    print(f"[8/9] rrg3d train {args.recipe}: finding classifier fitted on the training phantoms, then projector + "
          f"LoRA on prompts listing the true findings, {args.sft_steps} steps")
    final = run_recipe(args.recipe, [*common, *init, f"run_dir={out / 'runs' / 'sft'}",
                                     f"phases.0.steps={args.sft_steps}"], resume=True)
    print(f"      {time.perf_counter() - tick:.0f} s -> {final}")
    return final


def _generate(final: Path, references: Path, out: Path, args: argparse.Namespace) -> Path:
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports

    model = load_checkpoint(final, merge_lora=True)
    predictions = out / "predictions.jsonl"
    generate_reports(model, [references], predictions, batch_size=16, progress=False, resume=False,
                     checkpoint=str(final))
    ct = out / "scans" / "synth_nifti.nii.gz"
    extra = out / "predictions_ct.jsonl"
    summary = generate_reports(model, [ct], extra, progress=False, resume=False, checkpoint=str(final))
    if summary.written:
        report = json.loads(extra.read_text().splitlines()[0])["report"]
        print(f"      report for {ct.name} (a synthetic chest CT, not a phantom): {report}")
    return predictions


def _print_metrics(results: dict[str, dict[str, Any]]) -> None:
    width = max(len(name) for name in results)
    print(f"      {'':<{width}}  {'CE micro-F1':>11} {'macro-F1':>9} {'BLEU-4':>7} {'METEOR':>7} {'ROUGE-L':>8} "
          f"{'CIDEr':>6}")
    for name, metrics in results.items():
        coco, ce = metrics["coco"], metrics["ce"]
        meteor = "n/a" if coco["meteor"] is None else f"{coco['meteor']:.3f}"
        print(f"      {name:<{width}}  {ce['micro_f1']:>11.3f} {ce['macro_f1']:>9.3f} {coco['bleu_4']:>7.3f} "
              f"{meteor:>7} {coco['rouge_l']:>8.3f} {coco['cider']:>6.3f}")
