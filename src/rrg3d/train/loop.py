"""The small training loop every stage shares: phases, data order, accelerate, logs, checkpoints, resume, signals.

A stage (``clip.py``, ``align.py``, ``sft.py``) is a :class:`Stage`: how to build its model, the loss of one batch,
what validation measures and how a checkpoint is written. :func:`fit` does the rest::

    for phase in recipe.phases:                       # multi-scale: one preset (resolution) per phase
        for epoch:                                    # a seeded permutation per (phase, epoch), padded to whole steps
            for micro-batch:                          # this rank's slice of the global batch
                loss = stage.loss(model, batch) → backward (accumulated, clipped) → optimizer, scheduler
                log / validate / checkpoint / stop (SIGTERM, SIGINT, train.stop_after)

Data position is ``(phase, epoch, micro-batches consumed)``: the order of an epoch is a function of the seed, so
resuming regenerates it and skips what was consumed — no sampler state to save. A step checkpoint holds the model
files of the stage plus ``train_state/``: the trainable parameters and vision buffers (``trainable.safetensors``),
optimizer, scheduler, every rank's RNG states and ``trainer.json`` (step, position, recipe fingerprint). Resuming
rebuilds the model exactly as at the start (same recipe, same seed) and loads that state, so a resumed run on CPU
continues bit for bit.

Distribution is accelerate's: DDP, FSDP2 and DeepSpeed ZeRO (:mod:`rrg3d.train.sharding`). Where parameters are
sharded (FSDP2, ZeRO-3) the main process validates and writes the portable checkpoint with an unsharded replica
refreshed from the gathered full state dict, and the resumable state is sharded (FSDP2: DCP files per process;
ZeRO: one optimizer partition per process). See docs/distributed.md.

Run folder::

    RUN/config.yaml              the resolved recipe (also inside every checkpoint's train_state/)
    RUN/train_log.csv            step, phase, epoch, loss, lr, grad_norm, samples_per_s, elapsed_s
    RUN/eval_log.csv             step, phase + the stage's validation metrics
    RUN/samples.jsonl            reports generated at validation (align/sft with train.eval_samples > 0)
    RUN/tb/                      TensorBoard events (when tensorboard is installed and train.tensorboard)
    RUN/checkpoints/step_000100/ full checkpoints with train_state/ (the newest train.keep_last are kept)
    RUN/final/                   the checkpoint to use
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.train import sharding
from rrg3d.train.recipe import Recipe, recipe_from_yaml

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
TRAINER_FILE = "trainer.json"
#: FSDP2's resumable state inside ``train_state/``: a DCP checkpoint, one shard file per process.
SHARDED_DIR = "sharded"
TRAIN_COLUMNS = ("step", "phase", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s")


class TrainingInterrupted(RRG3DError):
    """The run stopped early (SIGTERM/SIGINT or ``train.stop_after``) after saving a resumable checkpoint."""

    def __init__(self, result: TrainResult) -> None:
        self.result = result
        super().__init__(f"training stopped at step {result.step} of {result.total_steps} ({result.reason}); "
                         f"checkpoint: {result.checkpoint}; continue with --resume")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    final: Path | None = None  # None when interrupted
    checkpoint: Path | None = None  # the newest step checkpoint
    interrupted: bool = False
    reason: str = "finished"
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation
    losses: list[float] = field(default_factory=list)  # training loss of every step run by this call
    model: Any = None  # the trained model (unwrapped), for callers in the same process


@dataclass
class Stage:
    """What a stage contributes to :func:`fit`; every function gets the unwrapped model unless noted."""

    name: str
    #: recipe, final preset → the model with its trainable parts set (deterministic given recipe.seed).
    build_model: Callable[[Recipe, Any], nn.Module]
    #: (prepared model, unwrapped model, batch on device, recipe) → scalar loss.
    loss: Callable[[nn.Module, nn.Module, dict[str, Any], Recipe], torch.Tensor]
    #: (model, checkpoint dir, preset, extra, train_state dir or None) → checkpoint dir.
    save: Callable[[nn.Module, Path, Any, dict[str, Any], Path | None], Path]
    #: (model, validation dataset, recipe, run context) → metrics; None: validation loss only.
    validate: Callable[[nn.Module, Any, Recipe, RunContext], dict[str, float]] | None = None
    #: (model, preset) → set the preprocessing the model records (the phase's preset).
    set_preset: Callable[[nn.Module, Any], None] | None = None
    #: modules to keep in eval mode while training (frozen parts: no dropout, no BatchNorm statistics).
    frozen_modules: Callable[[nn.Module], list[nn.Module]] = lambda model: []
    #: (model, phase-0 training dataset without augmentation, recipe, device) → fit data-dependent parts (PCA,
    #: feature standardisation) before training; deterministic, so every process and a resumed run agree.
    fit_statistics: Callable[[nn.Module, Any, Recipe, torch.device], None] | None = None
    #: (recipe, presets, accelerator) → (one training dataset per phase, validation dataset or None); None: the
    #: report datasets of ``data.manifest`` (:func:`build_report_datasets`)
    build_datasets: Callable[[Recipe, list[Any], Any], tuple[list[Any], Any]] | None = None
    #: items → batch; None: :func:`rrg3d.train.data.collate_reports`
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    #: extra columns of train_log.csv: named metrics the loss returns beside it (``loss`` may return
    #: ``(loss, {name: tensor})``); averaged over the accumulated micro-batches and the processes
    log_columns: tuple[str, ...] = ()
    #: (unwrapped model, batch on device, recipe) → the batch with its targets made (``tokens``) and
    #: ``num_items``: the loss's count of target tokens. A stage with ``prepare`` is token-weighted: every target
    #: token of an optimizer step weighs the same, whatever micro-batch and process it falls in (its ``loss`` gets
    #: ``batch["num_items_in_batch"]``: the divisor of its summed token loss). None: each micro-batch's loss counts
    #: the same (per-sample losses of equal-size batches: clip, dpo).
    prepare: Callable[[nn.Module, dict[str, Any], Recipe], dict[str, Any]] | None = None


@dataclass
class RunContext:
    """What validation may use: the accelerator, the run folder and the current position."""

    accelerator: Any
    run_dir: Path
    step: int
    phase: int


# -- data order --------------------------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, *, seed: int, phase: int, epoch: int, world: int = 1, rank: int = 0,
                  multiple: int = 1, skip: int = 0) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a seeded permutation, padded by wrapping around so that every rank
    gets the same number of batches and that number is a multiple of ``multiple`` (the accumulation steps);
    global batch ``k`` is ``batch_size × world`` consecutive indices, of which rank ``r`` takes slice ``r``."""
    if n < 1:
        raise RRG3DError("the training split has no usable study")
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + phase * 10_007 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_step = batch_size * world * multiple
    total = math.ceil(n / per_step) * per_step
    order = (order * math.ceil(total / n))[:total]
    batches = []
    global_batch = batch_size * world
    for start in range(0, total, global_batch):
        chunk = order[start + rank * batch_size: start + (rank + 1) * batch_size]
        batches.append(chunk)
    return batches[skip:]


