"""Report-length distributions (words per report): summary, Gaussian KDE, KL divergence, and a PNG.

KL divergence is ``KL(reference || generated)`` between the two KDEs (``scipy.stats.gaussian_kde``, Scott's rule)
evaluated on one shared grid of 1024 points and normalised there; a density that cannot be estimated by scipy (fewer
than two reports, or all of one length) is a single Gaussian bump of width ``max(1, 5 % of the mean)`` words. Lower
is closer; 0 for identical samples.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GRID_POINTS = 1024
EPS = 1e-12


def word_counts(texts: Sequence[str | None]) -> np.ndarray:
    return np.array([len((t or "").split()) for t in texts], dtype=np.float64)


def summary(lengths: np.ndarray) -> dict[str, float | int | None]:
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {"n": int(lengths.size), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "std": float(lengths.std()), "min": float(lengths.min()), "max": float(lengths.max())}


def _fallback_width(values: np.ndarray) -> float:
    return max(1.0, 0.05 * float(np.abs(values).mean()))


def density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """KDE of ``values`` on ``grid`` (see the module doc for the degenerate case)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.size >= 2 and np.ptp(values) > 0:
        try:
            return np.asarray(stats.gaussian_kde(values)(grid))
        except np.linalg.LinAlgError:
            pass
    width = _fallback_width(values)
    z = (grid[:, None] - values[None, :]) / width
    return np.exp(-0.5 * z**2).mean(axis=1) / (width * np.sqrt(2 * np.pi))


def shared_grid(*samples: np.ndarray, points: int = GRID_POINTS) -> np.ndarray:
    values = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples if np.size(s)])
    spread = max(float(values.std()), _fallback_width(values))
    return np.linspace(values.min() - 4 * spread, values.max() + 4 * spread, points)


def kl_divergence(reference: np.ndarray, generated: np.ndarray, grid: np.ndarray | None = None) -> float | None:
    """``KL(P_reference || Q_generated)`` of the two length KDEs on a shared grid (``None`` if a side is empty)."""
    reference = np.asarray(reference, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if reference.size == 0 or generated.size == 0:
        return None
    grid = shared_grid(reference, generated) if grid is None else grid
    p = density(reference, grid)
    q = density(generated, grid)
    p = p / max(p.sum(), EPS)
    q = q / max(q.sum(), EPS)
    mask = p > 0
    return float(max(0.0, np.sum(p[mask] * np.log((p[mask] + EPS) / (q[mask] + EPS)))))


def length_analysis(reference: np.ndarray, generated: np.ndarray) -> dict[str, Any]:
    """Summaries of both sides and the KL divergence."""
    return {"unit": "words", "reference": summary(reference), "generated": summary(generated),
            "kl_divergence": kl_divergence(reference, generated), "kl_direction": "KL(reference || generated)"}


def plot_lengths(reference: np.ndarray, generated: Mapping[str, np.ndarray], path: str | os.PathLike[str],
                 title: str | None = None) -> Path:
    """Histogram + KDE of reference and generated lengths (one curve per system) as a PNG (atomic write)."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot or a GUI backend

    from rrg3d.utils.files import atomic_path

    reference = np.asarray(reference, dtype=np.float64)
    series = {"reference": reference, **{k: np.asarray(v, dtype=np.float64) for k, v in generated.items()}}
    non_empty = [v for v in series.values() if v.size]
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.subplots()
    if non_empty:
        grid = shared_grid(*non_empty)
        grid = grid[grid >= 0] if np.any(grid >= 0) else grid
        bins = np.linspace(grid.min(), grid.max(), 40)
        for i, (name, values) in enumerate(series.items()):
            if not values.size:
                continue
            color = "black" if name == "reference" else f"C{i}"
            label = name
            if name != "reference" and reference.size:
                kl = kl_divergence(reference, values)
                label = f"{name} (KL {kl:.3f})" if kl is not None else name
            axes.hist(values, bins=bins, density=True, alpha=0.2, color=color)
            axes.plot(grid, density(values, grid), color=color, label=label, linewidth=2,
                      linestyle="--" if name == "reference" else "-", zorder=3 if name == "reference" else 2)
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no reports", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("report length (words)")
    axes.set_ylabel("density")
    axes.set_title(title or "Report length distribution (KDE)")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
