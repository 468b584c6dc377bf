"""Training: one readable file per stage (``clip``, ``align``, ``sft``, ``dpo``) on a small shared loop (``loop``),
driven by typed recipes (``recipe``), distributed through accelerate; ``prefs`` builds DPO's preference pairs.

From Python::

    from rrg3d.train import run_recipe
    final = run_recipe("tiny_sft", ["data.manifest=phantoms/manifest.jsonl", "run_dir=runs/sft"])

Nothing heavy is imported here: ``rrg3d.train.data`` and friends stay cheap to import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["STAGE_MODULES", "run_recipe", "train"]

#: stage name → module whose ``run(recipe, resume=...)`` trains it.
STAGE_MODULES = {"clip": "rrg3d.train.clip", "align": "rrg3d.train.align", "sft": "rrg3d.train.sft",
                 "dpo": "rrg3d.train.dpo"}


def train(recipe: str | Path | Mapping[str, Any] | Any, overrides: Sequence[str] = (), *,
          resume: bool = False) -> Any:
    """Run a recipe (path, shipped name, mapping or :class:`~rrg3d.train.recipe.Recipe`) with ``key=value``
    overrides; returns a :class:`~rrg3d.train.loop.TrainResult`. Raises
    :class:`~rrg3d.train.loop.TrainingInterrupted` (holding the result) when stopped early after a checkpoint."""
    import importlib

    from rrg3d.errors import ConfigError
    from rrg3d.train.recipe import load_recipe, validate_references

    resolved = load_recipe(recipe, overrides)
    problems = validate_references(resolved)
    if problems:
        raise ConfigError(f"recipe {resolved.name}: " + "; ".join(problems))
    module = importlib.import_module(STAGE_MODULES[resolved.stage])
    return module.run(resolved, resume=resume)


def run_recipe(recipe: str | Path | Mapping[str, Any] | Any, overrides: Sequence[str] = (), *,
               resume: bool = False) -> Path:
    """Train a recipe to the end; the final checkpoint's path (``RUN/final``)."""
    return Path(train(recipe, overrides, resume=resume).final)
