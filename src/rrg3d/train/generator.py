"""Report-generator pieces the ``align`` and ``sft`` stages share: build, loss, validation, checkpoint.

* **build**: from ``model.init`` (a report-generator checkpoint, e.g. the align run's ``final/``) or from the
  architecture ``model.config`` (pretrained LM, LoRA when configured, fresh vision tower); ``model.vision_init``
  then loads a CT-CLIP run's encoder (its config must equal the model's ``vision.encoder``).
* **loss**: the LM's next-token loss on report tokens only (``ReportGenerator.report_batch``; with a diagnosis prompt
  ``model.true_findings_share`` of the training prompts list the true findings), plus ``model.classifier_weight`` ×
  the finding classifier's cross-entropy on the manifest labels while it trains.
* **validation**: mean loss over the validation split and the image gain; with a finding classifier its macro AUROC
  and micro-F1 — a classifier in training first gets its decision threshold chosen there (best micro-F1), so the
  final checkpoint calls findings at the threshold validated last; with ``train.eval_samples`` also a few greedy
  reports, appended to ``RUN/samples.jsonl`` beside their references.
* **checkpoint**: :func:`rrg3d.models.checkpoint.save_checkpoint`, recording the phase's preset as the model's
  preprocessing, so inference uses the resolution the model was last trained at.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrg3d.errors import ConfigError
from rrg3d.models.classifier import target_matrix
from rrg3d.train.loop import RunContext, iterate_batches
from rrg3d.train.recipe import Recipe

log = logging.getLogger(__name__)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose ``final/`` is one."""
    folder = Path(path).expanduser()
    if not (folder / "rrg3d.yaml").is_file() and (folder / "final" / "rrg3d.yaml").is_file():
        return folder / "final"
    return folder


def preset_reference(preset: Any) -> str | dict[str, Any]:
    """What a model config records as its preprocessing: the preset's name when that name means exactly this
    preset, else the full mapping."""
    from rrg3d.errors import PresetError
    from rrg3d.preprocess.presets import load_preset

    try:
        if load_preset(preset.name).sha256 == preset.sha256:
            return str(preset.name)
    except (PresetError, ConfigError, OSError):
        pass
    return preset.to_dict()


def build_report_generator(recipe: Recipe, final_preset: Any) -> nn.Module:
    from rrg3d.models.checkpoint import load_checkpoint, load_clip_encoder_state
    from rrg3d.models.config import load_model_config
    from rrg3d.models.language import add_lora, base_model, enable_lm_checkpointing
    from rrg3d.models.registry import ENCODERS
    from rrg3d.models.vlm import ReportGenerator

    parts = recipe.model.train
    if recipe.model.init:
        model = load_checkpoint(resolve_checkpoint_dir(recipe.model.init), trainable=True)
        has_adapter = hasattr(model.lm, "peft_config")
        if parts.lm == "full" and has_adapter:
            raise ConfigError(f"model.init {recipe.model.init} carries a LoRA adapter: full fine-tuning "
                              "(model.train.lm=full) needs a checkpoint without one")
        if has_adapter and recipe.model.lora is not None:
            raise ConfigError(f"model.init {recipe.model.init} already carries a LoRA adapter; model.lora can only "
                              "add one to a checkpoint without")
        if parts.lm == "lora" and not has_adapter:
            settings = recipe.model.lora or model.config.lm.lora
            if settings is None:
                raise ConfigError("model.train.lm=lora: set model.lora {r: ..., alpha: ...} (neither model.init "
                                  "nor its architecture defines LoRA)")
            model.lm = add_lora(model.lm, settings)
            model.config.lm.lora = settings
            model.lm_is_base = False
    else:
        config = load_model_config(recipe.model.config)
        lora = recipe.model.lora or config.lm.lora
        if parts.lm == "lora" and lora is None:
            raise ConfigError(f"model.train.lm=lora, but {config.name} has no lm.lora: set model.lora "
                              "{r: ..., alpha: ...} or model.train.lm=full")
        # Only sft with lm=lora carries an adapter: align (LM frozen) saves the base LM by name and records the
        # LoRA settings for sft; full fine-tuning trains and saves the LM's own weights.
        config.lm.lora = lora if parts.lm == "lora" else None
        model = ReportGenerator.from_config(config, seed=recipe.seed)
        if parts.lm == "frozen":
            model.config.lm.lora = lora
    if recipe.model.vision_init:
        source = resolve_checkpoint_dir(recipe.model.vision_init)
        state = load_clip_encoder_state(source, ENCODERS.describe(model.vision.encoder))
        model.vision.encoder.load_state_dict(state, strict=True)
        log.info("vision encoder initialised from the CT-CLIP checkpoint %s", source)
    model.set_trainable(encoder=bool(parts.encoder), compressor=bool(parts.compressor),
                        projector=bool(parts.projector), lm=str(parts.lm), classifier=bool(parts.classifier))
    classifier = model.vision.classifier
    if classifier is not None and not parts.classifier and not bool(classifier.fitted):
        raise ConfigError("the model's finding classifier was never fitted and model.train.classifier is false: its "
                          "calls would be noise in every prompt; start from an align checkpoint (model.init) or set "
                          "model.train.classifier=true")
    if recipe.train.gradient_checkpointing:
        if hasattr(model.vision.encoder, "set_gradient_checkpointing"):
            model.vision.encoder.set_gradient_checkpointing(True)
        if parts.lm != "frozen" or parts.encoder or parts.compressor or parts.projector:
            enable_lm_checkpointing(base_model(model.lm))
    model.config.preprocess = preset_reference(final_preset)
    fill_style_templates(model, recipe)
    fill_findings_order(model, recipe)
    return model


