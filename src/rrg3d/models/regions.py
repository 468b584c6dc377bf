"""Region-guided generation (Reg2RG): per-region texture + geometry tokens, the region prompt, aligned targets.

A model config with ``vision.regions`` (:class:`RegionSettings`) is region-guided. For each anatomical region of a
study (from its label map: :mod:`rrg3d.preprocess.regions`) the :class:`RegionTower` makes

* **texture** tokens: the region's masked crop through the vision encoder (the global one, ``texture_encoder:
  shared``, or its own), a compressor (default a perceiver with 32 latents) and a projector (default linear);
* one **geometry** token: the uncropped region mask through a small 3D ViT, mean-pooled, then a linear layer. With
  ``geometry_descriptors`` the token also carries the mask's shape statistics (:func:`mask_descriptors`: volume
  fraction, centroid, spread and bounding box in normalised coordinates) through a small MLP added to the pooled ViT
  feature. Mean-pooling a ViT's patch features keeps little of *where* the mask lies (the patch embedding is shared by
  all patches and the mean of the position embeddings is a constant), and where a region lies is what tells lung
  from pleura from heart; a deep ViT trained for long recovers it, a small one trained for minutes does not.

The prompt holds the global image tokens (``global_tokens``), then one line per region slot, ``Region k:`` followed
by that slot's ``<region_{k-1}>`` placeholder (expanded to the slot's tokens when tokenised), then the instruction.
With a **recognition head** (``recognizer``, needs geometry and alignment) a linear layer on each slot's geometry
feature names the region (cross-entropy against the slot's true region, ``model.recognition_weight`` beside the
report loss) and the slot line says what it recognised, ``Region k (recognised: heart):``; training prompts show the
true name (teacher forcing, as the diagnosis prompt's ``true_findings_share``), generation the head's. Reg2RG leaves
recognition to the LM reading the region tokens, which it learns for most regions but not lung and pleura (F1 ≈ 0.44)
and which a small model trained for minutes does not learn at all; the head learns it from the mask's shape in a few
steps, and the output still names the region of every sentence from the image side alone.
The target writes every region's report on its own line. With **region–report alignment** (``alignment``, the
default) the slots are shuffled at every training step and each line starts with the region the model recognises
in that slot — ``The region k is <name>: <report>`` — so the model has to tell the area from its features, and the
output says which mask each sentence is about (the grounded report). Without alignment the slots stay in
``names`` order, the prompt names each one, and lines read ``<Name>: <report>``. A region-guided model without
texture and geometry (both off) keeps the target layout with no region tokens: the global-only ablation.

:func:`parse_region_report` splits an output back into ``region_reports`` (keyed by the region whose features the
slot held), the name recognised for each slot, and the merged report with the prefixes removed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS
from rrg3d.errors import ConfigError
from rrg3d.models.region_classifier import RegionFindingClassifier, region_classifier_config
from rrg3d.preprocess.regions import region_key

#: The 10 regions of RadGenome-ChestCT and Reg2RG, in the order targets list them.
REGION_NAMES: tuple[str, ...] = tuple(RADGENOME_REGIONS)


def _default_texture_compressor() -> dict[str, Any]:
    return {"name": "perceiver", "num_latents": 32, "dim": 256, "depth": 2, "heads": 4, "dim_head": 64}


def _default_geometry_encoder() -> dict[str, Any]:
    return {"name": "vit3d", "in_channels": 1, "input_shape": [32, 64, 64], "patch_size": [8, 16, 16], "dim": 128,
            "depth": 3, "heads": 4, "pos_embed": "learned"}


@dataclass
class RegionSettings:
    """``vision.regions`` of a model config (see the module doc)."""

    #: the regions a study may have, in the order targets and predictions list them
    names: tuple[str, ...] = REGION_NAMES
    texture: bool = True
    #: (D, H, W) every texture crop is resized to; None: the model's input size (its preset's shape)
    texture_size: tuple[int, int, int] | None = None
    #: "shared": the global vision encoder reads the crops too; a registry mapping: an encoder of its own
    texture_encoder: str | dict[str, Any] = "shared"
    texture_compressor: dict[str, Any] = field(default_factory=_default_texture_compressor)
    texture_projector: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})
    geometry: bool = True
    geometry_size: tuple[int, int, int] = (32, 64, 64)
    geometry_encoder: dict[str, Any] = field(default_factory=_default_geometry_encoder)
    geometry_projector: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})
    #: add the mask's shape statistics (:func:`mask_descriptors`) to the geometry token through a small MLP
    geometry_descriptors: bool = False
    #: a recognition head on the geometry feature names each slot in the prompt (needs geometry and alignment)
    recognizer: bool = False
    #: the global image tokens (the whole volume through the main vision tower) come first in the prompt
    global_tokens: bool = True
    #: region–report alignment: slots shuffled in training, each output line names the region it recognises
    alignment: bool = True
    #: regions with fewer mask voxels (on the model grid) are dropped and recorded
    min_voxels: int = 8
    #: the value outside a region in its texture crop; None: air (−1000 HU) under the model's preset
    air: float | None = None
    #: a per-region finding classifier on each region's masked intensity histogram, its calls written into the
    #: region's slot line (:mod:`rrg3d.models.region_classifier`; keys: hidden, dropout, histogram_bins,
    #: histogram_range, labels); None: no calls
    classifier: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        names = tuple(region_key(n) for n in self.names)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"vision.regions.names must name each region once, got {list(self.names)}")
        self.names = names
        if self.texture_encoder != "shared" and not (isinstance(self.texture_encoder, Mapping)
                                                     and "name" in self.texture_encoder):
            raise ConfigError("vision.regions.texture_encoder must be 'shared' or an encoder mapping with a 'name'")
        for key in ("texture_compressor", "texture_projector", "geometry_encoder", "geometry_projector"):
            value = getattr(self, key)
            if not isinstance(value, Mapping) or "name" not in value:
                raise ConfigError(f"vision.regions.{key} must be a mapping with a 'name' key")
        for key in ("texture_size", "geometry_size"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or min(int(v) for v in value) < 1):
                raise ConfigError(f"vision.regions.{key} must be three positive integers, got {value!r}")
        if self.min_voxels < 1:
            raise ConfigError("vision.regions.min_voxels must be >= 1")
        if self.classifier is not None:
            if not isinstance(self.classifier, Mapping):
                raise ConfigError("vision.regions.classifier must be a mapping (e.g. {histogram_bins: 16})")
            self.classifier = dict(self.classifier)
        #: ``classifier`` parsed (None without one), read by the tower and by every dataset item
        self.classifier_config = region_classifier_config(self.classifier) if self.classifier is not None else None
        if self.recognizer and not (self.geometry and self.alignment):
            raise ConfigError("vision.regions.recognizer reads the geometry feature and names shuffled slots: it "
                              "needs geometry: true and alignment: true")

    @property
    def has_region_tokens(self) -> bool:
        return self.texture or self.geometry


# ------------------------------------------------------------------------------------------------------ batches


@dataclass
class RegionBatch:
    """The regions of a batch: ``texture`` [N, C, ...] and ``geometry`` [N, 1, ...] (None when the model does not
    read them) hold the regions of every sample one after the other, ``counts[b]`` of them for sample ``b``;
    ``names[b]`` / ``label_ids[b]`` say which region each of sample ``b``'s slots holds, ``reports[b]`` its reference
    region reports (None at inference) and ``dropped[b]`` the regions left out. Models with a region classifier also
    get each slot's masked intensity ``histograms`` [N, C × bins] and, in training, its abnormalities ``findings``
    [N, 18] (NaN: unknown)."""

    names: list[list[str]]
    label_ids: list[list[int]]
    texture: torch.Tensor | None = None
    geometry: torch.Tensor | None = None
    histograms: torch.Tensor | None = None
    findings: torch.Tensor | None = None
    reports: list[dict[str, str] | None] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [len(n) for n in self.names]

    @property
    def slot_names(self) -> list[str]:
        """The region of every slot of the batch, samples one after the other (the row order of its tensors)."""
        return [name for names in self.names for name in names]

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: Any) -> RegionBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(self, texture=move(self.texture), geometry=move(self.geometry),
                       histograms=move(self.histograms), findings=move(self.findings))

    def permuted(self, orders: Sequence[Sequence[int]]) -> RegionBatch:
        """The same regions with sample ``b``'s slots in ``orders[b]`` (indices into its current slots)."""
        if len(orders) != len(self):
            raise ValueError(f"{len(orders)} orders for a batch of {len(self)}")
        flat, start = [], 0
        for order, count in zip(orders, self.counts, strict=True):
            if sorted(order) != list(range(count)):
                raise ValueError(f"a slot order must permute range({count}), got {list(order)}")
            flat += [start + int(i) for i in order]
            start += count
        index = torch.tensor(flat, dtype=torch.long)

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index.to(tensor.device))

        return replace(self, names=[[n[i] for i in o] for n, o in zip(self.names, orders, strict=True)],
                       label_ids=[[n[i] for i in o] for n, o in zip(self.label_ids, orders, strict=True)],
                       texture=take(self.texture), geometry=take(self.geometry), histograms=take(self.histograms),
                       findings=take(self.findings))

    def shuffled(self, generator: torch.Generator | None = None) -> RegionBatch:
        """Each sample's slots in a random order (torch's RNG, or ``generator``): deterministic per seed."""
        return self.permuted([torch.randperm(c, generator=generator).tolist() for c in self.counts])


