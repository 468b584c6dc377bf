"""Finding classifier: a multi-label head on the encoder grid, whose calls become diagnosis prompts.

Generated reports of a LLaVA-style model often follow the text prior more than the image; diagnosis-driven
prompting (PromptMRG, Jin et al., AAAI 2024) closes part of that gap by classifying the image first and writing
the positive findings into the prompt, so the language model conditions on an explicit, image-derived list.
rrg3d's head reads the encoder grid ``[B, D, H, W, C]`` (mean- and max-pooled channels, then a linear layer or a
one-hidden-layer MLP) and predicts the 18 CT-RATE abnormalities. With ``histogram_bins`` it also reads a soft
intensity histogram of the input volume (fixed Gaussian bins over the preset's output range, per channel: the
first-order statistics of radiomics). Diffuse density changes (emphysema, mosaic attenuation, ground glass) shift
that histogram while a small CNN trained for minutes pools them away; the two feature sets are complementary.

The head trains with a masked binary cross-entropy (labels unknown for a study, NaN, carry no loss) beside the report
loss. A few hundred small-batch steps leave a head far from its optimum, so before the first step a training stage
fits it (:meth:`FindingClassifier.fit`: full-batch AdamW on the pooled features of the training studies, the logistic
probe of the frozen encoder) and marks it ``fitted``; training then continues from there. Its decision ``threshold``
is a buffer chosen on the validation split (:meth:`FindingClassifier.calibrate`), so a checkpoint calls findings
exactly as it was validated.

With ``histogram_blocks: [2, 2, 2]`` there is one histogram per octant of the volume, so a density change keeps a
coarse location (the block histograms of Reg2RG-style texture features without a segmentation).

PET/CT towers: with ``reads: all`` the head reads every modality the tower sees (each branch's pooled encoder grid
and a histogram per input channel, the PET's included), and with ``uptake_regions`` it also calls abnormal FDG uptake
per PETRG region — two targets a region, marked and mild (or equivocal) uptake, from the manifest's per-region PET
status (``petrg``) — so the diagnosis line can say "marked FDG uptake in mediastinal nodes". A CT-only tower may
have the same head: it then guesses uptake from the CT, the baseline that shows what the PET adds.

Enable it in a model config with ``vision.classifier: {hidden: 0, histogram_bins: 32}`` and
``prompt.findings: "...{findings}..."``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rrg3d.text.labels import CTRATE_LABELS as LABEL_NAMES
from rrg3d.text.petrg import PETRG_REGIONS

#: PET classes an uptake target calls (PETRG classes 1 and 2: the abnormal ones a report must state)
UPTAKE_CLASSES: tuple[str, ...] = ("marked_uptake", "mild_uptake")
#: every (region, class) uptake target, in the column order of a dataset's ``uptake`` matrix
UPTAKE_TARGETS: tuple[tuple[str, str], ...] = tuple((r, c) for r in PETRG_REGIONS for c in UPTAKE_CLASSES)
#: what a head reads: the CT branch only, or every modality of the tower
READS = ("ct", "all")


def uptake_label(region: str, pet_class: str) -> str:
    """The name of an uptake target, as the diagnosis line writes it (``Marked FDG uptake in mediastinal nodes``)."""
    grade = {"marked_uptake": "Marked", "mild_uptake": "Mild"}[pet_class]
    return f"{grade} FDG uptake in {region.replace('_', ' ')}"


#: every target a classifier may predict: the 18 abnormalities, then the uptake targets
TARGET_NAMES: tuple[str, ...] = (*LABEL_NAMES, *(uptake_label(r, c) for r, c in UPTAKE_TARGETS))


@dataclass
class ClassifierConfig:
    """``hidden`` 0: a linear head on the pooled grid; > 0: one hidden GELU layer of that width."""

    hidden: int = 0
    dropout: float = 0.0
    #: > 0: a soft histogram of the input intensities with this many bins joins the pooled encoder features
    histogram_bins: int = 0
    #: the intensity range the bins cover (the preset's output range)
    histogram_range: tuple[float, float] = (0.0, 1.0)
    #: one histogram per block of this ``(z, y, x)`` grid over the volume: (1, 1, 1) the whole volume; (2, 2, 2)
    #: eight octants (upper/lower, anterior/posterior, right/left), so a density change keeps a coarse location
    histogram_blocks: tuple[int, int, int] = (1, 1, 1)
    labels: list[str] = field(default_factory=lambda: list(LABEL_NAMES))
    #: PETRG regions whose abnormal FDG uptake (marked; mild or equivocal) the head also calls; their targets come
    #: from the manifest's per-region ``petrg`` PET status
    uptake_regions: list[str] = field(default_factory=list)
    #: ``ct``: the CT branch's grid and channels; ``all``: every modality of the tower (PET/CT: both branches' grids
    #: and every input channel's histogram)
    reads: str = "ct"
    #: read the pooled encoder grid(s); false: the histograms alone (needs ``histogram_bins``) — a head whose inputs
    #: do not move while the encoder trains, so the probe fitted before the first step stays valid
    grid: bool = True

    def __post_init__(self) -> None:
        self.histogram_blocks, self.histogram_range = check_histogram(  # type: ignore[assignment]
            self.histogram_bins, self.histogram_blocks, self.histogram_range, "vision.classifier")
        if self.hidden < 0:
            raise ValueError(f"vision.classifier.hidden must be >= 0, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"vision.classifier.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.labels) - set(LABEL_NAMES))
        if unknown or not self.labels:
            raise ValueError(f"vision.classifier.labels must be CT-RATE abnormalities; unknown: {unknown}")
        repeated = sorted({name for name in self.labels if self.labels.count(name) > 1})
        if repeated:
            raise ValueError(f"vision.classifier.labels names each finding once; repeated: {repeated}")
        self.uptake_regions = list(self.uptake_regions)
        unknown = sorted(set(self.uptake_regions) - set(PETRG_REGIONS))
        if unknown:
            raise ValueError(f"vision.classifier.uptake_regions must be PETRG regions; unknown: {unknown} (known: "
                             f"{', '.join(PETRG_REGIONS)})")
        if len(set(self.uptake_regions)) != len(self.uptake_regions):
            raise ValueError("vision.classifier.uptake_regions names each region once")
        if not self.grid and not self.histogram_bins:
            raise ValueError("vision.classifier.grid: false leaves the head nothing to read; set histogram_bins")
        if self.reads not in READS:
            raise ValueError(f"vision.classifier.reads must be one of {READS}, got {self.reads!r}")

    @property
    def target_names(self) -> list[str]:
        """Every name the head predicts: its abnormalities, then two uptake targets per uptake region."""
        return [*self.labels, *(uptake_label(r, c) for r in self.uptake_regions for c in UPTAKE_CLASSES)]


def check_histogram(bins: int, blocks: Sequence[int], value_range: Sequence[float],
                    where: str) -> tuple[tuple[int, int, int], tuple[float, float]]:
    """Validate soft-histogram settings (``where`` names their config section in errors); the blocks and range as
    tuples of ints and floats. Raises ``ValueError``."""
    as_blocks = tuple(int(b) for b in blocks)
    if len(as_blocks) != 3 or min(as_blocks) < 1:
        raise ValueError(f"{where}.histogram_blocks must be three counts >= 1 (z, y, x), got {blocks}")
    if bins < 0:
        raise ValueError(f"{where}.histogram_bins must be >= 0, got {bins}")
    if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
        raise ValueError(f"{where}.histogram_range must be (low, high), got {value_range}")
    return as_blocks, (float(value_range[0]), float(value_range[1]))  # type: ignore[return-value]


def target_matrix(batch: Mapping[str, Any]) -> Tensor:
    """A batch's label matrix for a classifier: its ``labels [B, 18]``, then its ``uptake [B, U]`` where it has
    them (a :func:`~rrg3d.train.data.collate_reports` batch always does)."""
    labels = batch["labels"]
    uptake = batch.get("uptake")
    return labels if uptake is None else torch.cat([labels.float(), uptake.float().to(labels.device)], dim=-1)


def masked_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of ``logits`` over the known entries of ``targets`` (same shape, NaN: unknown); 0 with a
    graph when none is known."""
    targets = targets.to(logits.device).float()
    known = ~torch.isnan(targets)
    if not bool(known.any()):
        return logits.float().sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits.float()[known], targets[known])


