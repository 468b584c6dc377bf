"""A PNG of a few phantom cases: axial and coronal CT slices with the 10-region overlay (and PET if present)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rrg3d.data.manifest import load_manifest, resolve
from rrg3d.data.phantom.model import REGIONS


def render_preview(manifest: str | os.PathLike[str], out_png: str | os.PathLike[str], n_cases: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from rrg3d.io import read_volume

    records = load_manifest(manifest)[:n_cases]
    colours = plt.get_cmap("tab10")(np.arange(len(REGIONS)))
    cmap = ListedColormap(colours)
    has_pet = any(r["images"].get("pet") for r in records)
    columns = 3 + int(has_pet)
    fig, axes = plt.subplots(len(records), columns, figsize=(3.2 * columns, 3.2 * len(records)), squeeze=False)
    for row, record in enumerate(records):
        ct = read_volume(resolve(manifest, record["images"]["ct"]))
        seg = read_volume(resolve(manifest, record["masks"]["path"]), modality="SEG").array
        aspect = ct.spacing[0] / ct.spacing[2]
        heart = np.argwhere(seg == REGIONS.index("heart") + 1)
        d = int(np.median(heart[:, 0])) if heart.size else ct.shape[0] // 2
        h = int(np.median(heart[:, 1])) if heart.size else ct.shape[1] // 2
        views = [(ct.array[d], 1.0, "axial"), (ct.array[:, h][::-1], aspect, "coronal")]
        for col, (image, ratio, name) in enumerate(views):
            axes[row, col].imshow(image, cmap="gray", vmin=-1000, vmax=400, aspect=ratio)
            axes[row, col].set_title(f"{record['id']} {name}", fontsize=8)
        axes[row, 2].imshow(ct.array[d], cmap="gray", vmin=-1000, vmax=400)
        overlay = np.ma.masked_equal(seg[d], 0)
        axes[row, 2].imshow(overlay - 1, cmap=cmap, vmin=0, vmax=len(REGIONS) - 1, alpha=0.45,
                            interpolation="nearest")
        positives = [k for k, v in record.get("labels", {}).items() if v]
        axes[row, 2].set_title("; ".join(positives)[:60] or "no findings", fontsize=6)
        if has_pet and record["images"].get("pet"):
            pet = read_volume(resolve(manifest, record["images"]["pet"]), modality="PT").array
            axes[row, 3].imshow(pet[:, h][::-1], cmap="hot", vmin=0, vmax=8, aspect=aspect)
            axes[row, 3].set_title("PET (SUV 0-8) coronal", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(REGIONS)]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
