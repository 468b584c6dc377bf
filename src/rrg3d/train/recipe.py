"""Training recipes: one typed YAML file per run, with dotted ``key=value`` overrides, dumped beside every run.

A recipe names the stage and everything the stage needs; every key has a default except ``stage`` (and
``data.manifest``, which may be given on the command line)::

    name: tiny_sft
    stage: sft                      # clip | align | sft | dpo
    seed: 0
    run_dir: null                   # default runs/<name>
    model:
      config: tiny_ctvit_v          # architecture (name or YAML) — the report generator, or the CT-CLIP encoder
      init: null                    # report-generator checkpoint to continue from (e.g. the align run's final/)
      vision_init: null             # CT-CLIP run or checkpoint whose encoder starts the vision tower
      lora: null                    # LoRA for sft {r, alpha, dropout, target_modules}; default: the architecture's
      train: {encoder: null, compressor: null, projector: null, classifier: null, lm: null}  # null: stage default
      classifier_weight: 1.0        # weight of a finding classifier's cross-entropy beside the report loss
      recognition_weight: 1.0       # weight of a region recognition head's cross-entropy (vision.regions.recognizer)
      true_findings_share: 0.0      # share of training prompts listing the true findings, not the classifier's
      clip: {pooling: mean, embed_dim: 512, text: null, ...}              # clip stage only
    data: {manifest: null, train_split: train, val_split: val, cache_dir: null, batch_size: 1, workers: 0, ...}
    dpo: {loss: sigmoid, beta: 0.1, rpo_alpha: 1.0, val_fraction: 0.0}  # dpo stage only (data.pairs: the pairs)
    optim: {lr: 2.0e-4, weight_decay: 0.0, scheduler: cosine, warmup_ratio: 0.03, max_grad_norm: 1.0, ...}
    phases:                         # multi-scale progressive training; one phase with the model's preset by default
      - {preset: multiscale_64, steps: 1000}
      - {preset: multiscale_128, epochs: 1, batch_size: 1}
    train: {gradient_accumulation_steps: 1, mixed_precision: "no", save_every: 0, keep_last: 2, ...}

Overrides are dotted paths into that tree (``optim.lr=1e-4``, ``phases.0.steps=20``, ``model.train.encoder=true``);
values are parsed as YAML and type-checked, and an unknown key is an error that lists the known ones. Numbers
such as ``1e-3`` that YAML reads as text are accepted for float keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from rrg3d.errors import ConfigError
from rrg3d.models.language import LoraSettings
from rrg3d.models.registry import plain_data
from rrg3d.train.augment import AugmentSettings

STAGES = ("clip", "align", "sft", "dpo")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
#: Keys that may differ between a run and its ``--resume`` (they do not change what is computed).
VOLATILE_KEYS = ("train.stop_after", "train.progress", "train.keep_last", "train.save_every", "train.log_every",
                 "train.tensorboard", "data.workers", "data.preprocess_workers", "data.cache_dir")


@dataclass
class TrainableParts:
    """What the stage trains; ``None`` takes the stage's default (align: projector + compressor + a finding
    classifier; sft: projector + compressor + LoRA, the classifier frozen so its calls stay as align calibrated)."""

    encoder: bool | None = None
    compressor: bool | None = None
    projector: bool | None = None
    classifier: bool | None = None
    lm: Literal["frozen", "lora", "full"] | None = None


@dataclass
class ClipSettings:
    """CT-CLIP besides its vision encoder (which comes from ``model.config``'s ``vision.encoder``)."""

    pooling: Literal["mean", "meanmax", "attention"] = "mean"
    pool_heads: int = 8
    text: str | None = None  # HF text encoder (folder or hub id); None: the packaged all-MiniLM-L6-v2
    text_pretrained: bool = True
    max_text_length: int = 256
    embed_dim: int = 512
    train_text: bool = True  # False freezes the text tower (only its projection learns)
    gather_negatives: bool = True  # several processes: contrast with the whole global batch (all-gather)
    #: > 0: a label head on the pooled image features adds this weight × its binary cross-entropy on the manifest's
    #: 18 CT-RATE labels (unknown labels skipped) to the InfoNCE
    label_weight: float = 0.0
    #: "tokens": a text is encoded whole (truncated at max_text_length); "sentences": sentence by sentence, averaged
    text_pooling: Literal["tokens", "sentences"] = "tokens"
    #: > 0: trainable transformer blocks on the text tower's token states (starting as the identity; with a frozen
    #: tower its states are computed once per text and kept): the text side learns report wording cheaply
    text_adapter_layers: int = 0
    #: > 0: standardised block intensity histograms of the input join the pooled image features
    histogram_bins: int = 0
    histogram_blocks: tuple[int, int, int] = (1, 1, 1)
    histogram_range: tuple[float, float] = (0.0, 1.0)
    #: zero-shot [present, absent] prompt pairs with {label} / {label_lower}; None: CT-CLIP's single pair
    zero_shot_prompts: tuple[tuple[str, str], ...] | None = None
    #: > 0: adds this weight × the binary cross-entropy of the zero-shot prompts' log-odds on the manifest labels
    #: (vocabulary fine-tuning, as CT-CLIP's VocabFine; the prompts are then seen in training)
    prompt_weight: float = 0.0


@dataclass
class ModelSection:
    config: str = "tiny_ctvit_v"
    init: str | None = None
    vision_init: str | None = None
    lora: LoraSettings | None = None
    train: TrainableParts = field(default_factory=TrainableParts)
    classifier_weight: float = 1.0  # the finding classifier's cross-entropy weight beside the report loss
    recognition_weight: float = 1.0  # a region recognition head's cross-entropy weight beside the report loss
    #: diagnosis prompts in training: the share of samples whose prompt lists their true (manifest) findings
    #: instead of the classifier's calls; validation and generation always use the classifier
    true_findings_share: float = 0.0
    clip: ClipSettings = field(default_factory=ClipSettings)

    def __post_init__(self) -> None:
        if self.classifier_weight < 0:
            raise ConfigError(f"model.classifier_weight must be >= 0, got {self.classifier_weight}")
        if self.recognition_weight < 0:
            raise ConfigError(f"model.recognition_weight must be >= 0, got {self.recognition_weight}")
        if not 0 <= self.true_findings_share <= 1:
            raise ConfigError(f"model.true_findings_share must be in [0, 1], got {self.true_findings_share}")


@dataclass
class DataSection:
    manifest: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"  # None: no validation
    cache_dir: str | None = None  # preprocessing cache root (cache_dir/<preset name>); None: preprocess on the fly
    batch_size: int = 1  # per process and micro-batch
    val_batch_size: int | None = None  # default batch_size
    max_val_samples: int | None = 64  # validation subset (the first N studies of the split); None: all
    max_length: int | None = 1024  # prompt + report tokens (align/sft); longer reports are cut
    workers: int = 0  # DataLoader worker processes
    preprocess_workers: int = 1  # processes that build the preprocessing cache
    report_field: str = "report"  # the target text: the whole report or a section (findings, impression)
    blank_images: bool = False  # control runs: every volume replaced by zeros (text prior only)
    #: training studies (the first N of phase 0, not augmented) that fit data-dependent parts before the first step:
    #: a PCA compressor, a standardising projector (align/sft; nothing to fit: nothing read)
    fit_samples: int = 256
    #: training-time augmentation (translation, intensity jitter, noise; no flips), see rrg3d.train.augment
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    #: dpo: the preference pairs (``rrg3d prefs build``); their studies' volumes come from the manifest the pairs
    #: were built on (recorded in every pair) unless data.manifest names another copy of it
    pairs: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.val_batch_size is not None and self.val_batch_size < 1):
            raise ConfigError("data.batch_size and data.val_batch_size must be >= 1")
        if self.fit_samples < 2:
            raise ConfigError("data.fit_samples must be >= 2")
        if self.workers < 0 or self.preprocess_workers < 1:
            raise ConfigError("data.workers must be >= 0 and data.preprocess_workers >= 1")