def soft_histogram(volumes: Tensor, bins: int, value_range: tuple[float, float],
                   blocks: Sequence[int] = (1, 1, 1)) -> Tensor:
    """Share of voxels near each of ``bins`` equally spaced centres (Gaussian kernels, σ half a bin), per channel
    and per block of a ``blocks`` grid over the volume: ``[B, C, D, H, W]`` → ``[B, C × blocks × bins]`` (channel,
    then block in z-y-x order, then bin); each block's row sums to 1. Blocks split each axis into contiguous,
    near-equal parts (voxel ``i`` of ``n`` in part ``i × blocks // n``). No gradient flows (fixed bins).

    A voxel adds its kernel weight to the five bins nearest its value (the rest weigh below 4e-6 of the nearest
    and are left out), counted with one ``bincount`` per offset: a few passes over the volume whatever ``bins``.
    Values outside ``value_range`` count as if half a bin beyond its edge."""
    if volumes.dim() != 5:
        raise ValueError(f"soft_histogram reads volumes [B, C, D, H, W], got shape {tuple(volumes.shape)}")
    if any(int(b) > int(n) for b, n in zip(blocks, volumes.shape[2:], strict=True)):
        raise ValueError(f"histogram blocks {tuple(blocks)} exceed the volume shape {tuple(volumes.shape[2:])}")
    low, high = value_range
    step = (high - low) / bins
    rows, (d, h, w) = volumes.shape[0] * volumes.shape[1], volumes.shape[2:]
    bz, by, bx = (int(b) for b in blocks)
    device = volumes.device
    with torch.no_grad():
        part = [(torch.arange(n, device=device) * k) // n for n, k in ((d, bz), (h, by), (w, bx))]
        block = ((part[0][:, None, None] * by + part[1][None, :, None]) * bx + part[2][None, None, :]).reshape(-1)
        size = bz * by * bx * bins
        counts = torch.zeros(rows, size, dtype=torch.float64, device=device)
        chunk = max(1, (1 << 24) // block.numel())  # rows per pass: ~16 M voxels
        flat = volumes.reshape(rows, -1)
        for start in range(0, rows, chunk):
            u = (flat[start:start + chunk].float() - low) / step - 0.5  # bin centre k at u = k
            u = u.clamp(-1.0, float(bins))  # out of range: counted as half a bin beyond the edge
            base = (torch.arange(u.shape[0], device=device)[:, None] * (size // bins) + block) * bins
            nearest = u.round().clamp(0, bins - 1)
            for offset in (-2, -1, 0, 1, 2):
                k = nearest + offset
                weight = torch.exp(-2.0 * (u - k) ** 2) * ((k >= 0) & (k < bins))
                index = (base + k.clamp(0, bins - 1).long()).reshape(-1)
                found = torch.bincount(index, weights=weight.reshape(-1), minlength=u.shape[0] * size)
                counts[start:start + u.shape[0]] += found.view(-1, size)
        histogram = counts.view(volumes.shape[0], volumes.shape[1], bz, by, bx, bins)
        histogram = histogram / histogram.sum(-1, keepdim=True).clamp_min(1e-12)
    return histogram.flatten(1).float()


def uptake_matrix(statuses: dict[str, Any] | None) -> tuple[float, ...]:
    """A record's per-region PETRG status (``{region: {"pet": class, ...}}``) as the :data:`UPTAKE_TARGETS` row:
    1 where the region's PET class is that target's, 0 where the region has another PET class, NaN where the record
    says nothing of the region (outside the field of view, or no ``petrg`` at all)."""
    row = []
    for region, pet_class in UPTAKE_TARGETS:
        status = (statuses or {}).get(region)
        known = isinstance(status, dict) and isinstance(status.get("pet"), str)
        row.append(float(status["pet"] == pet_class) if known else float("nan"))  # type: ignore[index]
    return tuple(row)


class FindingClassifier(nn.Module):
    """Encoder grid(s) ``[B, ..., C]`` (and, with histogram bins, the input volumes) → one logit per finding
    ``[B, L]`` (the abnormalities, then the uptake targets)."""

    def __init__(self, in_dim: int | Sequence[int], config: ClassifierConfig | None = None,
                 in_channels: int = 1) -> None:
        """``in_dim``: the channels of the encoder grid it reads, or of each grid (``reads: all``: one per
        modality); ``in_channels``: the input volume's channels (for the histograms)."""
        super().__init__()
        self.config = config or ClassifierConfig()
        self.labels = self.config.target_names
        dims = [int(in_dim)] if isinstance(in_dim, int) else [int(d) for d in in_dim]
        if not self.config.grid:
            dims = []
        #: encoder grids :meth:`features` expects (0: histograms only)
        self.grids = len(dims)
        blocks = self.config.histogram_blocks
        # mean and max pooled channels of each grid (+ one histogram per input channel and block)
        width = 2 * sum(dims) + in_channels * blocks[0] * blocks[1] * blocks[2] * self.config.histogram_bins
        if self.config.hidden:
            self.head: nn.Module = nn.Sequential(nn.Dropout(self.config.dropout), nn.Linear(width, self.config.hidden),
                                                 nn.GELU(), nn.Linear(self.config.hidden, len(self.labels)))
        else:
            self.head = nn.Sequential(nn.Dropout(self.config.dropout), nn.Linear(width, len(self.labels)))
        # per-feature standardisation, fitted with the head (pooled channels and histogram shares differ in scale
        # by orders of magnitude); identity until fit()
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("fitted", torch.tensor(False))  # set by fit(): the head starts from its probe
        #: columns of the label matrix (:data:`TARGET_NAMES` order) this head predicts, for picking its targets
        self.register_buffer("columns", torch.tensor([TARGET_NAMES.index(n) for n in self.labels]), persistent=False)

    @property
    def uptake(self) -> bool:
        """True when the head calls FDG uptake too (its targets need the dataset's ``uptake`` columns)."""
        return bool(self.config.uptake_regions)

    def features(self, grid: Tensor | Sequence[Tensor] | None, volumes: Tensor | None = None) -> Tensor:
        """What the head reads: each grid's mean- and max-pooled channels (+ the volumes' intensity histogram); a
        histogram-only head (``grid: false``) ignores ``grid``."""
        grids = [] if not self.grids or grid is None else [grid] if isinstance(grid, Tensor) else list(grid)
        if len(grids) != self.grids:
            raise ValueError(f"this classifier reads {self.grids} encoder grid(s), got {len(grids)}")
        features = []
        for one in grids:
            if one.dim() < 3:
                raise ValueError(f"the classifier reads an encoder grid [B, ..., C], got shape {tuple(one.shape)}")
            tokens = one.flatten(1, -2).float()
            features += [tokens.mean(1), tokens.amax(1)]
        if self.config.histogram_bins:
            if volumes is None:
                raise ValueError("this classifier reads an intensity histogram of the input: pass the volumes")
            features.append(soft_histogram(volumes, self.config.histogram_bins, self.config.histogram_range,
                                           self.config.histogram_blocks))
        return torch.cat(features, dim=-1)

    def forward(self, grid: Tensor | Sequence[Tensor] | None, volumes: Tensor | None = None) -> Tensor:
        return self.logits(self.features(grid, volumes))

    def logits(self, features: Tensor) -> Tensor:
        """The head's logits ``[B, L]`` for :meth:`features` already computed."""
        return self.head(self.standardize(features))

    def standardize(self, features: Tensor) -> Tensor:
        return (features.float() - self.feature_mean) / self.feature_std

    def fit(self, features: Tensor, labels: Tensor, *, steps: int = 500, lr: float = 1e-2,
            weight_decay: float = 1e-3) -> float:
        """Fit the feature standardisation and the head on ``features`` (:meth:`features` of training studies) and
        ``labels [N, 18]`` (NaN: unknown) with full-batch AdamW — deterministic, seconds on a CPU. Marks the head
        ``fitted``; returns the final training loss."""
        if len(features) != len(labels) or len(features) < 2:
            raise ValueError(f"classifier fit: {len(features)} feature rows for {len(labels)} label rows (>= 2 needed)")
        device = self.feature_mean.device
        features, labels = features.float().to(device), labels.float().to(device)
        std = features.std(0)
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(std.clamp_min(max(float(std.mean()) * 1e-3, 1e-8)))  # constant features: shift only
        features = self.standardize(features)
        was_training, parameters = self.training, list(self.head.parameters())
        trainable = [p.requires_grad for p in parameters]
        self.train()
        self.head.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        loss = torch.zeros(())
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    optimizer.zero_grad()
                    loss = self.loss(self.head(features), labels)
                    loss.backward()
                    optimizer.step()
        finally:
            for parameter, flag in zip(parameters, trainable, strict=True):
                parameter.requires_grad_(flag)
                parameter.grad = None
            self.train(was_training)
        self.fitted.fill_(True)
        return float(loss.detach())

    def targets(self, labels: Tensor) -> Tensor:
        """This head's columns of a label matrix (NaN: unknown): ``[B, 18]`` abnormalities, or ``[B, 18 + U]`` with
        the dataset's uptake columns after them (:func:`target_matrix`); a head that calls uptake needs the latter."""
        if labels.shape[-1] == len(LABEL_NAMES) and not self.uptake:
            return labels.index_select(-1, self.columns.to(labels.device))
        if labels.shape[-1] != len(TARGET_NAMES):
            wanted = f"{len(TARGET_NAMES)} columns (the {len(LABEL_NAMES)} abnormalities, then {len(UPTAKE_TARGETS)}" \
                     " uptake targets)"
            if not self.uptake:
                wanted = f"{len(LABEL_NAMES)} columns or {wanted}"
            raise ValueError(f"finding labels must have {wanted}, got {labels.shape[-1]}")
        return labels.index_select(-1, self.columns.to(labels.device))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Binary cross-entropy over the known labels of ``labels [B, 18]`` (0 with a graph when none is known)."""
        return masked_bce(logits, self.targets(labels.to(logits.device)))

    def calls(self, logits: Tensor) -> list[list[str]]:
        """The findings called present (probability ≥ ``threshold``) for each study, in label order."""
        return self.named(torch.sigmoid(logits.float()) >= self.threshold.to(logits.device))

    def named(self, present: Tensor) -> list[list[str]]:
        """The label names of each row of a ``[B, L]`` presence mask (this head's labels, in order)."""
        return [[name for name, on in zip(self.labels, row.tolist(), strict=True) if on] for row in present.bool()]

    @torch.no_grad()
    def micro_f1(self, logits: Tensor, labels: Tensor, threshold: float | None = None) -> float:
        """Micro-F1 of the calls at ``threshold`` (default: the buffer) against ``labels [B, 18]`` (NaN ignored)."""
        return calls_micro_f1(logits, self.targets(labels.cpu()),
                              float(self.threshold) if threshold is None else threshold)

    @torch.no_grad()
    def calibrate(self, logits: Tensor, labels: Tensor, grid: Sequence[float] | None = None) -> float:
        """Set ``threshold`` to the value of ``grid`` (default 0.05 … 0.95) with the best micro-F1 on these studies
        (NaN labels ignored; ties: the value nearest 0.5). Returns the threshold."""
        best = best_threshold(lambda value: self.micro_f1(logits, labels, value), grid)
        self.threshold.fill_(best)
        return best


def calls_micro_f1(logits: Tensor, targets: Tensor, threshold: float) -> float:
    """Micro-F1 of the calls ``sigmoid(logits) ≥ threshold`` against ``targets`` of the same shape (NaN: unknown,
    ignored); 0 when nothing is called or true."""
    probs = torch.sigmoid(logits.float().cpu())
    targets = targets.cpu().float()
    known = ~torch.isnan(targets)
    truth = targets.nan_to_num(0.0).bool() & known
    called = (probs >= threshold) & known
    denominator = float(called.sum() + truth.sum())
    return 2 * float((called & truth).sum()) / denominator if denominator else 0.0


def best_threshold(score: Callable[[float], float], grid: Sequence[float] | None = None) -> float:
    """The value of ``grid`` (default 0.05 … 0.95) with the highest ``score``; ties: the value nearest 0.5."""
    best: tuple[float, float] = (-1.0, 0.5)
    for value in grid or [round(0.05 * i, 2) for i in range(1, 20)]:
        found = score(float(value))
        if found > best[0] + 1e-12 or (abs(found - best[0]) <= 1e-12 and abs(value - 0.5) < abs(best[1] - 0.5)):
            best = (found, float(value))
    return best[1]
