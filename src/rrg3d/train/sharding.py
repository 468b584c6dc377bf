"""Sharded training for the loop: FSDP2 (``torch.distributed.fsdp.fully_shard``) and DeepSpeed ZeRO, through accelerate.

What the loop (:mod:`rrg3d.train.loop`) needs beyond DDP, kept here so the loop stays one readable loop:

* **which distribution runs** (:func:`distribution_of`): ``ddp`` (or one process), ``fsdp2`` or ``deepspeed`` with
  its ZeRO stage. FSDP version 1 is refused (:func:`check_fsdp_version`); ``configs/accelerate/fsdp2.yaml`` is the
  supported FSDP config.
* **plugins built from the recipe** (:func:`make_fsdp2_plugin`, :func:`make_deepspeed_plugin`): FSDP2 with a
  ``MixedPrecisionPolicy`` that computes in bf16/fp16 and reduces gradients in float32 over float32 master shards;
  DeepSpeed with the micro-batch size, gradient accumulation and clipping of the recipe
  (:func:`resolve_deepspeed_config`, a pure function), so nothing is left "auto" for a DataLoader the loop does not
  hand to accelerate, and an accelerate config can no longer count accumulation differently from the loop.
* **CPU processes** (:func:`enable_on_cpu`): accelerate 1.15 switches FSDP and DeepSpeed on only for accelerator
  devices (``AcceleratorState``: the FSDP branch is under MULTI_GPU/XPU/..., DeepSpeed requires ``not cpu``) and
  silently falls back to DDP on CPU. The loop promotes the state itself (two or three attributes, the ones accelerate
  sets on a GPU), so the same FSDP2 / ZeRO code paths run over gloo in the tests.
* **what FSDP2 shards as units** (:func:`fsdp2_units`, :func:`apply_fsdp2`): every decoder layer of a Hugging Face
  model (its ``_no_split_modules`` classes) and the parts of the vision tower (encoder, compressor, projector,
  classifier, region tower, modality branches — each called through ``__call__``, so FSDP's hooks gather them even
  when a stage calls the tower outside the model's forward); the root (embeddings, final norm, LM head) is sharded
  here too (accelerate's ``prepare`` then finds it sharded and maps the optimizer's parameters).
* **an unsharded replica on the main process** (:class:`Replica`): with sharded parameters (FSDP2, ZeRO-3) a
  forward or a ``state_dict`` needs every process. The loop gathers the full state dict on every process
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, or ZeRO-3's consolidated state dict) and the
  main process loads it into a replica built before sharding; validation and the portable checkpoints (``final/``
  and the step checkpoints' weights) then use the replica exactly as they used the unwrapped model under DDP, while
  the other processes wait. Buffers validation changes (a classifier's calibrated threshold) are broadcast back.
* **the resumable state** (:func:`save_sharded_state`, :func:`load_sharded_state`, :func:`load_zero_optimizer_state`):
  FSDP2 writes the trainable parameters and the optimizer state as sharded DCP files (one per process);
  DeepSpeed writes one optimizer partition per process and loads it back as ZeRO expects (a list indexed by rank).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrg3d.errors import ConfigError

log = logging.getLogger(__name__)

#: the FSDP config to use (shipped in ``rrg3d/configs/accelerate/``).
FSDP2_CONFIG = "fsdp2.yaml"
#: DeepSpeed's own defaults for the ZeRO-3 sizes accelerate derives from ``model.config.hidden_size`` ("auto").
ZERO3_SIZE_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                       "stage3_param_persistence_threshold": 100_000}
#: DeepSpeed's ZeRO optimizers (stage 1/2 and stage 3), whose ``load_state_dict`` takes one state dict per rank.
ZERO_OPTIMIZERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3")


def _flag(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


# -- which distribution ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distribution:
    """The distribution of one run: ``kind`` is ``"ddp"`` (DDP or a single process), ``"fsdp2"`` or ``"deepspeed"``."""

    kind: str = "ddp"
    zero_stage: int = 0
    processes: int = 1

    @property
    def shards_parameters(self) -> bool:
        """Parameters live in shards (FSDP2, ZeRO-3): forward and state dict need every process."""
        return self.kind == "fsdp2" or (self.kind == "deepspeed" and self.zero_stage >= 3)

    @property
    def shards_optimizer(self) -> bool:
        """Each process holds its own part of the optimizer state (FSDP2, ZeRO ≥ 1)."""
        return self.kind == "fsdp2" or (self.kind == "deepspeed" and self.zero_stage >= 1)

    def describe(self) -> str:
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage} on {self.processes} process(es)"
        if self.kind == "fsdp2":
            return f"FSDP2 on {self.processes} process(es)"
        return f"DDP on {self.processes} process(es)" if self.processes > 1 else "one process"


def requested_fsdp_version(env: Mapping[str, str] | None = None) -> int | None:
    """The FSDP version an accelerate launch asks for (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``; accelerate's
    default is 1), or None when FSDP is not asked for."""
    env = os.environ if env is None else env
    if not _flag(env.get("ACCELERATE_USE_FSDP")):
        return None
    return int(env.get("FSDP_VERSION", "1") or 1)


def requested_deepspeed(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return _flag(env.get("ACCELERATE_USE_DEEPSPEED"))


def check_fsdp_version(version: int | None) -> None:
    """FSDP1 (the ``FullyShardedDataParallel`` wrapper) is refused; FSDP2 runs."""
    if version is not None and int(version) != 2:
        raise ConfigError(
            f"FSDP is not supported in version {version} (FSDP1, the FullyShardedDataParallel wrapper): the loop "
            f"shards with FSDP2 (torch.distributed.fsdp.fully_shard). Launch with the shipped {FSDP2_CONFIG} "
            "(fsdp_config.fsdp_version: 2; `rrg3d train --accelerate-config fsdp` prints the same config) or set "
            "FSDP_VERSION=2")


def distribution_of(accelerator: Any) -> Distribution:
    """What ``accelerator`` runs (after :func:`enable_on_cpu`)."""
    name = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    processes = int(accelerator.num_processes)
    if name == "FSDP":
        version = int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))
        check_fsdp_version(version)
        return Distribution("fsdp2", 0, processes)
    if name == "DEEPSPEED":
        stage = int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))
        return Distribution("deepspeed", stage, processes)
    return Distribution("ddp", 0, processes)


# -- FSDP2 -------------------------------------------------------------------------------------------------------------
def mixed_precision_policy(mixed_precision: str) -> Any:
    """FSDP2's policy for the run's precision: parameters all-gathered and computed in bf16/fp16, gradients
    reduce-scattered in float32 into the float32 master shards (:func:`rrg3d.train.loop.master_weights`); None
    without mixed precision (accelerate then uses the default policy: everything in the parameters' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision))
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def make_fsdp2_plugin(mixed_precision: str, env: Mapping[str, str] | None = None) -> Any:
    """accelerate's FSDP plugin for FSDP2, from the launch's environment (``FSDP_*``: reshard after forward, CPU
    offload) with what the loop decides: the mixed precision policy, no auto-wrap (the loop picks the units,
    :func:`fsdp2_units`), no "cpu RAM efficient loading" (every process builds the same model from the recipe's seed;
    accelerate's meta-device reload would also untie tied embeddings of a non-HF root module), no activation
    checkpointing through FSDP (``train.gradient_checkpointing`` does it)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = os.environ if env is None else env
    if _flag(env.get("FSDP_ACTIVATION_CHECKPOINTING")):
        raise ConfigError("fsdp_activation_checkpointing is not used by rrg3d: set it to false in the accelerate "
                          "config and use the recipe's train.gradient_checkpointing=true")
    wrap = str(env.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")).upper()
    if wrap != "NO_WRAP":
        log.info("FSDP2: fsdp_auto_wrap_policy %s is not used: rrg3d shards each LM decoder layer and each part of "
                 "the vision tower as units", wrap)
    return FullyShardedDataParallelPlugin(fsdp_version=2,
                                          mixed_precision_policy=mixed_precision_policy(mixed_precision),
                                          auto_wrap_policy="NO_WRAP", cpu_ram_efficient_loading=False,
                                          activation_checkpointing=False)


def fsdp2_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as their own units, deepest first: every module whose class a Hugging Face model in
    ``model`` names in ``_no_split_modules`` (decoder layers; a text tower's layers and embeddings), and the vision
    tower's parts — a :class:`~rrg3d.models.vlm.VisionTower`'s encoder, compressor, projector, classifier, region
    tower and branch modules (each is called through ``__call__``; the tower itself is entered through ``encode``,
    which FSDP's forward hooks would not see), or a bare ``vision`` encoder (CT-CLIP). Parameter-free modules are
    skipped; what is left (embeddings, final norm, LM head) goes to the root unit."""
    classes: set[str] = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)):
            classes.update(str(n) for n in names)
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if name and type(module).__name__ in classes:
            chosen[id(module)] = (name, module)
    vision = getattr(model, "vision", None)
    if isinstance(vision, nn.Module):
        parts: list[nn.Module | None]
        if hasattr(vision, "encoder") and hasattr(vision, "projector"):
            parts = [getattr(vision, n, None) for n in ("encoder", "compressor", "projector", "classifier", "regions")]
            for branch in getattr(vision, "branches", {}).values():
                parts += [getattr(branch, n, None) for n in ("encoder", "compressor", "projector")]
        else:
            parts = [vision]
        names = {id(m): n for n, m in model.named_modules()}
        for part in parts:
            if isinstance(part, nn.Module) and id(part) in names:
                chosen.setdefault(id(part), (names[id(part)], part))
    units = [(n, m) for n, m in chosen.values() if any(True for _ in m.parameters())]
    # a unit inside another is sharded first (fully_shard goes bottom-up)
    units.sort(key=lambda item: -item[0].count("."))
    return [m for _, m in units]


