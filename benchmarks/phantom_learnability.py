"""Is the phantom benchmark fair? A small 3D CNN must learn the 18 labels from the images alone.

Generates phantoms (default 480 at 64×128×128: 400 train, 80 held out, split by case index), trains a small
3D CNN for a fixed number of epochs on CPU, and reports per-label and macro AUROC on the held-out cases. The
same run repeated with the training labels shuffled across cases must stay near 0.5 (nothing leaks from
outside the image). Prints a table and writes benchmarks/results/phantom_learnability.json.

    python benchmarks/phantom_learnability.py [--n 480] [--epochs 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrg3d.data.adapters.ctrate import CTRATE_LABELS
from rrg3d.data.manifest import load_manifest, resolve
from rrg3d.data.phantom import PhantomConfig, generate_phantoms
from rrg3d.io import read_volume

# HU windows: lung, solid lung lesions, mediastinum, bone and above, calcium and metal (above cortical bone)
LUNG, SOLID = (-1000.0, -300.0), (-500.0, 100.0)
MEDIASTINUM, DENSE, CALCIUM = (-150.0, 250.0), (200.0, 1500.0), (1000.0, 2000.0)


def _window(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    return ((hu - window[0]) / (window[1] - window[0])).clamp(0, 1)


def encode(hu_array: np.ndarray) -> np.ndarray:
    """Six half-resolution channels that keep what 2x pooling would lose: mean, darkest and brightest lung
    voxel (diffuse patterns, emphysema holes, small nodules), mean mediastinal density (nodes, fluid), and the
    brightest voxel in a bone window and in a calcium/metal window."""
    hu = torch.from_numpy(hu_array.astype(np.float32))[None, None]
    lung = _window(hu, LUNG)
    pool = nn.functional.avg_pool3d
    peak = nn.functional.max_pool3d
    channels = [pool(lung, 2), -peak(-lung, 2), peak(_window(hu, SOLID), 2), pool(_window(hu, MEDIASTINUM), 2),
                peak(_window(hu, DENSE), 2), peak(_window(hu, CALCIUM), 2)]
    return torch.cat(channels, dim=1)[0].numpy().astype(np.float16)


def load_inputs(manifest: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    records = load_manifest(manifest)
    images, labels = [], []
    for record in records:
        images.append(encode(read_volume(resolve(manifest, record["images"]["ct"])).array))
        labels.append([record["labels"][name] for name in CTRATE_LABELS])
    return np.stack(images), np.asarray(labels, dtype=np.float32), [r["id"] for r in records]


class SmallCNN(nn.Module):
    """Four strided conv blocks, then global max + mean pooling (small findings survive the max)."""

    def __init__(self, in_channels: int = 6, n_labels: int = 18, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [in_channels, width, width * 2, width * 4, width * 6]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm3d(c_out), nn.GELU(),
                       nn.Conv3d(c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1] * 2, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.amax(dim=(2, 3, 4)), f.mean(dim=(2, 3, 4))], dim=1)
        return self.head(pooled)


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic (ties count half); NaN if one class is absent."""
    positives, negatives = scores[truth == 1], scores[truth == 0]
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (positives.size * negatives.size))


def train_and_score(x_train, y_train, x_test, y_test, epochs: int, seed: int, batch: int = 8) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    steps = epochs * int(np.ceil(len(x_train) / batch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    prevalence = y_train.mean(axis=0).clip(0.02, 0.98)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - prevalence) / prevalence).clamp(max=8.0))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x_train))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i: i + batch]
            xb = torch.from_numpy(x_train[idx].astype(np.float32))
            # label-preserving augmentation: none of the 18 labels depends on the side
            if rng.random() < 0.5:
                xb = xb.flip(4)
            loss = loss_fn(model(xb), torch.from_numpy(y_train[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        print(f"  epoch {epoch + 1}/{epochs} loss {total / len(order):.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    with torch.no_grad():
        scores = np.concatenate([
            torch.sigmoid(model(torch.from_numpy(x_test[i: i + 16].astype(np.float32)))).numpy()
            for i in range(0, len(x_test), 16)
        ])
    per_label = {name: auroc(scores[:, k], y_test[:, k]) for k, name in enumerate(CTRATE_LABELS)}
    valid = [v for v in per_label.values() if not np.isnan(v)]
    return {"macro_auroc": float(np.mean(valid)), "per_label": per_label,
            "train_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=480)
    parser.add_argument("--test", type=int, default=80, help="held-out cases (the last ones by index)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-label control run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="phantom folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "phantom_learnability.json",
                        help="JSON results (benchmarks/results/phantom_learnability_seed1.json holds a --seed 1 run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "phantoms"
        start = time.perf_counter()
        manifest = generate_phantoms(PhantomConfig(n=args.n, seed=args.seed, shape=(64, 128, 128)), data,
                                     workers=args.workers, progress=False)
        generate_seconds = time.perf_counter() - start
        x, y, _ = load_inputs(manifest)
    x_train, y_train, x_test, y_test = x[: -args.test], y[: -args.test], x[-args.test:], y[-args.test:]
    print(f"generated {args.n} phantoms in {generate_seconds:.0f} s; training on {len(x_train)}, "
          f"testing on {len(x_test)}")
    print("real labels:")
    real = train_and_score(x_train, y_train, x_test, y_test, args.epochs, args.seed)
    print(f"  held-out macro AUROC with real labels: {real['macro_auroc']:.3f}")
    if args.no_control:
        shuffled = {"macro_auroc": float("nan"), "per_label": dict.fromkeys(CTRATE_LABELS, float("nan"))}
    else:
        print("shuffled labels (control):")
        shuffled_y = y_train[np.random.default_rng(args.seed + 1).permutation(len(y_train))]
        shuffled = train_and_score(x_train, shuffled_y, x_test, y_test, args.epochs, args.seed)

    print(f"\n{'label':<36}{'AUROC':>8}{'shuffled':>10}{'test +':>8}")
    for name in CTRATE_LABELS:
        print(f"{name:<36}{real['per_label'][name]:>8.3f}{shuffled['per_label'][name]:>10.3f}"
              f"{int(y_test[:, CTRATE_LABELS.index(name)].sum()):>8d}")
    print(f"{'macro AUROC':<36}{real['macro_auroc']:>8.3f}{shuffled['macro_auroc']:>10.3f}")
    result = {"n": args.n, "n_test": args.test, "epochs": args.epochs, "shape": [64, 128, 128],
              "generate_seconds": generate_seconds, "real": real, "shuffled": shuffled}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
