"""The Argus study on phantoms: which encoder, which visual-token compression, how many tokens, how much data, and
whether multi-scale progressive training pays, each measured under one training recipe and one time budget.

Argus (CT-3DRRG) built its training recipe from controlled comparisons: 3D CNN against ViT encoders, pooling against
PCA for compressing visual tokens, data and model scale, and progressive training over growing resolutions. This
script runs those comparisons on the phantom benchmark (or on a real manifest) with rrg3d's components:

* ``encoders`` grid: encoders {resnet3d, vit3d, ctvit_v} × compressors {pool, pca, perceiver, pixel_shuffle} ×
  visual-token counts (``--tokens``, default 64 and 256) × arms (``--arms``). The compressor of each cell is set from
  the encoder's output grid so that every cell hands the LM exactly the same number of visual tokens: a pooling
  kernel / pixel-shuffle factor whose output grid has that many cells (the most even one), a token PCA with that many
  components (fitted on the training studies), a perceiver with that many latents. A combination that cannot reach
  the count (pooling cannot make more tokens than grid cells; token PCA keeps at most one component per cell and is
  tied to one grid) is recorded as ``skipped`` with the reason, and the grid goes on.
* ``schedule`` grid: single-scale against progressive multi-scale SFT (``--progressive-scales``, default 0.5 then
  1: the same preset at half the size and the same field of view, then the model's own) at equal training time, on
  ``--schedule-compressor`` / ``--schedule-tokens`` (default pool, 64) for each encoder. Token counts change with the
  resolution under pooling, so this grid standardises the projector's input per channel (``per_channel``) in both
  arms; the other grids standardise per token position (``per_token``, as the small configs do).
* ``scale`` grid: one cell (``--scale-cell``, default resnet3d/pool/64) trained on ``--scale-phantoms`` training
  studies (default 300, 1200, 2400; case ``i`` of a seed is the same whatever the count, so the sets are nested).

Arms: ``image`` hands the LM the image tokens only; ``dx`` adds diagnosis prompting (``rrg3d.models.classifier``: a
finding classifier on the encoder grid plus octant intensity histograms, fitted on the training studies before
align, trained beside the projector, threshold chosen on validation; every prompt lists its calls, in the order the
training reports name findings; training prompts list the true findings, ``--true-findings-share``). The target is
the full report (findings and impression).

The recipe (the same for every cell): the encoder is pretrained once per encoder and training-set size with CT-CLIP
(label-supervised, frozen MiniLM text tower, reading the impressions; ``--clip-minutes``, 0: none) and stays frozen;
then align (projector, and in the ``dx`` arm the classifier; a token PCA / perceiver is fitted / trained here) and
LoRA SFT (projector, compressor, LoRA) on the full reports. Each cell trains ``--budget-minutes`` (align
``--align-share`` of it): the recipe has no time limit, so the steps of each stage (and of each phase) come from its
step time measured in a short calibration run of the same model and recipe (``--calibration-steps``; cached in
``WORK/calibration.json``); the steps chosen are kept with the run (``plan_*.json``) so that a rerun trains the same
recipe. The minutes actually trained (the sum of the logged step times, validation and calibration left out) are
recorded. Single-scale and progressive cells of one model share their align run.

Per cell, on a fixed test set (``--test-phantoms`` phantoms of ``--test-seed``, a seed never used for training; the
validation phantoms come from it too): CE micro-F1 of the generated reports against the true labels with a 95%
study-bootstrap interval (``--bootstrap`` resamples), macro-F1, precision, recall, BLEU-4, METEOR, ROUGE-L, words
per report, the classifier's own test micro-F1 (``dx``), the last validation loss and image gain; visual tokens (per
phase), training throughput (samples/s over the trained steps), peak memory and minutes. ``peak_gb`` is measured in
the cell's own process (each cell and each CLIP run runs in a fresh child process): on a GPU
``torch.cuda.max_memory_allocated`` (tensors only), else the process's peak resident set (Linux ``VmHWM``, else
``ru_maxrss``) of calibration and training; ``generation_peak_gb`` is the peak of generating and scoring the test
reports (``--eval-batch-size`` at a time), measured apart from a reset peak, so the evaluation batch does not move
``peak_gb``. The budget is wall time, so the steps it buys depend on the machine: each cell and CLIP run records
``machine`` (CPU model, cores, threads, torch, GPU, a measured fp32 matmul speed). Two image-blind reports, each
said of every test study, are the reference rows of each training-set size: the majority-class report (the
training report with the most frequent label vector; on phantoms the normal study, CE 0) and the best constant
report (the training report whose labels, said of every training study, score the best CE micro-F1).

Results: ``--out`` (default ``benchmarks/results/study.json``: ``{"cells": [...], "baselines": [...]}``, written
atomically after every cell; rows of an earlier setup, e.g. another budget, are kept under ``other_setups``) and a
plot of CE micro-F1 against visual tokens per encoder (``--plot``, default the ``--out`` path with ``.png``). The
budget is time, so cells differ in steps as well as in their arm: ``steps_effect`` in the JSON gives, per arm, the
Spearman correlation of each cell's steps with its scores, and ``<plot>_steps.png`` plots CE micro-F1 and BLEU-4
against steps. ``marginals`` averages the encoders grid per encoder, compressor and token count and pairs its arms;
``data_scale`` sets the scale cell's CE beside what each training-set size gave its encoder (CT-CLIP validation
zero-shot AUROC and recall, the finding classifier's test AUROC); ``<plot>_grids.png`` plots the schedule and scale
grids. A cell whose result is in the JSON for this setup, or whose run folder holds its result, is not
rerun; runs live under ``WORK/runs/<setup id>/`` (``--work``, default ``study_work``). ``--grid`` and ``--cells``
(patterns over ``encoder/compressor/tokens/schedule/phantoms/arm/standardize``, leading parts enough:
``resnet3d/pool/64``, ``*/pca``) run parts; ``--plan`` prints the cells, their compressors and what is finished,
and trains nothing.

The whole study on CPU (2 cores): 64 cells (48 + 12 + 4) and 5 CT-CLIP runs (3 encoders on 1200 phantoms, the
scale cell's encoder on 300 and 2400), each cell about 19 minutes with its calibration, validation, generation of
the full test reports (about 6 minutes at ``--eval-batch-size`` 32) and scoring: roughly 20 hours. Run it in parts
(one grid or one encoder at a time; every invocation resumes where the last stopped; ``--plan`` shows what is left):

    python benchmarks/study.py --work study_work --plan
    python benchmarks/study.py --work study_work --grid encoders --cells resnet3d
    python benchmarks/study.py --work study_work --grid encoders --cells vit3d ctvit_v
    python benchmarks/study.py --work study_work --grid schedule scale
    python benchmarks/study.py --work study_work          # everything (what is finished is skipped)

At full size on one GPU: the full-size configs resnet3d / vit3d / ctvit_v at their own presets (ctrate 240×480×480,
m3d 32×256×256), gradient checkpointing, bf16; phantoms at 128×256×256, or a real manifest with train/val/test
splits. The preprocessing cache is off there (a 240×480×480 study is 110 MB in it): studies are preprocessed on the
fly by ``--loader-workers`` processes (``--cache on`` where the disk allows):

    python benchmarks/study.py --full-size --work /data/study_work --out benchmarks/results/study_full.json
    python benchmarks/study.py --full-size --manifest /data/ctrate/manifest.jsonl --scale-phantoms 2000 10000 40000 \\
        --work /data/study_ctrate --out benchmarks/results/study_ctrate.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, reset_vm_hwm, vm_hwm_gb

ENCODERS = ("resnet3d", "vit3d", "ctvit_v")
COMPRESSORS = ("pool", "pca", "perceiver", "pixel_shuffle")
GRIDS = ("encoders", "schedule", "scale")
ARMS = ("image", "dx")
SCHEDULES = ("single", "progressive")
STANDARDIZE = ("per_token", "per_channel")
#: the cell fields a ``--cells`` pattern matches, in order
KEY_FIELDS = ("encoder", "compressor", "tokens", "schedule", "phantoms", "arm", "standardize")
#: every row of ``cells`` carries these keys (the contract), besides any other
ROW_KEYS = ("encoder", "compressor", "tokens", "schedule", "phantoms", "ce_micro_f1", "ci95", "bleu_4",
            "samples_per_s", "peak_gb", "minutes")
#: the base model config of each encoder: CPU study size (32×64×64 input, 8³ grid) and full size
CPU_BASES = {"resnet3d": "small_resnet3d", "vit3d": "tiny_vit3d", "ctvit_v": "small_ctvit_v"}
FULL_BASES = {"resnet3d": "resnet3d", "vit3d": "vit3d", "ctvit_v": "ctvit_v"}
#: the CPU ViT: tiny_vit3d widened to the small CTViT-V's size (conv stem, 4×8×8 patches → 8³ grid, dim 64, 4 layers)
SMALL_VIT3D = {"patch_size": [4, 8, 8], "patch_stem": "conv", "dim": 64, "depth": 4, "heads": 4, "pos_embed": "sincos"}
FINDINGS_PROMPT = "Findings the image classifier calls: {findings}."
FIELD = "report"  # the generator's target: the whole report, findings and impression


@dataclasses.dataclass(frozen=True)
class Cell:
    """One trained and scored model of the study."""

    encoder: str
    compressor: str
    tokens: int
    schedule: str = "single"
    phantoms: int = 1200
    arm: str = "dx"
    standardize: str = "per_token"

    @property
    def key(self) -> str:
        return "/".join(str(getattr(self, name)) for name in KEY_FIELDS)

    @property
    def model_name(self) -> str:
        """The model folder (shared by the schedules of one model: they share its align run)."""
        return f"{self.compressor}{self.tokens}_{self.arm}_{self.standardize}"


# ------------------------------------------------------------------------------------------------------ planning


def plan_cells(args: argparse.Namespace) -> tuple[list[Cell], dict[str, list[str]]]:
    """The cells of the selected grids (deduplicated: the scale grid's cell at ``--phantoms`` is the encoders grid's
    one) and, per cell key, the grids it belongs to; ``--cells`` patterns filter them."""
    cells: dict[str, Cell] = {}
    grids: dict[str, list[str]] = {}

    def add(cell: Cell, grid: str) -> None:
        cells.setdefault(cell.key, cell)
        grids.setdefault(cell.key, []).append(grid)

    for grid in args.grid:
        if grid == "encoders":
            for encoder, compressor, tokens, arm in itertools.product(args.encoders, args.compressors, args.tokens,
                                                                      args.arms):
                add(Cell(encoder, compressor, tokens, "single", args.phantoms, arm, "per_token"), grid)
        elif grid == "schedule":
            for encoder, schedule, arm in itertools.product(args.encoders, SCHEDULES, args.arms):
                add(Cell(encoder, args.schedule_compressor, args.schedule_tokens, schedule, args.phantoms, arm,
                         "per_channel"), grid)
        elif grid == "scale":
            encoder, compressor, tokens = parse_scale_cell(args.scale_cell)
            for count, arm in itertools.product(args.scale_phantoms, args.arms):
                add(Cell(encoder, compressor, tokens, "single", count, arm, "per_token"), grid)
    selected = [cell for cell in cells.values() if matches(cell, args.cells)]
    return selected, {cell.key: grids[cell.key] for cell in selected}


def parse_scale_cell(text: str) -> tuple[str, str, int]:
    """``"resnet3d/pool/64"`` → ``("resnet3d", "pool", 64)``."""
    parts = text.split("/")
    if len(parts) != 3 or parts[0] not in ENCODERS or parts[1] not in COMPRESSORS or not parts[2].isdigit():
        raise SystemExit(f"--scale-cell must be ENCODER/COMPRESSOR/TOKENS (e.g. resnet3d/pool/64), got {text!r}")
    return parts[0], parts[1], int(parts[2])


def matches(cell: Cell, patterns: list[str] | None) -> bool:
    """Whether a cell matches one of the ``--cells`` patterns (``fnmatch`` per ``/`` part, leading parts enough)."""
    if not patterns:
        return True
    values = cell.key.split("/")
    for pattern in patterns:
        parts = [p for p in pattern.strip("/").split("/")]
        if len(parts) <= len(values) and all(fnmatch.fnmatchcase(v, p) for v, p in zip(values, parts, strict=False)):
            return True
    return False


def base_model_config(encoder: str, full_size: bool) -> dict[str, Any]:
    """The model config an encoder's cells start from (a dict): the encoder, the base's preset; LM, LoRA and
    generation settings from the resnet3d base, so that only the vision side differs between encoders."""
    from rrg3d.models.config import load_model_config

    bases = FULL_BASES if full_size else CPU_BASES
    config = load_model_config(bases[encoder]).to_dict()
    reference = load_model_config(bases["resnet3d"]).to_dict()
    if encoder == "vit3d" and not full_size:
        config["vision"]["encoder"].update(SMALL_VIT3D)
    config["lm"] = reference["lm"]
    config["generation"] = reference["generation"]
    return config


def encoder_grid(encoder_config: dict[str, Any], shape: tuple[int, ...]) -> tuple[tuple[int, int, int], int]:
    """The output grid ``(d, h, w)`` of an encoder for an input shape, and its channels (built on the meta device:
    nothing allocated)."""
    import torch

    from rrg3d.models.registry import ENCODERS as ENCODER_REGISTRY

    with torch.device("meta"):
        encoder = ENCODER_REGISTRY.build(encoder_config)
    return tuple(int(g) for g in encoder.grid_shape(tuple(shape))), int(encoder.out_dim)  # type: ignore[return-value]


def window_for(grid: tuple[int, int, int], tokens: int) -> tuple[int, int, int] | None:
    """The pooling kernel (or pixel-shuffle factor) whose output grid ``ceil(grid / k)`` has exactly ``tokens`` cells:
    the most even window first (then the most even output grid, windows that divide the grid, the smallest window,
    pooling slices first); None when no window gives that count."""
    best: tuple[Any, ...] | None = None
    for kernel in itertools.product(*(range(1, side + 1) for side in grid)):
        out = [math.ceil(side / k) for side, k in zip(grid, kernel, strict=True)]
        if math.prod(out) != tokens:
            continue
        if any(k > 1 and math.ceil(side / (k - 1)) == o for side, k, o in zip(grid, kernel, out, strict=True)):
            continue  # a smaller window gives the same grid
        inexact = sum(side % k != 0 for side, k in zip(grid, kernel, strict=True))
        score = (max(kernel) / min(kernel), max(out) / min(out), inexact, sum(kernel), tuple(-k for k in kernel))
        if best is None or score < best[0]:
            best = (score, kernel)
    return None if best is None else best[1]


def compressor_config(name: str, grid: tuple[int, int, int], channels: int, tokens: int, full_size: bool,
                      progressive: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The compressor mapping that turns this grid into ``tokens`` visual tokens, or None and the reason it cannot."""
    cells = math.prod(grid)
    if name in ("pool", "pixel_shuffle"):
        window = window_for(grid, tokens)
        if window is None:
            verb = "pooling" if name == "pool" else "pixel shuffle"
            return None, (f"{name}: no {verb} window turns the {'x'.join(map(str, grid))} grid ({cells} cells) into "
                          f"exactly {tokens} tokens" + (" (it can only merge cells)" if tokens > cells else ""))
        key = "kernel" if name == "pool" else "factor"
        return {"name": name, key: list(window)}, None
    if name == "pca":
        if progressive:
            return None, "pca: a token PCA is fitted on one grid and cannot follow the grid through progressive phases"
        if tokens > cells:
            return None, (f"pca: a token PCA keeps at most one component per grid cell ({cells} cells in the "
                          f"{'x'.join(map(str, grid))} grid < {tokens} tokens)")
        return {"name": "pca", "num_components": tokens, "axis": "tokens"}, None
    if name == "perceiver":
        return {"name": "perceiver", "num_latents": tokens, "dim": max(min(channels, 512), 16), "depth": 2,
                "heads": 8 if full_size else 4, "dim_head": 64 if full_size else 16}, None
    raise SystemExit(f"unknown compressor {name!r} (known: {', '.join(COMPRESSORS)})")


