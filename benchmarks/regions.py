"""Does region guidance help? The Reg2RG ablation on phantoms at one CPU budget (``benchmarks/results/regions.json``).

Phantom studies carry a 10-region label map and one report per region, so the region-guided target exists for every
study. First the shared vision encoder (the ``tiny_reg2rg`` 3D ResNet at width 16/32) is pretrained once with CT-CLIP
on the training phantoms (``--clip-steps`` at batch 32, label-supervised, text tower frozen): Reg2RG's encoder is a
pretrained, frozen one, and this is its CPU-sized stand-in. Then five arms are trained from that same encoder (frozen)
with the same recipe (``tiny_region_sft`` overrides: LoRA r 16 on every projection of the LLM, the perceivers,
projectors and geometry ViT trained, ``--steps`` steps at ``--batch-size``, lr ``--lr``, same seed) and write the
same target — the region reports, one line each — so that only what the model sees changes:

=========================  ==================================================================================
``global``                 the global image tokens only (no region tokens; lines ``<Name>: ...`` in fixed order)
``texture``                texture tokens per region (masked crop → shared encoder → perceiver), no global
``texture_geometry``       + one geometry token per region (the whole mask → mask ViT, mean-pooled)
``texture_geometry_global`` + the global tokens
``full``                   + region–report alignment: slots shuffled every step, each line names the region it
                           recognises (``The region k is <name>: ...``), a recognition head on the geometry
                           feature naming each slot in the prompt (``recognizer``)
=========================  ==================================================================================

The geometry token carries the mask's shape statistics (``geometry_descriptors``, as in the shipped configs) in every
arm that has one. Training runs at ``--mixed-precision`` (default ``auto``: bf16 on a CPU that computes it natively).

Diagnosis prompting (``--diagnosis regions``, the default): every arm gets a finding classifier on what it sees,
its calls in the prompt — the lever that made global models read their images in the learnability and PET/CT
benchmarks, here given to both sides of the comparison. The ``global`` arm: one head on soft intensity histograms of
the volume in 2 × 2 × 2 blocks (``vision.classifier``, ``--histogram-bins``), its calls in a diagnosis line. The region
arms: one head per region on the histogram inside that region's mask (``vision.regions.classifier``,
:mod:`rrg3d.models.region_classifier`), targets the region's own abnormalities (the phantoms' ``region_truth``), its
calls in that region's slot line. Both are probes: fitted on the training studies before the first step, threshold
chosen on the validation studies, frozen; training prompts list the true findings (``true_findings_share`` 1), as
``petrg3d_dx_sft`` does. ``classifier_calls`` scores each arm's calls (the union over regions for the region arms)
against the true labels. ``--diagnosis none``: the image tokens alone (the run of 2026-12-05).

Without alignment the prompt names each region and the slots keep their order. Each arm writes greedy reports for
the test phantoms (regions from their label maps alone) that are scored against the phantoms' true labels: CE
micro-F1 / precision / recall of the merged report (the 18 CT-RATE labels from the labeler), with study-bootstrap 95%
intervals; region CE (each region's text against its reference region report, labels from the labeler, pooled); region
recognition P/R/F1 per region (the region the model named for each region it was shown; the non-aligned arms are
told the names, so theirs is 1 by construction and reported as such). The full − global difference of CE micro-F1 has
a paired bootstrap interval. ``distinct_reports`` counts the different reports an arm wrote for the test studies and
``image_dependent_reports`` the studies whose report differs from the most common one among the studies shown the
same regions: 0 means the arm writes one report per region set whatever the image, its CE is that report's, and a
gain does not count. Also measured: the texture branch's peak memory (resident set of a fresh process) with
10 regions of 64×256×256 at batch 1 through the ``reg2rg`` architecture's ViT, forward and backward.

Targets (issue 22): full ≥ global + 0.05 CE micro-F1 with the paired interval above 0; region recognition F1 ≥ 0.95
for every region; texture-branch peak memory ≤ 8 GB; all within 60 minutes on 2 CPU cores (``budget_minutes``: the
CT-CLIP stage, every arm's training and its generation, phantom generation and scoring left out).

    python benchmarks/regions.py [--work /tmp/exp/regions] [--train 480] [--test 40] [--clip-steps 1200]
        [--steps 100] [--batch-size 2] [--mixed-precision auto|bf16|no] [--diagnosis regions|none]
        [--arms global texture texture_geometry texture_geometry_global full]

Each arm's run and predictions stay in ``--work`` and are reused when their settings match, so a rerun only redoes
what is missing (``--only-memory`` measures the memory alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import arm_minutes, reused_minutes, statistics, truth_scores

ARMS: dict[str, dict[str, Any]] = {
    "global": {"texture": False, "geometry": False, "global_tokens": True, "alignment": False},
    "texture": {"texture": True, "geometry": False, "global_tokens": False, "alignment": False},
    "texture_geometry": {"texture": True, "geometry": True, "global_tokens": False, "alignment": False},
    "texture_geometry_global": {"texture": True, "geometry": True, "global_tokens": True, "alignment": False},
    "full": {"texture": True, "geometry": True, "global_tokens": True, "alignment": True},
}
for _switches in ARMS.values():  # the recognition head names shuffled slots: it belongs to alignment
    _switches["recognizer"] = _switches["alignment"]
TARGETS = {"ce_micro_f1_gain": 0.05, "recognition_f1": 0.95, "texture_memory_gb": 8.0}
FINDINGS_PROMPT = "Findings the image classifier calls: {findings}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/exp/regions", help="phantoms, cache, runs and predictions")
    parser.add_argument("--phantoms", default=None, help="an existing phantom folder to read (default WORK/phantoms)")
    parser.add_argument("--train", type=int, default=480, help="training phantoms")
    parser.add_argument("--val", type=int, default=24, help="validation phantoms (the region classifier's threshold)")
    parser.add_argument("--test", type=int, default=40, help="test phantoms")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], help="phantom size when generated")
    parser.add_argument("--clip-steps", type=int, default=1200,
                        help="CT-CLIP pretraining steps of the shared encoder, batch 32 (0: every arm starts from a "
                             "random encoder and trains it)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mixed-precision", default="auto", choices=["no", "bf16", "auto"],
                        help="training precision of the arms (auto: bf16 where the CPU computes it natively)")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--generate-batch", type=int, default=40,
                        help="test studies decoded together (greedy: the reports do not depend on it)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--diagnosis", default="regions", choices=["regions", "none"],
                        help="regions: the global arm gets a block-histogram finding classifier, the region arms a "
                             "per-region one, their calls in the prompt; none: image tokens alone")
    parser.add_argument("--histogram-bins", type=int, default=16, help="bins of the diagnosis classifiers' histograms")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "regions.json"))
    return parser


# -- data ----------------------------------------------------------------------------------------------------------
def subset_manifest(source: Path, out: Path, args: argparse.Namespace) -> Path:
    """The first ``--train`` / ``--val`` / ``--test`` phantoms of each split, image paths made absolute."""
    from rrg3d.data.manifest import load_manifest, resolve, write_manifest

    wanted = {"train": args.train, "val": args.val, "test": args.test}
    kept, seen = [], {k: 0 for k in wanted}
    for record in load_manifest(source):
        split = record.get("split")
        if split not in wanted or seen[split] >= wanted[split]:
            continue
        seen[split] += 1
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        record["images"] = {k: (str(resolve(source, v)) if v else v) for k, v in record["images"].items()}
        record["masks"] = dict(record["masks"], path=str(resolve(source, record["masks"]["path"])))
        kept.append(record)
    short = {k: wanted[k] - seen[k] for k in wanted if seen[k] < wanted[k]}
    if short:
        raise SystemExit(f"{source}: not enough phantoms ({short} missing); generate more (--train/--test)")
    return write_manifest(kept, out)


def test_inputs(manifest: Path, out: Path) -> Path:
    """What generation reads for each test study: its image and its label map, no report of any kind (so which
    regions are reported cannot depend on the references)."""
    from rrg3d.data.manifest import load_manifest, write_manifest

    records = [{"id": r["id"], "split": "test", "images": r["images"], "masks": r["masks"]}
               for r in load_manifest(manifest) if r.get("split") == "test"]
    return write_manifest(records, out)


def model_config(arm: str, diagnosis: str = "none", bins: int = 16) -> dict[str, Any]:
    """The arm's architecture: ``tiny_reg2rg`` at learnability width with the arm's region switches; with
    ``diagnosis`` ``regions`` also the arm's finding classifier (see the module doc)."""
    from rrg3d.models.config import load_model_config

    config = load_model_config("tiny_reg2rg").to_dict()
    config["name"] = f"regions_{arm}"
    config["description"] = f"benchmarks/regions.py arm {arm}"
    vision = config["vision"]
    vision["encoder"].update({"widths": [16, 32]})
    vision["compressor"].update({"num_latents": 16, "dim": 128})
    vision["regions"].update({"texture_compressor": dict(vision["regions"]["texture_compressor"], num_latents=8,
                                                         dim=128), **ARMS[arm]})
    if diagnosis == "regions" and not (ARMS[arm]["texture"] or ARMS[arm]["geometry"]):
        vision["classifier"] = {"hidden": 0, "histogram_bins": bins, "histogram_blocks": [2, 2, 2], "grid": False}
        config["prompt"]["findings"] = FINDINGS_PROMPT
    elif diagnosis == "regions":
        vision["regions"]["classifier"] = {"histogram_bins": bins}
    config["lm"]["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]}
    return config


def pretrain_encoder(manifest: Path, work: Path, args: argparse.Namespace) -> tuple[Path | None, bool]:
    """The shared encoder's CT-CLIP run on the training phantoms (label-supervised, text tower frozen; reused when a
    finished run has the same settings) and whether it was trained now. Reg2RG's vision encoder is pretrained and
    frozen; this is the CPU-sized stand-in, shared by every arm so that only the region inputs differ."""
    from rrg3d.train import train

    if args.clip_steps <= 0:
        return None, False
    config = model_config("global")
    config_file = work / "runs" / "clip.model.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    overrides = {"data.manifest": str(manifest), "data.cache_dir": str(work / "cache"), "data.batch_size": 32,
                 "data.max_val_samples": args.val, "phases.0.steps": args.clip_steps, "optim.lr": 1e-3,
                 "optim.weight_decay": 0.05, "seed": args.seed, "model.clip.pooling": "meanmax",
                 "model.clip.embed_dim": 128, "model.clip.label_weight": 1.0, "model.clip.train_text": False,
                 "train.save_every": 0, "train.progress": False, "train.threads": os.cpu_count() or 1,
                 "train.tensorboard": False}
    key = hashlib.sha256(json.dumps([config["vision"]["encoder"], overrides], sort_keys=True).encode()).hexdigest()
    run = work / "runs" / f"clip_{key[:12]}"
    if (run / "final").is_dir():  # written atomically: there only when the run finished
        print(f"reusing {run}", flush=True)
        return run / "final", False
    items = [f"{k}={v}" for k, v in overrides.items()] + [f"model.config={config_file}", f"run_dir={run}"]
    return Path(train("tiny_clip", items, resume=(run / "checkpoints").is_dir()).final), True


