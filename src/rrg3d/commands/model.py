"""Model architectures and checkpoints.

  rrg3d model list                      built-in architectures (configs/models/*.yaml) and registered components
  rrg3d model show NAME|FILE            an architecture as resolved YAML
  rrg3d model init NAME|FILE --out CKPT a new checkpoint: pretrained LM, freshly initialised vision tower (for
                                        training, or to try `rrg3d generate` end to end before any training)
  rrg3d model info CKPT                 what a checkpoint holds: architecture, preset, LM weights kind, parameters
"""

from __future__ import annotations

import argparse

HELP = "list architectures, create an untrained checkpoint, describe a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="built-in architectures and registered components")
    show = sub.add_parser("show", help="print an architecture as resolved YAML")
    show.add_argument("config", metavar="NAME|FILE")
    init = sub.add_parser("init", help="write an untrained checkpoint for an architecture")
    init.add_argument("config", metavar="NAME|FILE")
    init.add_argument("--out", required=True, metavar="CKPT")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    info = sub.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint", metavar="CKPT")


def run(args: argparse.Namespace) -> int:
    from rrg3d.models.config import list_model_configs, load_model_config

    if args.action == "list":
        from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS
        from rrg3d.models.vlm import register_components

        register_components()
        for name in list_model_configs():
            config = load_model_config(name)
            print(f"{name:<18} {config.description}")
        print(f"\nencoders:    {', '.join(ENCODERS.names())}\ncompressors: {', '.join(COMPRESSORS.names())}\n"
              f"projectors:  {', '.join(PROJECTORS.names())}")
        return 0
    if args.action == "show":
        print(load_model_config(args.config).to_yaml(), end="")
        return 0
    if args.action == "init":
        from rrg3d.models.checkpoint import save_checkpoint
        from rrg3d.models.vlm import ReportGenerator

        model = ReportGenerator.from_config(args.config, seed=args.seed)
        save_checkpoint(model, args.out, extra={"trained": False, "seed": args.seed})
        print(f"untrained {model.config.name} checkpoint -> {args.out}")
        return 0
    import yaml

    from rrg3d.models.checkpoint import read_manifest

    meta = read_manifest(args.checkpoint)
    if meta["kind"] != "report_generator":
        summary = {k: meta.get(k) for k in ("kind", "format_version", "rrg3d_version", "created", "extra")}
        print(yaml.safe_dump({**summary, "encoder": meta.get("encoder"),
                              "preprocess": {k: meta.get("preprocess", {}).get(k) for k in ("preset", "sha256")}},
                             sort_keys=False), end="")
        return 0
    model = meta["model"]
    summary = {
        "architecture": model["name"],
        "format_version": meta["format_version"],
        "rrg3d_version": meta.get("rrg3d_version"),
        "created": meta.get("created"),
        "encoder": model["vision"]["encoder"]["name"],
        "compressor": model["vision"]["compressor"]["name"],
        "projector": model["vision"]["projector"]["name"],
        "lm": meta["lm"],
        "preprocess": {"preset": meta["preprocess"]["preset"], "sha256": meta["preprocess"]["sha256"]},
        "generation": model.get("generation"),
        "extra": meta.get("extra"),
    }
    print(yaml.safe_dump(summary, sort_keys=False), end="")
    return 0