def scaled_preset(preset: Any, scale: float) -> dict[str, Any] | None:
    """A phase preset: ``preset`` at ``scale`` of its shape over the same field of view (spacing scaled inversely
    when it has one), as a mapping; None for scale 1 (the model's own preset)."""
    if scale == 1:
        return None
    data = preset.to_dict()
    shape = [max(8, round(side * scale)) for side in preset.shape]
    if data.get("spacing") is not None:
        data["spacing"] = [round(sp * old / new, 6) for sp, old, new in zip(data["spacing"], preset.shape, shape,
                                                                            strict=True)]
    data.update(shape=shape, name=f"{preset.name}_s{round(scale * 100)}", family=None, stage=None,
                description=f"{preset.name} at {scale:g} of its shape, same field of view (study progressive phase)")
    return data


def cell_model(cell: Cell, args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The model config (a dict) of a cell and what it means (grid, channels, compressor, tokens and preset of each
    phase); None and ``{"reason": ...}`` when the cell cannot reach its token count."""
    from rrg3d.models.registry import COMPRESSORS as COMPRESSOR_REGISTRY
    from rrg3d.preprocess.presets import load_preset

    config = base_model_config(cell.encoder, args.full_size)
    preset = load_preset(config["preprocess"])
    grid, channels = encoder_grid(config["vision"]["encoder"], preset.shape)
    progressive = cell.schedule == "progressive"
    info: dict[str, Any] = {"grid": list(grid), "channels": channels, "preset": preset.name}
    compressor, reason = compressor_config(cell.compressor, grid, channels, cell.tokens, args.full_size, progressive)
    if compressor is None:
        return None, {**info, "reason": reason}
    scales = args.progressive_scales if progressive else [1.0]
    phases = [scaled_preset(preset, scale) for scale in scales]
    built = COMPRESSOR_REGISTRY.build(compressor, in_dim=channels)  # small; a PCA's state is read on the CPU
    tokens_per_phase = []
    for phase in phases:
        shape = tuple(phase["shape"]) if phase is not None else tuple(preset.shape)
        tokens_per_phase.append(int(built.num_tokens(encoder_grid(config["vision"]["encoder"], shape)[0])))
    if tokens_per_phase[-1] != cell.tokens:  # the search guarantees it; a guard against a compressor change
        return None, {**info, "reason": f"{cell.compressor} gives {tokens_per_phase[-1]} tokens, not {cell.tokens}"}
    config["name"] = f"study_{cell.encoder}_{cell.model_name}"
    config["description"] = f"Argus study cell: {cell.encoder} + {cell.compressor} → {cell.tokens} tokens ({cell.arm})"
    config["vision"]["compressor"] = compressor
    config["vision"]["projector"] = {"name": "mlp2x_gelu", "standardize": cell.standardize}
    config["vision"].pop("classifier", None)
    if cell.arm == "dx":
        config["vision"]["classifier"] = {"hidden": 0, "histogram_bins": 16, "histogram_blocks": [2, 2, 2]}
        config["prompt"]["findings"] = FINDINGS_PROMPT  # main() adds the order the training reports name findings
    return config, {**info, "compressor": compressor, "phases": phases, "tokens_per_phase": tokens_per_phase,
                    "scales": scales}


# ------------------------------------------------------------------------------------------------------ settings


def setup_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a cell's result depends on besides the cell itself (its hash names the setup: runs and rows)."""
    return {"budget_minutes": args.budget_minutes, "full_size": args.full_size,
            "manifest": str(Path(args.manifest).resolve()) if args.manifest else None,
            "shape": None if args.manifest else list(args.shape), "seed": args.seed,
            "test_seed": None if args.manifest else args.test_seed,
            "val_phantoms": None if args.manifest else args.val_phantoms,
            "test_phantoms": None if args.manifest else args.test_phantoms,
            "batch_size": args.batch_size, "align_share": args.align_share, "align_lr": args.align_lr,
            "sft_lr": args.sft_lr, "classifier_lr_mult": args.classifier_lr_mult,
            "true_findings_share": args.true_findings_share, "fit_samples": args.fit_samples,
            "mixed_precision": args.mixed_precision, "progressive_scales": list(args.progressive_scales),
            "max_new_tokens": args.max_new_tokens, "clip": clip_settings(args)}


def clip_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """What a CT-CLIP run depends on besides the encoder and the training set (None: no CLIP pretraining)."""
    if args.clip_minutes <= 0:
        return None
    return {"minutes": args.clip_minutes, "batch_size": args.clip_batch_size, "lr": args.clip_lr,
            "label_weight": 1.0, "field": "impression", "full_size": args.full_size, "seed": args.seed,
            "mixed_precision": args.mixed_precision}


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------------- results


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"benchmark": "study", "cells": [], "baselines": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    from rrg3d.utils.files import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)