def train_arm(arm: str, manifest: Path, work: Path, args: argparse.Namespace, encoder: Path | None
              ) -> tuple[Path, bool]:
    """The arm's final checkpoint (reused when a finished run has the same settings) and whether it was trained.
    With a pretrained ``encoder`` it stays frozen (as in Reg2RG); without one every arm trains its own."""
    from rrg3d.train import train

    config = model_config(arm, args.diagnosis, args.histogram_bins)
    overrides = {"data.manifest": str(manifest), "data.cache_dir": str(work / "cache"),
                 "data.batch_size": args.batch_size, "data.max_length": 768, "data.max_val_samples": args.val,
                 "phases.0.steps": args.steps, "optim.lr": args.lr, "optim.warmup_steps": 10, "seed": args.seed,
                 "model.train.encoder": encoder is None, "train.save_every": 0, "train.progress": False,
                 "train.threads": os.cpu_count() or 1, "train.tensorboard": False,
                 "train.mixed_precision": args.mixed_precision}
    if encoder is not None:
        overrides["model.vision_init"] = str(encoder)
    if args.diagnosis == "regions":  # probes fitted before the first step, then kept; true findings in training
        overrides["model.true_findings_share"] = 1.0
        if config["vision"].get("classifier"):
            overrides.update({"model.train.classifier": True, "model.classifier_weight": 0.0,
                              "optim.lr_multipliers": json.dumps({"vision.classifier": 0.0})})
    key = hashlib.sha256(json.dumps([config, overrides], sort_keys=True).encode()).hexdigest()[:12]
    run = work / "runs" / f"{arm}_{key}"
    if (run / "final" / "rrg3d.yaml").is_file():
        print(f"reusing {run}", flush=True)
        return run / "final", False
    run.mkdir(parents=True, exist_ok=True)
    config_file = run.with_suffix(".model.yaml")
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    items = [f"{k}={v}" for k, v in overrides.items()] + [f"model.config={config_file}", f"run_dir={run}"]
    resume = (run / "checkpoints").is_dir()
    return Path(train("tiny_region_sft", items, resume=resume).final), True