def steps_per_epoch(n: int, batch_size: int, world: int, accumulation: int) -> int:
    return math.ceil(n / (batch_size * world * accumulation))


# -- RNG ---------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- signals -----------------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM/SIGINT set a flag the loop reads after each optimizer step (a second SIGINT interrupts at once)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, stop_after still works
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# -- logs --------------------------------------------------------------------------------------------------------------
class RunLog:
    """CSV logs (train and eval) and TensorBoard, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.writer = None
        self.tensorboard_available = False
        if not enabled:
            return
        for name in ("train_log.csv", "eval_log.csv"):
            _truncate_csv(run_dir / name, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: CSV logs only")
            else:
                self.tensorboard_available = True
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def train(self, row: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        _append_csv(self.run_dir / "train_log.csv", (*TRAIN_COLUMNS, *extra), row)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s", *extra):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def eval(self, step: int, phase: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        _append_csv(self.run_dir / "eval_log.csv", ("step", "phase", *sorted(metrics)),
                    {"step": step, "phase": phase, **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                if value is not None:
                    self.writer.add_scalar(f"val/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _append_csv(path: Path, columns: tuple[str, ...], row: dict[str, Any]) -> None:
    new = not path.exists()
    if not new:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
        if header and tuple(header) != tuple(columns):
            columns = tuple(header)  # keep the file's columns (a stage's metrics are fixed)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "" if value is None else value


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows after ``step`` (a resumed run re-runs them)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(kept)


# -- checkpoint state --------------------------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus the vision tower's buffers (BatchNorm statistics, fitted PCA)."""
    state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    vision = getattr(model, "vision", None)
    if vision is not None:
        for name, buffer in vision.named_buffers():
            state[f"vision.{name}"] = buffer.detach().cpu().contiguous()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path, *,
                         parameters: bool = True) -> None:
    """Copy :func:`trainable_state` back into ``model`` (the key sets must match); ``parameters=False`` copies the
    buffers only (ZeRO-3: the parameters are partitioned and come back with the optimizer's fp32 partitions)."""
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RRG3DError(f"{where}: the saved trainable state does not match this model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}): was the recipe changed?")
    own = dict(model.named_parameters()) if parameters else {}
    own.update({f"vision.{k}": v for k, v in model.vision.named_buffers()} if hasattr(model, "vision") else {})
    state = {k: v for k, v in state.items() if k in own}
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint of a run (one whose train_state/trainer.json exists)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    candidates = sorted(p for p in folder.glob("step_*") if (p / STATE_DIR / TRAINER_FILE).is_file())
    return candidates[-1] if candidates else None


def _prune(run_dir: Path, keep: int) -> None:
    folder = run_dir / "checkpoints"
    steps = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- the loop ----------------------------------------------------------------------------------------------------------
