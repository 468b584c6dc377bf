"""Train a stage (clip, align or sft) from a recipe: a YAML file or the name of a shipped recipe.

    rrg3d train tiny_align data.manifest=phantoms/manifest.jsonl run_dir=runs/align
    rrg3d train tiny_sft data.manifest=phantoms/manifest.jsonl model.init=runs/align/final run_dir=runs/sft
    rrg3d train my_recipe.yaml optim.lr=1e-4 phases.0.steps=500 --resume
    accelerate launch --config_file $(rrg3d train --accelerate-config ddp) -m rrg3d.cli train RECIPE ...

Overrides are dotted keys of the recipe (values parsed as YAML, type-checked; an unknown key lists the known
ones). The resolved recipe is written to RUN/config.yaml; logs go to RUN/train_log.csv, RUN/eval_log.csv and
RUN/tb/; checkpoints to RUN/checkpoints/step_N/ (resumable) and RUN/final/ (the one to use), whose path is
printed at the end. SIGTERM or Ctrl-C saves a checkpoint and exits (status 143 / 130); --resume continues from
the newest checkpoint of RUN (bit for bit on CPU) and needs the same recipe and overrides.
"""

from __future__ import annotations

import argparse
import sys

HELP = "train a stage (clip, align, sft, dpo) from a recipe YAML with key=value overrides"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe YAML file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (dotted keys)")
    parser.add_argument("--resume", action="store_true", help="continue RUN from its newest checkpoint")
    parser.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--show", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--accelerate-config", metavar="NAME",
                        choices=("ddp", "fsdp2", "fsdp", "deepspeed_zero2", "deepspeed_zero3"),
                        help="print the path of a shipped accelerate config (ddp, fsdp2 (= fsdp), deepspeed_zero2, "
                             "deepspeed_zero3) and exit")


def run(args: argparse.Namespace) -> int:
    from rrg3d.errors import ConfigError

    if args.accelerate_config:
        from importlib import resources

        print(resources.files("rrg3d") / "configs" / "accelerate" / f"{args.accelerate_config}.yaml")
        return 0
    if args.list:
        from rrg3d.train.recipe import list_recipes, load_recipe

        for name in list_recipes():
            recipe = load_recipe(name)
            print(f"{name:24s} {recipe.stage:6s} {recipe.description}")
        return 0
    if not args.recipe:
        raise ConfigError("give a recipe (a YAML file or a shipped name; --list shows them)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value: {bad}")
    if args.show:
        from rrg3d.train.recipe import load_recipe

        print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
        return 0

    from rrg3d.train import train
    from rrg3d.train.loop import TrainingInterrupted

    try:
        result = train(args.recipe, args.overrides, resume=args.resume)
    except TrainingInterrupted as stopped:
        print(f"rrg3d train: {stopped}", file=sys.stderr)
        reason = stopped.result.reason
        return 143 if reason == "SIGTERM" else 130 if reason == "SIGINT" else 3
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, (int, float)))
    if metrics:
        print(f"validation at step {result.step}: {metrics}", file=sys.stderr)
    print(result.final)
    return 0