def generate(checkpoint: Path, inputs: Path, out: Path, args: argparse.Namespace) -> bool:
    """Greedy grounded reports of the test studies (regions from their label maps alone); False when they were
    there already. A study that fails stops the benchmark: a missing report would be scored as an empty one."""
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports, iter_predictions

    if out.is_file() and sum(1 for r in iter_predictions(out) if not r.get("error")) >= args.test:
        return False
    out.unlink(missing_ok=True)
    model = load_checkpoint(checkpoint, merge_lora=True)
    settings = model.config.generation.replace(max_new_tokens=args.max_new_tokens, temperature=0.0,
                                               repetition_penalty=1.0)
    generate_reports(model, [inputs], out, settings=settings, batch_size=args.generate_batch, progress=False)
    errors = [r for r in iter_predictions(out) if r.get("error")]
    if errors:
        raise SystemExit(f"{out}: {len(errors)} test studies failed, e.g. {errors[0]['error']}")
    return True


def logged_minutes(train_log: Path) -> float | None:
    """A finished run's training minutes from its ``train_log.csv`` (the last step's ``elapsed_s``)."""
    if not train_log.is_file():
        return None
    rows = train_log.read_text().splitlines()
    if len(rows) < 2:
        return None
    header, last = rows[0].split(","), rows[-1].split(",")
    return round(float(last[header.index("elapsed_s")]) / 60, 2) if "elapsed_s" in header else None