def put_row(results: dict[str, Any], row: dict[str, Any], table: str = "cells") -> None:
    """Insert or replace the row of this key (and setup); a row of another setup moves to ``other_setups``."""
    kept = []
    for old in results.get(table, []):
        if old.get("key") != row["key"]:
            kept.append(old)
        elif old.get("setup_id") != row.get("setup_id") and old.get("status") == "ok":
            results.setdefault("other_setups", []).append(old)
    results[table] = [*kept, row]


def finished_row(results: dict[str, Any], cell: Cell, setup_id: str) -> dict[str, Any] | None:
    """The recorded result of a cell in this setup (finished or skipped: neither is rerun)."""
    for row in results.get("cells", []):
        if row.get("key") == cell.key and row.get("setup_id") == setup_id and row.get("status") in ("ok", "skipped"):
            return row
    return None


def recorded_clip_plan(results: dict[str, Any], clip_id: str, encoder: str, count: int) -> dict[str, Any] | None:
    """The CT-CLIP plan (steps, step time) a finished cell of this CLIP setup, encoder and training-set size recorded,
    or None. A lost work folder (a new machine) then pretrains the encoder with the same steps instead of planning
    them anew from a step time measured on another machine: the cells already in the results and the cells still to
    run share one encoder recipe."""
    for row in results.get("cells", []):
        clip = row.get("clip") or {}
        if (row.get("status") != "ok" or row.get("encoder") != encoder or row.get("phantoms") != count
                or not clip.get("steps") or not clip.get("final")):
            continue
        if clip.get("clip_id", "") != clip_id and clip_id not in Path(clip["final"]).parts:
            continue
        steps = int(clip["steps"])
        per_step = clip.get("seconds_per_step") or (clip["seconds"] / steps if clip.get("seconds") else None)
        return {"steps": [steps], "seconds_per_step": [per_step], "recovered_from": row["key"]}
    return None


def skipped_row(cell: Cell, info: dict[str, Any], setup_id: str, grids: list[str]) -> dict[str, Any]:
    """The row of a cell that cannot reach its token count (recorded so the grid can say why it is empty)."""
    return {**dataclasses.asdict(cell), "key": cell.key, "setup_id": setup_id, "grids": grids, "status": "skipped",
            "reason": info["reason"], "grid": info.get("grid"), "channels": info.get("channels"),
            **{k: None for k in ROW_KEYS if k not in KEY_FIELDS}}


# ---------------------------------------------------------------------------------------------------------- data


def data_id(args: argparse.Namespace) -> str:
    """The name of a data setup (its manifests, references and preprocessing cache)."""
    settings = setup_settings(args)
    return short_hash({k: settings[k] for k in ("manifest", "shape", "seed", "test_seed", "val_phantoms",
                                                 "test_phantoms")})


def findings_order(manifest: Path) -> list[str]:
    """The 18 labels in the order the training reports of a manifest name them (the dx arm's prompt order)."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.text.labeler import mention_order
    from rrg3d.train.data import record_text

    return mention_order([record_text(r, FIELD) for r in load_manifest(manifest) if r.get("split") == "train"])


def count_train(manifest: Path) -> int:
    return sum(1 for line in manifest.read_text(encoding="utf-8").splitlines()
               if line.strip() and json.loads(line).get("split") == "train")


def manifest_path(args: argparse.Namespace, work: Path, count: int) -> Path:
    """Where :func:`study_data` writes the manifest of a training-set size."""
    return work / "data" / data_id(args) / f"n{count}" / "manifest.jsonl"


def study_data(args: argparse.Namespace, work: Path, count: int) -> Path:
    """The manifest of a training-set size: the first ``count`` training studies plus the fixed validation and test
    studies. Phantoms: a training pool of ``--seed`` (extended, never changed, when a larger count is asked) and an
    evaluation pool of ``--test-seed`` (test: its first ``--test-phantoms`` cases, validation: the next
    ``--val-phantoms``; ids prefixed ``eval_``); image paths rewritten relative to the new manifest."""
    from rrg3d.data.manifest import load_manifest, relativize, resolve, write_manifest

    out = manifest_path(args, work, count)
    if out.is_file():
        return out
    if args.manifest:
        source = Path(args.manifest).resolve()
        records = load_manifest(source)
        train = [r for r in records if r.get("split") == "train"][:count]
        rest = [r for r in records if r.get("split") in ("val", "test")]
        chosen = [(r, source) for r in train + rest]
    else:
        from rrg3d.data.phantom import PhantomConfig, generate_phantoms

        shape = tuple(args.shape)
        size = "x".join(map(str, shape))
        pool = generate_phantoms(PhantomConfig(n=count, seed=args.seed, shape=shape, styles=1),
                                 work / "phantoms" / f"seed{args.seed}_{size}", workers=args.workers, progress=False)
        evaluation = generate_phantoms(PhantomConfig(n=args.test_phantoms + args.val_phantoms, seed=args.test_seed,
                                                     shape=shape, styles=1),
                                       work / "phantoms" / f"seed{args.test_seed}_{size}", workers=args.workers,
                                       progress=False)
        chosen = [({**r, "split": "train"}, pool) for r in load_manifest(pool)[:count]]
        for index, record in enumerate(load_manifest(evaluation)[:args.test_phantoms + args.val_phantoms]):
            split = "test" if index < args.test_phantoms else "val"
            chosen.append(({**record, "id": f"eval_{record['id']}", "split": split}, evaluation))
    rows = []
    for record, source in chosen:
        images = {k: (relativize(resolve(source, v), out) if v else v) for k, v in (record.get("images") or {}).items()}
        masks = record.get("masks")
        if isinstance(masks, dict) and masks.get("path"):
            masks = {**masks, "path": relativize(resolve(source, masks["path"]), out)}
        rows.append({**record, "images": images, **({"masks": masks} if masks else {})})
    if not any(r["split"] == "test" for r, _ in chosen) or not any(r["split"] == "val" for r, _ in chosen):
        raise SystemExit(f"{args.manifest}: needs val and test studies")
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(rows, out)


def text_lengths(manifest: Path, args: argparse.Namespace) -> int:
    """``max_new_tokens`` of generation: ``--max-new-tokens``, or (0) the longest validation report in LM tokens
    plus 15%, rounded up to 32 (at most 512)."""
    if args.max_new_tokens:
        return int(args.max_new_tokens)
    from rrg3d.data.manifest import load_manifest
    from rrg3d.models.config import load_model_config
    from rrg3d.models.language import load_tokenizer, resolve_lm_path
    from rrg3d.train.data import record_text

    name = load_model_config((FULL_BASES if args.full_size else CPU_BASES)["resnet3d"]).lm.name_or_path
    tokenizer = load_tokenizer(resolve_lm_path(name), 0)
    texts = [record_text(r, FIELD) for r in load_manifest(manifest) if r.get("split") == "val"]
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts if t)
    return min(512, 32 * math.ceil(longest * 1.15 / 32))


def score_predictions(predictions: Path, references: Path, out: Path, bootstrap: int) -> dict[str, Any]:
    """The evaluation suite on a predictions file: CE (true labels) with its bootstrap interval, NLG, lengths."""
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files

    metrics = evaluate_files(predictions, references, out, EvaluateOptions(bootstrap=bootstrap, progress=False))
    coco, ce, ci = metrics["coco"], metrics["ce"], metrics.get("ci", {})
    interval = ci.get("ce.micro_f1") or {}
    lengths = metrics.get("lengths", {})
    return {"ce_micro_f1": ce["micro_f1"], "ci95": [interval.get("low"), interval.get("high")],
            "ce_macro_f1": ce["macro_f1"], "ce_micro_precision": ce["micro_precision"],
            "ce_micro_recall": ce["micro_recall"], "bleu_4": coco["bleu_4"], "meteor": coco.get("meteor"),
            "rouge_l": coco.get("rouge_l"), "cider": coco.get("cider"),
            "words_per_report": (lengths.get("generated") or {}).get("mean"),
            "reference_words_per_report": (lengths.get("reference") or {}).get("mean"),
            "test_studies": metrics.get("counts", {}).get("matched")}


CONSTANT_BASELINES = {"majority": "majority report", "constant": "best constant report"}


def has_baseline(results: dict[str, Any], kind: str, count: int, setup_id: str) -> bool:
    """Whether ``results`` holds the ``kind`` constant report of a training-set size in this setup."""
    return any(b.get("key") == f"{kind}/{count}" and b.get("setup_id") == setup_id
               for b in results.get("baselines", []))


def constant_baseline(kind: str, manifest: Path, references: Path, count: int, folder: Path,
                      args: argparse.Namespace, setup_id: str) -> dict[str, Any]:
    """One report for every test study, scored like the cells: ``majority`` (the training report with the most
    frequent label vector) or ``constant`` (the training report whose labels, said of every training study, score
    the best CE micro-F1: the strongest image-blind report when the majority vector names nothing)."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.train.data import best_constant_text, majority_text

    folder.mkdir(parents=True, exist_ok=True)
    choose = majority_text if kind == "majority" else best_constant_text
    text = choose(manifest, split="train", field=FIELD)
    predictions = folder / f"{kind}.jsonl"
    predictions.write_text("".join(json.dumps({"id": r["id"], "report": text}) + "\n"
                                   for r in load_manifest(references)), encoding="utf-8")
    scores = score_predictions(predictions, references, folder / f"eval_{kind}", args.bootstrap)
    return {"key": f"{kind}/{count}", "setup_id": setup_id, "status": "ok", "encoder": CONSTANT_BASELINES[kind],
            "compressor": "-", "tokens": 0, "schedule": "-", "phantoms": count, "arm": kind,
            "standardize": "-", **scores, "samples_per_s": None, "peak_gb": None, "minutes": 0.0}


