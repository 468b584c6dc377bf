"""Checkpoints: one directory that alone reproduces generation, written by one call and read by one call.

Layout (DESIGN.md)::

    CKPT/rrg3d.yaml           format + version, kind, the full model config, the preprocessing preset (full
                              mapping + sha256), what lm/ holds, file checksums
    CKPT/vision.safetensors   encoder, compressor (PCA included), projector, finding classifier and region branches
                              (if any)
    CKPT/lm/                  "full": HF weights (save_pretrained) | "adapter": a PEFT adapter | "base": empty —
                              the unchanged base model, named in rrg3d.yaml (lm.base)
    CKPT/tokenizer/           the tokenizer with rrg3d's special tokens and chat template
    CKPT/train_state/         optimizer, scheduler, RNG, step (written by training; optional)

Two smaller kinds initialise a report generator's vision encoder (``model.vision_init``): ``ct_clip`` (a CLIP run:
``clip.safetensors``, both towers) and ``encoder`` (``encoder.safetensors``, one vision encoder, e.g. imported from
a peer's public weights by ``rrg3d model import``). Both record the encoder's full registry mapping and the preset.

The kind of LM weights is recorded in ``rrg3d.yaml`` and read from there; nothing is guessed from folder contents or
names. Saving writes a sibling staging folder and swaps it in, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from rrg3d.errors import RRG3DError

FORMAT = "rrg3d-checkpoint"
FORMAT_VERSION = 1
LM_WEIGHT_KINDS = ("full", "adapter", "base")
MODEL_KINDS = ("report_generator", "ct_clip", "encoder")


class CheckpointError(RRG3DError):
    """A checkpoint directory is missing, malformed or from an unsupported format version."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``rrg3d.yaml`` of a checkpoint, with its format and version checked."""
    folder = Path(path)
    meta_path = folder / "rrg3d.yaml"
    if not folder.is_dir():
        raise CheckpointError(folder, "not a checkpoint directory (it does not exist or is a file)")
    if not meta_path.is_file():
        raise CheckpointError(folder, "no rrg3d.yaml: not an rrg3d checkpoint")
    try:
        meta = yaml.safe_load(meta_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CheckpointError(meta_path, f"not valid YAML: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(meta_path, f"format is not {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(meta_path, f"format_version {version!r} is not supported (this rrg3d reads "
                                         f"{FORMAT_VERSION}); upgrade rrg3d or convert the checkpoint")
    if meta.get("kind") not in MODEL_KINDS:
        raise CheckpointError(meta_path, f"kind {meta.get('kind')!r} is not one of {MODEL_KINDS}")
    if meta["kind"] == "report_generator" and (meta.get("lm") or {}).get("weights") not in LM_WEIGHT_KINDS:
        raise CheckpointError(meta_path, f"lm.weights must be one of {LM_WEIGHT_KINDS}")
    return meta


def _lm_weight_kind(model: Any, requested: str) -> str:
    is_peft = hasattr(model.lm, "peft_config")
    if getattr(model, "lora_merged", False):
        raise ValueError("this model's LoRA adapter was merged for inference; save the checkpoint it was loaded from")
    if requested == "auto":
        return "adapter" if is_peft else ("base" if model.lm_is_base else "full")
    if requested not in LM_WEIGHT_KINDS:
        raise ValueError(f"lm_weights must be auto or one of {LM_WEIGHT_KINDS}, got {requested!r}")
    if requested == "adapter" and not is_peft:
        raise ValueError("lm_weights='adapter' needs a LoRA (PEFT) language model")
    if requested == "base" and (is_peft or not model.lm_is_base):
        raise ValueError("lm_weights='base' would drop trained language-model weights")
    if requested == "full" and is_peft:
        raise ValueError("the language model carries a LoRA adapter: save it as 'adapter' (merging is explicit)")
    return requested


def save_checkpoint(model: Any, path: str | os.PathLike[str], *, lm_weights: str = "auto",
                    extra: dict[str, Any] | None = None,
                    train_state: str | os.PathLike[str] | None = None) -> Path:
    """Write ``model`` (a :class:`~rrg3d.models.vlm.ReportGenerator`) as a checkpoint directory at ``path``.

    An existing ``train_state/`` in ``path`` is kept (training writes it beside the weights), unless
    ``train_state`` names a folder: that folder is then moved into the staged checkpoint as ``train_state/``
    before the swap, so the weights and the training state appear together or not at all.
    """
    from safetensors.torch import save_file

    from rrg3d.models.language import base_model
    from rrg3d.preprocess.presets import load_preset

    target = Path(path)
    kind = _lm_weight_kind(model, lm_weights)
    preset = load_preset(model.config.preprocess)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        vision_state = {k: v.detach().contiguous().cpu() for k, v in model.vision.state_dict().items()}
        save_file(vision_state, str(staging / "vision.safetensors"), metadata={"format": FORMAT})
        (staging / "lm").mkdir()
        if kind == "full":
            base_model(model.lm).save_pretrained(staging / "lm")
        elif kind == "adapter":
            model.lm.save_pretrained(staging / "lm", save_embedding_layers=False)
        model.tokenizer.save_pretrained(staging / "tokenizer")
        meta = {
            **_header("report_generator"),
            "model": _model_record(model),
            "preprocess": preset.record(),
            "lm": {"weights": kind, "base": model.config.lm.name_or_path, "path": "lm", "tokenizer": "tokenizer"},
            "files": {"vision.safetensors": _sha256(staging / "vision.safetensors")},
            "extra": extra or {},
        }
        _complete(staging, target, meta, train_state)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _header(kind: str) -> dict[str, Any]:
    """The fields every checkpoint's ``rrg3d.yaml`` starts with."""
    from rrg3d import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "rrg3d_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _complete(staging: Path, target: Path, meta: dict[str, Any], train_state: str | os.PathLike[str] | None) -> None:
    """Write ``rrg3d.yaml`` last, add the training state, and swap the staged checkpoint in."""
    (staging / "rrg3d.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
    _stage_train_state(staging, target, train_state)
    _make_readable(staging)
    _swap_in(staging, target)


def _stage_train_state(staging: Path, target: Path, train_state: str | os.PathLike[str] | None) -> None:
    """Put ``train_state/`` into the staged checkpoint: the given folder (moved), else the existing one (copied)."""
    if train_state is not None:
        source = Path(train_state)
        if not source.is_dir():
            raise ValueError(f"train_state {source} is not a directory")
        shutil.move(str(source), str(staging / "train_state"))
    elif (target / "train_state").is_dir():
        shutil.copytree(target / "train_state", staging / "train_state")


def _model_record(model: Any) -> dict[str, Any]:
    """The model config, with each vision component described from the live module (fitted state included)."""
    from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS

    record = model.config.to_dict()
    vision = model.vision
    record["vision"] = {"encoder": ENCODERS.describe(vision.encoder),
                        "compressor": COMPRESSORS.describe(vision.compressor),
                        "projector": PROJECTORS.describe(vision.projector)}
    if vision.classifier is not None:
        from rrg3d.models.registry import config_to_dict

        record["vision"]["classifier"] = config_to_dict(vision.classifier.config)
    if len(getattr(vision, "branches", {})):  # PET/CT: each modality branch as built (fitted state included)
        record["vision"]["branches"] = {name: branch.describe() for name, branch in vision.branches.items()}
    if vision.regions is not None:  # region-guided: the settings as resolved (names, sizes, branches, alignment)
        from rrg3d.models.registry import config_to_dict

        record["vision"]["regions"] = config_to_dict(vision.regions.settings)
    return record


def _make_readable(folder: Path) -> None:
    """Give the staged files the permissions a plain write would (mkdtemp and some writers use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [folder, *folder.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with renames only (the old one is removed after the new one is in place)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def load_checkpoint(path: str | os.PathLike[str], *, device: str | None = None, dtype: str | None = None,
                    trainable: bool = False, merge_lora: bool = False) -> Any:
    """The :class:`~rrg3d.models.vlm.ReportGenerator` saved at ``path`` (in eval mode unless ``trainable``).

    ``merge_lora`` folds a LoRA adapter into the base weights for inference (fewer matmuls per token; the model
    can then no longer be saved as an adapter).
    """
    from safetensors.torch import load_file

    from rrg3d.models.config import ModelConfig
    from rrg3d.models.language import load_language_model
    from rrg3d.models.vlm import ReportGenerator, VisionTower

    folder = Path(path)
    meta = read_manifest(folder)
    if meta["kind"] != "report_generator":
        raise CheckpointError(folder, f"is a {meta['kind']} checkpoint, not a report generator (a CT-CLIP or "
                                      "encoder checkpoint initialises a report generator's encoder: "
                                      "model.vision_init)")
    config = ModelConfig.from_dict(meta["model"], source=str(folder / "rrg3d.yaml"))
    recorded_preset = meta.get("preprocess", {}).get("config")
    if recorded_preset is not None:
        config.preprocess = recorded_preset  # the exact preset used in training, not whatever a name means today
    if dtype is not None:
        config.lm.dtype = dtype
    lm_meta = meta["lm"]
    tokenizer_dir = folder / lm_meta.get("tokenizer", "tokenizer")
    if not tokenizer_dir.is_dir():
        raise CheckpointError(folder, "the tokenizer folder is missing")
    kind = lm_meta["weights"]
    lm_dir = folder / lm_meta.get("path", "lm")
    if kind == "full" and not (lm_dir / "config.json").is_file():
        raise CheckpointError(folder, "rrg3d.yaml says lm.weights=full but lm/config.json is missing")
    if kind == "adapter" and not (lm_dir / "adapter_config.json").is_file():
        raise CheckpointError(folder, "rrg3d.yaml says lm.weights=adapter but lm/adapter_config.json is missing")
    lm, tokenizer = load_language_model(config.lm, tokenizer_path=str(tokenizer_dir), device=device,
                                        weights_path=str(lm_dir) if kind == "full" else None)
    if kind == "adapter":
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(lm_dir), is_trainable=trainable and not merge_lora)
        if merge_lora:
            lm = lm.merge_and_unload()
    vision_file = folder / "vision.safetensors"
    if not vision_file.is_file():
        raise CheckpointError(folder, "vision.safetensors is missing")
    expected = (meta.get("files") or {}).get("vision.safetensors")
    if expected and _sha256(vision_file) != expected:
        raise CheckpointError(vision_file, "checksum mismatch: the file is corrupt or was changed after saving")
    vision = VisionTower.from_config(config.vision, lm_dim=int(lm.config.hidden_size))
    state = load_file(str(vision_file))
    _prepare_fitted_buffers(vision, state)
    _load_state(vision, state, vision_file, "the model config")
    model = ReportGenerator(config, vision, lm, tokenizer, lm_is_base=kind == "base")
    model.lora_merged = kind == "adapter" and merge_lora
    return _ready(model, meta, device=device, trainable=trainable)


def _load_state(module: Any, state: dict[str, Any], where: Path, what: str) -> None:
    """Load weights that must match the module exactly (a clear error otherwise, never a silent partial load)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(where, f"does not match {what}: missing {sorted(missing)[:5]}, "
                                     f"unexpected {sorted(unexpected)[:5]}")


def _ready(model: Any, meta: dict[str, Any], *, device: str | None, trainable: bool) -> Any:
    """A loaded model on its device, frozen in eval mode unless it is loaded for training."""
    model.to(device or "cpu")
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    model.checkpoint_meta = meta
    return model


def _prepare_fitted_buffers(vision: Any, state: dict[str, Any]) -> None:
    """Give buffers whose size is only known after fitting (PCA) the saved shapes before loading."""
    for name, buffer in list(vision.named_buffers()):
        saved = state.get(name)
        if saved is not None and tuple(saved.shape) != tuple(buffer.shape):
            module_name, _, attr = name.rpartition(".")
            module = vision.get_submodule(module_name) if module_name else vision
            setattr(module, attr, buffer.new_empty(saved.shape))


def default_model_dir() -> Path:
    """Where the default model lives: ``$RRG3D_MODEL``, else ``<cache>/models/demo`` (written by ``rrg3d demo``)."""
    from rrg3d.models.language import cache_dir

    configured = os.environ.get("RRG3D_MODEL")
    return Path(configured).expanduser() if configured else cache_dir() / "models" / "demo"


def default_model_path() -> Path:
    """The model ``rrg3d generate`` uses without ``--model`` (an error saying what to do when there is none)."""
    path = default_model_dir()
    if not (path / "rrg3d.yaml").is_file():
        raise CheckpointError(path, "no default model here: pass --model CKPT, set $RRG3D_MODEL, or train the demo "
                                    "model with `rrg3d demo`")
    return path


# -- CT-CLIP checkpoints ----------------------------------------------------------------------------------------------
CLIP_WEIGHTS = "clip.safetensors"


def save_clip_checkpoint(model: Any, path: str | os.PathLike[str], *, preprocess: Any,
                         extra: dict[str, Any] | None = None,
                         train_state: str | os.PathLike[str] | None = None) -> Path:
    """Write a :class:`~rrg3d.models.clip.CTCLIP` as a checkpoint directory (kind ``ct_clip``), atomically.

    ``rrg3d.yaml`` records the CLIP config, the encoder's full mapping (``encoder``: what a report generator's
    ``vision.encoder`` must equal to take these weights) and the preprocessing preset; ``clip.safetensors`` holds
    every weight (both towers, projections, temperature). ``train_state`` works as in :func:`save_checkpoint`.
    """
    from safetensors.torch import save_file

    from rrg3d.models.registry import ENCODERS
    from rrg3d.preprocess.presets import load_preset

    target = Path(path)
    preset = load_preset(preprocess)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / CLIP_WEIGHTS), metadata={"format": FORMAT})
        meta = {
            **_header("ct_clip"),
            "clip": model.describe(),
            "encoder": ENCODERS.describe(model.vision),
            "preprocess": preset.record(),
            "files": {CLIP_WEIGHTS: _sha256(staging / CLIP_WEIGHTS)},
            "extra": extra or {},
        }
        _complete(staging, target, meta, train_state)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _clip_weights(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = folder / CLIP_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(folder, f"{CLIP_WEIGHTS} is missing")
    expected = (meta.get("files") or {}).get(CLIP_WEIGHTS)
    if expected and _sha256(weights) != expected:
        raise CheckpointError(weights, "checksum mismatch: the file is corrupt or was changed after saving")
    return load_file(str(weights))


def _clip_meta(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    folder = Path(path)
    meta = read_manifest(folder)
    if meta["kind"] != "ct_clip":
        raise CheckpointError(folder, f"is a {meta['kind']} checkpoint, not a CT-CLIP one")
    return folder, meta


def load_clip_checkpoint(path: str | os.PathLike[str], *, device: str | None = None, trainable: bool = False) -> Any:
    """The :class:`~rrg3d.models.clip.CTCLIP` saved at ``path`` (text tower architecture from its recorded source)."""
    from rrg3d.models.clip import CTCLIP

    folder, meta = _clip_meta(path)
    config = dict(meta["clip"])
    config["text_pretrained"] = False  # every weight comes from the checkpoint
    model = CTCLIP.from_mapping(config)
    model.config.text_pretrained = bool(meta["clip"].get("text_pretrained", True))
    _load_state(model, _clip_weights(folder, meta), folder, "its config")
    return _ready(model, meta, device=device, trainable=trainable)


def _canonical_encoder(mapping: dict[str, Any]) -> dict[str, Any]:
    """An encoder mapping with every config field spelled out (defaults filled in), so mappings recorded before a
    field existed compare equal to today's ``ENCODERS.describe`` of the same model."""
    import rrg3d.models.encoders  # noqa: F401  (registers the encoders)
    from rrg3d.models.registry import ENCODERS, config_to_dict

    try:
        name, config = ENCODERS.make_config(mapping)
    except RRG3DError:
        return dict(mapping)
    return {"name": name, **config_to_dict(config)}


def load_clip_encoder_state(path: str | os.PathLike[str], encoder: dict[str, Any]) -> dict[str, Any]:
    """The vision-encoder weights of a CT-CLIP checkpoint or of an encoder checkpoint (kind ``encoder``, e.g. from
    ``rrg3d model import``), checked against ``encoder`` (a registry mapping, described in full): a report generator
    takes them only when its encoder is configured identically."""
    folder = Path(path)
    meta = read_manifest(folder)
    if meta["kind"] not in ("ct_clip", "encoder"):
        raise CheckpointError(folder, f"is a {meta['kind']} checkpoint, neither a CT-CLIP nor an encoder one")
    recorded = _canonical_encoder(meta.get("encoder") or {})
    wanted = _canonical_encoder(encoder)
    if recorded != wanted:
        keys = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        detail = ", ".join(f"{k}: checkpoint {recorded.get(k)!r} vs model {wanted.get(k)!r}" for k in keys[:6])
        what = "CT-CLIP encoder" if meta["kind"] == "ct_clip" else "encoder"
        raise CheckpointError(folder, f"the {what} does not match the model's vision.encoder ({detail})")
    if meta["kind"] == "encoder":
        return _encoder_weights(folder, meta)
    state = _clip_weights(folder, meta)
    return {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.")}


# -- vision-encoder checkpoints ---------------------------------------------------------------------------------------
ENCODER_WEIGHTS = "encoder.safetensors"


def save_encoder_checkpoint(encoder: Any, path: str | os.PathLike[str], *, preprocess: Any,
                            extra: dict[str, Any] | None = None) -> Path:
    """Write one vision encoder as a checkpoint directory (kind ``encoder``), atomically.

    ``rrg3d.yaml`` records the encoder's full registry mapping (``encoder``: what a report generator's
    ``vision.encoder`` must equal to take these weights through ``model.vision_init``), the preprocessing preset and
    ``extra`` (e.g. the provenance of imported weights); ``encoder.safetensors`` holds the encoder's state dict.
    """
    from safetensors.torch import save_file

    from rrg3d.models.registry import ENCODERS
    from rrg3d.preprocess.presets import load_preset

    target = Path(path)
    preset = load_preset(preprocess)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
        save_file(state, str(staging / ENCODER_WEIGHTS), metadata={"format": FORMAT})
        meta = {
            **_header("encoder"),
            "encoder": ENCODERS.describe(encoder),
            "preprocess": preset.record(),
            "files": {ENCODER_WEIGHTS: _sha256(staging / ENCODER_WEIGHTS)},
            "extra": extra or {},
        }
        _complete(staging, target, meta, None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _encoder_weights(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = folder / ENCODER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(folder, f"{ENCODER_WEIGHTS} is missing")
    expected = (meta.get("files") or {}).get(ENCODER_WEIGHTS)
    if expected and _sha256(weights) != expected:
        raise CheckpointError(weights, "checksum mismatch: the file is corrupt or was changed after saving")
    return load_file(str(weights))


def load_encoder_checkpoint(path: str | os.PathLike[str], *, device: str | None = None,
                            trainable: bool = False) -> Any:
    """The vision encoder saved at ``path`` (kind ``encoder``), built from its recorded mapping, in eval mode unless
    ``trainable``; ``encoder.checkpoint_meta`` holds ``rrg3d.yaml`` (preset, provenance)."""
    import rrg3d.models.encoders  # noqa: F401  (registers the encoders)
    from rrg3d.models.registry import ENCODERS

    folder = Path(path)
    meta = read_manifest(folder)
    if meta["kind"] != "encoder":
        raise CheckpointError(folder, f"is a {meta['kind']} checkpoint, not an encoder one")
    encoder = ENCODERS.build(meta["encoder"])
    _load_state(encoder, _encoder_weights(folder, meta), folder, "its encoder config")
    return _ready(encoder, meta, device=device, trainable=trainable)


def install_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy a checkpoint (without its ``train_state/``) to ``target`` atomically, replacing what is there."""
    read_manifest(source)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.installing-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "ckpt", ignore=shutil.ignore_patterns("train_state"))
        _make_readable(staging / "ckpt")
        _swap_in(staging / "ckpt", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
