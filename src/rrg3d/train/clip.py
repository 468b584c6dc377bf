"""``clip``: CT-CLIP contrastive pretraining of a vision encoder against report text (symmetric InfoNCE, learnable
temperature).

The encoder is the one of the architecture ``model.config`` (its ``vision.encoder`` mapping), so the align stage
can take it over unchanged: ``model.vision_init: runs/clip`` (checked: the configs must be equal). The text tower
is ``model.clip.text`` (default: the packaged all-MiniLM-L6-v2). Validation embeds the validation split and reports
retrieval recall R@1/5/10 both ways, the validation InfoNCE over all its pairs, and zero-shot abnormality AUROC
over the 18 CT-RATE labels ("<label> is present." vs "... is not present."). ``model.clip.label_weight`` > 0 adds
label supervision: a linear head on the pooled image features, its binary cross-entropy on the manifest labels
added to the InfoNCE with that weight, its macro AUROC validated as ``label_head_auroc``. ``model.clip.prompt_weight``
> 0 adds vocabulary fine-tuning (CT-CLIP's VocabFine): the zero-shot prompts' log-odds trained against the same
labels, so the prompts are seen in training. ``RUN/final`` is a ``ct_clip`` checkpoint.

Under several processes the embeddings are all-gathered with gradients, so every pair is contrasted with the
whole global batch (``model.clip.gather_negatives``, on by default; off: each process's own micro-batch). The
3D-CT-GPT++ pretraining lr is 1e-3.

    rrg3d train tiny_clip data.manifest=phantoms/manifest.jsonl run_dir=runs/clip
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrg3d.train.loop import RunContext, Stage, TrainResult, fit, iterate_batches
from rrg3d.train.recipe import Recipe


def build_clip(recipe: Recipe, final_preset: Any) -> nn.Module:
    from rrg3d.models.clip import CTCLIP
    from rrg3d.models.config import load_model_config

    settings = dataclasses.asdict(recipe.model.clip)
    train_text = settings.pop("train_text")
    settings.pop("gather_negatives")
    if settings["zero_shot_prompts"] is None:  # the model's default (CT-CLIP's pair)
        settings.pop("zero_shot_prompts")
    encoder = dict(load_model_config(recipe.model.config).vision.encoder)
    model = CTCLIP.from_mapping({"vision": encoder, **settings})
    model.vision.requires_grad_(bool(recipe.model.train.encoder))
    model.text.requires_grad_(train_text)
    if recipe.train.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


def clip_loss(model: nn.Module, raw: nn.Module, batch: dict[str, Any], recipe: Recipe) -> torch.Tensor:
    from rrg3d.models.clip import gathered_clip_loss

    # a frozen text tower's features are computed once per text (or sentence) and kept (CTCLIP.text_features)
    out = model(batch["volumes"], texts=batch["reports"])
    if recipe.model.clip.gather_negatives:
        loss = gathered_clip_loss(out["image_embeds"], out["text_embeds"], out["scale"])
    else:
        loss = out["loss"]
    from rrg3d.models.classifier import masked_bce

    if "label_logits" in out:
        loss = loss + recipe.model.clip.label_weight * masked_bce(out["label_logits"], batch["labels"])
    if "prompt_logits" in out:  # vocabulary fine-tuning: the zero-shot prompts' log-odds against the labels
        loss = loss + recipe.model.clip.prompt_weight * masked_bce(out["prompt_logits"], batch["labels"])
    return loss


def clip_frozen_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in (model.vision, model.text) if not any(p.requires_grad for p in m.parameters())]


@torch.no_grad()
def validate_clip(model: nn.Module, dataset: Any, recipe: Recipe, context: RunContext) -> dict[str, float]:
    batch_size = recipe.data.val_batch_size or recipe.data.batch_size
    return clip_scores(model, dataset, batch_size, device=context.accelerator.device,
                       autocast=context.accelerator.autocast)["metrics"]


@torch.no_grad()
def clip_scores(model: nn.Module, dataset: Any, batch_size: int = 16, *, device: Any = None,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """A CT-CLIP (eval mode) on a dataset of studies: ``metrics`` (InfoNCE over all its pairs as ``val_loss``,
    retrieval R@1/5/10 both ways, macro ``zero_shot_auroc`` and, with a label head, ``label_head_auroc``) and
    ``per_label`` (each abnormality's zero-shot and label-head AUROC; None where a split has one class only)."""
    from rrg3d.models.clip import clip_loss as info_nce
    from rrg3d.train.metrics import retrieval_recall, zero_shot_auroc

    device = device if device is not None else next(model.parameters()).device
    images, texts, probs, head_logits, labels = [], [], [], [], []
    for batch in iterate_batches(dataset, batch_size):
        volumes = batch["volumes"].to(device)
        with autocast():
            image = model.image_outputs(volumes)
            images.append(image["image_embeds"].float().cpu())
            if "label_logits" in image:
                head_logits.append(image["label_logits"].float().cpu())
            texts.append(model.project_text(model.text_features(batch["reports"])).float().cpu())
            probs.append(model.zero_shot(image_embeds=image["image_embeds"]).float().cpu())
        labels.append(batch["labels"])
    image_embeds, text_embeds, targets = torch.cat(images), torch.cat(texts), torch.cat(labels)
    metrics: dict[str, float] = {}
    logits = model.temperature_scale().float().cpu() * image_embeds @ text_embeds.T
    metrics["val_loss"] = float(info_nce(logits))
    for direction, values in retrieval_recall(image_embeds, text_embeds).items():
        short = "i2t" if direction == "image_to_text" else "t2i"
        for k, value in values.items():
            metrics[f"{short}_{k}"] = value
    auroc = zero_shot_auroc(torch.cat(probs), targets)
    per_label = {name: {"zero_shot_auroc": value} for name, value in auroc["per_label"].items()}
    if auroc["macro"] is not None:
        metrics["zero_shot_auroc"] = float(auroc["macro"])
    if head_logits:
        head = zero_shot_auroc(torch.cat(head_logits).sigmoid(), targets)
        for name, value in head["per_label"].items():
            per_label[name]["label_head_auroc"] = value
        if head["macro"] is not None:
            metrics["label_head_auroc"] = float(head["macro"])
    return {"metrics": metrics, "per_label": per_label}


def save_clip(model: nn.Module, path: Path, preset: Any, extra: dict[str, Any], train_state: Path | None) -> Path:
    from rrg3d.models.checkpoint import save_clip_checkpoint

    return save_clip_checkpoint(model, path, preprocess=preset, extra=extra, train_state=train_state)


STAGE = Stage(
    name="clip",
    build_model=build_clip,
    loss=clip_loss,
    save=save_clip,
    validate=validate_clip,
    frozen_modules=clip_frozen_modules,
)


def run(recipe: Recipe, *, resume: bool = False) -> TrainResult:
    return fit(recipe, STAGE, resume=resume)
