"""Per-region finding classifier: diagnosis prompts for region-guided models (the regional analogue of PromptMRG).

A global finding classifier (:mod:`rrg3d.models.classifier`) writes one list of calls for the whole study into the
prompt. A region-guided model knows where each region lies, so it can do better: :class:`RegionFindingClassifier` has
one head per anatomical region, each reading the intensity histogram of the voxels inside that region's mask (soft
bins, per input channel: :func:`region_histograms`) and calling the abnormalities that lie *in that region* — a
nodule from the lungs' histogram, a pericardial effusion from the heart's. Its calls go into the slot line of the
region they were made for (``Region 3 (recognised: lung; calls: emphysema, lung nodule): <region_2>``), so the line
the model writes for that slot conditions on an explicit, region-local list.

Targets are each region's own abnormalities: a manifest's ``region_labels`` (``{region: [labels]}`` or ``{region:
{label: 0/1}}``), a phantom's ``meta.region_truth``, or else the rule labeler run on the record's region reports
(:func:`region_label_rows`). The heads are logistic probes on histograms that do not depend on any trained weight:
fitted once, before the first training step (:meth:`RegionFindingClassifier.fit`, full-batch, deterministic), their
common decision threshold chosen on the validation split (:meth:`RegionFindingClassifier.calibrate`), and never
trained by gradient (so the calls a model learns to read stay the calls it will get).

Enable it with ``vision.regions.classifier: {histogram_bins: 16}`` (keys of
:class:`~rrg3d.models.classifier.ClassifierConfig`: ``hidden``, ``dropout``, ``histogram_bins``, ``histogram_range``,
``labels``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rrg3d.errors import ConfigError
from rrg3d.models.classifier import (
    ClassifierConfig,
    FindingClassifier,
    best_threshold,
    calls_micro_f1,
    soft_histogram,
)
from rrg3d.text.labels import CTRATE_LABELS as LABEL_NAMES

#: the ``vision.regions.classifier`` keys a region classifier accepts
REGION_CLASSIFIER_KEYS = ("hidden", "dropout", "histogram_bins", "histogram_range", "labels")


def region_classifier_config(mapping: Mapping[str, Any]) -> ClassifierConfig:
    """``vision.regions.classifier`` as a histogram-only :class:`ClassifierConfig` (one whole-mask histogram per
    input channel). Raises :class:`ConfigError` on unknown keys or without ``histogram_bins``."""
    unknown = sorted(set(mapping) - set(REGION_CLASSIFIER_KEYS))
    if unknown:
        raise ConfigError(f"vision.regions.classifier: unknown keys {unknown} "
                          f"(known: {', '.join(REGION_CLASSIFIER_KEYS)})")
    if int(mapping.get("histogram_bins") or 0) < 1:
        raise ConfigError("vision.regions.classifier reads the histogram inside each region mask: set histogram_bins")
    try:
        return ClassifierConfig(**{k: (tuple(v) if k == "histogram_range" else v) for k, v in mapping.items()},
                                grid=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"vision.regions.classifier: {exc}") from exc


def region_histograms(volume: Tensor, masks: Sequence[np.ndarray | Tensor], bins: int,
                      value_range: tuple[float, float]) -> Tensor:
    """The soft intensity histogram of the voxels inside each mask: ``volume [C, D, H, W]`` and boolean masks
    ``[D, H, W]`` on its grid → ``[R, C × bins]`` (channel, then bin; each channel's row sums to 1, an empty mask's
    is 0)."""
    if volume.dim() != 4:
        raise ValueError(f"region_histograms reads one volume [C, D, H, W], got shape {tuple(volume.shape)}")
    rows = []
    for mask in masks:
        inside = torch.as_tensor(np.asarray(mask, dtype=bool) if not isinstance(mask, Tensor) else mask.bool(),
                                 device=volume.device)
        if tuple(inside.shape) != tuple(volume.shape[1:]):
            raise ValueError(f"a region mask of shape {tuple(inside.shape)} for a volume of {tuple(volume.shape[1:])}")
        voxels = volume[:, inside]  # [C, n]
        if voxels.shape[1] == 0:
            rows.append(volume.new_zeros(volume.shape[0] * bins))
            continue
        rows.append(soft_histogram(voxels.reshape(1, volume.shape[0], -1, 1, 1), bins, value_range)[0])
    if not rows:
        return volume.new_zeros((0, volume.shape[0] * bins))
    return torch.stack(rows).float()


def region_label_rows(names: Sequence[str], record_labels: Mapping[str, Any] | None,
                      labels: Sequence[str] = LABEL_NAMES) -> list[tuple[float, ...]]:
    """Each named region's abnormality vector (``labels`` order; NaN: unknown) from a record's per-region labels
    ``{region: [present labels]}`` or ``{region: {label: 0/1}}``; a region the mapping lacks is all NaN."""
    from rrg3d.preprocess.regions import region_key

    given = {region_key(str(k)): v for k, v in (record_labels or {}).items()}
    rows = []
    for name in names:
        value = given.get(name)
        if value is None:
            rows.append(tuple(float("nan") for _ in labels))
        elif isinstance(value, Mapping):
            rows.append(tuple(float(value[label]) if value.get(label) is not None else float("nan")
                              for label in labels))
        else:
            present = set(value)
            unknown = sorted(present - set(LABEL_NAMES))
            if unknown:
                raise ValueError(f"region {name!r}: unknown abnormalities {unknown}")
            rows.append(tuple(float(label in present) for label in labels))
    return rows


def restart(head: nn.Module, seed: int) -> None:
    """Reset a head's linear layers to a start that depends on ``seed`` alone: zero for a linear probe (its loss is
    convex: the start does not matter but for determinism), small seeded normals for a hidden layer."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:
                layer.weight.zero_()
            else:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * layer.in_features ** -0.5)
            layer.bias.zero_()