def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """The precision a run uses. "auto" is bf16 on a CUDA GPU that supports it and on a CPU with native bf16
    (AVX512-BF16 or AMX), else "no": a CPU without it emulates bf16, which is slower than float32 (3D convolutions
    about 10× on an AVX2 EPYC). Other values pass through."""
    if requested != "auto":
        return requested
    if not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(check is not None and check() for check in native) else "no"


def _make_accelerator(recipe: Recipe) -> Any:
    """A fresh accelerator for this run. accelerate keeps its settings in a process-wide singleton that refuses a
    second precision, so the previous run's state is cleared first (the process group, ``PartialState``, stays):
    one process may run several stages in turn (a benchmark, a notebook), each with its own mixed precision.

    Under an accelerate launch that asks for FSDP or DeepSpeed (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``)
    the plugin is built here from the recipe (:mod:`rrg3d.train.sharding`): FSDP2's mixed precision policy;
    DeepSpeed's micro-batch size (the first phase's batch size), gradient accumulation and clipping. FSDP1 is
    refused. On CPU processes the plugin is switched on explicitly (accelerate would fall back to DDP)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = recipe.train.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(recipe.train.mixed_precision, cpu)
    if precision != recipe.train.mixed_precision:
        log.info("mixed precision %r resolves to %r on this %s", recipe.train.mixed_precision, precision,
                 "CPU" if cpu else "GPU")
    accumulation = recipe.train.gradient_accumulation_steps
    fsdp_version = sharding.requested_fsdp_version()
    fsdp_plugin = deepspeed_plugin = None
    if sharding.requested_deepspeed():
        sharding.check_accelerate_env(accumulation, recipe.optim.max_grad_norm)
        sizes = {p.batch_size or recipe.data.batch_size for p in recipe.phases}
        micro_batch = recipe.phases[0].batch_size or recipe.data.batch_size
        if len(sizes) > 1:
            log.info("DeepSpeed: phases use batch sizes %s; its train_micro_batch_size_per_gpu is the first phase's "
                     "(%d): DeepSpeed uses it only for its batch-size check and throughput report, the loop feeds "
                     "each phase's batches itself", sorted(sizes), micro_batch)
        deepspeed_plugin = sharding.make_deepspeed_plugin(
            micro_batch=micro_batch, accumulation=accumulation, world=PartialState(cpu=cpu).num_processes,
            max_grad_norm=recipe.optim.max_grad_norm)
    elif fsdp_version is not None:
        sharding.check_fsdp_version(fsdp_version)
        fsdp_plugin = sharding.make_fsdp2_plugin(precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, gradient_accumulation_steps=accumulation,
                              fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin)
    sharding.enable_on_cpu(accelerator, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin,
                           mixed_precision=precision)
    if deepspeed_plugin is not None:
        sharding.detach_transformers_zero3()
    if accelerator.gradient_accumulation_steps != accumulation:
        raise ConfigError(f"accelerate counts {accelerator.gradient_accumulation_steps} accumulation steps, the "
                          f"recipe train.gradient_accumulation_steps={accumulation}: unset "
                          "ACCELERATE_GRADIENT_ACCUMULATION_STEPS (the recipe decides)")
    return accelerator


def _distributed_name(distributed_type: Any) -> str:
    """accelerate's ``DistributedType`` (or its name) as an upper-case string: "NO", "MULTI_GPU", "FSDP", ..."""
    return str(getattr(distributed_type, "value", distributed_type)).upper()


def check_distributed_type(distributed_type: Any, fsdp_version: int | None = None) -> None:
    """Refuse what the loop cannot run: FSDP version 1 (the ``FullyShardedDataParallel`` wrapper; ``fsdp_version``
    None means accelerate's default, 1). FSDP2 runs: validation and checkpoints use an unsharded replica on the main
    process refreshed from the gathered state dict (:class:`rrg3d.train.sharding.Replica`)."""
    if _distributed_name(distributed_type) == "FSDP":
        sharding.check_fsdp_version(1 if fsdp_version is None else fsdp_version)


def optimizer_state_file(distributed_type: Any, rank: int) -> str:
    """The optimizer state's file in ``train_state/``: one per process where the optimizer state is sharded
    (DeepSpeed ZeRO: each process holds its own partition), else one file written by the main process. FSDP2 keeps
    the optimizer state in the DCP checkpoint ``train_state/sharded/`` instead."""
    if _distributed_name(distributed_type) == "DEEPSPEED":
        return f"optimizer_rank{rank}.pt"
    return "optimizer.pt"


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, is_main: bool) -> Path | None:
    """Check the run folder against ``resume``; write ``config.yaml``. The checkpoint to resume from, if any."""
    checkpoint = find_resume_checkpoint(run_dir)
    config_file = run_dir / "config.yaml"
    if resume:
        if checkpoint is None:  # a warning only when a run started here before and left no step checkpoint
            started = config_file.is_file()
            log.log(logging.WARNING if started else logging.INFO,
                    "%s: nothing to resume (no step checkpoint): starting from the beginning", run_dir)
        if config_file.is_file():
            previous = recipe_from_yaml(config_file.read_text(encoding="utf-8"))
            if previous.fingerprint() != recipe.fingerprint():
                raise ConfigError(f"{run_dir}: --resume needs the recipe this run started with; it differs in "
                                  f"{_differences(previous.to_dict(), recipe.to_dict())} (see {config_file})")
    elif checkpoint is not None or (run_dir / "final").exists():
        raise ConfigError(f"{run_dir} already holds a training run: pass --resume to continue it, or choose another "
                          "run_dir=...")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(recipe.to_yaml(), encoding="utf-8")
    return checkpoint


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    from rrg3d.train.recipe import VOLATILE_KEYS

    keys = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        if path in VOLATILE_KEYS:
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differences(a[key], b[key], f"{path}.")
        elif a.get(key) != b.get(key):
            keys.append(path)
    return keys