def check_model_support(model: nn.Module, recipe: Any, distribution: Distribution) -> None:
    """Refuse what sharded parameters cannot run. With FSDP2 or ZeRO-3 every call of a sharded module is a
    collective that all processes must make together; a diagnosis-prompt model teacher-forced on a share of its
    prompts (``model.true_findings_share`` > 0) runs its classifier only for the samples that are not, so one process
    may skip the call another makes, and the run would hang."""
    if not distribution.shards_parameters or distribution.processes < 2:
        return
    share = float(getattr(getattr(recipe, "model", None), "true_findings_share", 0.0) or 0.0)
    if share > 0 and bool(getattr(model, "uses_findings_prompt", False)):
        raise ConfigError(f"model.true_findings_share={share:g} with a diagnosis prompt cannot run with sharded "
                          f"parameters ({distribution.describe()}): the classifier runs for a random subset of each "
                          "batch, which differs between processes. Set model.true_findings_share=0, or train with "
                          "DDP or DeepSpeed ZeRO-2")


def apply_fsdp2(model: nn.Module, accelerator: Any) -> int:
    """``fully_shard`` each of :func:`fsdp2_units`, then the root, with the plugin's settings (those accelerate's
    ``prepare`` would give; it then finds the model sharded and only maps the optimizer's parameters). Call before
    building the optimizer. Scalar parameters (CT-CLIP's ``logit_scale``), which ``fully_shard`` cannot shard, stay
    replicated outside FSDP: they are moved to the device and their gradients averaged over the processes by a hook.
    Returns the number of units."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs: dict[str, Any] = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    scalars = {p for p in model.parameters() if p.ndim == 0}
    if scalars:
        kwargs["ignored_params"] = scalars
        world = accelerator.num_processes

        def average(parameter: torch.Tensor) -> None:
            if parameter.grad is not None and world > 1:  # linear: averaging every micro-batch's sum is exact
                dist.all_reduce(parameter.grad)
                parameter.grad.div_(world)

        with torch.no_grad():
            for parameter in scalars:
                parameter.data = parameter.data.to(accelerator.device)
                if parameter.requires_grad:
                    parameter.register_post_accumulate_grad_hook(average)
    units = [m for m in fsdp2_units(model) if not isinstance(m, FSDPModule)]
    for unit in units:
        fully_shard(unit, **kwargs)
    if not isinstance(model, FSDPModule):  # the root: PyTorch's default reshard policy for it (no reshard)
        fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    log.info("FSDP2: %d units (%s) + the root%s", len(units), ", ".join(sorted({type(m).__name__ for m in units})),
             f"; {len(scalars)} scalar parameter(s) replicated" if scalars else "")
    return len(units)


# -- DeepSpeed ---------------------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "none", "")):
        return None
    return float(value)


def check_accelerate_env(accumulation: int, max_grad_norm: float | None,
                         env: Mapping[str, str] | None = None) -> None:
    """An accelerate config that sets ``gradient_accumulation_steps`` / ``gradient_clipping`` (exported as
    ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` / ``ACCELERATE_GRADIENT_CLIPPING``) must agree with the recipe, which
    decides both: accelerate would otherwise count accumulation one way and the loop another."""
    env = os.environ if env is None else env
    given = _number(env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"))
    if given is not None and int(given) != int(accumulation):
        raise ConfigError(f"the accelerate config sets gradient_accumulation_steps={int(given)}, the recipe "
                          f"train.gradient_accumulation_steps={accumulation}: remove the key from the accelerate "
                          "config (the recipe decides it)")
    clip = _number(env.get("ACCELERATE_GRADIENT_CLIPPING"))
    wanted = float(max_grad_norm) if max_grad_norm is not None else 0.0
    if clip is not None and not math.isclose(clip, wanted):
        raise ConfigError(f"the accelerate config sets gradient_clipping={clip:g}, the recipe optim.max_grad_norm="
                          f"{max_grad_norm}: remove the key from the accelerate config (the recipe decides it)")


def resolve_deepspeed_config(config: Mapping[str, Any], *, micro_batch: int, accumulation: int, world: int,
                             max_grad_norm: float | None) -> dict[str, Any]:
    """The DeepSpeed config a run uses: ``config`` (accelerate's, from the launch config or a DeepSpeed JSON) with
    the recipe's batch geometry — ``train_micro_batch_size_per_gpu`` = the phase's batch size,
    ``gradient_accumulation_steps`` = ``train.gradient_accumulation_steps``, ``train_batch_size`` = their product
    with the process count, ``gradient_clipping`` = ``optim.max_grad_norm`` (0: off) — filled where ``config`` has
    "auto" or nothing; an explicit different value is a :class:`ConfigError`. ZeRO-3 gathers the 16-bit weights on
    save (the portable checkpoint needs them). An ``optimizer`` or ``scheduler`` section is refused: the recipe's
    AdamW and schedule train."""
    resolved = copy.deepcopy(dict(config))
    for section in ("optimizer", "scheduler"):
        if section in resolved:
            raise ConfigError(f"the DeepSpeed config has a {section!r} section: remove it (rrg3d trains with the "
                              "recipe's AdamW and learning-rate schedule)")
    wanted = {"train_micro_batch_size_per_gpu": int(micro_batch), "gradient_accumulation_steps": int(accumulation),
              "train_batch_size": int(micro_batch) * int(accumulation) * int(world),
              "gradient_clipping": float(max_grad_norm) if max_grad_norm is not None else 0.0}
    for key, value in wanted.items():
        given = _number(resolved.get(key))
        if given is not None and not math.isclose(given, float(value)):
            raise ConfigError(f"the DeepSpeed config sets {key}={resolved[key]}, the recipe needs {value} "
                              f"({_recipe_source(key)}): remove the key or set it to \"auto\"")
        resolved[key] = value
    zero = resolved.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) >= 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    resolved["zero_allow_untested_optimizer"] = True  # the recipe's torch AdamW
    return resolved


def _recipe_source(key: str) -> str:
    return {"train_micro_batch_size_per_gpu": "the phase's batch size",
            "gradient_accumulation_steps": "train.gradient_accumulation_steps",
            "train_batch_size": "batch size × accumulation × processes",
            "gradient_clipping": "optim.max_grad_norm"}[key]


def resolve_zero3_sizes(config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """Fill ZeRO-3's bucket sizes left "auto" as accelerate would from the LM's hidden size (accelerate looks for
    ``model.config.hidden_size``, which a report generator does not have), or with DeepSpeed's defaults when the model
    has no Hugging Face part. Changes and returns ``config``."""
    zero = config.get("zero_optimization", {})
    derived = {}
    if hidden_size:
        derived = {"reduce_bucket_size": hidden_size * hidden_size,
                   "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                   "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, default in ZERO3_SIZE_DEFAULTS.items():
        if str(zero.get(key, "")).lower() == "auto":
            zero[key] = derived.get(key, default)
    return config


def hidden_size_of(model: nn.Module) -> int | None:
    """The largest ``config.hidden_size`` of the Hugging Face models inside ``model`` (None without one)."""
    sizes = [int(getattr(m.config, "hidden_size", 0) or 0) for m in model.modules()
             if hasattr(m, "config") and hasattr(m.config, "hidden_size")]
    return max(sizes) if sizes and max(sizes) > 0 else None


def make_deepspeed_plugin(*, micro_batch: int, accumulation: int, world: int, max_grad_norm: float | None) -> Any:
    """accelerate's DeepSpeed plugin from the launch (``ACCELERATE_DEEPSPEED_*``, a DeepSpeed JSON) with the config
    resolved against the recipe (:func:`resolve_deepspeed_config`). ``zero3_init_flag`` is off: every process builds
    the whole model (as under DDP) and ZeRO-3 partitions it at ``prepare``, so the main process can keep an unsharded
    replica for validation and checkpoints."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(gradient_accumulation_steps=int(accumulation),
                             gradient_clipping=float(max_grad_norm) if max_grad_norm is not None else 0.0,
                             zero3_init_flag=False)
    resolved = resolve_deepspeed_config(plugin.deepspeed_config, micro_batch=micro_batch, accumulation=accumulation,
                                        world=world, max_grad_norm=max_grad_norm)
    plugin.deepspeed_config.clear()
    plugin.deepspeed_config.update(resolved)  # the same dict as plugin.hf_ds_config.config
    plugin.gradient_accumulation_steps = int(accumulation)
    plugin.gradient_clipping = resolved["gradient_clipping"]
    plugin.zero_stage = int(resolved["zero_optimization"].get("stage", plugin.zero_stage))
    return plugin


def detach_transformers_zero3() -> None:
    """Undo accelerate's registration of the DeepSpeed config with transformers (``DeepSpeedPlugin.select`` always
    makes one). Under ZeRO-3 it would make every ``from_pretrained`` build its model inside ``deepspeed.zero.Init``
    (parameters partitioned at construction, whatever ``zero3_init_flag`` says) and make ``generate`` default to
    ``synced_gpus``: the loop builds the whole model on every process (it adds tokens and LoRA, fits statistics and
    copies the replica) and lets ZeRO-3 partition it at ``prepare``; the replica generates on the main process
    alone."""
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:  # transformers without its DeepSpeed integration: nothing was registered
        return
    unset_hf_deepspeed_config()


def load_zero_optimizer_state(optimizer: Any, state: dict[str, Any], rank: int, world: int) -> None:
    """Load this process's ZeRO partition: ZeRO's ``load_state_dict`` takes one state dict per data-parallel rank and
    reads its own (``state_dict_list[rank]``) for a checkpoint of the same process count; the fp32 master partition
    is restored from the checkpoint (not re-derived from the 16-bit weights)."""
    zero = optimizer
    while zero is not None and type(zero).__name__ not in ZERO_OPTIMIZERS:
        zero = getattr(zero, "optimizer", None)  # accelerate's wrappers → DeepSpeed's ZeRO optimizer
    if zero is None:
        raise RuntimeError(f"no DeepSpeed ZeRO optimizer inside {type(optimizer).__name__}")
    states: list[Any] = [None] * int(world)
    states[int(rank)] = state
    if type(zero).__name__ == "DeepSpeedZeroOptimizer":
        zero.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:  # ZeRO-3 restores the fp32 partitions (and from them the 16-bit ones) from the checkpoint itself
        zero.load_state_dict(states, load_optimizer_states=True)


# -- CPU processes -----------------------------------------------------------------------------------------------------
def enable_on_cpu(accelerator: Any, *, fsdp_plugin: Any = None, deepspeed_plugin: Any = None,
                  mixed_precision: str = "no") -> bool:
    """Switch a CPU multi-process accelerator to FSDP / DeepSpeed as accelerate does on GPUs. accelerate 1.15
    keeps ``MULTI_CPU`` (DDP) on CPU whatever the plugin: the FSDP branch of ``AcceleratorState`` only runs for
    accelerator devices and DeepSpeed requires ``not cpu``. Here the state gets the attributes that branch sets
    (``distributed_type``, the plugin; for DeepSpeed the plugin's precision, its selection and accelerate's "no" native
    precision, since DeepSpeed does its own). Returns whether anything changed. Used by the tests over gloo and by CPU
    clusters; a GPU run never comes here."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if accelerator.device.type != "cpu" or accelerator.num_processes < 2:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU or (fsdp_plugin is None and deepspeed_plugin is None):
        return False
    if fsdp_plugin is not None:
        state.fsdp_plugin = fsdp_plugin
        kind = DistributedType.FSDP
    else:
        deepspeed_plugin.set_mixed_precision(mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = deepspeed_plugin
        state._mixed_precision = "no"  # DeepSpeed's config carries the precision (accelerate does the same)
        kind = DistributedType.DEEPSPEED
    state.distributed_type = kind
    # as AcceleratorState.__init__ ends: a later AcceleratorState() copies PartialState's type back into the state
    PartialState._shared_state["distributed_type"] = kind
    log.info("%s on CPU processes (gloo): accelerate's state promoted from MULTI_CPU", kind.value)
    return True


# -- the unsharded replica ---------------------------------------------------------------------------------------------
def gather_full_state(accelerator: Any, model: nn.Module, distribution: Distribution) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded ``model``, on CPU, on the main process ({} elsewhere). Every process must call
    it (it all-gathers): FSDP2 through ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, ZeRO-3
    through accelerate's ``get_state_dict`` (DeepSpeed's consolidated 16-bit state dict)."""
    if distribution.kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in (state or {}).items()}


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    buffers = {}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                buffers[f"{prefix}.{name}" if prefix else name] = buffer
    return buffers


class Replica:
    """An unsharded copy of the model on the main process (None elsewhere), made before sharding and refreshed from
    the gathered full state dict whenever validation or a checkpoint needs the weights."""

    def __init__(self, model: nn.Module, accelerator: Any, distribution: Distribution) -> None:
        self.accelerator = accelerator
        self.distribution = distribution
        # built before sharding, kept on the CPU between uses (moved to the device for validation only)
        self.module: nn.Module | None = copy.deepcopy(model).to("cpu") if accelerator.is_main_process else None
        self.step: int | None = None  # the step the weights were gathered at

    def sync(self, model: nn.Module, step: int) -> nn.Module | None:
        """Gather the weights of the prepared ``model`` (FSDP2's sharded module, DeepSpeed's engine; every process
        calls) into the replica (main process); returns the replica (None on the other processes). Gathered once per
        step: validation and a checkpoint at the same step share it."""
        if self.step == step:
            return self.module
        state = gather_full_state(self.accelerator, model, self.distribution)
        if self.module is not None:
            missing, unexpected = self.module.load_state_dict(state, strict=False)
            tied = {n for n, p in self.module.named_parameters(remove_duplicate=False)} - \
                {n for n, _ in self.module.named_parameters()}
            missing = [k for k in missing if k not in tied]
            if missing or unexpected:
                raise RuntimeError(f"the gathered state dict does not match the replica (missing {missing[:4]}, "
                                   f"unexpected {unexpected[:4]})")
        self.step = step
        return self.module


def broadcast_buffers(model: nn.Module, source: nn.Module | None = None) -> None:
    """Make ``model``'s persistent buffers equal on every process: the main process first copies ``source``'s into
    its own (the replica validation ran on), then broadcasts them. Validation runs on the main process alone and may
    change buffers (a classifier's calibrated decision threshold); under DDP its forward broadcasts buffers itself,
    FSDP2 and DeepSpeed do not. Every process must call it."""
    import torch.distributed as dist

    own = _persistent_buffers(model)
    if source is not None and source is not model:
        theirs = _persistent_buffers(source)
        with torch.no_grad():
            for name, buffer in own.items():
                if name in theirs:
                    buffer.copy_(theirs[name].to(buffer.device))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for name in sorted(own):
        buffer = own[name]
        carrier = buffer.to(torch.uint8) if buffer.dtype == torch.bool else buffer  # gloo has no bool
        dist.broadcast(carrier, src=0)
        if carrier is not buffer:
            with torch.no_grad():
                buffer.copy_(carrier.bool())


# -- FSDP2 resumable state (DCP) ---------------------------------------------------------------------------------------
def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def save_sharded_state(model: nn.Module, optimizer: Any, folder: Path) -> None:
    """The trainable parameters, buffers and optimizer state of an FSDP2 model as a DCP checkpoint: each process writes
    its own shards (``__R_0.distcp``), the main process the metadata. Frozen parameters are left out (the model is
    rebuilt from the recipe). Every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, _torch_optimizer(optimizer), options=options)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded_state(model: nn.Module, optimizer: Any, folder: Path) -> None:
    """Load what :func:`save_sharded_state` wrote (same process count) into the sharded model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    inner = _torch_optimizer(optimizer)
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, inner, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