# -- scores --------------------------------------------------------------------------------------------------------
def recognition_counts(records: dict[str, dict[str, Any]], ids: list[str], names: list[str]) -> np.ndarray:
    """Per test study and region: [tp, fp, fn] of region recognition (the name given to each region shown)."""
    from rrg3d.preprocess.regions import region_key

    index = {n: i for i, n in enumerate(names)}
    counts = np.zeros((len(ids), len(names), 3))
    for row, study in enumerate(ids):
        for shown, named in (records[study].get("region_recognition") or {}).items():
            truth = region_key(shown)
            guess = region_key(named) if named else None
            if guess == truth:
                counts[row, index[truth], 0] += 1
                continue
            counts[row, index[truth], 2] += 1
            if guess in index:
                counts[row, index[guess], 1] += 1
    return counts


def classifier_calls(records: list[dict[str, Any]], references: Path) -> dict[str, Any] | None:
    """Micro-F1 (and precision, recall) of an arm's diagnosis calls against the true labels: the global classifier's
    (``meta.findings_classifier``) or the union of the region classifier's over the regions
    (``meta.region_findings_classifier``); None without a classifier."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.text.labels import CTRATE_LABELS

    truth = {r["id"]: {n for n in CTRATE_LABELS if (r.get("labels") or {}).get(n) == 1}
             for r in load_manifest(references)}
    tp = fp = fn = 0
    for record in records:
        meta = record.get("meta") or {}
        if meta.get("findings_classifier"):
            called = set(meta["findings_classifier"]["called"])
        elif meta.get("region_findings_classifier"):
            called = {n for region in meta["region_findings_classifier"]["regions"].values() for n in region["called"]}
        else:
            return None
        true = truth[record["id"]]
        tp, fp, fn = tp + len(called & true), fp + len(called - true), fn + len(true - called)
    return {"micro_f1": 2 * tp / max(1, 2 * tp + fp + fn), "precision": tp / max(1, tp + fp),
            "recall": tp / max(1, tp + fn)}


def f1_statistic(counts: np.ndarray) -> Any:
    from rrg3d.evaluate.bootstrap import Statistic

    def f1(sums: np.ndarray, n: int) -> np.ndarray:
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp, dtype=float), where=(2 * tp + fp + fn) > 0)

    return Statistic(counts, f1)


def score_arm(predictions: Path, references: Path, out: Path, labeler: Any, args: argparse.Namespace
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arm's metrics (with intervals) and its per-study truth scores (for paired comparisons)."""
    from rrg3d.evaluate.bootstrap import bootstrap_ci
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files
    from rrg3d.models.regions import REGION_NAMES

    truth = truth_scores(predictions, references, labeler)
    stats = statistics(truth)
    metrics: dict[str, Any] = {}
    for name in ("ce_micro_f1", "ce_precision", "ce_recall", "hallucinated_per_report", "omitted_per_report"):
        ci = bootstrap_ci(stats[name], args.bootstrap, args.seed)
        metrics[name] = {"value": float(stats[name].value()), "ci95": [ci["low"], ci["high"]]}
    suite = evaluate_files(predictions, references, out, EvaluateOptions(bootstrap=0, progress=False))
    metrics["bleu_4"] = suite["coco"]["bleu_4"]
    metrics["region_ce_micro_f1"] = (suite.get("ce_regions") or {}).get("all_regions", {}).get("micro_f1")
    names = list(REGION_NAMES)
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    counts = recognition_counts({r["id"]: r for r in records}, truth["ids"], names)
    recognition = {}
    for i, name in enumerate(names):
        shown = int(counts[:, i, 0].sum() + counts[:, i, 2].sum())
        if shown == 0:  # no test study has this region: nothing to recognise
            recognition[name] = {"value": None, "ci95": [None, None], "shown": 0}
            continue
        statistic = f1_statistic(counts[:, i, :])
        ci = bootstrap_ci(statistic, args.bootstrap, args.seed)
        recognition[name] = {"value": float(statistic.value()), "ci95": [ci["low"], ci["high"]], "shown": shown}
    metrics["region_recognition_f1"] = recognition
    metrics["classifier_calls"] = classifier_calls(records, references)
    metrics["words_per_report"] = float(np.mean([len((r.get("report") or "").split()) for r in records]))
    # a model that ignores its inputs writes one report for every study shown the same regions; its CE is then that
    # report's, not the image's: count the studies whose report differs from their region set's most common one
    metrics["distinct_reports"] = len({r.get("report") for r in records})
    groups: dict[frozenset[str], list[str]] = {}
    for record in records:
        groups.setdefault(frozenset(record.get("regions") or {}), []).append(record.get("report") or "")
    metrics["image_dependent_reports"] = sum(len(texts) - max(texts.count(t) for t in set(texts))
                                             for texts in groups.values())
    return metrics, truth