@dataclass
class DPOSettings:
    """The preference loss of the ``dpo`` stage (see :mod:`rrg3d.train.dpo`)."""

    #: sigmoid: DPO (Rafailov et al.); ipo: the squared-hinge IPO loss; rpo: DPO + rpo_alpha × the chosen report's
    #: per-token NLL
    loss: Literal["sigmoid", "ipo", "rpo"] = "sigmoid"
    beta: float = 0.1
    rpo_alpha: float = 1.0
    #: share of the pairs' studies held out (seeded, by study) to validate reward accuracy and margin; 0: none
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"dpo.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"dpo.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW; applied to weight matrices only (not to biases, norms, embeddings' scales)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03  # of all optimizer steps
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float | None = 1.0  # gradient clipping; None: off
    #: lr × multiplier for the parameters under a module prefix, e.g. {text: 0.05} (CLIP text tower) or
    #: {vision: 0.1, projector: 1.0}; the longest matching prefix wins, the rest train at lr
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("optim.warmup_ratio must be in [0, 1)")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.lr_multipliers.values()):
            raise ConfigError(f"optim.lr_multipliers must map module prefixes to numbers >= 0, "
                              f"got {self.lr_multipliers}")


@dataclass
class Phase:
    """A resolution phase: a preset (name or inline mapping; None: the model's) and a budget (steps or epochs)."""

    preset: str | dict[str, Any] | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None  # overrides data.batch_size in this phase

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("each phase needs exactly one of 'steps' or 'epochs'")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise ConfigError("phase steps/epochs must be >= 1")


