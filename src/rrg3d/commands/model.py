"""Model architectures and checkpoints.

  rrg3d model list                      built-in architectures (configs/models/*.yaml) and registered components
  rrg3d model show NAME|FILE            an architecture as resolved YAML
  rrg3d model init NAME|FILE --out CKPT a new checkpoint: pretrained LM, freshly initialised vision tower (for
                                        training, or to try `rrg3d generate` end to end before any training)
  rrg3d model info CKPT                 what a checkpoint holds: architecture, preset, LM weights kind, parameters
  rrg3d model import KIND PATH --out CKPT
                                        a peer's public encoder weights (ctclip: CT-CLIP's CTViT, radfm: RadFM's 3D
                                        ViT) as an rrg3d encoder checkpoint, for a recipe's model.vision_init
                                        (docs/peer_weights.md)
"""

from __future__ import annotations

import argparse

HELP = "list architectures, create an untrained checkpoint, describe a checkpoint, import peer weights"


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
    imp = sub.add_parser("import", help="map a peer's pretrained encoder weights onto an rrg3d encoder",
                         description="Map a peer checkpoint (.pt/.pth/.bin read with torch.load(weights_only=True), "
                                     "or .safetensors) onto rrg3d's encoder and save an encoder checkpoint recording "
                                     "the encoder config, the peer's preprocessing preset and the provenance. Every "
                                     "key of the peer's encoder must be mapped or deliberately dropped.")
    imp.add_argument("kind", choices=["ctclip", "radfm"], metavar="KIND",
                     help="ctclip (CT-CLIP's image encoder, CTViT) or radfm (RadFM's 3D ViT, as used by Reg2RG)")
    imp.add_argument("path", metavar="PATH", help="the peer's weights file")
    imp.add_argument("--out", required=True, metavar="CKPT", help="the encoder checkpoint folder to write")
    imp.add_argument("--strict", action="store_true",
                     help="also refuse keys outside the peer's encoder that the mapping table does not name "
                          "(by default they are dropped with a warning and listed in the provenance)")
    imp.add_argument("--preset", metavar="NAME|FILE", default=None,
                     help="the preprocessing to record (default: the peer's own, ctclip or radfm); its shape is the "
                          "encoder's reference input shape unless --option input_shape=... says otherwise")
    imp.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="what the weights cannot tell (YAML values), e.g. patch_size=[10,20,20], "
                          "input_shape=[64,256,256], quantizer=false (ctclip), heads=8 dim_head=64 (radfm), "
                          "prefix=embedding_layer.vision_encoder.")


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

    if args.action == "import":
        return _import(args)

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


def _import(args: argparse.Namespace) -> int:
    """``rrg3d model import``: map, save, and say how to use the result."""
    import yaml

    from rrg3d.errors import ConfigError
    from rrg3d.models.peers import import_peer

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    result = import_peer(args.kind, args.path, args.out, options=options, preset=args.preset, strict=args.strict)
    report = result.report
    print(f"{report['title']}: {report['mapped']} peer keys mapped, {report['dropped']} dropped, "
          f"{len(report['filled'])} of our keys filled, {report['parameters']:,} parameters -> {args.out}")
    for reason, count in report["dropped_by_reason"].items():
        print(f"  dropped {count:>5}: {reason}")
    if report["dropped_unknown"]:
        print(f"  dropped {len(report['dropped_unknown']):>5}: not named by the table (use --strict to refuse): "
              f"{', '.join(report['dropped_unknown'][:5])}")
    print(f"preprocessing: preset {result.preset.name} (sha256 {result.preset.sha256[:12]})")
    print("\nTo start a report generator from it, give its model config this vision.encoder (and "
          f"preprocess: {result.preset.name}), then train with model.vision_init={args.out}:")
    print(yaml.safe_dump({"vision": {"encoder": result.mapping}}, sort_keys=False, default_flow_style=None), end="")
    return 0