def collate_regions(items: Sequence[Mapping[str, Any]]) -> RegionBatch:
    """The ``regions`` entries of dataset items (see :func:`rrg3d.train.data.region_item`) as one batch."""
    def stack(key: str) -> torch.Tensor | None:
        parts = [item.get(key) for item in items]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts)

    return RegionBatch(names=[list(item["names"]) for item in items],
                       label_ids=[list(item["label_ids"]) for item in items],
                       texture=stack("texture"), geometry=stack("geometry"), histograms=stack("histograms"),
                       findings=stack("findings"),
                       reports=[item.get("reports") for item in items],
                       dropped=[dict(item.get("dropped") or {}) for item in items])


# ------------------------------------------------------------------------------------------------------ modules


class RegionTower(nn.Module):
    """Region inputs → region embeddings [N, tokens_per_region, lm_dim]: texture tokens then the geometry token."""

    def __init__(self, settings: RegionSettings, shared_encoder_dim: int, lm_dim: int, in_channels: int = 1) -> None:
        super().__init__()
        from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS

        self.settings = settings
        self.texture_encoder: nn.Module | None = None
        self.texture_compressor: nn.Module | None = None
        self.texture_projector: nn.Module | None = None
        self.geometry_encoder: nn.Module | None = None
        self.geometry_projector: nn.Module | None = None
        if settings.texture:
            in_dim = shared_encoder_dim
            if settings.texture_encoder != "shared":
                self.texture_encoder = ENCODERS.build(dict(settings.texture_encoder))
                in_dim = int(self.texture_encoder.out_dim)
            self.texture_compressor = COMPRESSORS.build(dict(settings.texture_compressor), in_dim=in_dim)
            self.texture_projector = PROJECTORS.build(dict(settings.texture_projector),
                                                      in_dim=int(self.texture_compressor.out_dim), out_dim=lm_dim)
        self.geometry_descriptor: nn.Module | None = None
        if settings.geometry:
            self.geometry_encoder = ENCODERS.build(dict(settings.geometry_encoder))
            width = int(self.geometry_encoder.out_dim)
            self.geometry_projector = PROJECTORS.build(dict(settings.geometry_projector), in_dim=width, out_dim=lm_dim)
            if settings.geometry_descriptors:
                self.geometry_descriptor = nn.Sequential(nn.Linear(DESCRIPTOR_SIZE, width), nn.GELU(),
                                                         nn.Linear(width, width))
        self.recognizer: nn.Module | None = None
        if settings.recognizer and self.geometry_encoder is not None:
            # the head reads the geometry feature and, with descriptors, the raw shape statistics beside it: the
            # volume fraction alone tells lung from pleura, which share a centroid and a bounding box
            width = int(self.geometry_encoder.out_dim) + (DESCRIPTOR_SIZE if settings.geometry_descriptors else 0)
            self.recognizer = nn.Linear(width, len(settings.names))
        self.classifier: RegionFindingClassifier | None = None
        if settings.classifier_config is not None:
            self.classifier = RegionFindingClassifier(settings.names, settings.classifier_config,
                                                      in_channels=in_channels)

    def set_trainable(self, *, encoder: bool, compressor: bool, projector: bool) -> None:
        """A texture encoder of its own trains with ``encoder``, the texture compressor with ``compressor``, the
        projectors and the geometry ViT (adapters learnt from scratch) with ``projector``."""
        for module, flag in ((self.texture_encoder, encoder), (self.texture_compressor, compressor),
                             (self.texture_projector, projector), (self.geometry_encoder, projector),
                             (self.geometry_descriptor, projector), (self.geometry_projector, projector),
                             (self.recognizer, projector)):
            if module is not None:
                module.requires_grad_(flag)

    def tokens_per_region(self, texture_size: Sequence[int], shared_encoder: nn.Module | None = None) -> int:
        """Embeddings per region slot for texture crops of ``texture_size``."""
        count = 0
        if self.texture_compressor is not None:
            encoder = self.texture_encoder or shared_encoder
            if encoder is None:
                raise ValueError("a shared texture encoder is needed to count texture tokens")
            count += int(self.texture_compressor.num_tokens(encoder.grid_shape(tuple(int(s) for s in texture_size))))
        return count + (1 if self.geometry_encoder is not None else 0)

    def forward(self, regions: RegionBatch, shared_encoder: nn.Module | None = None) -> torch.Tensor:
        parts = []
        if self.texture_compressor is not None:
            if regions.texture is None:
                raise ValueError("this region model reads texture crops, the batch has none")
            encoder = self.texture_encoder or shared_encoder
            assert encoder is not None and self.texture_projector is not None
            parts.append(self.texture_projector(self.texture_compressor(encoder(regions.texture))))
        if self.geometry_encoder is not None:
            assert self.geometry_projector is not None
            parts.append(self.geometry_projector(self.geometry_features(regions).unsqueeze(1)))
        if not parts:
            raise ValueError("this region model has neither texture nor geometry tokens")
        return torch.cat(parts, dim=1)

    def geometry_features(self, regions: RegionBatch) -> torch.Tensor:
        """Each slot's geometry feature [N, width]: the mask ViT mean-pooled, plus its shape statistics."""
        if self.geometry_encoder is None:
            raise ValueError("this region model has no geometry branch")
        if regions.geometry is None:
            raise ValueError("this region model reads geometry masks, the batch has none")
        grid = self.geometry_encoder(regions.geometry)  # [N, d, h, w, C]
        pooled = grid.reshape(grid.shape[0], -1, grid.shape[-1]).mean(dim=1)
        if self.geometry_descriptor is not None:
            pooled = pooled + self.geometry_descriptor(mask_descriptors(regions.geometry).to(pooled.dtype))
        return pooled

    def recognition_logits(self, regions: RegionBatch) -> torch.Tensor:
        """The recognition head's logits [N, len(names)] for every slot of the batch, in slot order."""
        if self.recognizer is None:
            raise ValueError("this region model has no recognition head (vision.regions.recognizer)")
        features = self.geometry_features(regions)
        if self.geometry_descriptor is not None:
            assert regions.geometry is not None
            features = torch.cat([features, mask_descriptors(regions.geometry).to(features.dtype)], dim=-1)
        return self.recognizer(features)

    def recognize(self, regions: RegionBatch) -> list[list[str]]:
        """The region the head names for each slot of each sample."""
        with torch.no_grad():
            best = self.recognition_logits(regions).argmax(dim=-1).tolist()
        return split_slots([self.settings.names[i] for i in best], regions.counts)

    def region_logits(self, regions: RegionBatch) -> torch.Tensor:
        """The region classifier's logits [N, L] for every slot of the batch, in slot order."""
        if self.classifier is None:
            raise ValueError("this region model has no region classifier (vision.regions.classifier)")
        if regions.histograms is None:
            raise ValueError("this region model calls findings from each region's histogram, the batch has none")
        return self.classifier(regions.histograms.to(self.classifier.columns.device), regions.slot_names)

    def region_calls(self, regions: RegionBatch) -> list[list[list[str]]]:
        """The region classifier's calls for each slot of each sample (``[sample][slot] → abnormalities``)."""
        assert self.classifier is not None  # region_logits raises without one
        return split_slots(self.classifier.calls(self.region_logits(regions)), regions.counts)

    def recognition_loss(self, regions: RegionBatch) -> torch.Tensor:
        """Cross-entropy of the head against each slot's true region."""
        index = {name: i for i, name in enumerate(self.settings.names)}
        unknown = sorted({n for n in regions.slot_names if n not in index})
        if unknown:
            raise ValueError(f"regions {unknown} are not among the model's region names")
        logits = self.recognition_logits(regions)
        target = torch.tensor([index[n] for n in regions.slot_names], device=logits.device,
                              dtype=torch.long)
        if not target.numel():  # no slot in the batch: no loss, but a graph
            return logits.float().sum() * 0.0
        return nn.functional.cross_entropy(logits.float(), target)