# --------------------------------------------------------------------------------------------------- child jobs


def run_job(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run a CLIP or cell job in a fresh child process (its own peak memory, its own failures); its result."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / f"job_{spec.get('schedule', spec['kind'])}.json"
    spec_file.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    error_file = spec_file.with_suffix(".error.txt")
    error_file.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--job", str(spec_file)], env=env)
    result_file = Path(spec["result"])
    if code == 0 and result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    error = error_file.read_text(encoding="utf-8")[-2000:] if error_file.is_file() else f"exit code {code}"
    return {"status": "failed", "error": error}


def job_main(spec_file: str) -> int:
    """Entry point of a child process: run the job, write its result (or the traceback) next to the spec."""
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    try:
        result = clip_job(spec) if spec["kind"] == "clip" else cell_job(spec)
    except BaseException:
        Path(spec_file).with_suffix(".error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise
    from rrg3d.utils.files import atomic_write_json

    atomic_write_json(spec["result"], result)
    return 0


def peak_memory() -> tuple[float, str]:
    """This process's peak memory in GB and what was measured."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, "cuda_max_memory_allocated"
    return vm_hwm_gb(), "process_peak_rss"


def reset_peak_memory() -> bool:
    """Start :func:`peak_memory` afresh from the memory in use now; False where that is not possible (then the peak
    keeps counting from the process start)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return reset_vm_hwm()


def log_rows(run: Path) -> list[dict[str, str]]:
    path = run / "train_log.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def step_seconds(rows: list[dict[str, str]], batch_size: int) -> list[tuple[int, float]]:
    """``(phase, seconds)`` of each logged optimizer step: the batch over the logged samples/s (one process, no
    accumulation: the study's runs)."""
    return [(int(r["phase"]), batch_size / float(r["samples_per_s"])) for r in rows if r.get("samples_per_s")]


def trained(run: Path, batch_size: int) -> dict[str, Any]:
    """Steps, samples and training seconds (the sum of the step times) of a finished run."""
    steps = step_seconds(log_rows(run), batch_size)
    seconds = sum(s for _, s in steps)
    return {"steps": len(steps), "samples": len(steps) * batch_size, "seconds": round(seconds, 2),
            "samples_per_s": round(len(steps) * batch_size / seconds, 4) if seconds else None}


def last_eval(run: Path) -> dict[str, float]:
    path = run / "eval_log.csv"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {k: float(v) for k, v in (rows[-1] if rows else {}).items() if v not in ("", None) and k not in
            ("step", "phase")}


def calibrate(recipe: str, overrides: list[str], phases: list[Any], model_file: str, folder: Path,
              spec: dict[str, Any]) -> list[float]:
    """Seconds per optimizer step of each phase of a stage: measured on a short run of the same recipe and model
    (``calibration_steps`` per phase, no validation; :func:`typical_step`), cached in ``WORK/calibration.json`` by
    everything that sets the step time."""
    from rrg3d.train import train
    from rrg3d.utils.files import atomic_write_json

    settings = spec["settings"]
    cache_file = Path(spec["calibration_file"])
    timing_keys = [o for o in overrides if not o.startswith(("run_dir=", "model.config=", "model.init=",
                                                             "model.vision_init=", "optim.", "data.fit_samples="))]
    device = "cuda" if _cuda() else "cpu"
    key = short_hash([recipe, timing_keys, phases, Path(model_file).read_text(encoding="utf-8"), device])
    cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    if key in cache:
        return cache[key]["seconds_per_step"]
    steps = max(2, int(settings["calibration_steps"]))
    shutil.rmtree(folder, ignore_errors=True)
    phase_list = [{"preset": p, "steps": steps} for p in phases]
    train(recipe, [*overrides, f"run_dir={folder}", f"phases={json.dumps(phase_list)}", "data.val_split=null",
                   f"data.fit_samples={min(8, settings['fit_samples'])}"])
    times: dict[int, list[float]] = {}
    for phase, seconds in step_seconds(log_rows(folder), settings["batch_size"]):
        times.setdefault(phase, []).append(seconds)
    per_phase = [typical_step(times[i]) for i in range(len(phases))]
    cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    cache[key] = {"seconds_per_step": per_phase, "recipe": recipe, "phases": len(phases), "steps": steps,
                  "device": device, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(cache_file, cache)
    return per_phase


def typical_step(seconds: list[float]) -> float:
    """The step time a plan divides its budget by: the mean of the measured steps after the first (warm-up). The
    mean, not the median: a run's time is the sum of its steps, and step times are skewed (a batch is padded to its
    longest report, so they vary about 2.5× on the full reports)."""
    if not seconds:
        raise ValueError("no step was timed")
    steady = seconds[1:] or seconds
    return float(sum(steady) / len(steady))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def common_overrides(spec: dict[str, Any], model_file: str, max_length: int) -> list[str]:
    """The recipe overrides every stage of a cell shares."""
    settings = spec["settings"]
    return [f"model.config={model_file}", f"data.manifest={spec['manifest']}", f"data.report_field={FIELD}",
            f"data.batch_size={settings['batch_size']}", f"data.workers={settings['loader_workers']}",
            f"data.cache_dir={json.dumps(spec['cache_dir'])}",
            f"data.max_length={max_length}", f"seed={settings['seed']}", "data.max_val_samples=null",
            "train.progress=false", "train.save_every=0", "train.tensorboard=false",
            f"train.threads={settings['threads']}", f"train.mixed_precision={settings['mixed_precision']}",
            f"train.gradient_checkpointing={str(settings['full_size']).lower()}"]


def planned_steps(plan_file: Path, seconds: list[float], measure: Any) -> tuple[list[int], list[float]]:
    """Steps per phase for these seconds at the step times ``measure()`` gives, and those times; kept in
    ``plan_file`` (then nothing is measured) so that a rerun trains the same recipe."""
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        return plan["steps"], plan["seconds_per_step"]
    per_step = measure()
    steps = [max(1, math.floor(s / t)) for s, t in zip(seconds, per_step, strict=True)]
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"steps": steps, "seconds": seconds, "seconds_per_step": per_step}) + "\n",
                         encoding="utf-8")
    return steps, per_step


def clip_job(spec: dict[str, Any]) -> dict[str, Any]:
    """CT-CLIP pretraining of one encoder on one training set, for ``clip_minutes`` of measured step time."""
    import learnability

    start = time.perf_counter()
    machine = machine_info()
    settings, clip = spec["settings"], spec["clip_settings"]
    folder = Path(spec["folder"])
    overrides = [*common_overrides(spec, spec["model_config"], 256), f"data.batch_size={clip['batch_size']}",
                 f"optim.lr={clip['lr']}", "optim.weight_decay=0.05", f"data.report_field={clip['field']}",
                 "model.clip.pooling=meanmax", "model.clip.embed_dim=128",
                 f"model.clip.label_weight={clip['label_weight']}", "model.clip.train_text=false",
                 "data.max_val_samples=200", "data.augment.enabled=false"]
    steps, per_step = planned_steps(folder / "clip_plan.json", [clip["minutes"] * 60], lambda: calibrate(
        "tiny_clip", overrides, [None], spec["model_config"], folder / "calibration",
        {**spec, "settings": {**settings, "batch_size": clip["batch_size"]}}))
    metrics: dict[str, Any] = {}
    final = learnability.finished_or_train("tiny_clip", [
        *overrides, f"run_dir={folder / 'clip'}", f"phases={json.dumps([{'preset': None, 'steps': steps[0]}])}"],
        metrics)
    peak, kind = peak_memory()
    return {"status": "ok", "final": str(final), "steps": steps[0], "seconds_per_step": per_step[0],
            **trained(folder / "clip", clip["batch_size"]), "val": metrics, "peak_gb": round(peak, 3),
            "peak_kind": kind, "machine": machine, "wall_minutes": round((time.perf_counter() - start) / 60, 2)}