@dataclass
class TrainSection:
    gradient_accumulation_steps: int = 1
    #: "auto": bf16 where the hardware computes it natively, else "no" (see rrg3d.train.loop.resolve_mixed_precision)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    gradient_checkpointing: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end (and when interrupted)
    keep_last: int = 2  # step checkpoints kept (the newest)
    eval_every: int = 0  # optimizer steps between validations; 0: at the end of each phase
    eval_samples: int = 0  # align/sft: reports generated at each validation (written to samples.jsonl)
    log_every: int = 1
    stop_after: int | None = None  # stop after this many optimizer steps as if interrupted (checkpoint, exit)
    cpu: bool = False  # train on CPU even when a GPU is present
    threads: int | None = None  # torch.set_num_threads
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("train.gradient_accumulation_steps must be >= 1")
        if self.keep_last < 1:
            raise ConfigError("train.keep_last must be >= 1")
        if min(self.save_every, self.eval_every, self.eval_samples) < 0 or self.log_every < 1:
            raise ConfigError("train.save_every/eval_every/eval_samples must be >= 0 and log_every >= 1")


@dataclass
class Recipe:
    stage: Literal["clip", "align", "sft", "dpo"]
    name: str = "run"
    description: str = ""
    seed: int = 0
    run_dir: str | None = None  # default runs/<name>
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    phases: list[Phase] = field(default_factory=lambda: [Phase(steps=100)])
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSettings = field(default_factory=DPOSettings)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ConfigError("phases: at least one phase is needed")
        if self.stage == "clip" and (self.model.init or self.model.vision_init):
            raise ConfigError("the clip stage starts from model.config; model.init/vision_init are for align/sft")
        self.model.train = resolved_trainable(self.stage, self.model.train, self.model)

    # -- derived --------------------------------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return Path(self.run_dir if self.run_dir else Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return plain_data(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe without :data:`VOLATILE_KEYS` (what ``--resume`` must match)."""
        return hashlib.sha256(json.dumps(_strip_volatile(self.to_dict()), sort_keys=True).encode()).hexdigest()


def resolved_trainable(stage: str, parts: TrainableParts, model: ModelSection) -> TrainableParts:
    """The stage defaults filled in: align trains the projector (and compressor); sft adds LoRA (or the full LM); dpo
    trains the LM alone (LoRA; ``lm: full`` for every weight), the vision tower frozen."""
    if stage == "dpo":
        return TrainableParts(encoder=bool(parts.encoder), compressor=bool(parts.compressor),
                              projector=bool(parts.projector), classifier=bool(parts.classifier),
                              lm=parts.lm or "lora")
    if stage == "clip":
        return TrainableParts(encoder=True if parts.encoder is None else parts.encoder,
                              compressor=bool(parts.compressor), projector=bool(parts.projector),
                              classifier=bool(parts.classifier), lm=parts.lm or "frozen")
    default_lm = "frozen" if stage == "align" else "lora"
    return TrainableParts(
        encoder=False if parts.encoder is None else parts.encoder,
        compressor=True if parts.compressor is None else parts.compressor,
        projector=True if parts.projector is None else parts.projector,
        classifier=(stage == "align") if parts.classifier is None else parts.classifier,
        lm=parts.lm or default_lm,
    )