def fill_findings_order(model: nn.Module, recipe: Recipe) -> None:
    """A diagnosis prompt with ``findings_order: reports`` gets the order the training split's report texts name
    findings in (:func:`rrg3d.text.labeler.mention_order`); the checkpoint then keeps that list."""
    from rrg3d.models.config import FINDINGS_ORDER_FROM_REPORTS

    prompt = model.config.prompt
    if prompt.findings_order != FINDINGS_ORDER_FROM_REPORTS:
        return
    if not recipe.data.manifest:
        raise ConfigError("prompt.findings_order: reports needs data.manifest to read the training reports")
    from rrg3d.data.manifest import load_manifest
    from rrg3d.text.labeler import mention_order
    from rrg3d.train.data import record_text

    texts = [record_text(r, recipe.data.report_field) for r in load_manifest(recipe.data.manifest)
             if r.get("split") == recipe.data.train_split]
    prompt.findings_order = mention_order(texts)
    log.info("diagnosis prompt lists findings in the training reports' order: %s", ", ".join(prompt.findings_order))


def fill_style_templates(model: nn.Module, recipe: Recipe) -> None:
    """A style-prompted model (``prompt.style``) without templates gets them from the training split of
    ``data.manifest`` (:func:`rrg3d.text.styles.build_style_templates`); the checkpoint then keeps them, so generation
    uses exactly the templates training saw."""
    prompt = model.config.prompt
    if prompt.style is None or prompt.style_templates:
        return
    if not recipe.data.manifest:
        raise ConfigError("a style-prompted model (prompt.style) needs data.manifest to build its style templates")
    from rrg3d.text.styles import build_style_templates

    prompt.style_templates = build_style_templates(recipe.data.manifest, splits=recipe.data.train_split,
                                                   field=recipe.data.report_field)
    log.info("style templates from the training split: %s", ", ".join(
        f"{style} ({'/'.join(sorted(by_sex))})" for style, by_sex in prompt.style_templates.items()))


def recipe_model_config(recipe: Recipe) -> Any:
    """The model config a generator stage trains: ``model.init``'s as saved, else ``model.config``."""
    from rrg3d.models.config import ModelConfig, load_model_config

    if recipe.model.init:
        from rrg3d.models.checkpoint import read_manifest

        folder = resolve_checkpoint_dir(recipe.model.init)
        return ModelConfig.from_dict(read_manifest(folder)["model"], source=str(folder / "rrg3d.yaml"))
    return load_model_config(recipe.model.config)


def build_generator_datasets(recipe: Recipe, presets: list[Any], accelerator: Any) -> tuple[list[Any], Any]:
    """The report datasets of align and sft; for a region-guided model (``vision.regions``) their items carry each
    study's region inputs, made from its label map (``masks`` in the manifest)."""
    from rrg3d.models.regions import RegionSettings
    from rrg3d.models.registry import config_from_mapping
    from rrg3d.train.loop import build_report_datasets

    config = recipe_model_config(recipe)
    regions = None
    if config.vision.regions is not None:
        regions = config_from_mapping(RegionSettings, config.vision.regions, where="vision.regions")
        if recipe.data.augment.enabled:
            raise ConfigError("data.augment moves the volume but not its label map: a region-guided model trains "
                              "without augmentation (data.augment.enabled=false)")
    return build_report_datasets(recipe, presets, accelerator, regions=regions)


