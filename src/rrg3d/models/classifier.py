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

Enable it in a model config with ``vision.classifier: {hidden: 0, histogram_bins: 32}`` and
``prompt.findings: "...{findings}..."``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rrg3d.text.labels import CTRATE_LABELS as LABEL_NAMES


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


class FindingClassifier(nn.Module):
    """Encoder grid ``[B, ..., C]`` (and, with histogram bins, the input volumes) → one logit per finding
    ``[B, L]``."""

    def __init__(self, in_dim: int, config: ClassifierConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        self.labels = list(self.config.labels)
        blocks = self.config.histogram_blocks
        # mean and max pooled channels (+ one histogram per channel and block)
        width = 2 * in_dim + in_channels * blocks[0] * blocks[1] * blocks[2] * self.config.histogram_bins
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
        #: dataset columns (in :data:`LABEL_NAMES` order) this head predicts, for picking its targets
        self.register_buffer("columns", torch.tensor([LABEL_NAMES.index(n) for n in self.labels]), persistent=False)

    def features(self, grid: Tensor, volumes: Tensor | None = None) -> Tensor:
        """What the head reads: the grid's mean- and max-pooled channels (+ the volumes' intensity histogram)."""
        if grid.dim() < 3:
            raise ValueError(f"the classifier reads an encoder grid [B, ..., C], got shape {tuple(grid.shape)}")
        tokens = grid.flatten(1, -2).float()
        features = [tokens.mean(1), tokens.amax(1)]
        if self.config.histogram_bins:
            if volumes is None:
                raise ValueError("this classifier reads an intensity histogram of the input: pass the volumes")
            features.append(soft_histogram(volumes, self.config.histogram_bins, self.config.histogram_range,
                                           self.config.histogram_blocks))
        return torch.cat(features, dim=-1)

    def forward(self, grid: Tensor, volumes: Tensor | None = None) -> Tensor:
        return self.head(self.standardize(self.features(grid, volumes)))

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
        """This head's columns of a dataset label matrix ``[B, 18]`` (NaN: unknown)."""
        if labels.shape[-1] != len(LABEL_NAMES):
            raise ValueError(f"finding labels must have {len(LABEL_NAMES)} columns, got {labels.shape[-1]}")
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
        probs = torch.sigmoid(logits.float().cpu())
        targets = self.targets(labels.cpu()).float()
        known = ~torch.isnan(targets)
        truth = targets.nan_to_num(0.0).bool() & known
        called = (probs >= (float(self.threshold) if threshold is None else threshold)) & known
        denominator = float(called.sum() + truth.sum())
        return 2 * float((called & truth).sum()) / denominator if denominator else 0.0

    @torch.no_grad()
    def calibrate(self, logits: Tensor, labels: Tensor, grid: Sequence[float] | None = None) -> float:
        """Set ``threshold`` to the value of ``grid`` (default 0.05 … 0.95) with the best micro-F1 on these studies
        (NaN labels ignored; ties: the value nearest 0.5). Returns the threshold."""
        best: tuple[float, float] = (-1.0, 0.5)
        for value in grid or [round(0.05 * i, 2) for i in range(1, 20)]:
            f1 = self.micro_f1(logits, labels, float(value))
            if f1 > best[0] + 1e-12 or (abs(f1 - best[0]) <= 1e-12 and abs(value - 0.5) < abs(best[1] - 0.5)):
                best = (f1, float(value))
        self.threshold.fill_(best[1])
        return best[1]