def split_slots(flat: Sequence[Any], counts: Sequence[int]) -> list[list[Any]]:
    """Per-slot values of a whole batch (samples' slots one after the other) as one list per sample."""
    out, start = [], 0
    for count in counts:
        out.append(list(flat[start: start + count]))
        start += count
    return out


#: the length of :func:`mask_descriptors`' vectors
DESCRIPTOR_SIZE = 13


def mask_descriptors(masks: torch.Tensor) -> torch.Tensor:
    """Shape statistics of binary masks ``[N, 1, D, H, W]`` → ``[N, 13]``: the volume fraction (as
    ``2·sqrt(f) − 1``, so small regions are not all near −1), the centroid, the standard deviation and the bounding
    box's low and high ends along z, y and x, coordinates normalised to [−1, 1] over the grid. An empty mask gives a
    zero centroid, spread and box."""
    if masks.ndim != 5 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [N, 1, D, H, W], got {tuple(masks.shape)}")
    weights = (masks[:, 0] > 0.5).float()
    count = weights.flatten(1).sum(dim=1)
    safe = count.clamp(min=1.0)
    features = [2.0 * (count / weights[0].numel()).sqrt() - 1.0]
    centres, spreads, lows, highs = [], [], [], []
    for axis in range(3):
        size = weights.shape[axis + 1]
        coords = torch.linspace(-1.0, 1.0, size, device=masks.device) if size > 1 else masks.new_zeros(1)
        other = tuple(d + 1 for d in range(3) if d != axis)
        profile = weights.sum(dim=other)  # [N, size]: mask voxels per plane along this axis
        centre = (profile * coords).sum(dim=1) / safe
        variance = (profile * (coords[None] - centre[:, None]) ** 2).sum(dim=1) / safe
        present = profile > 0
        low = torch.where(present, coords.expand_as(profile), torch.full_like(profile, 2.0)).amin(dim=1)
        high = torch.where(present, coords.expand_as(profile), torch.full_like(profile, -2.0)).amax(dim=1)
        empty = count == 0
        centres.append(centre)
        spreads.append(variance.sqrt())
        lows.append(torch.where(empty, torch.zeros_like(low), low))
        highs.append(torch.where(empty, torch.zeros_like(high), high))
    return torch.stack([*features, *centres, *spreads, *lows, *highs], dim=1)


