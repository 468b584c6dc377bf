"""``align``: LLaVA stage 1 — train the projector (and a learned compressor) on report text, encoder and LLM frozen.

The vision tower learns to speak the LLM's embedding language: visual tokens go in where ``<image>`` stands and
only the report tokens carry loss. The encoder comes from ``model.vision_init`` (a ``clip`` run) or is whatever
``model.config`` builds; its output, ``RUN/final``, is a report-generator checkpoint that ``sft`` continues from
(``model.init``) and that ``rrg3d generate --model RUN/final`` can already use.

    rrg3d train tiny_align data.manifest=phantoms/manifest.jsonl run_dir=runs/align
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
    """Align trains the vision-to-language bridge only."""
    parts = recipe.model.train
    if parts.lm != "frozen" or parts.encoder:
        raise ConfigError("the align stage keeps the encoder and the LLM frozen (model.train.encoder=false, "
                          "model.train.lm=frozen); train them in the sft stage")
    if not (parts.projector or parts.compressor):
        raise ConfigError("the align stage needs the projector (or compressor) to train")


STAGE = Stage(
    name="align",
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
