"""Is the phantom benchmark fair? A small 3D CNN must learn the 18 labels from the images alone.

Generates phantoms (default 480 at 64×128×128: 400 train, 80 held out, split by case index), trains a small
3D CNN for a fixed number of epochs on CPU, and reports per-label and macro AUROC on the held-out cases. The
same run repeated with the training labels shuffled across cases must stay near 0.5 (nothing leaks from
outside the image). Prints a table and writes benchmarks/results/phantom_learnability.json.

``--inputs`` compares what the CNN reads, on the same cases and split, in one run: ``windows`` (default: six
HU-windowed channels at half resolution, see :func:`encode`) and/or preprocessing preset names (one channel, the
preset's output, e.g. ``tiny``: 32×64×64 resized); the shuffled-label control runs on the first input.

    python benchmarks/phantom_learnability.py [--n 480] [--epochs 12] [--workers 2] [--inputs windows tiny]
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

from rrg3d.data.manifest import load_manifest, resolve
from rrg3d.data.phantom import PhantomConfig, generate_phantoms
from rrg3d.io import read_volume
from rrg3d.text.labels import CTRATE_LABELS

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


def load_inputs(manifest: Path, kind: str = "windows") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every case's input (``windows``: :func:`encode`; otherwise the named preprocessing preset's output, one
    channel), its 18 labels and its id."""
    preset = None
    if kind != "windows":
        from rrg3d.preprocess.presets import load_preset

        preset = load_preset(kind)
    records = load_manifest(manifest)
    images, labels = [], []
    for record in records:
        volume = read_volume(resolve(manifest, record["images"]["ct"]))
        images.append(encode(volume.array) if preset is None else preset.apply(volume).array[None].astype(np.float16))
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
    model = SmallCNN(in_channels=x_train.shape[1])
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
    parser.add_argument("--inputs", nargs="+", default=["windows"], metavar="INPUT",
                        help="what the CNN reads: 'windows' (six windowed channels) and/or preset names (e.g. tiny)")
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
        inputs = {kind: load_inputs(manifest, kind) for kind in args.inputs}
    y = next(iter(inputs.values()))[1]
    y_train, y_test = y[: -args.test], y[-args.test:]
    print(f"generated {args.n} phantoms in {generate_seconds:.0f} s; training on {len(y_train)}, "
          f"testing on {len(y_test)}")
    runs = {}
    for kind, (x, _, _) in inputs.items():
        print(f"real labels, input {kind} {tuple(x.shape[1:])}:")
        runs[kind] = train_and_score(x[: -args.test], y_train, x[-args.test:], y_test, args.epochs, args.seed)
        print(f"  held-out macro AUROC with real labels: {runs[kind]['macro_auroc']:.3f}")
    first = args.inputs[0]
    real = runs[first]
    if args.no_control:
        shuffled = {"macro_auroc": float("nan"), "per_label": dict.fromkeys(CTRATE_LABELS, float("nan"))}
    else:
        print(f"shuffled labels (control), input {first}:")
        shuffled_y = y_train[np.random.default_rng(args.seed + 1).permutation(len(y_train))]
        x = inputs[first][0]
        shuffled = train_and_score(x[: -args.test], shuffled_y, x[-args.test:], y_test, args.epochs, args.seed)

    header = "".join(f"{kind[:10]:>11}" for kind in args.inputs)
    print(f"\n{'label':<36}{header}{'shuffled':>10}{'test +':>8}")
    for name in CTRATE_LABELS:
        cells = "".join(f"{runs[kind]['per_label'][name]:>11.3f}" for kind in args.inputs)
        positives = int(y_test[:, CTRATE_LABELS.index(name)].sum())
        print(f"{name:<36}{cells}{shuffled['per_label'][name]:>10.3f}{positives:>8d}")
    cells = "".join(f"{runs[kind]['macro_auroc']:>11.3f}" for kind in args.inputs)
    print(f"{'macro AUROC':<36}{cells}{shuffled['macro_auroc']:>10.3f}")
    result = {"n": args.n, "n_test": args.test, "epochs": args.epochs, "shape": [64, 128, 128], "inputs": args.inputs,
              "generate_seconds": generate_seconds, "real": real, "shuffled": shuffled,
              "by_input": {kind: runs[kind] for kind in args.inputs}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
