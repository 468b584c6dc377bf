"""CT-CLIP training steps with a frozen text tower: every report encoded at every step, against each distinct report
encoded once and kept (``CTCLIP.text_features``, what the ``clip`` stage does when ``model.clip.train_text`` is
false).

Both arms train the same model from the same seed in one process, alternating blocks of steps (the machine's noise
hits both), on the learnability setting by default: ``small_resnet3d`` at 32×64×64, batch 32, mean+max pooling, a
pool of 128 distinct impression-length reports drawn with replacement (a training split seen over many epochs).
The kept arm's first pass over the pool (its one-time encoding) is timed separately. Reported: median seconds per
step of each arm and their ratio, and the largest difference between the two arms' losses (they must agree).

    python benchmarks/clip_text_cache.py [--encoder small_resnet3d] [--steps 20] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

FINDINGS = ("Right pleural effusion", "Two solid pulmonary nodules in the left upper lobe (largest 1.4 cm)",
            "Mild centrilobular emphysema", "Moderate cardiomegaly", "Mediastinal lymphadenopathy (subcarinal)",
            "Patchy ground-glass opacity in the right lower lobe", "Cardiac pacemaker in situ",
            "Moderate atherosclerotic calcification of the thoracic aorta", "Small hiatal hernia",
            "Subsegmental atelectasis in the left lower lobe", "Consolidation in the right middle lobe")


def report_pool(count: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [". ".join(rng.sample(FINDINGS, rng.randint(2, 6))) + "." for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="small_resnet3d", help="model config whose vision encoder CLIP trains")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=128, help="distinct reports")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "clip_text_cache.json"))
    args = parser.parse_args(argv)

    import torch

    from rrg3d.models.clip import CTCLIP
    from rrg3d.models.config import load_model_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vision = dict(load_model_config(args.encoder).vision.encoder)
    shape = tuple(vision["input_shape"])
    base = CTCLIP.from_mapping({"vision": vision, "pooling": "meanmax", "embed_dim": 128})
    base.text.requires_grad_(False)
    arms = {"encode every step": copy.deepcopy(base), "kept features": copy.deepcopy(base)}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in arms.items()}
    for model in arms.values():
        model.train()
        model.text.eval()  # frozen: no dropout, as the clip stage keeps frozen modules
    pool = report_pool(args.pool, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps + 1):
        picks = torch.randint(0, len(pool), (args.batch,), generator=generator).tolist()
        batches.append((torch.rand(args.batch, 1, *shape, generator=generator), [pool[i] for i in picks]))

    def step(name: str, volumes, texts) -> tuple[float, float]:
        model, optimizer = arms[name], optimizers[name]
        tick = time.perf_counter()
        if name == "kept features":
            out = model(volumes, text_features=model.text_features(texts))
        else:
            tokens = model.tokenize(texts)
            out = model(volumes, tokens["input_ids"], tokens["attention_mask"])
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - tick, float(out["loss"].detach())

    tick = time.perf_counter()
    with torch.no_grad():
        arms["kept features"].text_features(pool)  # the one-time encoding of every distinct report
    first_pass_s = time.perf_counter() - tick
    step("encode every step", *batches[0])  # warm-up of both arms (allocations), not timed
    step("kept features", *batches[0])
    times: dict[str, list[float]] = {name: [] for name in arms}
    losses: dict[str, list[float]] = {name: [] for name in arms}
    for volumes, texts in batches[1:]:
        for name in arms:
            seconds, loss = step(name, volumes, texts)
            times[name].append(seconds)
            losses[name].append(loss)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["encode every step"] / medians["kept features"]
    agreement = max(abs(a - b) for a, b in zip(losses["encode every step"], losses["kept features"], strict=True))

    print(f"\nCT-CLIP step, frozen text tower, {args.encoder} {'x'.join(map(str, shape))}, batch {args.batch}, "
          f"{args.pool} distinct reports, {args.threads} threads, {args.steps} steps per arm")
    print(f"{'arm':<20} {'median s/step':>13}")
    for name, value in medians.items():
        print(f"{name:<20} {value:>13.3f}")
    print(f"speed-up of kept features: {ratio:.2f}x (one-time encoding of the pool: {first_pass_s:.1f} s); "
          f"largest loss difference between the arms: {agreement:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "clip_text_cache", "args": vars(args), "machine": platform.platform(),
                               "median_step_s": medians, "speedup": ratio, "first_pass_s": first_pass_s,
                               "max_loss_difference": agreement, "step_s": times}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