def _strip_volatile(data: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    for key in VOLATILE_KEYS:
        section, name = key.split(".")
        data.get(section, {}).pop(name, None)
    # keys added with the dpo stage: absent from other stages' fingerprints, so earlier runs still resume
    if data.get("stage") != "dpo":
        data.pop("dpo", None)
        if data.get("data", {}).get("pairs") is None:
            data.get("data", {}).pop("pairs", None)
    return data


# -- typed construction ------------------------------------------------------------------------------------------------
def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if dataclasses.is_dataclass(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked (and lightly converted) against ``annotation``; :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null (expected {_type_name(annotation)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and ("yes" if value else "no") in choices:  # YAML 1.1 read `no` as false
            value = "yes" if value else "no"
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {list(typing.get_args(annotation))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return build(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple:
            if args and args[-1] is not Ellipsis:
                if len(args) != len(value):
                    raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
                return tuple(_convert(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True)))
            return tuple(_convert(v, args[0] if args else Any, f"{where}.{i}") for i, v in enumerate(value))
        return [_convert(v, args[0] if args else Any, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build(cls: type, data: Any, where: str) -> Any:
    """A recipe dataclass from a mapping: unknown keys list the known ones; every value is type-checked."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {unknown}; "
                          f"known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where or 'recipe'}: {exc}") from None


# -- overrides ---------------------------------------------------------------------------------------------------------
def _field_type(cls: type, key: str, path: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ConfigError(f"unknown recipe key {path!r}; known keys here: {sorted(fields)}")
    return typing.get_type_hints(cls)[key]


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        structured = [a for a in args if dataclasses.is_dataclass(a) or typing.get_origin(a) in (list, dict)
                      or a is dict]
        return structured[0] if len(structured) == 1 else annotation
    return annotation


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` to the raw recipe mapping (value parsed as YAML; key checked against the
    schema, so a misspelt key fails here with the known keys listed)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, _, text = override.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has no key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: the value is not valid YAML: {exc}") from None
    parts = key.split(".")
    annotation: Any = Recipe
    node: Any = data
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        annotation = _strip_optional(annotation)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(annotation):
            child = _field_type(annotation, part, path)
            if not last and not isinstance(node.get(part), (dict, list)):
                default = _default_of(annotation, part)
                node[part] = default if isinstance(default, (dict, list)) else {}
        elif typing.get_origin(annotation) is list:
            if not part.isdigit():
                raise ConfigError(f"{path}: {'.'.join(parts[:depth])} is a list; use an index (e.g. .0.)")
            index = int(part)
            if index > len(node):
                raise ConfigError(f"{path}: index {index} is past the end (the list has {len(node)} items)")
            if index == len(node):
                node.append({})
            child = typing.get_args(annotation)[0]
            part = index  # type: ignore[assignment]
            if not last and not isinstance(node[part], dict):
                node[part] = {}
        elif typing.get_origin(annotation) is dict or annotation is dict or annotation is Any:
            child = Any
            if not last and not isinstance(node.get(part), dict):
                node[part] = {}
        else:
            raise ConfigError(f"{path}: {'.'.join(parts[:depth])} is a value, not a section")
        if last:
            node[part] = value
        else:
            node = node[part]
            annotation = child


def _default_of(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return plain_data(_asdict_any(f.default_factory()))  # type: ignore[misc]
            return None if f.default is dataclasses.MISSING else f.default
    return None


def _asdict_any(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)  # type: ignore[arg-type]
    if isinstance(value, list):
        return [_asdict_any(v) for v in value]
    return value


# -- loading -----------------------------------------------------------------------------------------------------------
def _builtin_dir() -> Any:
    return resources.files("rrg3d") / "configs" / "recipes"


def list_recipes() -> list[str]:
    """Names of the recipes shipped with rrg3d."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def read_recipe_mapping(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw mapping of a recipe file or shipped recipe name, and where it came from."""
    text_name = str(name_or_path)
    path = Path(text_name).expanduser()
    builtin = _builtin_dir() / f"{text_name}.yaml"
    if path.is_file():
        source, text = str(path), path.read_text(encoding="utf-8")
    elif builtin.is_file():
        source, text = f"rrg3d:configs/recipes/{text_name}.yaml", builtin.read_text(encoding="utf-8")
    else:
        raise ConfigError(f"no recipe {text_name!r}: not a file and not one of {', '.join(list_recipes())}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping")
    if "name" not in data:
        data["name"] = Path(text_name).stem
    return data, source


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()) -> Recipe:
    """A typed :class:`Recipe` from a file, a shipped name or a mapping, with ``key=value`` overrides applied."""
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        data, source = recipe.to_dict(), "<recipe>"
    elif isinstance(recipe, Mapping):
        data, source = json.loads(json.dumps(dict(recipe))), "<mapping>"
    else:
        data, source = read_recipe_mapping(recipe)
    for override in overrides:
        apply_override(data, override)
    try:
        return build(Recipe, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def recipe_from_yaml(text: str) -> Recipe:
    """A recipe from YAML text (the ``config.yaml`` a run wrote)."""
    return load_recipe(yaml.safe_load(text))


def validate_references(recipe: Recipe) -> list[str]:
    """Check what a recipe names exists (model config, presets); the problems found, empty when all is well."""
    from rrg3d.errors import PresetError
    from rrg3d.models.config import load_model_config
    from rrg3d.preprocess.presets import load_preset

    problems: list[str] = []
    model_config = None
    if recipe.model.init is None:
        try:
            model_config = load_model_config(recipe.model.config)
        except ConfigError as exc:
            problems.append(f"model.config: {exc}")
    for i, phase in enumerate(recipe.phases):
        preset = phase.preset if phase.preset is not None else (model_config.preprocess if model_config else None)
        if preset is None:
            continue
        try:
            load_preset(preset)
        except (PresetError, ConfigError) as exc:
            problems.append(f"phases.{i}.preset: {exc}")
    if model_config is not None and recipe.stage != "clip":
        lora = recipe.model.lora or model_config.lm.lora
        if recipe.model.train.lm == "lora" and lora is None:
            problems.append("model.train.lm is lora but neither model.lora nor the architecture's lm.lora is set")
    return problems