class RegionFindingClassifier(nn.Module):
    """One histogram head per region: ``[N, C × bins]`` histograms of N region slots and each slot's region name →
    ``[N, L]`` logits (L: the configured abnormalities)."""

    def __init__(self, names: Sequence[str], config: ClassifierConfig, in_channels: int = 1) -> None:
        super().__init__()
        if config.grid or config.uptake_regions or tuple(config.histogram_blocks) != (1, 1, 1):
            raise ConfigError("a region classifier reads one histogram per region mask: no grid, blocks or uptake")
        self.config = config
        self.names = tuple(names)
        self.labels = list(config.labels)
        self.heads = nn.ModuleDict({name: FindingClassifier(0, config, in_channels=in_channels) for name in names})
        self.requires_grad_(False)  # a probe: fitted and calibrated, never trained by gradient
        #: columns of an 18-label matrix this head predicts
        self.register_buffer("columns", torch.tensor([LABEL_NAMES.index(n) for n in self.labels]), persistent=False)

    @property
    def width(self) -> int:
        """The histogram features each head reads."""
        return int(next(iter(self.heads.values())).feature_mean.numel())

    @property
    def fitted(self) -> bool:
        return any(bool(head.fitted) for head in self.heads.values())

    @property
    def threshold(self) -> float:
        return float(next(iter(self.heads.values())).threshold)

    def _rows(self, slots: Sequence[str], count: int) -> dict[str, list[int]]:
        if len(slots) != count:
            raise ValueError(f"{len(slots)} region names for {count} histogram rows")
        unknown = sorted(set(slots) - set(self.names))
        if unknown:
            raise ValueError(f"regions {unknown} are not among the region classifier's ({', '.join(self.names)})")
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(slots):
            rows.setdefault(name, []).append(i)
        return rows

    def targets(self, labels: Tensor) -> Tensor:
        """This classifier's columns of ``[N, 18]`` per-slot labels."""
        if labels.shape[-1] != len(LABEL_NAMES):
            raise ValueError(f"region labels must have {len(LABEL_NAMES)} columns, got {labels.shape[-1]}")
        return labels.index_select(-1, self.columns.to(labels.device))

    def forward(self, histograms: Tensor, slots: Sequence[str]) -> Tensor:
        """Logits ``[N, L]``; a region whose head was never fitted gets −∞ (calls nothing)."""
        if histograms.dim() != 2 or histograms.shape[1] != self.width:
            raise ValueError(f"region histograms must be [N, {self.width}], got {tuple(histograms.shape)}")
        out = histograms.new_full((histograms.shape[0], len(self.labels)), float("-inf"), dtype=torch.float32)
        for name, rows in self._rows(slots, histograms.shape[0]).items():
            head = self.heads[name]
            if bool(head.fitted):
                index = torch.tensor(rows, device=histograms.device)
                out[index] = head.logits(histograms.index_select(0, index)).float()
        return out

    def calls(self, logits: Tensor) -> list[list[str]]:
        """The abnormalities called in each slot (probability ≥ the common threshold), in label order."""
        present = torch.sigmoid(logits.float()) >= self.threshold
        return [[name for name, on in zip(self.labels, row.tolist(), strict=True) if on] for row in present]

    def named(self, labels: Tensor) -> list[list[str]]:
        """The abnormalities present in each row of ``[N, 18]`` per-slot labels (NaN: not present)."""
        targets = self.targets(labels.float()) == 1
        return [[name for name, on in zip(self.labels, row.tolist(), strict=True) if on] for row in targets]

    def fit(self, histograms: Tensor, slots: Sequence[str], labels: Tensor, *, steps: int = 500) -> dict[str, float]:
        """Fit each region's head on its slots' histograms and ``[N, 18]`` labels (NaN: unknown) — full-batch, from a
        fixed start (:func:`restart`), so the same data give the same heads whatever the RNG's state. A region
        with fewer than 2 slots with known labels stays unfitted (it calls nothing).
        Returns each fitted region's final training loss."""
        losses = {}
        for name, rows in self._rows(slots, histograms.shape[0]).items():
            index = torch.tensor(rows)
            targets = labels.index_select(0, index).float()
            known = ~torch.isnan(targets).all(dim=1)
            if int(known.sum()) < 2:
                continue
            restart(self.heads[name].head, seed=self.names.index(name))
            losses[name] = self.heads[name].fit(histograms.index_select(0, index)[known], targets[known], steps=steps)
        return losses

    @torch.no_grad()
    def micro_f1(self, logits: Tensor, labels: Tensor, threshold: float | None = None) -> float:
        """Micro-F1 of the slots' calls against their ``[N, 18]`` labels (NaN ignored)."""
        return calls_micro_f1(logits, self.targets(labels.cpu().float()),
                              self.threshold if threshold is None else threshold)

    @torch.no_grad()
    def calibrate(self, logits: Tensor, labels: Tensor, grid: Sequence[float] | None = None) -> float:
        """Set every head's threshold to the value of ``grid`` (default 0.05 … 0.95) with the best pooled micro-F1
        on these slots (ties: the value nearest 0.5). Returns it."""
        best = best_threshold(lambda value: self.micro_f1(logits, labels, value), grid)
        for head in self.heads.values():
            head.threshold.fill_(best)
        return best