def splice_regions(embeddings: torch.Tensor, input_ids: torch.Tensor, region_embeds: torch.Tensor,
                   counts: Sequence[int], region_token_ids: Sequence[int]) -> torch.Tensor:
    """Replace the ``<region_k>`` embeddings of each sample by its slot ``k``'s region embeddings [N, T, H] (the
    samples' slots one after the other). Each slot must have exactly T placeholders, in slot order; raises
    otherwise."""
    if region_embeds.ndim != 3:
        raise ValueError(f"region embeddings must be [regions, tokens, dim], got {tuple(region_embeds.shape)}")
    if len(counts) != input_ids.shape[0] or sum(counts) != region_embeds.shape[0]:
        raise ValueError(f"{region_embeds.shape[0]} region embeddings for slot counts {list(counts)}")
    tokens = region_embeds.shape[1]
    ids = torch.tensor(list(region_token_ids), device=input_ids.device)
    is_region = torch.isin(input_ids, ids)
    for row, count in enumerate(counts):
        for slot in range(len(region_token_ids)):
            found = int((input_ids[row] == int(region_token_ids[slot])).sum())
            expected = tokens if slot < count else 0
            if found != expected:
                raise ValueError(f"sample {row}: {found} <region_{slot}> tokens, expected {expected} ({count} region "
                                 f"slots of {tokens} tokens); build prompts with ReportGenerator.prompt_ids")
        positions = is_region[row].nonzero().flatten()
        slots = [int(input_ids[row, p]) for p in positions[::tokens].tolist()] if tokens else []
        if slots != [int(region_token_ids[k]) for k in range(count)]:
            raise ValueError(f"sample {row}: region slots appear out of order in the prompt")
    return embeddings.masked_scatter(is_region.unsqueeze(-1), region_embeds.reshape(-1, region_embeds.shape[-1])
                                     .to(embeddings.dtype))


