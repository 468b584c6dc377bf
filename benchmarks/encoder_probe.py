"""Can an encoder learn the 18 labels from phantoms at all? A supervised probe, before any language model.

Each arm is a model config's vision encoder (optionally with encoder overrides), trained from scratch with a
linear head on the concatenated mean and max of its output tokens (binary cross-entropy over the 18 CT-RATE
labels, AdamW, fixed epochs), on the training split of a phantom set preprocessed with the config's preset;
it reports the training loss per epoch and the macro AUROC on the held-out test split. An encoder that cannot
fit the training labels here will not make a report generator read them either. The arms share the data, the
seed, the epochs and the learning rate, so the table compares them within one run.

    python benchmarks/encoder_probe.py --phantoms 1200 --epochs 12 \\
        --arms small_resnet3d small_ctvit_v 'small_ctvit_v:{"patch_stem": "linear"}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    name, _, overrides = text.partition(":")
    return name, (json.loads(overrides) if overrides else {})


def load_split(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    volumes = torch.stack([torch.from_numpy(dataset.load_volume(i)) for i in range(len(dataset))])
    return volumes, dataset.label_matrix()


def probe(architecture: str, overrides: dict[str, Any], train: tuple[torch.Tensor, torch.Tensor],
          test: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    import rrg3d.models.encoders  # noqa: F401  (registers the encoders)
    from rrg3d.models.config import load_model_config
    from rrg3d.models.registry import ENCODERS
    from rrg3d.train.metrics import zero_shot_auroc

    torch.manual_seed(args.seed)
    encoder = ENCODERS.build({**dict(load_model_config(architecture).vision.encoder), **overrides})
    head = nn.Linear(2 * encoder.out_dim, train[1].shape[1])
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)

    def forward(x: torch.Tensor) -> torch.Tensor:
        tokens = encoder(x).flatten(1, 3)
        return head(torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1))

    volumes, labels = train
    known = ~labels.isnan()
    targets = labels.nan_to_num(0.0)
    generator = torch.Generator().manual_seed(args.seed)
    tick = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        encoder.train()
        order = torch.randperm(len(volumes), generator=generator)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(forward(volumes[idx]), targets[idx],
                                                                  weight=known[idx].float())
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            total += loss.item() * len(idx)
        history.append(round(total / len(volumes), 4))
        print(f"  {architecture} {overrides or ''} epoch {epoch + 1}/{args.epochs}: train loss {history[-1]:.4f}",
              flush=True)
    encoder.eval()
    with torch.no_grad():
        scores = torch.cat([forward(test[0][i:i + 32]) for i in range(0, len(test[0]), 32)]).sigmoid()
    auroc = zero_shot_auroc(scores, test[1])
    return {"architecture": architecture, "overrides": overrides, "train_loss": history,
            "test_macro_auroc": auroc["macro"], "test_per_label": auroc["per_label"],
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "seconds": round(time.perf_counter() - tick, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["small_resnet3d", "small_ctvit_v",
                                                      'small_ctvit_v:{"patch_stem": "linear"}'],
                        metavar="ARCH[:JSON]", help="model config, optionally with encoder overrides as JSON")
    parser.add_argument("--phantoms", type=int, default=1200)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", default="learnability_work", help="phantoms and caches (shared with learnability)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "encoder_probe.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.models.config import load_model_config
    from rrg3d.train.data import build_dataset

    work = Path(args.work).resolve()
    manifest = generate_phantoms(PhantomConfig(n=args.phantoms, seed=args.seed, shape=tuple(args.shape), styles=1),
                                 work / "phantoms", workers=2, progress=False)
    arms = [parse_arm(a) for a in args.arms]
    data: dict[str, Any] = {}
    rows = []
    for architecture, overrides in arms:
        preset = load_model_config(architecture).preprocess
        if preset not in data:
            splits = {s: build_dataset(manifest, preset, split=s, cache_dir=work / "cache", workers=2)
                      for s in (("train", "val"), "test")}
            data[preset] = (load_split(splits[("train", "val")]), load_split(splits["test"]))
        train, test = data[preset]
        rows.append(probe(architecture, overrides, train, test, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "test_per_label"}), flush=True)

    print(f"\nsupervised probe: {len(train[0])} training / {len(test[0])} test phantoms, {args.epochs} epochs")
    print(f"{'arm':<48} {'params':>9} {'first loss':>10} {'last loss':>9} {'test AUROC':>10} {'seconds':>8}")
    for r in rows:
        arm = r["architecture"] + (f" {json.dumps(r['overrides'])}" if r["overrides"] else "")
        print(f"{arm:<48} {r['parameters']:>9} {r['train_loss'][0]:>10.4f} {r['train_loss'][-1]:>9.4f} "
              f"{r['test_macro_auroc']:>10.3f} {r['seconds']:>8.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "encoder_probe", "args": vars(args), "rows": rows,
                               "n_train": len(train[0]), "n_test": len(test[0])}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
