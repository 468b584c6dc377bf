"""``sft``: supervised fine-tuning of the report writer — LoRA (or the full LLM) with the projector, optionally the
encoder.

Usually continues the align run (``model.init: runs/align/final``); LoRA comes with that checkpoint or, when
starting from ``model.config``, from the architecture's ``lm.lora`` (``model.lora`` replaces it). ``model.train.lm``
is ``lora`` (the adapter trains, the base stays frozen; the checkpoint stores the adapter) or ``full`` (every LM
weight trains; the checkpoint stores full weights). 3D-CT-GPT++ uses LoRA r=128, α=256 at lr 2e-4, or full SFT at
2e-5, cosine with 3% warm-up.

    rrg3d train tiny_sft data.manifest=phantoms/manifest.jsonl model.init=runs/align/final run_dir=runs/sft
"""

from __future__ import annotations

from rrg3d.errors import ConfigError
from rrg3d.train.generator import (
    build_generator_datasets,
    build_report_generator,
    fit_generator_statistics,
    generator_frozen_modules,
    generator_loss,
    prepare_generator_batch,
    save_generator,
    set_generator_preset,
    validate_generator,
)
from rrg3d.train.loop import Stage, TrainResult, fit
from rrg3d.train.recipe import Recipe


def check(recipe: Recipe) -> None:
    if recipe.model.train.lm == "frozen":
        raise ConfigError("the sft stage trains the LLM: model.train.lm must be lora or full (align trains the "
                          "projector alone)")


STAGE = Stage(
    name="sft",
    build_model=build_report_generator,
    loss=generator_loss,
    prepare=prepare_generator_batch,
    save=save_generator,
    validate=validate_generator,
    set_preset=set_generator_preset,
    frozen_modules=generator_frozen_modules,
    fit_statistics=fit_generator_statistics,
    build_datasets=build_generator_datasets,
)


def run(recipe: Recipe, *, resume: bool = False) -> TrainResult:
    check(recipe)
    return fit(recipe, STAGE, resume=resume)