def build_report_datasets(recipe: Recipe, presets: list[Any], accelerator: Any, **dataset_options: Any
                    ) -> tuple[list[Any], Any]:
    """One training dataset per phase (a cache per preset, built on the main process first) and the validation
    dataset at the last phase's preset; ``dataset_options`` go to :func:`rrg3d.train.data.build_dataset`."""
    from rrg3d.train.data import build_dataset

    if not recipe.data.manifest:
        raise ConfigError("data.manifest is not set: pass data.manifest=PATH (a manifest JSONL)")
    progress = recipe.train.progress and accelerator.is_main_process
    options = {"report_field": recipe.data.report_field, "blank_images": recipe.data.blank_images, **dataset_options}
    datasets, val = [], None
    with accelerator.main_process_first():
        for preset in presets:
            datasets.append(build_dataset(recipe.data.manifest, preset, split=recipe.data.train_split,
                                          cache_dir=recipe.data.cache_dir, workers=recipe.data.preprocess_workers,
                                          progress=progress, **options))
        if recipe.data.val_split:
            val = build_dataset(recipe.data.manifest, presets[-1], split=recipe.data.val_split,
                                cache_dir=recipe.data.cache_dir, workers=recipe.data.preprocess_workers,
                                progress=progress, **options)
            if len(val) == 0:
                log.warning("validation split %r is empty: no validation", recipe.data.val_split)
                val = None
            elif recipe.data.max_val_samples is not None and len(val) > recipe.data.max_val_samples:
                val = torch.utils.data.Subset(val, range(recipe.data.max_val_samples))
    for i, dataset in enumerate(datasets):
        if len(dataset) == 0:
            raise RRG3DError(f"phase {i}: the split {recipe.data.train_split!r} of {recipe.data.manifest} has no "
                             "usable study")
    if recipe.data.augment.enabled:  # training items only; validation sees the volumes as they are
        from rrg3d.train.augment import AugmentedDataset

        datasets = [AugmentedDataset(d, recipe.data.augment, seed=recipe.seed) for d in datasets]
    return datasets, val


def _phase_steps(recipe: Recipe, datasets: list[Any], world: int) -> list[int]:
    steps = []
    for phase, dataset in zip(recipe.phases, datasets, strict=True):
        if phase.steps is not None:
            steps.append(int(phase.steps))
        else:
            batch = phase.batch_size or recipe.data.batch_size
            per_epoch = steps_per_epoch(len(dataset), batch, world, recipe.train.gradient_accumulation_steps)
            steps.append(int(phase.epochs) * per_epoch)
    return steps


def _under(name: str, prefix: str) -> bool:
    """Whether the parameter ``name`` is ``prefix`` itself or lies in the module ``prefix``."""
    return name == prefix or name.startswith(prefix + ".")


def _lr_multiplier(name: str, multipliers: dict[str, float]) -> float:
    """The multiplier of the longest ``optim.lr_multipliers`` prefix that names a module above ``name``."""
    matches = [prefix for prefix in multipliers if _under(name, prefix)]
    return float(multipliers[max(matches, key=len)]) if matches else 1.0