def cell_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Calibrate, train (align, then SFT in the cell's schedule), generate the test reports and score them."""
    import torch

    import learnability
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports
    from rrg3d.train.data import build_dataset

    start = time.perf_counter()
    machine = machine_info()  # the steps a time budget buys depend on it
    settings, cell = spec["settings"], Cell(**spec["cell"])
    folder, schedule = Path(spec["folder"]), spec["schedule"]
    model_file = spec["model_config"]
    phases = spec["phases"]
    max_length = max(spec["tokens_per_phase"]) + settings["prompt_room"] + settings["max_new_tokens"]
    common = common_overrides(spec, model_file, max_length)
    teacher = ([f"model.true_findings_share={settings['true_findings_share']}"]
               if cell.arm == "dx" and settings["true_findings_share"] else [])
    fit = [f"data.fit_samples={settings['fit_samples']}"]
    classifier_rate = ([f"optim.lr_multipliers={json.dumps({'vision.classifier': settings['classifier_lr_mult']})}"]
                       if cell.arm == "dx" else [])
    vision_init = [f"model.vision_init={spec['clip']}"] if spec.get("clip") else []
    budget = settings["budget_minutes"] * 60
    align_seconds = budget * settings["align_share"]

    align_overrides = [*common, *teacher, *fit, *classifier_rate, f"optim.lr={settings['align_lr']}"]
    (align_steps,), align_step = planned_steps(folder / "plan_align.json", [align_seconds], lambda: calibrate(
        "tiny_align", align_overrides, [None], model_file, folder / "calibration" / "align", spec))
    align = learnability.finished_or_train("tiny_align", [
        *align_overrides, *vision_init, f"run_dir={folder / 'align'}",
        f"phases={json.dumps([{'preset': None, 'steps': align_steps}])}"])

    sft_overrides = [*common, *teacher, f"optim.lr={settings['sft_lr']}", "model.train.encoder=false",
                     "optim.lr_multipliers={}"]
    sft_seconds = [(budget - align_seconds) / len(phases)] * len(phases)  # equal time per phase
    # the SFT calibration starts from the trained align run: the very model the SFT run trains
    sft_steps, sft_step = planned_steps(folder / f"plan_sft_{schedule}.json", sft_seconds, lambda: calibrate(
        "tiny_sft", [*sft_overrides, f"model.init={align}"], phases, model_file,
        folder / "calibration" / f"sft_{schedule}", spec))
    sft_dir = folder / f"sft_{schedule}"
    final = learnability.finished_or_train("tiny_sft", [
        *sft_overrides, f"model.init={align}", f"run_dir={sft_dir}",
        f"phases={json.dumps([{'preset': p, 'steps': n} for p, n in zip(phases, sft_steps, strict=True)])}"])
    reused = [r for r in learnability.REUSED if Path(r) in (folder / "align", sft_dir)]

    tick = time.perf_counter()
    # the peak of calibration and training (None when both runs were reused: nothing trained in this process), then
    # the peak of generating and scoring, measured apart so that the evaluation batch does not move ``peak_gb``
    trained_peak, kind = peak_memory()
    trained_peak = None if len(reused) == 2 else trained_peak
    generation_peak_apart = reset_peak_memory()
    device = "cuda" if torch.cuda.is_available() else None
    model = load_checkpoint(final, merge_lora=True, device=device)
    model.config.generation.max_new_tokens = settings["max_new_tokens"]
    predictions = folder / f"predictions_{schedule}.jsonl"
    generate_reports(model, [spec["references"]], predictions, batch_size=settings["eval_batch_size"],
                     progress=False, resume=False)
    scores = score_predictions(predictions, Path(spec["references"]), folder / f"eval_{schedule}",
                               settings["bootstrap"])
    test_set = build_dataset(spec["manifest"], model.config.preprocess, split="test", cache_dir=spec["cache_dir"],
                             report_field=FIELD, progress=False)
    classifier = learnability.classifier_scores(model, test_set)
    from rrg3d.preprocess.presets import load_preset

    tokens = int(model.vision.num_tokens(load_preset(model.config.preprocess).shape))
    generation_peak, _ = peak_memory()
    align_stats, sft_stats = trained(folder / "align", settings["batch_size"]), trained(sft_dir, settings["batch_size"])
    seconds = align_stats["seconds"] + sft_stats["seconds"]
    samples = align_stats["samples"] + sft_stats["samples"]
    sft_rows = step_seconds(log_rows(sft_dir), settings["batch_size"])
    validation = last_eval(sft_dir)
    return {"status": "ok", **scores, **classifier, "tokens": tokens, "tokens_per_phase": spec["tokens_per_phase"],
            "samples_per_s": round(samples / seconds, 4) if seconds else None,
            "peak_gb": None if trained_peak is None else round(trained_peak, 3), "peak_kind": kind,
            "generation_peak_gb": round(generation_peak, 3) if generation_peak_apart else None,
            "minutes": round(seconds / 60, 2),
            "align": {**align_stats, "planned_steps": align_steps, "seconds_per_step": align_step[0]},
            "sft": {**sft_stats, "planned_steps": sft_steps, "seconds_per_step": sft_step,
                    "seconds_per_phase": [round(sum(s for p, s in sft_rows if p == i), 2)
                                          for i in range(len(phases))]},
            "val_loss": validation.get("val_loss"), "val_image_gain": validation.get("image_gain"), "val": validation,
            "reused_runs": reused, "machine": machine, "eval_minutes": round((time.perf_counter() - tick) / 60, 2),
            "wall_minutes": round((time.perf_counter() - start) / 60, 2),
            "runs": {"align": str(folder / "align"), "sft": str(sft_dir), "predictions": str(predictions)}}


# ------------------------------------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> None:
    """The study's table: one line per cell of this setup, the constant reports last."""
    header = (f"{'encoder':<20} {'compressor':<13} {'tokens':>6} {'schedule':<11} {'phantoms':>8} {'arm':<8} "
              f"{'CE micro-F1 [95% CI]':<24} {'macro-F1':>8} {'BLEU-4':>6} {'METEOR':>6} {'words':>5} "
              f"{'clf F1':>6} {'samples/s':>9} {'peak GB':>7} {'minutes':>7}  status")
    print("\n" + header)
    print("-" * len(header))
    order = {name: i for i, name in enumerate(ENCODERS)}
    for r in sorted(rows, key=lambda r: (r["phantoms"], r["schedule"] != "single", order.get(r["encoder"], 9),
                                         r["compressor"], r["tokens"], r["arm"], r["standardize"])) + baselines:
        ci = r.get("ci95") or [None, None]
        ce = (f"{fmt(r.get('ce_micro_f1'))} [{fmt(ci[0])}, {fmt(ci[1])}]" if r.get("ce_micro_f1") is not None
              else "-")
        schedule = r["schedule"] + ("*" if r.get("standardize") == "per_channel" else "")
        status = r.get("status", "")
        if status != "ok":
            lines = str(r.get("reason") or r.get("error") or "").strip().splitlines()
            status += f": {lines[-1] if lines else ''}"
        print(f"{r['encoder']:<20} {r['compressor']:<13} {r['tokens']:>6} {schedule:<11} {r['phantoms']:>8} "
              f"{r['arm']:<8} {ce:<24} {fmt(r.get('ce_macro_f1')):>8} {fmt(r.get('bleu_4')):>6} "
              f"{fmt(r.get('meteor')):>6} {fmt(r.get('words_per_report'), 0):>5} "
              f"{fmt(r.get('classifier_test_micro_f1')):>6} {fmt(r.get('samples_per_s'), 2):>9} "
              f"{fmt(r.get('peak_gb'), 2):>7} {fmt(r.get('minutes'), 1):>7}  {status}")
    print("(* projector standardised per channel: the schedule grid)", flush=True)


def encoders_grid_rows(rows: list[dict[str, Any]], phantoms: int) -> list[dict[str, Any]]:
    """The rows of the encoders grid's kind: single-scale, ``phantoms`` training studies, per-token standardisation
    (the schedule grid standardises per channel, the scale grid changes the data)."""
    return [r for r in rows if r["schedule"] == "single" and r["phantoms"] == phantoms
            and r.get("standardize") == "per_token"]


def error_bars(points: list[dict[str, Any]]) -> list[list[float]]:
    """``yerr`` for CE micro-F1 from each row's 95% interval (no bar where a bound is missing)."""
    return [[r["ce_micro_f1"] - (r["ci95"][0] if r["ci95"][0] is not None else r["ce_micro_f1"]) for r in points],
            [(r["ci95"][1] if r["ci95"][1] is not None else r["ce_micro_f1"]) - r["ce_micro_f1"] for r in points]]


def plot(rows: list[dict[str, Any]], baselines: list[dict[str, Any]], phantoms: int, path: Path) -> Path | None:
    """CE micro-F1 against visual tokens, one panel per encoder, one line per compressor and arm (single-scale
    cells of the encoders grid at ``phantoms``), with the 95% intervals and the constant reports' levels."""
    chosen = [r for r in encoders_grid_rows(rows, phantoms) if r.get("status") == "ok"]
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = [e for e in ENCODERS if any(r["encoder"] == e for r in chosen)]
    figure, axes = plt.subplots(1, len(encoders), figsize=(max(6.0, 4.2 * len(encoders)), 3.8), sharey=True,
                                squeeze=False)
    colours = dict(zip(COMPRESSORS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    levels = [(b, style) for kind, style in (("majority", ":"), ("constant", "-."))
              for b in baselines if b["phantoms"] == phantoms and b["arm"] == kind]
    for axis, encoder in zip(axes[0], encoders, strict=True):
        for compressor, arm in itertools.product(COMPRESSORS, ARMS):
            points = sorted((r for r in chosen if r["encoder"] == encoder and r["compressor"] == compressor
                             and r["arm"] == arm), key=lambda r: r["tokens"])
            if not points:
                continue
            x = [r["tokens"] for r in points]
            y = [r["ce_micro_f1"] for r in points]
            axis.errorbar(x, y, yerr=error_bars(points), color=colours[compressor],
                          linestyle="-" if arm == "image" else "--", marker="o" if arm == "image" else "s",
                          capsize=3, label=f"{compressor} ({arm})")
        for baseline, style in levels:
            axis.axhline(baseline["ce_micro_f1"], color="grey", linestyle=style, label=baseline["encoder"])
        axis.set_xscale("log", base=2)
        ticks = sorted({r["tokens"] for r in chosen})
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_title(encoder)
        axis.set_xlabel("visual tokens")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("CE micro-F1 (test, 95% CI)")
    return save_figure(figure, axes[0], f"{phantoms} training studies, full reports, equal training budget", 0.86,
                       path)


def save_figure(figure: Any, axes: Any, title: str, right: float, path: Path) -> Path:
    """Title ``figure``, give it one legend on the right (every panel's entries once each: a line may appear in one
    panel only; the panels take ``right`` of the width), save it as ``path`` and close it."""
    import matplotlib.pyplot as plt

    entries: dict[str, Any] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0.0, 0.0, right, 1.0))
    figure.legend(list(entries.values()), list(entries), fontsize=7, loc="center right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


STEP_METRICS = ("ce_micro_f1", "ce_micro_recall", "bleu_4", "words_per_report")


def cell_steps(row: dict[str, Any]) -> int | None:
    """Optimizer steps a finished cell trained: align plus SFT (all phases)."""
    align, sft = (row.get("align") or {}).get("steps"), (row.get("sft") or {}).get("steps")
    return None if align is None or sft is None else int(align) + int(sft)


def steps_effect(rows: list[dict[str, Any]], min_cells: int = 4) -> dict[str, Any]:
    """Per arm, Spearman's rank correlation between the steps a cell trained and each of ``STEP_METRICS``, over the
    finished cells (an arm with fewer than ``min_cells`` is left out).

    The budget is time, so a cell's steps depend on its step cost and on the machine as well as on its arm. A
    correlation near ±1 says the grid ranks cells by how far they trained rather than by what they compare."""
    from scipy.stats import spearmanr

    effect: dict[str, Any] = {}
    for arm in ARMS:
        chosen = [(count, r) for r in rows if r.get("status") == "ok" and r.get("arm") == arm
                  and (count := cell_steps(r)) is not None]
        if len(chosen) < min_cells:
            continue
        steps = [s for s, _ in chosen]
        entry: dict[str, Any] = {"cells": len(chosen), "steps": [min(steps), max(steps)]}
        for metric in STEP_METRICS:
            pairs = [(s, r[metric]) for s, r in chosen if r.get(metric) is not None]
            if len(pairs) < min_cells or len({v for _, v in pairs}) < 2 or len({s for s, _ in pairs}) < 2:
                continue
            rho, p_value = spearmanr([s for s, _ in pairs], [v for _, v in pairs])
            entry[metric] = {"rho": round(float(rho), 3), "p": round(float(p_value), 4), "cells": len(pairs)}
        effect[arm] = entry
    return effect


def print_steps_effect(effect: dict[str, Any]) -> None:
    if not effect:
        return
    print("\nSpearman's rho of training steps against each metric (p), per arm:")
    for arm, entry in effect.items():
        cells = ", ".join(f"{m} {entry[m]['rho']:+.2f} ({entry[m]['p']:.3f})" for m in STEP_METRICS if m in entry)
        print(f"  {arm:<6} {entry['cells']} cells, {entry['steps'][0]}-{entry['steps'][1]} steps: {cells}", flush=True)


def plot_steps(rows: list[dict[str, Any]], baselines: list[dict[str, Any]], phantoms: int, path: Path) -> Path | None:
    """CE micro-F1 and BLEU-4 against the steps each finished cell trained, by arm and encoder (the best constant
    report of ``phantoms`` training studies for reference): what the time budget bought each cell."""
    chosen = [(steps, r) for r in rows if r.get("status") == "ok" and (steps := cell_steps(r)) is not None]
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    markers = dict(zip(ENCODERS, ("o", "s", "^"), strict=True))
    colours = dict(zip(ARMS, ("tab:blue", "tab:red"), strict=True))
    for axis, metric, label in zip(axes, ("ce_micro_f1", "bleu_4"), ("CE micro-F1 (test)", "BLEU-4 (test)"),
                                   strict=True):
        for encoder, arm in itertools.product(ENCODERS, ARMS):
            points = [(s, r[metric]) for s, r in chosen if r["encoder"] == encoder and r["arm"] == arm
                      and r.get(metric) is not None]
            if points:
                axis.scatter([s for s, _ in points], [v for _, v in points], marker=markers[encoder],
                             color=colours[arm], label=f"{encoder} ({arm})", alpha=0.8)
        for baseline in baselines:
            if baseline.get("arm") == "constant" and baseline["phantoms"] == phantoms and metric in baseline:
                axis.axhline(baseline[metric], color="grey", linestyle="-.", label="best constant report")
        axis.set_xlabel("optimizer steps (align + SFT)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    return save_figure(figure, axes, "What an equal time budget bought each cell", 0.83, path)


def plot_grids(rows: list[dict[str, Any]], baselines: list[dict[str, Any]], scale_cell: tuple[str, str, int],
               phantoms: int, path: Path) -> Path | None:
    """The schedule and scale grids side by side: CE micro-F1 (95% CI) of single-scale against progressive training
    per encoder and arm, and CE micro-F1 of ``scale_cell`` against its training-set size with the best constant
    report of each size. A panel needs its cells (the scale curve two sizes at least); None when neither has them."""
    finished = [r for r in rows if r.get("status") == "ok" and r.get("ce_micro_f1") is not None]
    schedule = [r for r in finished if r.get("standardize") == "per_channel" and r["phantoms"] == phantoms]
    encoder, compressor, tokens = scale_cell
    scale = scale_grid_rows(finished, scale_cell)
    pretraining = [s for s in data_scale(rows, scale_cell) if s.get("clip_zero_shot_auroc") is not None
                   or s.get("classifier_test_auroc") is not None]
    panels = [name for name, chosen, needed in (("schedule", schedule, 1), ("scale", scale, 2),
                                                 ("encoder", pretraining, 2))
              if len({r["phantoms"] for r in chosen} if name != "schedule" else chosen) >= needed]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    colours = dict(zip(ARMS, ("tab:blue", "tab:red"), strict=True))

    for axis, panel in zip(axes[0], panels, strict=True):
        if panel == "schedule":
            encoders = [e for e in ENCODERS if any(r["encoder"] == e for r in schedule)]
            for (offset, kind), arm in itertools.product(enumerate(SCHEDULES), ARMS):
                points = [r for e in encoders for r in schedule
                          if r["encoder"] == e and r["schedule"] == kind and r["arm"] == arm]
                if not points:
                    continue
                x = [encoders.index(r["encoder"]) + (offset - 0.5) * 0.3 + (0.06 if arm == "dx" else -0.06)
                     for r in points]
                axis.errorbar(x, [r["ce_micro_f1"] for r in points], yerr=error_bars(points), color=colours[arm],
                              marker="o" if kind == "single" else "D", mfc="white" if kind == "progressive" else None,
                              linestyle="none", capsize=3, label=f"{kind} ({arm})")
            axis.set_xticks(range(len(encoders)), encoders)
            axis.set_xlim(-0.6, len(encoders) - 0.4)
            axis.set_title(f"single-scale vs progressive ({schedule[0]['compressor']}, {schedule[0]['tokens']} "
                           "tokens)", fontsize=9)
            for baseline in baselines:
                if baseline.get("arm") == "constant" and baseline["phantoms"] == phantoms:
                    axis.axhline(baseline["ce_micro_f1"], color="grey", linestyle="-.", label="best constant report")
        elif panel == "scale":
            for arm in ARMS:
                points = sorted((r for r in scale if r["arm"] == arm), key=lambda r: r["phantoms"])
                if points:
                    axis.errorbar([r["phantoms"] for r in points], [r["ce_micro_f1"] for r in points],
                                  yerr=error_bars(points), color=colours[arm], marker="o", capsize=3,
                                  label=f"{encoder}/{compressor}/{tokens} ({arm})")
            constant = sorted((b for b in baselines if b.get("arm") == "constant"
                               and b["phantoms"] in {r["phantoms"] for r in scale}), key=lambda b: b["phantoms"])
            if constant:
                axis.plot([b["phantoms"] for b in constant], [b["ce_micro_f1"] for b in constant], color="grey",
                          linestyle="-.", marker="x", label="best constant report")
            _training_studies_axis(axis, scale)
            axis.set_title("data scale", fontsize=9)
        else:
            for metric, label, style in (("clip_zero_shot_auroc", "CT-CLIP zero-shot AUROC (val)", "s--"),
                                         ("clip_i2t_r1", "CT-CLIP image→report R@1 (val)", "^--"),
                                         ("classifier_test_auroc", "dx arm's finding classifier AUROC (test)", "o:")):
                points = [s for s in pretraining if s.get(metric) is not None]
                if points:
                    axis.plot([s["phantoms"] for s in points], [s[metric] for s in points], style, color="tab:green"
                              if metric.startswith("clip") else "tab:red", mfc="white" if "r1" in metric else None,
                              label=label)
            _training_studies_axis(axis, pretraining)
            axis.set_ylim(0, 1)
            axis.set_title(f"what the data gave {encoder}", fontsize=9)
            axis.set_ylabel("AUROC / recall")
            axis.grid(alpha=0.3)
            continue
        axis.set_ylabel("CE micro-F1 (test, 95% CI)")
        axis.grid(alpha=0.3)
    return save_figure(figure, axes[0], "Schedule and data scale at an equal training budget", 0.8, path)


def _training_studies_axis(axis: Any, rows: list[dict[str, Any]]) -> None:
    counts = sorted({r["phantoms"] for r in rows})
    axis.set_xscale("log")
    axis.set_xticks(counts, [str(c) for c in counts])
    axis.minorticks_off()
    axis.set_xlabel("training studies")


def scale_grid_rows(rows: list[dict[str, Any]], scale_cell: tuple[str, str, int]) -> list[dict[str, Any]]:
    """The finished single-scale, per-token cells of ``scale_cell`` (ENCODER, COMPRESSOR, TOKENS) at any training-set
    size: the scale grid's cells and the encoders grid's cell it shares."""
    return [r for r in rows if r.get("status") == "ok" and r.get("ce_micro_f1") is not None
            and r["schedule"] == "single" and r.get("standardize") == "per_token"
            and (r["encoder"], r["compressor"], r["tokens"]) == tuple(scale_cell)]


def data_scale(rows: list[dict[str, Any]], scale_cell: tuple[str, str, int]) -> list[dict[str, Any]]:
    """Per training-set size of ``scale_cell``: what the data bought the encoder (its CT-CLIP run's steps, validation
    zero-shot AUROC and image→report recall@1; the dx arm's finding classifier's test AUROC) beside CE micro-F1 and the
    SFT steps per arm, so a flat report curve can be told apart from an encoder that did not improve."""
    sizes: dict[int, dict[str, Any]] = {}
    for r in sorted(scale_grid_rows(rows, scale_cell), key=lambda r: (r["phantoms"], r["arm"])):
        size = sizes.setdefault(r["phantoms"], {"phantoms": r["phantoms"]})
        clip = r.get("clip") or {}
        val = clip.get("val") or {}
        for key, value in (("clip_steps", clip.get("steps")), ("clip_zero_shot_auroc", val.get("zero_shot_auroc")),
                           ("clip_i2t_r1", val.get("i2t_R@1"))):
            if value is not None:
                size.setdefault(key, value)
        if r.get("classifier_test_auroc") is not None:
            size["classifier_test_auroc"] = r["classifier_test_auroc"]
        size[f"ce_micro_f1_{r['arm']}"] = r["ce_micro_f1"]
        size[f"sft_steps_{r['arm']}"] = (r.get("sft") or {}).get("steps")
    return [sizes[count] for count in sorted(sizes)]


def print_data_scale(summary: list[dict[str, Any]]) -> None:
    if len(summary) < 2:
        return
    print("\nData scale (the scale cell per training-set size):")
    print(f"  {'studies':>7} {'CLIP steps':>10} {'zero-shot AUROC':>15} {'R@1':>5} {'classifier AUROC':>16} "
          + " ".join(f"{'CE ' + arm:>8}" for arm in ARMS))
    def number(size: dict[str, Any], key: str, width: int) -> str:
        value = size.get(key)
        return f"{'–':>{width}}" if value is None else f"{value:>{width}.3f}"

    for s in summary:
        print(f"  {s['phantoms']:>7} {s.get('clip_steps') or '–':>10} {number(s, 'clip_zero_shot_auroc', 15)} "
              f"{number(s, 'clip_i2t_r1', 5)} {number(s, 'classifier_test_auroc', 16)} "
              + " ".join(number(s, f"ce_micro_f1_{arm}", 8) for arm in ARMS), flush=True)


MARGINAL_FACTORS = ("encoder", "compressor", "tokens")


def grid_marginals(rows: list[dict[str, Any]], phantoms: int) -> dict[str, Any]:
    """What the encoders grid says on average (single-scale cells at ``phantoms``, one seed each): per arm, the mean,
    range and count of CE micro-F1 over the cells of each encoder, compressor and token count; and the diagnosis
    prompt's effect over the pairs of cells that differ only in the arm (dx minus image: mean, range, how many pairs
    gain, and the two-sided Wilcoxon signed-rank p)."""
    chosen = [r for r in encoders_grid_rows(rows, phantoms) if r.get("status") == "ok"
              and r.get("ce_micro_f1") is not None]
    summary: dict[str, Any] = {}
    for arm in ARMS:
        in_arm = [r for r in chosen if r["arm"] == arm]
        if not in_arm:
            continue
        summary[arm] = {factor: {str(level): _spread([r["ce_micro_f1"] for r in in_arm if r[factor] == level])
                                 for level in sorted({r[factor] for r in in_arm}, key=_level_order(factor))}
                        for factor in MARGINAL_FACTORS}
    by_key = {(r["encoder"], r["compressor"], r["tokens"], r["arm"]): r for r in chosen}
    gains = [round(by_key[(*key[:3], "dx")]["ce_micro_f1"] - r["ce_micro_f1"], 6) for key, r in by_key.items()
             if key[3] == "image" and (*key[:3], "dx") in by_key]
    if gains:
        effect: dict[str, Any] = {k: v for k, v in _spread(gains).items() if k != "cells"}
        effect.update(pairs=len(gains), pairs_gaining=sum(g > 0 for g in gains))
        if len(gains) >= 6 and any(g != 0 for g in gains):
            from scipy.stats import wilcoxon

            effect["wilcoxon_p"] = float(f"{float(wilcoxon(gains).pvalue):.3g}")
        summary["dx_minus_image"] = effect
    return summary


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": round(sum(values) / len(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "cells": len(values)}


def _level_order(factor: str) -> Any:
    order = {"encoder": ENCODERS, "compressor": COMPRESSORS}.get(factor)
    return (lambda level: order.index(level) if level in order else len(order)) if order else (lambda level: level)


def print_marginals(summary: dict[str, Any]) -> None:
    if not summary:
        return
    print("\nCE micro-F1 averaged over the encoders grid (mean [min, max] over cells):")
    for arm in ARMS:
        for factor, levels in summary.get(arm, {}).items():
            spread = ", ".join(f"{level} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                               for level, v in levels.items())
            print(f"  {arm:<6} by {factor:<10} {spread}")
    effect = summary.get("dx_minus_image")
    if effect:
        p_value = f", Wilcoxon p {effect['wilcoxon_p']:.2g}" if "wilcoxon_p" in effect else ""
        print(f"  diagnosis prompt: {effect['mean']:+.3f} on average over {effect['pairs']} pairs "
              f"[{effect['min']:+.3f}, {effect['max']:+.3f}], {effect['pairs_gaining']} gain{p_value}", flush=True)


# --------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # list options take values separated by spaces or commas (--arms image,dx)
    parser.add_argument("--grid", nargs="+", default=list(GRIDS), help=f"the grids to run ({', '.join(GRIDS)})")
    parser.add_argument("--cells", nargs="+", default=None, metavar="PATTERN",
                        help="only cells whose key encoder/compressor/tokens/schedule/phantoms/arm/standardize "
                             "matches (fnmatch per part, leading parts enough, e.g. resnet3d/pool/64 or '*/pca')")
    parser.add_argument("--arms", nargs="+", default=list(ARMS),
                        help="image: image tokens only; dx: plus the diagnosis prompt")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), help=", ".join(ENCODERS))
    parser.add_argument("--compressors", nargs="+", default=list(COMPRESSORS), help=", ".join(COMPRESSORS))
    parser.add_argument("--tokens", nargs="+", default=[64, 256], help="visual-token counts to match")
    parser.add_argument("--schedule-compressor", default="pool", choices=COMPRESSORS)
    parser.add_argument("--schedule-tokens", type=int, default=64)
    parser.add_argument("--progressive-scales", nargs="+", type=float, default=[0.5, 1.0],
                        help="progressive SFT: the phases' input sizes as fractions of the model's preset (equal "
                             "time each; the last must be 1)")
    parser.add_argument("--scale-cell", default="resnet3d/pool/64", help="ENCODER/COMPRESSOR/TOKENS of the scale grid")
    parser.add_argument("--scale-phantoms", nargs="+", default=[300, 1200, 2400])
    parser.add_argument("--phantoms", type=int, default=None,
                        help="training studies of the encoders and schedule grids (default 1200; with --manifest "
                             "all its training studies)")
    parser.add_argument("--val-phantoms", type=int, default=48)
    parser.add_argument("--test-phantoms", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="phantom shape (default 64 128 128; 128 256 256 with --full-size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training phantoms and of training")
    parser.add_argument("--test-seed", type=int, default=1000, help="seed of the validation and test phantoms")
    parser.add_argument("--manifest", default=None,
                        help="a real manifest with train/val/test splits instead of phantoms (the scale grid takes "
                             "the first N training studies)")
    parser.add_argument("--full-size", action="store_true",
                        help="the full-size configs (resnet3d, vit3d, ctvit_v at their own presets) on a GPU")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="training time of each cell (align + SFT)")
    parser.add_argument("--align-share", type=float, default=0.3, help="share of the budget that align trains")
    parser.add_argument("--clip-minutes", type=float, default=6.0,
                        help="CT-CLIP pretraining time per encoder and training set (0: none, the encoder stays "
                             "as initialised)")
    parser.add_argument("--clip-batch-size", type=int, default=32)
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--sft-lr", type=float, default=5e-4)
    parser.add_argument("--classifier-lr-mult", type=float, default=1.0)
    parser.add_argument("--true-findings-share", type=float, default=1.0,
                        help="dx arm: share of the training prompts listing the true findings")
    parser.add_argument("--fit-samples", type=int, default=512,
                        help="training studies that fit the PCA, the projector's standardisation and the classifier")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16"))
    parser.add_argument("--calibration-steps", type=int, default=8, help="steps per phase of a calibration run")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="report tokens generated (and trained on); 0: the longest validation report + 15%%")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=2, help="phantom generation processes")
    parser.add_argument("--cache", default="auto", choices=("auto", "on", "off"),
                        help="preprocessing cache of every study at each phase's preset (auto: on, off with "
                             "--full-size: 240x480x480 float16 is 110 MB a study; off preprocesses on the fly)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader processes of training (default 0; 6 with --full-size)")
    parser.add_argument("--work", default="study_work", help="folder of phantoms, caches, runs and predictions")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "study.json"))
    parser.add_argument("--plot", default=None, help="the PNG (default: --out with .png)")
    parser.add_argument("--plan", action="store_true", help="print the cells and what is finished; train nothing")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # a child process's job spec
    return parser