# ------------------------------------------------------------------------------------------------ prompts and text


def region_block(names: Sequence[str], settings: RegionSettings, recognized: Sequence[str] | None = None,
                 calls: Sequence[Sequence[str]] | None = None) -> str:
    """The prompt lines of a sample's region slots (empty without region tokens); ``recognized``: the name a
    recognition head gave each slot (models with ``recognizer``); ``calls``: the abnormalities the region classifier
    calls in each slot (models with ``classifier``), written as ``calls: a, b`` (or ``calls: none``)."""
    from rrg3d.models.language import REGION_TOKEN

    if not settings.has_region_tokens:
        return ""
    if calls is not None and len(calls) != len(names):
        raise ValueError(f"{len(calls)} call lists for {len(names)} region slots")
    if settings.alignment and settings.recognizer:
        if recognized is None or len(recognized) != len(names):
            raise ValueError("a model with a recognition head needs the recognised name of every region slot")
        notes = [[f"recognised: {name}"] for name in recognized]
    elif settings.alignment:
        notes = [[] for _ in names]
    else:
        notes = [[name] for name in names]
    if calls is not None:
        notes = [[*note, "calls: " + (", ".join(c.lower() for c in called) or "none")]
                 for note, called in zip(notes, calls, strict=True)]
    lines = [f"Region {k + 1}" + (f" ({'; '.join(note)})" if note else "") + f": {REGION_TOKEN.format(k)}"
             for k, note in enumerate(notes)]
    return "\n".join(lines)