def _optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; ``optim.lr_multipliers`` gives module prefixes their own lr."""
    multipliers = dict(recipe.optim.lr_multipliers)
    names = {name for name, _ in model.named_parameters()}
    unknown = [prefix for prefix in multipliers if not any(_under(n, prefix) for n in names)]
    if unknown:
        raise ConfigError(f"optim.lr_multipliers: no parameters under {unknown} (top-level modules: "
                          f"{sorted({n.split('.')[0] for n in names})})")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, _lr_multiplier(name, multipliers)), []).append(p)
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen (check model.train)")
    order = sorted(groups, key=lambda key: (key[1] != 1.0, not key[0], key[1]))  # base lr first: it is logged
    param_groups = [{"params": groups[(decay, scale)], "lr": recipe.optim.lr * scale,
                     "weight_decay": recipe.optim.weight_decay if decay else 0.0} for decay, scale in order]
    return torch.optim.AdamW(param_groups, lr=recipe.optim.lr, betas=recipe.optim.betas, eps=recipe.optim.eps)


def _scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total: int) -> Any:
    from transformers import get_scheduler

    warmup = recipe.optim.warmup_steps
    if warmup is None:
        warmup = math.ceil(recipe.optim.warmup_ratio * total)
    return get_scheduler(recipe.optim.scheduler, optimizer, num_warmup_steps=min(warmup, total),
                         num_training_steps=total)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(recipe: Recipe, stage: Stage, *, resume: bool = False) -> TrainResult:
    """Train ``stage`` as ``recipe`` says; :class:`TrainingInterrupted` when stopped early (after a checkpoint)."""
    from rrg3d.preprocess.presets import load_preset
    from rrg3d.train.data import collate_reports

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    accelerator = _make_accelerator(recipe)
    distribution = sharding.distribution_of(accelerator)  # refuses FSDP1
    world, rank = accelerator.num_processes, accelerator.process_index
    run_dir = recipe.output_dir
    checkpoint = _prepare_run_dir(recipe, run_dir, resume, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    seed_everything(recipe.seed)
    first_model_preset = None
    if any(p.preset is None for p in recipe.phases):
        from rrg3d.models.config import load_model_config

        first_model_preset = _model_preset(recipe, load_model_config)
    presets = [load_preset(p.preset if p.preset is not None else first_model_preset) for p in recipe.phases]
    datasets, val_dataset = (stage.build_datasets or build_report_datasets)(recipe, presets, accelerator)
    collate = stage.collate or collate_reports
    phase_steps = _phase_steps(recipe, datasets, world)
    total = sum(phase_steps)
    accumulation = recipe.train.gradient_accumulation_steps

    seed_everything(recipe.seed)  # the model is initialised the same way whatever the datasets consumed
    model = stage.build_model(recipe, presets[-1])
    master_weights(model, accelerator.mixed_precision)
    if stage.fit_statistics is not None:
        from rrg3d.train.augment import AugmentedDataset

        first = datasets[0].dataset if isinstance(datasets[0], AugmentedDataset) else datasets[0]
        stage.fit_statistics(model, first, recipe, accelerator.device)
    # sharded parameters: the main process keeps an unsharded replica for validation and portable checkpoints
    sharding.check_model_support(model, recipe, distribution)
    replica = sharding.Replica(model, accelerator, distribution) if distribution.shards_parameters else None
    if distribution.kind == "fsdp2":  # decoder layers and vision parts as units, then the root
        sharding.apply_fsdp2(model, accelerator)
    elif distribution.kind == "deepspeed":
        sharding.resolve_zero3_sizes(accelerator.state.deepspeed_plugin.deepspeed_config,
                                     sharding.hidden_size_of(model))
    if world > 1:
        log.info("distribution: %s", distribution.describe())
    optimizer = _optimizer(recipe, model)
    scheduler = _scheduler(recipe, optimizer, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    params = [p for p in raw.parameters() if p.requires_grad]

    step, position = 0, {"phase": 0, "epoch": 0, "batches": 0}
    if checkpoint is not None:
        step, position = _load_train_state(checkpoint, raw, optimizer, scheduler, rank, recipe,
                                           accelerator.distributed_type, distribution=distribution)
        log.info("resuming %s from step %d (%s)", run_dir, step, checkpoint)
    else:
        seed_everything(recipe.seed + rank)

    runlog = RunLog(run_dir, accelerator.is_main_process, recipe.train.tensorboard, step)
    result = TrainResult(run_dir=run_dir, step=step, total_steps=total, checkpoint=checkpoint)
    if step >= total and (run_dir / "final" / "rrg3d.yaml").is_file():
        result.final = run_dir / "final"
        runlog.close()
        return result

    def save_step(reason: str) -> Path:
        result.checkpoint = _save_step(accelerator, stage, raw, optimizer, scheduler, recipe, run_dir, step,
                                       _position_after(step), presets, reason, replica=replica,
                                       distribution=distribution, prepared=model)
        return result.checkpoint

    def set_preset(preset: Any) -> None:
        if stage.set_preset is not None:
            stage.set_preset(raw, preset)
            if replica is not None and replica.module is not None:
                stage.set_preset(replica.module, preset)

    bounds = np.cumsum([0, *phase_steps]).tolist()

    def _position_after(done: int) -> dict[str, int]:
        pos = dict(current)
        if done >= bounds[pos["phase"] + 1]:
            pos = {"phase": pos["phase"] + 1, "epoch": 0, "batches": 0}
        return pos

    def validate(phase_index: int) -> None:
        if val_dataset is None:
            return
        metrics: dict[str, float] = {}
        # the unwrapped model on the main process while the others wait; with sharded parameters a forward would
        # need every process, so the main process validates the replica, refreshed from the gathered weights
        target = raw if replica is None else replica.sync(model, step)
        if accelerator.is_main_process:
            context = RunContext(accelerator, run_dir, step, phase_index)
            with torch.random.fork_rng(devices=[]), _on_device(target, accelerator.device, replica is not None):
                target.eval()
                try:
                    metrics = (stage.validate or _no_validation)(target, val_dataset, recipe, context)
                finally:
                    _train_mode(target, stage)
        accelerator.wait_for_everyone()
        if distribution.kind != "ddp" and world > 1:  # what validation changed (a calibrated threshold) → all
            sharding.broadcast_buffers(raw, source=target if accelerator.is_main_process else None)
        result.metrics = metrics
        runlog.eval(step, phase_index, metrics)
        if accelerator.is_main_process and metrics:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            log.info("step %d validation: %s", step, shown)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=f"{stage.name} {recipe.name}", unit="step", dynamic_ncols=True,
               disable=not (recipe.train.progress and accelerator.is_main_process))
    current = dict(position)
    start_time = time.perf_counter()
    try:
        with StopFlag() as stop:
            _train_mode(raw, stage)
            for phase_index in range(position["phase"], len(recipe.phases)):
                phase = recipe.phases[phase_index]
                dataset = datasets[phase_index]
                set_preset(presets[phase_index])
                batch_size = phase.batch_size or recipe.data.batch_size
                epoch = position["epoch"] if phase_index == position["phase"] else 0
                skip = position["batches"] if phase_index == position["phase"] else 0
                while step < bounds[phase_index + 1]:
                    if hasattr(dataset, "set_epoch"):  # augmentation drawn per (seed, phase, epoch, item)
                        dataset.set_epoch(phase_index, epoch)
                    batches = epoch_batches(len(dataset), batch_size, seed=recipe.seed, phase=phase_index,
                                            epoch=epoch, world=world, rank=rank, multiple=accumulation, skip=skip)
                    loader = torch.utils.data.DataLoader(
                        dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=recipe.data.workers, generator=torch.Generator().manual_seed(recipe.seed),
                        persistent_workers=False)
                    consumed = skip
                    step_losses: list[torch.Tensor] = []
                    step_metrics: dict[str, list[torch.Tensor]] = {name: [] for name in stage.log_columns}
                    tick = time.perf_counter()
                    for window in _windows(loader, accumulation):
                        window = [_to_device(batch, accelerator.device) for batch in window]
                        if stage.prepare is not None:  # token-weighted: one divisor for the whole optimizer step
                            window = [stage.prepare(raw, batch, recipe) for batch in window]
                            divisor = token_divisor([batch["num_items"] for batch in window], accelerator,
                                                    accumulation)
                            for batch in window:
                                batch["num_items_in_batch"] = divisor
                        for batch in window:
                            with accelerator.accumulate(model):
                                loss = stage.loss(model, raw, batch, recipe)
                                if isinstance(loss, tuple):  # (loss, named metrics to log)
                                    loss, named = loss
                                    for name in stage.log_columns:
                                        step_metrics[name].append(named[name].detach().float())
                                if not torch.isfinite(loss.detach()):
                                    raise RRG3DError(f"step {step + 1}: the loss is {loss.item()} (batch "
                                                     f"{batch['ids']}); lower optim.lr or check the data")
                                accelerator.backward(loss)
                                grad_norm = None
                                if accelerator.sync_gradients and recipe.optim.max_grad_norm is not None:
                                    grad_norm = accelerator.clip_grad_norm_(params, recipe.optim.max_grad_norm)
                                optimizer.step()
                                if accelerator.sync_gradients:
                                    lr = scheduler.get_last_lr()[0]  # the rate this step used
                                    scheduler.step()
                                optimizer.zero_grad(set_to_none=True)
                            consumed += 1
                            step_losses.append(loss.detach())
                        if not accelerator.sync_gradients:
                            raise RuntimeError(f"step {step + 1}: {len(window)} micro-batches did not end an "
                                               f"accumulation of {accumulation}")
                        step += 1
                        current = {"phase": phase_index, "epoch": epoch, "batches": consumed}
                        if stage.prepare is not None:  # the token-weighted mean: the micro-losses are its parts
                            mean_loss = (accelerator.reduce(torch.stack(step_losses).sum(), reduction="sum").item()
                                         / (world * accumulation))
                        else:
                            mean_loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
                        step_losses = []
                        logged = {name: accelerator.reduce(torch.stack(values).mean(), reduction="mean").item()
                                  for name, values in step_metrics.items() if values}
                        step_metrics = {name: [] for name in stage.log_columns}
                        result.losses.append(mean_loss)
                        elapsed = time.perf_counter() - tick
                        tick = time.perf_counter()
                        rate = batch_size * world * accumulation / max(elapsed, 1e-9)
                        bar.update(1)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.2f}",
                                        phase=phase_index)
                        if step % recipe.train.log_every == 0 or step == total:
                            runlog.train({"step": step, "phase": phase_index, "epoch": epoch, "loss": mean_loss,
                                          "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                                          "samples_per_s": rate, "elapsed_s": time.perf_counter() - start_time,
                                          **logged}, stage.log_columns)
                        phase_done = step >= bounds[phase_index + 1]
                        if (recipe.train.eval_every and step % recipe.train.eval_every == 0) or phase_done:
                            validate(phase_index)
                        stop_signal = _agreed_stop(accelerator, stop.signal)
                        stop_now = stop_signal or (recipe.train.stop_after is not None
                                                   and step >= recipe.train.stop_after and step < total)
                        if step == total or stop_now or (recipe.train.save_every
                                                          and step % recipe.train.save_every == 0):
                            save_step("end" if step == total else "interrupted" if stop_now else "periodic")
                        if stop_now:
                            result.interrupted = True
                            result.reason = (signal.Signals(stop_signal).name if stop_signal
                                             else f"train.stop_after={recipe.train.stop_after}")
                            result.step = step
                            raise TrainingInterrupted(result)
                        if phase_done:
                            break
                    else:
                        epoch, skip = epoch + 1, 0
                        continue
                    break
                position = {"phase": phase_index + 1, "epoch": 0, "batches": 0}
    finally:
        bar.close()
        runlog.close()
    result.step = step
    set_preset(presets[-1])
    final_model = raw if replica is None else replica.sync(model, step)  # every process gathers
    if accelerator.is_main_process:
        result.final = stage.save(final_model, run_dir / "final", presets[-1], _extra(recipe, step, "final"), None)
    else:
        result.final = run_dir / "final"
    accelerator.wait_for_everyone()
    # the trained model, unwrapped; with sharded parameters the main process's replica (the others: their shards)
    result.model = final_model if final_model is not None else raw
    result.model.eval()
    return result


def _windows(loader: Any, size: int) -> Any:
    """The micro-batches of ``loader`` in groups of ``size`` (one optimizer step each; epochs hold whole groups)."""
    window: list[dict[str, Any]] = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def token_divisor(counts: list[Any], accelerator: Any, accumulation: int) -> torch.Tensor:
    """What each micro-batch divides its summed token loss by so that, after the backward's division by the
    accumulation steps and the processes' gradient average, the step's gradient is that of the mean over every
    target token of the step: (tokens on all processes and micro-batches) / (processes × accumulation)."""
    local = torch.tensor(float(sum(int(c) for c in counts)), device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return (total / (accelerator.num_processes * accumulation)).clamp_min(1.0)


def master_weights(model: nn.Module, mixed_precision: str) -> int:
    """Under autocast (bf16/fp16 mixed precision) every trainable parameter is kept in float32 — the master copy
    that AdamW updates; the forward still computes in half precision. A LM loaded in bf16 for speed keeps its frozen
    weights in bf16, but a trainable weight in bf16 would lose every update below ~0.4% of its size (lr 2e-5 full
    fine-tuning rounds away). Returns the number of parameters cast; without autocast it only warns."""
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return 0
    if str(mixed_precision) not in ("bf16", "fp16"):
        log.warning("%d trainable parameter tensors are in %s without mixed precision: updates smaller than their "
                    "precision are lost; set train.mixed_precision=bf16 (float32 master weights + autocast)",
                    len(low), low[0].dtype)
        return 0
    for parameter in low:
        parameter.data = parameter.data.float()
    log.info("%d trainable parameter tensors kept in float32 (master weights) under %s autocast", len(low),
             mixed_precision)
    return len(low)


def _model_preset(recipe: Recipe, load_model_config: Any) -> Any:
    if recipe.model.init:
        from rrg3d.models.checkpoint import read_manifest

        return read_manifest(recipe.model.init)["preprocess"]["config"]
    return load_model_config(recipe.model.config).preprocess


def _no_validation(model: nn.Module, dataset: Any, recipe: Recipe, context: RunContext) -> dict[str, float]:
    return {}


def _train_mode(model: nn.Module, stage: Stage) -> None:
    model.train()
    for module in stage.frozen_modules(model):
        module.eval()


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device, move: bool) -> Iterator[None]:
    """``model`` on ``device`` for the block and back on the CPU after (the replica of sharded training lives on the
    CPU between validations); nothing when ``move`` is false or the device is the CPU."""
    if not move or device.type == "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _agreed_stop(accelerator: Any, signum: int | None) -> int:
    """The signal number when any process received one (all processes stop at the same step)."""
    value = torch.tensor(int(signum or 0), device=accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="max")
    return int(value.item())


def _extra(recipe: Recipe, step: int, reason: str) -> dict[str, Any]:
    return {"trained": True, "stage": recipe.stage, "recipe": recipe.name, "step": step, "saved": reason,
            "seed": recipe.seed}


def _save_step(accelerator: Any, stage: Stage, raw: nn.Module, optimizer: Any, scheduler: Any, recipe: Recipe,
               run_dir: Path, step: int, position: dict[str, int], presets: list[Any], reason: str, *,
               replica: sharding.Replica | None = None, distribution: sharding.Distribution | None = None,
               prepared: nn.Module | None = None) -> Path:
    """A step checkpoint: the stage's files + train_state/, written into a staging folder and swapped in. With
    sharded parameters the weights come from the replica (refreshed from the gathered state dict: every process
    takes part); FSDP2 writes its resumable state as DCP shards (``train_state/sharded/``), ZeRO one optimizer
    partition per process."""
    from safetensors.torch import save_file

    distribution = distribution or sharding.Distribution(processes=accelerator.num_processes)
    target = run_dir / "checkpoints" / f"step_{step:06d}"
    state_dir = run_dir / "checkpoints" / f".{STATE_DIR}-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # every process gathers; the main process gets the replica
    weights = raw if replica is None else replica.sync(prepared if prepared is not None else raw, step)
    if accelerator.is_main_process:
        save_file(trainable_state(weights), str(state_dir / "trainable.safetensors"))
        torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
        (state_dir / "config.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        trainer = {"step": step, "position": position, "world_size": accelerator.num_processes,
                   "fingerprint": recipe.fingerprint(), "reason": reason,
                   "phase_preset": presets[min(position["phase"], len(presets) - 1)].name,
                   "distribution": distribution.kind, "zero_stage": distribution.zero_stage}
        (state_dir / TRAINER_FILE).write_text(json.dumps(trainer, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    torch.save(rng_state(), state_dir / f"rng_rank{accelerator.process_index}.pt")
    if distribution.kind == "fsdp2":
        sharding.save_sharded_state(raw, optimizer, state_dir / SHARDED_DIR)
    else:
        optimizer_file = optimizer_state_file(accelerator.distributed_type, accelerator.process_index)
        if accelerator.is_main_process or optimizer_file != "optimizer.pt":
            torch.save(optimizer.state_dict(), state_dir / optimizer_file)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained_at = presets[_trained_phase(position, len(presets))]
        stage.save(weights, target, trained_at, _extra(recipe, step, reason), state_dir)
        _prune(run_dir, recipe.train.keep_last)
    accelerator.wait_for_everyone()
    return target


def _trained_phase(position: dict[str, int], phases: int) -> int:
    """The phase the weights were last trained in (the position points at the next batch)."""
    if position["epoch"] == 0 and position["batches"] == 0:
        return max(0, min(position["phase"] - 1, phases - 1))
    return min(position["phase"], phases - 1)


def _load_train_state(checkpoint: Path, raw: nn.Module, optimizer: Any, scheduler: Any, rank: int,
                      recipe: Recipe, distributed_type: Any = "NO", *,
                      distribution: sharding.Distribution | None = None) -> tuple[int, dict[str, int]]:
    """Load ``train_state/`` into the prepared model, optimizer and scheduler of this process: FSDP2 from its DCP
    shards; ZeRO with this process's optimizer partition (ZeRO-3: the parameters come back with it, the file gives
    the buffers); otherwise the trainable weights and the one optimizer file. Sharded state needs the process count
    it was saved with."""
    from safetensors.torch import load_file

    distribution = distribution or sharding.Distribution()

    state_dir = checkpoint / STATE_DIR
    trainer = json.loads((state_dir / TRAINER_FILE).read_text(encoding="utf-8"))
    if trainer.get("fingerprint") != recipe.fingerprint():
        saved = recipe_from_yaml((state_dir / "config.yaml").read_text(encoding="utf-8"))
        raise ConfigError(f"{checkpoint}: saved with a different recipe (differs in "
                          f"{_differences(saved.to_dict(), recipe.to_dict())})")
    world = int(trainer.get("world_size", 1))
    rng_file = state_dir / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise RRG3DError(f"{checkpoint}: saved by {world} process(es); no RNG state for process {rank}")
    saved_kind = trainer.get("distribution", "ddp")
    if (distribution.shards_optimizer or saved_kind != "ddp") and \
            (saved_kind, int(trainer.get("zero_stage", 0)), world) != \
            (distribution.kind, distribution.zero_stage, distribution.processes):
        raise RRG3DError(f"{checkpoint}: saved by {world} process(es) under {saved_kind} (ZeRO stage "
                         f"{trainer.get('zero_stage', 0)}); this run is {distribution.describe()}: sharded training "
                         "state resumes with the distribution and process count it was saved with")
    if distribution.kind == "fsdp2":
        sharding.load_sharded_state(raw, optimizer, state_dir / SHARDED_DIR)
    else:
        load_trainable_state(raw, load_file(str(state_dir / "trainable.safetensors")), state_dir,
                             parameters=not distribution.shards_parameters)
        optimizer_file = state_dir / optimizer_state_file(distributed_type, rank)
        if not optimizer_file.is_file():
            raise RRG3DError(f"{checkpoint}: no optimizer state {optimizer_file.name} (saved by {world} process(es) "
                             "with another distribution?)")
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=False)
        if distribution.kind == "deepspeed":
            sharding.load_zero_optimizer_state(optimizer, optimizer_state, rank, distribution.processes)
        else:
            optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", map_location="cpu", weights_only=False))
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return int(trainer["step"]), dict(trainer["position"])


def dump_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def iterate_batches(dataset: Any, batch_size: int, workers: int = 0,
                    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
                    ) -> Iterator[dict[str, Any]]:
    """Validation batches in dataset order (``collate``: default :func:`rrg3d.train.data.collate_reports`)."""
    from rrg3d.train.data import collate_reports

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate or collate_reports, num_workers=workers)
    yield from loader