def min_f1(recognition: dict[str, dict[str, Any]]) -> float:
    """The lowest recognition F1 over the regions some test study showed."""
    values = [v["value"] for v in recognition.values() if v["value"] is not None]
    return min(values) if values else float("nan")


# -- memory --------------------------------------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import json, resource, sys, torch
from rrg3d.models.config import load_model_config
from rrg3d.models.regions import RegionBatch, RegionSettings, RegionTower
from rrg3d.models.registry import ENCODERS, config_from_mapping
torch.set_num_threads(2)
config = load_model_config("reg2rg")
settings = config_from_mapping(RegionSettings, config.vision.regions, where="vision.regions")
encoder = ENCODERS.build(config.vision.encoder).requires_grad_(False).eval()
tower = RegionTower(settings, int(encoder.out_dim), 576)
size = tuple(settings.texture_size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch = RegionBatch(names=[list(settings.names)], label_ids=[list(range(1, 11))],
                    texture=torch.rand(10, 1, *size), geometry=torch.rand(10, 1, *settings.geometry_size).round())
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = tower(batch, shared_encoder=encoder)
out.float().square().mean().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_gb": peak / 2**20, "before_gb": before / 2**20, "tokens": list(out.shape)}))
"""


def texture_memory() -> dict[str, Any]:
    """Peak resident memory of a fresh process running the reg2rg texture + geometry branches on 10 regions of
    64×256×256 (batch 1, bf16 autocast, forward and backward; the ViT frozen as the recipe has it)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    memory = texture_memory()
    print(f"texture branch, 10 regions of 64x256x256: peak {memory['peak_gb']:.2f} GB", flush=True)
    if args.only_memory:
        previous["texture_memory"] = memory
        out_path.write_text(json.dumps(previous, indent=2) + "\n")
        return 0

    import torch

    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.evaluate.bootstrap import paired_bootstrap
    from rrg3d.text.labeler import load_labeler
    from rrg3d.train.data import write_references

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.phantoms:
        source = Path(args.phantoms) / "manifest.jsonl"
    else:  # split_of: 8 in 10 phantoms train, 1 val, 1 test
        count = 10 * max(args.train // 8 + 1, args.test, args.val)
        source = generate_phantoms(PhantomConfig(n=count, seed=args.seed, shape=tuple(args.shape)),
                                   work / "phantoms", workers=os.cpu_count() or 1, progress=False)
    manifest = subset_manifest(source, work / "manifest.jsonl", args)
    references = write_references(manifest, work / "test_references.jsonl", split="test")
    inputs = test_inputs(manifest, work / "test_inputs.jsonl")
    labeler = load_labeler()
    minutes: dict[str, dict[str, float]] = {}
    arms: dict[str, Any] = {}
    truths: dict[str, Any] = {}
    tick = time.perf_counter()
    encoder, pretrained = pretrain_encoder(manifest, work, args)
    if encoder is not None:
        minutes["clip"] = reused_minutes(previous, "clip", encoder, pretrained) or {
            "train": round((time.perf_counter() - tick) / 60, 2), "generate": 0.0, "measured": pretrained,
            "run": str(encoder)}
        if not minutes["clip"]["measured"]:  # reused from another invocation: its own training log's clock
            logged = logged_minutes(encoder.parent / "train_log.csv")
            if logged is not None:
                minutes["clip"].update(train=logged, measured=True, source="train_log.csv")
        print(f"shared encoder: CT-CLIP {args.clip_steps} steps -> {encoder} ({minutes['clip']['train']:.1f} min)",
              flush=True)
    for arm in args.arms:
        tick = time.perf_counter()
        checkpoint, trained = train_arm(arm, manifest, work, args, encoder)
        train_minutes = (time.perf_counter() - tick) / 60
        tick = time.perf_counter()
        predictions = work / "predictions" / f"{checkpoint.parent.name}.jsonl"
        generated = generate(checkpoint, inputs, predictions, args)
        generate_minutes = (time.perf_counter() - tick) / 60
        metrics, truths[arm] = score_arm(predictions, references, work / "eval" / arm, labeler, args)
        arms[arm] = {"settings": ARMS[arm], "checkpoint": str(checkpoint), **metrics}
        minutes[arm] = arm_minutes(previous, arm, checkpoint, trained=trained, generated=generated,
                                   train_minutes=train_minutes, generate_minutes=generate_minutes)
        calls = metrics["classifier_calls"]
        print(f"{arm:26s} CE micro-F1 {metrics['ce_micro_f1']['value']:.3f} "
              f"[{metrics['ce_micro_f1']['ci95'][0]:.3f}, {metrics['ce_micro_f1']['ci95'][1]:.3f}]  "
              f"recognition min F1 {min_f1(metrics['region_recognition_f1']):.3f}  "
              + (f"calls F1 {calls['micro_f1']:.3f}  " if calls else "") +
              f"({train_minutes:.1f} + {generate_minutes:.1f} min)", flush=True)
    result: dict[str, Any] = {"benchmark": "regions", "args": vars(args), "arms": arms, "minutes_per_arm": minutes,
                              "texture_memory": memory, "targets": TARGETS}
    if "full" in truths and "global" in truths:
        delta = paired_bootstrap(statistics(truths["full"])["ce_micro_f1"], statistics(truths["global"])["ce_micro_f1"],
                                 args.bootstrap, args.seed)
        result["delta_full_minus_global"] = {"value": delta["delta"], "ci95": [delta["low"], delta["high"]],
                                             "p_value": delta["p_value"]}
    if "full" in arms:
        result["region_recognition_f1"] = {k: v["value"] for k, v in arms["full"]["region_recognition_f1"].items()}
    measured = sum(m["train"] + m["generate"] for m in minutes.values())
    result["minutes"] = round(measured, 2)  # CT-CLIP + every arm's training and generation
    result["invocation_minutes"] = round((time.perf_counter() - start) / 60, 2)
    result["budget_minutes"] = args.budget_minutes
    delta = result.get("delta_full_minus_global")
    recognition = result.get("region_recognition_f1") or {}
    result["met"] = {
        # a gain counts only when the full model's reports depend on the study (not one constant report for all)
        "ce_micro_f1_gain": bool(delta and delta["value"] >= TARGETS["ce_micro_f1_gain"] and delta["ci95"][0] > 0
                                 and arms["full"]["image_dependent_reports"] > 0),
        "recognition_f1": bool(recognition) and all(v is None or v >= TARGETS["recognition_f1"]
                                                    for v in recognition.values()),
        "texture_memory_gb": memory["peak_gb"] <= TARGETS["texture_memory_gb"],
        # every stage's minutes measured (here or by the invocation that ran it), none reused unmeasured
        "budget": measured <= args.budget_minutes and all(m.get("measured") for m in minutes.values()),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'arm':26s} {'CE micro-F1':>12s} {'precision':>10s} {'recall':>8s} {'region CE':>10s} {'BLEU-4':>7s} "
          f"{'distinct':>9s} {'image-dep.':>10s}")
    for arm, m in arms.items():
        print(f"{arm:26s} {m['ce_micro_f1']['value']:12.3f} {m['ce_precision']['value']:10.3f} "
              f"{m['ce_recall']['value']:8.3f} {m['region_ce_micro_f1'] or 0:10.3f} {m['bleu_4']:7.3f} "
              f"{m['distinct_reports']:9d} {m['image_dependent_reports']:10d}")
    if delta:
        print(f"full - global CE micro-F1: {delta['value']:+.3f} [{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]")
    print(f"targets met: {result['met']}  ({measured:.1f} measured minutes) -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