def fit_generator_statistics(model: nn.Module, dataset: Any, recipe: Recipe, device: torch.device) -> None:
    """Fit the vision tower's data-dependent parts that are not fitted yet (a PCA compressor, a standardising
    projector) on the first ``data.fit_samples`` training studies, before the first step; then start a finding
    classifier that trains in this stage and was never fitted from its probe on those studies (see
    :meth:`~rrg3d.models.classifier.FindingClassifier.fit`). A ``model.init`` checkpoint brings its fitted state
    along, so sft after align keeps align's; a resumed run refits the same values (the computation is deterministic)
    and then loads them from its checkpoint anyway."""
    classifier = model.vision.classifier
    fit_classifier = (classifier is not None and not bool(classifier.fitted)
                      and any(p.requires_grad for p in classifier.parameters()))
    region_classifier = model.vision.regions.classifier if model.vision.regions is not None else None
    fit_regions = region_classifier is not None and not region_classifier.fitted
    parts = model.vision.unfitted_parts()
    if not parts and not fit_classifier and not fit_regions:
        return
    count = min(recipe.data.fit_samples, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    batch_size = recipe.data.val_batch_size or recipe.data.batch_size
    model.vision.to(device)

    def volume_batches() -> Any:
        for batch in iterate_batches(subset, batch_size):
            yield batch["volumes"].to(device=device, dtype=torch.float32)

    if parts:
        model.vision.fit_statistics(volume_batches)
        log.info("fitted %s on %d training studies", " and ".join(parts), count)
    if fit_classifier:
        features, labels = [], []
        was_training = model.vision.training
        model.vision.eval()  # no dropout; BatchNorm uses its running statistics
        try:
            with torch.no_grad():
                for batch in iterate_batches(subset, batch_size):
                    volumes = batch["volumes"].to(device=device, dtype=torch.float32)
                    features.append(model.vision.classifier_features(volumes).cpu())
                    labels.append(target_matrix(batch))
        finally:
            model.vision.train(was_training)
        loss = classifier.fit(torch.cat(features), torch.cat(labels))
        log.info("fitted the finding classifier on %d training studies (loss %.4f)", count, loss)
    if fit_regions:
        fit_region_classifier(region_classifier, subset, batch_size)


def region_classifier_inputs(dataset: Any, batch_size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Every region slot of ``dataset``: its masked histogram, its region and its abnormalities ``[N, 18]``."""
    histograms, names, findings = [], [], []
    for batch in iterate_batches(dataset, batch_size):
        regions = batch["regions"]
        if regions.histograms is None or regions.findings is None:
            raise ValueError("the dataset's region items carry no histograms or findings: build it with the model's "
                             "region settings (vision.regions.classifier)")
        histograms.append(regions.histograms)
        findings.append(regions.findings)
        names += regions.slot_names
    return torch.cat(histograms), names, torch.cat(findings)


def fit_region_classifier(classifier: nn.Module, dataset: Any, batch_size: int) -> None:
    """Fit a region classifier's heads on the region slots of ``dataset`` (training studies); raises when no
    region has known labels (the manifest gives no region_labels, region_truth or region reports)."""
    histograms, names, findings = region_classifier_inputs(dataset, batch_size)
    losses = classifier.fit(histograms, names, findings)
    if not losses:
        raise ValueError("the region classifier found no region with known abnormalities among the training studies "
                         "(give region_labels or region_reports in the manifest)")
    log.info("fitted the region classifier on %d region slots of %d training studies (%d regions; mean loss %.4f)",
             len(names), len(dataset), len(losses), sum(losses.values()) / len(losses))


def set_generator_preset(model: nn.Module, preset: Any) -> None:
    model.config.preprocess = preset_reference(preset)


def prepare_generator_batch(raw: nn.Module, batch: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The batch's prompt + target tokens (``tokens``) and their count of target tokens (``num_items``, the tokens
    the next-token loss scores); region-guided models draw their slot order here (region–report alignment)."""
    volumes = batch["volumes"]
    regions = batch.get("regions")
    if regions is not None and raw.region_settings is not None and raw.region_settings.alignment:
        regions = regions.shuffled()  # region–report alignment: a new slot order at every step (torch's RNG)
    tokens = raw.report_batch(volumes, batch["reports"], max_length=recipe.data.max_length, ids=batch["ids"],
                              true_labels=target_matrix(batch), true_share=recipe.model.true_findings_share,
                              regions=regions, styles=batch.get("styles"))
    from rrg3d.models.vlm import IGNORE_INDEX

    scored = int((tokens["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {**batch, "regions": regions, "tokens": tokens, "num_items": scored}


def generator_loss(model: nn.Module, raw: nn.Module, batch: dict[str, Any], recipe: Recipe) -> torch.Tensor:
    """Next-token loss on the report tokens of a batch (visual tokens for this batch's input size): the mean over
    its target tokens, or their sum divided by ``batch["num_items_in_batch"]`` when the loop weighs every token of
    an optimizer step the same (:attr:`rrg3d.train.loop.Stage.prepare`)."""
    if "tokens" not in batch:
        batch = prepare_generator_batch(raw, batch, recipe)
    volumes, regions, tokens = batch["volumes"], batch.get("regions"), batch["tokens"]
    classifier = raw.vision.classifier
    train_classifier = classifier is not None and any(p.requires_grad for p in classifier.parameters())
    extra: dict[str, Any] = {"regions": regions} if regions is not None else {}
    if batch.get("num_items_in_batch") is not None:
        extra["num_items_in_batch"] = batch["num_items_in_batch"]
    output = model(volumes, tokens["input_ids"], tokens["attention_mask"], tokens["labels"],
                   finding_labels=target_matrix(batch) if train_classifier else None, **extra)
    loss = output.loss
    if train_classifier:
        loss = loss + recipe.model.classifier_weight * output.classifier_loss
    if output.recognition_loss is not None and recipe.model.recognition_weight > 0:
        loss = loss + recipe.model.recognition_weight * output.recognition_loss
    return loss


def generator_frozen_modules(model: nn.Module) -> list[nn.Module]:
    parts = [model.vision.encoder, model.vision.compressor, model.vision.projector, model.lm]
    if model.vision.classifier is not None:
        parts.append(model.vision.classifier)
    if model.vision.regions is not None:
        parts += [m for m in model.vision.regions.children()]
    return [m for m in parts if not any(p.requires_grad for p in m.parameters())]


@torch.no_grad()
def image_conditioned_losses(model: nn.Module, dataset: Any, batch_size: int, max_length: int | None = None,
                             autocast: Any = contextlib.nullcontext, device: Any = None) -> dict[str, float]:
    """Mean report loss of ``dataset`` with each study's own volume (``loss``) and with its neighbour's
    (``loss_other_image``: item ``i`` gets item ``i − 1``'s, the first the last's), and their difference
    ``image_gain`` — how much the image tells the model about its report (about 0 when the image is ignored;
    needs at least two studies, otherwise only ``loss``). Region-guided models: ``loss`` only, slots in the order
    of the model's region names."""
    device = device if device is not None else model.device
    losses, other_losses, weights = [], [], []
    region_model = getattr(model, "region_settings", None) is not None
    carry = dataset[len(dataset) - 1]["volume"][None] if len(dataset) > 1 and not region_model else None
    for batch in iterate_batches(dataset, batch_size):
        volumes = batch["volumes"].to(device)
        regions = {"regions": batch["regions"]} if region_model else {}
        with autocast():
            tokens = model.report_batch(volumes, batch["reports"], max_length=max_length, ids=batch["ids"],
                                        styles=batch.get("styles"), **regions)
            losses.append(float(model(volumes, tokens["input_ids"], tokens["attention_mask"], tokens["labels"],
                                      **regions).loss))
            if carry is not None:  # the other study's image, and (with a diagnosis prompt) its classifier's calls
                others = torch.cat([carry.to(device), volumes[:-1]])
                tokens = model.report_batch(others, batch["reports"], max_length=max_length, ids=batch["ids"],
                                            styles=batch.get("styles"))
                other_losses.append(float(model(others, tokens["input_ids"], tokens["attention_mask"],
                                                tokens["labels"]).loss))
        if carry is not None:
            carry = batch["volumes"][-1:]
        weights.append(len(batch["ids"]))

    def mean(values: list[float]) -> float:
        return sum(w * v for w, v in zip(weights, values, strict=True)) / max(1, sum(weights))

    result = {"loss": mean(losses)}
    if other_losses:
        result["loss_other_image"] = mean(other_losses)
        result["image_gain"] = result["loss_other_image"] - result["loss"]
    return result


@torch.no_grad()
def validate_classifier(model: nn.Module, dataset: Any, batch_size: int, context: RunContext) -> dict[str, float]:
    """The finding classifier on the validation split: macro AUROC and micro-F1 at its threshold. A classifier
    in training (trainable parameters) first gets its threshold re-chosen here (best validation micro-F1)."""
    from rrg3d.train.metrics import zero_shot_auroc

    classifier = model.vision.classifier
    device = context.accelerator.device
    logits, labels = [], []
    for batch in iterate_batches(dataset, batch_size):
        with context.accelerator.autocast():
            batch_logits = model.vision.finding_logits(batch["volumes"].to(device))
        logits.append(batch_logits.float().cpu())
        labels.append(target_matrix(batch))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    metrics: dict[str, float] = {}
    if any(p.requires_grad for p in classifier.parameters()):
        classifier.calibrate(all_logits, all_labels)
    metrics["classifier_threshold"] = float(classifier.threshold)
    auroc = zero_shot_auroc(torch.sigmoid(all_logits), classifier.targets(all_labels), names=classifier.labels)
    if auroc["macro"] is not None:
        metrics["classifier_auroc"] = float(auroc["macro"])
    metrics["classifier_micro_f1"] = classifier.micro_f1(all_logits, all_labels)
    return metrics


@torch.no_grad()
def validate_region_classifier(classifier: nn.Module, dataset: Any, batch_size: int) -> dict[str, float]:
    """A region classifier on the validation split's region slots: its common threshold chosen there (best pooled
    micro-F1; the probe does not change while the model trains, so every validation picks the same value) and the
    micro-F1 at it."""
    histograms, names, findings = region_classifier_inputs(dataset, batch_size)
    logits = classifier(histograms.to(classifier.columns.device), names).cpu()
    threshold = classifier.calibrate(logits, findings)
    return {"region_classifier_threshold": threshold,
            "region_classifier_micro_f1": classifier.micro_f1(logits, findings)}


@torch.no_grad()
def validate_generator(model: nn.Module, dataset: Any, recipe: Recipe, context: RunContext) -> dict[str, float]:
    """Validation loss, the loss with other studies' images and the image gain (see
    :func:`image_conditioned_losses`), and a few greedy reports written to ``samples.jsonl`` when asked."""
    batch_size = recipe.data.val_batch_size or recipe.data.batch_size
    metrics: dict[str, float] = {}
    if model.vision.classifier is not None:
        metrics.update(validate_classifier(model, dataset, batch_size, context))
    region_classifier = model.vision.regions.classifier if model.vision.regions is not None else None
    if region_classifier is not None and region_classifier.fitted:
        metrics.update(validate_region_classifier(region_classifier, dataset, batch_size))
    losses = image_conditioned_losses(model, dataset, batch_size, recipe.data.max_length, context.accelerator.autocast,
                                      context.accelerator.device)
    metrics["val_loss"] = losses["loss"]
    if "image_gain" in losses:
        metrics["val_loss_other_image"] = losses["loss_other_image"]
        metrics["image_gain"] = losses["image_gain"]
    device = context.accelerator.device
    if recipe.train.eval_samples and context.accelerator.is_main_process:
        count = min(recipe.train.eval_samples, len(dataset))
        items = [dataset[i] for i in range(count)]
        volumes = torch.stack([item["volume"] for item in items]).to(device)
        styles = [(item.get("style"), item.get("sex")) for item in items]
        if model.region_settings is not None:
            from rrg3d.models.regions import collate_regions

            reports = model.generate(volumes, regions=collate_regions([item["regions"] for item in items]),
                                     styles=styles)
        else:
            reports = model.generate(volumes, styles=styles)
        with open(context.run_dir / "samples.jsonl", "a", encoding="utf-8") as handle:
            for item, report in zip(items, reports, strict=True):
                handle.write(json.dumps({"step": context.step, "phase": context.phase, "id": item["id"],
                                         "report": report, "reference": item["report"]}) + "\n")
    return metrics


def save_generator(model: nn.Module, path: Path, preset: Any, extra: dict[str, Any],
                   train_state: Path | None) -> Path:
    from rrg3d.models.checkpoint import save_checkpoint
    from rrg3d.models.language import base_model

    model.config.preprocess = preset_reference(preset)
    hf_config = base_model(model.lm).config
    use_cache = getattr(hf_config, "use_cache", True)
    hf_config.use_cache = True  # training turns the KV cache off; the saved model decodes with it
    try:
        return save_checkpoint(model, path, extra=extra, train_state=train_state)
    finally:
        hf_config.use_cache = use_cache