def _label(name: str) -> str:
    return name[:1].upper() + name[1:]


def region_target(names: Sequence[str], reports: Mapping[str, str], settings: RegionSettings,
                  where: str = "sample") -> str:
    """The training target of a sample whose slots hold ``names``: one line per region with a report."""
    texts = {region_key(k): v.strip() for k, v in reports.items() if isinstance(v, str) and v.strip()}
    lines = []
    for k, name in enumerate(names):
        text = texts.get(name)
        if text is None:
            continue
        lines.append(f"The region {k + 1} is {name}: {text}" if settings.alignment and settings.has_region_tokens
                     else f"{_label(name)}: {text}")
    if not lines:
        raise ValueError(f"{where}: none of its regions ({', '.join(names) or 'none'}) has a report to train on")
    return "\n".join(lines)


_ALIGNED_LINE = re.compile(r"^\s*the\s+region\s+(\d+)\s+is\s+(?:the\s+)?([^:\n]+?)\s*:\s*(.*)$", re.IGNORECASE)


@dataclass
class RegionReport:
    """A region-guided output split up: ``region_reports`` (slot region → text, prefixes removed), ``recognized``
    (slot region → the name the model gave it; None when no line was written for the slot), and ``report`` (the
    region texts merged in ``names`` order)."""

    report: str
    region_reports: dict[str, str]
    recognized: dict[str, str | None]


def parse_region_report(text: str, slots: Sequence[str], settings: RegionSettings) -> RegionReport:
    """Split generated text into region reports; ``slots`` are the regions the prompt's slots held, in order.

    Aligned lines (``The region k is <name>: ...``) belong to slot ``k`` whatever the name says (the name is the
    recognition, scored separately); other lines start with a whole region name (``Heart: ...``); a line with
    neither continues the previous region. Text before any prefix, and a line for a slot the prompt did not have, are
    kept in the merged report only (grounded in no region)."""
    names_by_length = sorted(settings.names, key=len, reverse=True)
    region_texts: dict[str, list[str]] = {}
    recognized: dict[str, str | None] = {name: None for name in slots}
    loose: list[str] = []
    current: str | None = None
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        match = _ALIGNED_LINE.match(line)
        if match and settings.alignment and settings.has_region_tokens:
            slot = int(match.group(1)) - 1
            if not 0 <= slot < len(slots):  # a slot the prompt did not have: text grounded in no region
                current = None
                loose.append(match.group(3).strip())
                continue
            current = slots[slot]
            recognized[current] = region_key(match.group(2))
            region_texts.setdefault(current, []).append(match.group(3).strip())
            continue
        named = next((n for n in names_by_length
                      if re.match(rf"^\s*{re.escape(n)}\s*:", line, flags=re.IGNORECASE)), None)
        if named is not None and not (settings.alignment and settings.has_region_tokens):
            current = named
            if recognized.get(named) is None:  # told the names: the one written is the one recognised
                recognized[named] = named
            region_texts.setdefault(named, []).append(line.split(":", 1)[1].strip())
            continue
        if current is None:
            loose.append(line.strip())
        else:
            region_texts[current].append(line.strip())
    reports = {name: " ".join(t for t in parts if t) for name, parts in region_texts.items()}
    order = [n for n in settings.names if n in reports] + [n for n in reports if n not in settings.names]
    merged = " ".join([*loose, *(reports[n] for n in order if reports[n])]).strip()
    return RegionReport(merged, {n: reports[n] for n in order}, recognized)