def resolve_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.job:
        return args

    def listed(values: list[Any], choices: tuple[str, ...] | None, convert: Any = str) -> list[Any]:
        items = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
        wrong = [v for v in items if choices is not None and v not in choices]
        if wrong:
            parser.error(f"unknown {', '.join(wrong)} (known: {', '.join(choices or ())})")
        try:
            return list(dict.fromkeys(convert(v) for v in items))
        except ValueError as error:
            parser.error(str(error))
            raise

    args.grid, args.arms = listed(args.grid, GRIDS), listed(args.arms, ARMS)
    args.encoders, args.compressors = listed(args.encoders, ENCODERS), listed(args.compressors, COMPRESSORS)
    args.tokens, args.scale_phantoms = listed(args.tokens, None, int), listed(args.scale_phantoms, None, int)
    args.cells = listed(args.cells, None) if args.cells else None
    if args.cache == "auto":
        args.cache = "off" if args.full_size else "on"
    if args.loader_workers is None:
        args.loader_workers = 6 if args.full_size else 0
    if args.shape is None:
        args.shape = [128, 256, 256] if args.full_size else [64, 128, 128]
    if args.phantoms is None:
        args.phantoms = count_train(Path(args.manifest)) if args.manifest else 1200
    if args.manifest:
        available = count_train(Path(args.manifest))
        args.scale_phantoms = sorted({min(n, available) for n in args.scale_phantoms})
        args.phantoms = min(args.phantoms, available)
    if not args.manifest and args.test_seed == args.seed:
        parser.error("--test-seed must differ from --seed: the test phantoms must come from a seed never trained on")
    if not args.progressive_scales or args.progressive_scales[-1] != 1.0 or min(args.progressive_scales) <= 0:
        parser.error("--progressive-scales must be positive and end with 1")
    if not 0 < args.align_share < 1:
        parser.error("--align-share must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve_args(parser, argv)
    if args.job:
        return job_main(args.job)
    import yaml

    start = time.perf_counter()
    work = Path(args.work).resolve()
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    settings = setup_settings(args)
    setup_id = short_hash(settings)
    clip_id = short_hash(clip_settings(args))
    cells, grids = plan_cells(args)
    results = load_results(out)
    models = {cell.key: cell_model(cell, args) for cell in cells}

    if args.plan:
        print(f"setup {setup_id}: {json.dumps(settings)}")
        for cell in cells:
            config, info = models[cell.key]
            done = finished_row(results, cell, setup_id)
            state = "skipped" if config is None else ("finished" if done else "to run")
            what = info["reason"] if config is None else f"{info['compressor']} tokens/phase {info['tokens_per_phase']}"
            print(f"{cell.key:<52} {','.join(grids[cell.key]):<18} {state:<9} grid {info['grid']}x{info['channels']}"
                  f"  {what}")
        return 0

    results.update({"benchmark": "study", "args": vars(args), "setup": settings, "setup_id": setup_id})
    manifests: dict[int, Path] = {}
    references: Path | None = None
    max_new_tokens: int | None = None

    def data(count: int) -> Path:
        nonlocal references, max_new_tokens
        if count not in manifests:
            manifests[count] = study_data(args, work, count)
            if references is None:
                from rrg3d.train.data import write_references

                references = write_references(manifests[count], work / "data" / data_id(args) /
                                              "test_references.jsonl", split="test", field=FIELD)
            if max_new_tokens is None:
                max_new_tokens = text_lengths(manifests[count], args)
            for kind in CONSTANT_BASELINES:
                if not has_baseline(results, kind, count, setup_id):
                    put_row(results, constant_baseline(kind, manifests[count], references, count,
                                                       manifests[count].parent, args, setup_id), "baselines")
                    save_results(out, results)
        return manifests[count]

    clips: dict[tuple[str, int], dict[str, Any]] = {}
    orders: dict[int, list[str]] = {}
    for index, cell in enumerate(cells, start=1):
        config, info = models[cell.key]
        if finished_row(results, cell, setup_id):
            continue
        if config is None:
            print(f"[{index}/{len(cells)}] {cell.key}: skipped — {info['reason']}", flush=True)
            put_row(results, skipped_row(cell, info, setup_id, grids[cell.key]))
            save_results(out, results)
            continue
        folder = work / "runs" / setup_id / f"n{cell.phantoms}" / cell.encoder / cell.model_name
        result_file = folder / f"result_{cell.schedule}.json"
        row_base = {**dataclasses.asdict(cell), "key": cell.key, "setup_id": setup_id, "grids": grids[cell.key],
                    "grid": info["grid"], "channels": info["channels"], "compressor_config": info["compressor"],
                    "phases": [p["name"] if p else info["preset"] for p in info["phases"]]}
        if result_file.is_file():  # trained and scored by an earlier invocation whose JSON row is gone
            print(f"[{index}/{len(cells)}] {cell.key}: result found in {folder}", flush=True)
            put_row(results, {**row_base, **json.loads(result_file.read_text(encoding="utf-8"))})
            save_results(out, results)
            continue
        manifest = data(cell.phantoms)
        print(f"[{index}/{len(cells)}] {cell.key} ({', '.join(grids[cell.key])}): {info['compressor']}, "
              f"tokens per phase {info['tokens_per_phase']}", flush=True)
        if cell.arm == "dx":
            if cell.phantoms not in orders:
                orders[cell.phantoms] = findings_order(manifest)
            config["prompt"]["findings_order"] = orders[cell.phantoms]
        model_file = work / "configs" / setup_id / f"n{cell.phantoms}" / f"{config['name']}.yaml"
        model_file.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config, sort_keys=False)
        if not model_file.is_file() or model_file.read_text(encoding="utf-8") != text:
            model_file.write_text(text, encoding="utf-8")
        job_settings = {**settings, "seed": args.seed, "threads": args.threads, "loader_workers": args.loader_workers,
                        "calibration_steps": args.calibration_steps, "eval_batch_size": args.eval_batch_size,
                        "bootstrap": args.bootstrap, "max_new_tokens": max_new_tokens,
                        "prompt_room": 160 if cell.arm == "dx" else 96}
        common_spec = {"manifest": str(manifest), "settings": job_settings,
                       "cache_dir": str(work / "cache" / data_id(args)) if args.cache == "on" else None,
                       "calibration_file": str(work / "calibration.json")}
        clip_final, clip_row = None, None
        if args.clip_minutes > 0:
            clip_key = (cell.encoder, cell.phantoms)
            if clip_key not in clips:
                clip_folder = work / "clip" / clip_id / f"n{cell.phantoms}" / cell.encoder
                clip_file = work / "configs" / f"clip_{cell.encoder}_{'full' if args.full_size else 'cpu'}.yaml"
                clip_config = base_model_config(cell.encoder, args.full_size)
                clip_config["name"] = f"study_clip_{cell.encoder}"
                clip_text = yaml.safe_dump(clip_config, sort_keys=False)
                if not clip_file.is_file() or clip_file.read_text(encoding="utf-8") != clip_text:
                    clip_file.write_text(clip_text, encoding="utf-8")
                result_path = clip_folder / "clip_result.json"
                plan_file = clip_folder / "clip_plan.json"
                if result_path.is_file() and (clip_folder / "clip" / "final" / "rrg3d.yaml").is_file():
                    clips[clip_key] = json.loads(result_path.read_text(encoding="utf-8"))
                else:
                    recorded = recorded_clip_plan(results, clip_id, cell.encoder, cell.phantoms)
                    if recorded and not plan_file.is_file():
                        print(f"CT-CLIP of {cell.encoder}: {recorded['steps'][0]} steps, as recorded by "
                              f"{recorded['recovered_from']} in {out}", flush=True)
                        plan_file.parent.mkdir(parents=True, exist_ok=True)
                        plan_file.write_text(json.dumps({**recorded, "seconds": [args.clip_minutes * 60]}) + "\n",
                                             encoding="utf-8")
                    print(f"CT-CLIP pretraining of {cell.encoder} on {cell.phantoms} training studies "
                          f"({args.clip_minutes:g} min)", flush=True)
                    clips[clip_key] = run_job({**common_spec, "kind": "clip", "folder": str(clip_folder),
                                               "model_config": str(clip_file), "clip_settings": clip_settings(args),
                                               "result": str(result_path)}, clip_folder)
            clip_row = clips[clip_key]
            if clip_row.get("status") != "ok":
                put_row(results, {**row_base, "status": "failed", "error": f"CT-CLIP: {clip_row.get('error')}",
                                  **{k: None for k in ROW_KEYS if k not in KEY_FIELDS}})
                save_results(out, results)
                print(f"{cell.key}: CT-CLIP failed:\n{clip_row.get('error')}", flush=True)
                continue
            clip_final = clip_row["final"]
        result = run_job({**common_spec, "kind": "cell", "cell": dataclasses.asdict(cell), "folder": str(folder),
                          "schedule": cell.schedule, "model_config": str(model_file), "phases": info["phases"],
                          "tokens_per_phase": info["tokens_per_phase"], "references": str(references),
                          "clip": clip_final, "result": str(result_file)}, folder)
        if result.get("status") != "ok":
            print(f"{cell.key}: failed:\n{result.get('error')}", flush=True)
            result = {**result, **{k: None for k in ROW_KEYS if k not in KEY_FIELDS}}
        elif clip_row is not None:
            result["clip"] = {"clip_id": clip_id, **{k: clip_row.get(k) for k in (
                "final", "steps", "seconds_per_step", "seconds", "samples_per_s", "peak_gb", "val")}}
            result["clip_minutes"] = round((clip_row.get("seconds") or 0) / 60, 2)
        put_row(results, {**row_base, **result})
        results["seconds_this_invocation"] = round(time.perf_counter() - start)
        save_results(out, results)
        current = [r for r in results["cells"] if r.get("setup_id") == setup_id]
        print_table(current, [b for b in results.get("baselines", []) if b.get("setup_id") == setup_id])

    trained_counts = {cell.phantoms for cell in cells
                      if (finished_row(results, cell, setup_id) or {}).get("status") == "ok"}
    for count in sorted(c for c in trained_counts
                        if not all(has_baseline(results, kind, c, setup_id) for kind in CONSTANT_BASELINES)):
        # the constant reports of a training-set size whose cells an earlier version trained, where its data are
        # at hand (nothing is generated for them)
        if manifest_path(args, work, count).is_file():
            data(count)
    current = [r for r in results.get("cells", []) if r.get("setup_id") == setup_id]
    baselines = [b for b in results.get("baselines", []) if b.get("setup_id") == setup_id]
    print_table(current, baselines)
    picture = plot(current, baselines, args.phantoms, plot_path)
    results["plot"] = str(picture) if picture else None
    # the step confound is the encoders grid's: its cells differ in what they compare, not in their recipe
    encoders_rows = encoders_grid_rows(current, args.phantoms)
    results["steps_effect"] = steps_effect(encoders_rows)
    print_steps_effect(results["steps_effect"])
    results["marginals"] = grid_marginals(current, args.phantoms)
    print_marginals(results["marginals"])
    steps_path = plot_path.with_name(f"{plot_path.stem}_steps{plot_path.suffix}")
    steps_picture = plot_steps(encoders_rows, baselines, args.phantoms, steps_path)
    results["steps_plot"] = str(steps_picture) if steps_picture else None
    results["data_scale"] = data_scale(current, parse_scale_cell(args.scale_cell))
    print_data_scale(results["data_scale"])
    grids_path = plot_path.with_name(f"{plot_path.stem}_grids{plot_path.suffix}")
    grids_picture = plot_grids(current, baselines, parse_scale_cell(args.scale_cell), args.phantoms, grids_path)
    results["grids_plot"] = str(grids_picture) if grids_picture else None
    save_results(out, results)
    print(f"-> {out}" + "".join(f", {p}" for p in (picture, steps_picture, grids_picture) if p), flush=True)
    planned = {cell.key for cell in cells}
    return 1 if any(r.get("status") == "failed" and r["key"] in planned for r in current) else 0


if __name__ == "__main__":
    sys.exit(main())
