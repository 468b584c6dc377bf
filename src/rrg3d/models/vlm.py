"""The report generator: vision tower (encoder → compressor → projector) + any HF causal LM, LLaVA style.

The HF model is wrapped, never subclassed: visual embeddings replace the embeddings of the ``<image>`` tokens and the
LM runs on ``inputs_embeds``. The prompt holds one ``<image>``; tokenisation expands it to exactly as many tokens as
the vision tower yields for the input size, and the splice checks that count per sample and raises on a mismatch.

Training batches (:meth:`ReportGenerator.training_batch`) carry labels on the report tokens and the end-of-turn token
only; prompt, image and padding tokens are −100. A sample whose report would be cut away entirely raises instead of
silently contributing no loss.

With a finding classifier (``vision.classifier``) and a diagnosis prompt (``prompt.findings``), each sample's
instruction gains a line listing the findings the classifier calls in its image — computed the same way in training
(:meth:`ReportGenerator.report_batch`) and in generation, so the language model learns to read the calls it will get.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from rrg3d.errors import ConfigError
from rrg3d.models.branches import BranchSettings, ModalityBranch
from rrg3d.models.classifier import ClassifierConfig, FindingClassifier
from rrg3d.models.config import GenerationSettings, ModelConfig, load_model_config
from rrg3d.models.language import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    add_lora,
    base_model,
    load_language_model,
    special_token_ids,
)
from rrg3d.models.regions import (
    RegionBatch,
    RegionReport,
    RegionSettings,
    RegionTower,
    parse_region_report,
    region_block,
    region_target,
    splice_regions,
    split_slots,
)
from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS, config_from_mapping

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def register_components() -> None:
    """Import the modules that register encoders, compressors and projectors."""
    import rrg3d.models.compress
    import rrg3d.models.encoders
    import rrg3d.models.projector  # noqa: F401


class GeneratorOutput(dict):
    """What :meth:`ReportGenerator.forward` returns: the LM's outputs (``loss``, ``logits``, ...) and, with a finding
    classifier, ``finding_logits`` and ``classifier_loss``; keys read as attributes, absent optional ones as None.
    A plain mapping, so wrappers that rebuild outputs (accelerate's fp32 conversion under autocast) keep every key."""

    OPTIONAL = ("loss", "logits", "past_key_values", "hidden_states", "attentions", "finding_logits",
                "classifier_loss", "recognition_loss")

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in self.OPTIONAL:
            return None
        raise AttributeError(f"{type(self).__name__} has no {name!r}; it holds {sorted(self)}")


class VisionTower(nn.Module):
    """Volume [B, C, D, H, W] → visual embeddings [B, N, lm_dim] (and, with a finding classifier, one logit per
    finding from the same encoder pass: :meth:`encode`)."""

    def __init__(self, encoder: nn.Module, compressor: nn.Module, projector: nn.Module,
                 classifier: FindingClassifier | None = None, regions: RegionTower | None = None,
                 branches: dict[str, ModalityBranch] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.compressor = compressor
        self.projector = projector
        self.classifier = classifier
        #: region-guided models: the texture and geometry branches (:mod:`rrg3d.models.regions`)
        self.regions = regions
        #: PET/CT models: the modality branches after the CT (:mod:`rrg3d.models.branches`), in channel order
        self.branches = nn.ModuleDict(branches or {})

    @classmethod
    def from_config(cls, vision: Any, lm_dim: int) -> VisionTower:
        register_components()
        encoder = ENCODERS.build(vision.encoder)
        compressor = COMPRESSORS.build(vision.compressor, in_dim=encoder.out_dim)
        projector = PROJECTORS.build(vision.projector, in_dim=compressor.out_dim, out_dim=lm_dim)
        regions = None
        if getattr(vision, "regions", None) is not None:
            region_settings = config_from_mapping(RegionSettings, vision.regions, where="vision.regions")
            regions = RegionTower(region_settings, int(encoder.out_dim), lm_dim,
                                  in_channels=int(getattr(encoder, "in_channels", 1)))
        branches = {name: ModalityBranch(name, config_from_mapping(BranchSettings, data,
                                                                   where=f"vision.branches.{name}"), encoder, lm_dim)
                    for name, data in (getattr(vision, "branches", None) or {}).items()}
        classifier = None
        if getattr(vision, "classifier", None) is not None:
            settings = config_from_mapping(ClassifierConfig, vision.classifier, where="vision.classifier")
            dims, channels = [int(encoder.out_dim)], int(getattr(encoder, "in_channels", 1))
            if settings.reads == "all":  # every modality: one grid per branch, a histogram per input channel
                dims += [int((branch.encoder or encoder).out_dim) for branch in branches.values()]
                channels += sum(branch.settings.channels for branch in branches.values())
            classifier = FindingClassifier(dims, settings, in_channels=channels)
        return cls(encoder, compressor, projector, classifier, regions, branches)

    # -- modalities ---------------------------------------------------------------------------------------------------
    @property
    def ct_channels(self) -> int:
        """Input channels the CT branch reads (the first ones of the volume)."""
        return int(getattr(self.encoder, "in_channels", 1))

    @property
    def modality_labels(self) -> list[str]:
        """The prompt label of each modality's run of image tokens (``["CT", "PET"]``); ``[]`` for a CT-only tower."""
        return ["CT", *[branch.label for branch in self.branches.values()]] if len(self.branches) else []

    def ct_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        """The channels of ``volumes`` [B, C, D, H, W] the CT branch reads (all of them for a CT-only tower)."""
        return volumes[:, : self.ct_channels] if len(self.branches) else volumes

    def branch_grids(self, volumes: torch.Tensor) -> list[torch.Tensor]:
        """Each branch's encoder grid for its channels of ``volumes``, in branch order (channel count checked)."""
        grids, start = [], self.ct_channels
        for branch in self.branches.values():
            channels = volumes[:, start: start + branch.settings.channels]
            start += branch.settings.channels
            grids.append((branch.encoder if branch.encoder is not None else self.encoder)(channels))
        if len(self.branches) and start != volumes.shape[1]:
            raise ValueError(f"the vision tower reads {start} channels (CT + {', '.join(self.branches)}), the volumes "
                             f"have {volumes.shape[1]}; use the model's PET/CT preset")
        return grids

    def _branch_tokens(self, volumes: torch.Tensor, ct_tokens: torch.Tensor, project: bool = True,
                       grids: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The CT tokens followed by each branch's tokens for its channels of ``volumes`` (counts checked);
        ``grids``: the branches' encoder grids when already at hand (:meth:`branch_grids`)."""
        if not len(self.branches):
            return ct_tokens
        parts = [ct_tokens]
        for (name, branch), grid in zip(self.branches.items(), grids if grids is not None
                                        else self.branch_grids(volumes), strict=True):
            tokens = branch.compressor(grid)
            tokens = branch.projector(tokens) if project else tokens
            if tokens.shape[1] != ct_tokens.shape[1]:
                raise ValueError(f"the {name} branch gives {tokens.shape[1]} tokens, the CT branch "
                                 f"{ct_tokens.shape[1]}: every modality must give as many tokens (compressors with "
                                 "the same output count)")
            parts.append(tokens)
        return torch.cat(parts, dim=1)

    def region_embeddings(self, regions: RegionBatch) -> torch.Tensor:
        """Embeddings [N, tokens per region, lm_dim] of a batch's region slots (texture, then geometry)."""
        if self.regions is None:
            raise ValueError("this vision tower is not region-guided (vision.regions)")
        return self.regions(regions.to(next(self.parameters()).device), shared_encoder=self.encoder)

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        """Visual embeddings per volume of spatial size ``(D, H, W)`` (all modalities together)."""
        ct = int(self.compressor.num_tokens(self.encoder.grid_shape(tuple(int(s) for s in input_shape[-3:]))))
        return ct * (1 + len(self.branches))

    def features(self, volumes: torch.Tensor) -> torch.Tensor:
        """Compressed encoder tokens before the projector [B, N, C] (the CT branch's: PET/CT towers have one
        projector per modality, so only the CT branch has features in this sense)."""
        return self.compressor(self.encoder(self.ct_volumes(volumes)))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.encode(volumes)[0]

    def classifier_features(self, volumes: torch.Tensor, ct_grid: torch.Tensor | None = None,
                            branch_grids: list[torch.Tensor] | None = None) -> torch.Tensor:
        """What the finding classifier reads of ``volumes`` (its :meth:`~FindingClassifier.features`): the CT
        branch, or with ``reads: all`` every modality (``ct_grid``, ``branch_grids``: the encoders' outputs when
        already at hand)."""
        if self.classifier is None:
            raise ValueError("this vision tower has no finding classifier (vision.classifier)")
        every = self.classifier.config.reads == "all" and bool(len(self.branches))
        read = volumes if every else self.ct_volumes(volumes)
        if not self.classifier.grids:  # a histogram-only head: no encoder pass
            return self.classifier.features(None, read)
        grid = ct_grid if ct_grid is not None else self.encoder(self.ct_volumes(volumes))
        if not every:
            return self.classifier.features(grid, read)
        return self.classifier.features([grid, *(branch_grids if branch_grids is not None
                                                 else self.branch_grids(volumes))], read)

    def finding_logits(self, volumes: torch.Tensor) -> torch.Tensor:
        """The finding classifier's logits [B, L] (encoder + classifier; the compressor and projector are skipped).
        A PET/CT tower's classifier reads the CT branch, or every modality with ``reads: all``."""
        if self.classifier is None:
            raise ValueError("this vision tower has no finding classifier (vision.classifier)")
        return self.classifier.logits(self.classifier_features(volumes))

    def encode(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visual embeddings [B, N, lm_dim] (a PET/CT tower: the CT tokens, then each branch's) and finding logits
        [B, L] (None without a classifier), one encoder pass per modality for both."""
        grid = self.encoder(self.ct_volumes(volumes))
        branch_grids = self.branch_grids(volumes) if len(self.branches) else None
        logits = None
        if self.classifier is not None:
            logits = self.classifier.logits(self.classifier_features(volumes, grid, branch_grids))
        return self._branch_tokens(volumes, self.projector(self.compressor(grid)), grids=branch_grids), logits

    def unfitted_parts(self) -> list[str]:
        """Parts with data-dependent statistics not fitted yet: a PCA compressor, a standardising projector."""
        parts = []
        if hasattr(self.compressor, "is_fitted") and not self.compressor.is_fitted:
            parts.append("compressor")
        if getattr(self.projector, "needs_fit", False):
            parts.append("projector")
        for name, branch in self.branches.items():
            if (hasattr(branch.compressor, "is_fitted") and not branch.compressor.is_fitted) \
                    or getattr(branch.projector, "needs_fit", False):
                raise ConfigError(f"vision.branches.{name}: a compressor or projector fitted on data (PCA, "
                                  "standardising) is not supported in a modality branch yet")
        return parts

    @torch.no_grad()
    def fit_statistics(self, volume_batches: Callable[[], Iterable[torch.Tensor]]) -> list[str]:
        """Fit what :meth:`unfitted_parts` lists, in data-flow order (the compressor's PCA on encoder grids, then
        the projector's standardisation on compressed tokens). ``volume_batches()`` yields volume batches
        ``[B, C, D, H, W]`` on the tower's device and is called once per part. Returns the parts fitted."""
        parts = self.unfitted_parts()
        was_training = self.training
        self.eval()  # no dropout; BatchNorm uses its running statistics
        try:
            if "compressor" in parts:
                self.compressor.fit(self.encoder(self.ct_volumes(v)) for v in volume_batches())
            if "projector" in parts:
                self.projector.fit(self.features(v) for v in volume_batches())
        finally:
            self.train(was_training)
        return parts


class ReportGenerator(nn.Module):
    """Vision tower + causal LM + tokenizer, with the prompt and decoding defaults of its config."""

    def __init__(self, config: ModelConfig, vision: VisionTower, lm: Any, tokenizer: Any,
                 lm_is_base: bool = False) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        #: True while the LM weights are the unchanged base model (a checkpoint then records the base's name only).
        self.lm_is_base = lm_is_base
        #: True when a LoRA adapter was folded into the LM weights for inference (saving would then be refused).
        self.lora_merged = False
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.suppress_ids = special_token_ids(tokenizer, config.lm.num_region_tokens)
        self.region_token_ids = [int(tokenizer.convert_tokens_to_ids(REGION_TOKEN.format(k)))
                                 for k in range(config.lm.num_region_tokens)]
        self.eos_ids = self._eos_ids()

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig | str, *, device: str | None = None, seed: int | None = 0
                    ) -> ReportGenerator:
        """A new model: pretrained LM (with LoRA when configured), freshly initialised vision tower."""
        config = load_model_config(config)
        if seed is not None:
            torch.manual_seed(seed)
        lm, tokenizer = load_language_model(config.lm, device=device)
        vision = VisionTower.from_config(config.vision, lm_dim=int(lm.config.hidden_size))
        if config.lm.lora is not None:
            lm = add_lora(lm, config.lm.lora)
        model = cls(config, vision, lm, tokenizer, lm_is_base=config.lm.lora is None)
        return model.to(device or "cpu")

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(base_model(self.lm).generation_config, "eos_token_id", None)
        for value in (configured, self.tokenizer.eos_token_id):
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is not None and int(item) not in ids:
                    ids.append(int(item))
        if not ids:
            raise ConfigError("the language model defines no end-of-sequence token")
        return ids

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def lm_dtype(self) -> torch.dtype:
        return base_model(self.lm).get_input_embeddings().weight.dtype

    @property
    def end_of_turn(self) -> str:
        """The text that ends the assistant's turn (what training appends after each report)."""
        return str(self.tokenizer.eos_token)

    # -- trainability ---------------------------------------------------------------------------------------------
    def set_trainable(self, *, encoder: bool, compressor: bool = True, projector: bool = True,
                      lm: str = "frozen", classifier: bool = False) -> None:
        """Freeze or unfreeze each part; ``lm`` is ``"frozen"``, ``"lora"`` (adapter only) or ``"full"``;
        ``classifier`` applies to a finding classifier when the tower has one."""
        if lm not in ("frozen", "lora", "full"):
            raise ConfigError(f"lm trainability must be frozen, lora or full, got {lm!r}")
        is_peft = hasattr(self.lm, "peft_config")
        if lm == "lora" and not is_peft:
            raise ConfigError("lm=lora needs lm.lora settings in the model config")
        self.vision.encoder.requires_grad_(encoder)
        self.vision.compressor.requires_grad_(compressor)
        self.vision.projector.requires_grad_(projector)
        if self.vision.classifier is not None:
            self.vision.classifier.requires_grad_(classifier)
        if self.vision.regions is not None:  # region branches: their adapters train with the compressor/projector
            self.vision.regions.set_trainable(encoder=encoder, compressor=compressor, projector=projector)
        for name, parameter in self.lm.named_parameters():
            parameter.requires_grad_(lm == "full" or (lm == "lora" and "lora_" in name))
        if lm == "full":
            self.lm_is_base = False

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter counts per part."""
        parts = {"encoder": self.vision.encoder, "compressor": self.vision.compressor,
                 "projector": self.vision.projector, "lm": self.lm}
        if self.vision.classifier is not None:
            parts["classifier"] = self.vision.classifier
        if self.vision.regions is not None:
            parts["regions"] = self.vision.regions
        return {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items()}

    # -- regions (Reg2RG) -----------------------------------------------------------------------------------------
    @property
    def region_settings(self) -> RegionSettings | None:
        """The region settings of a region-guided model (``vision.regions``), else None."""
        return self.vision.regions.settings if self.vision.regions is not None else None

    def region_tokens_per_slot(self, regions: RegionBatch) -> int:
        """Embeddings per region slot for this batch's texture crops (0 without region tokens)."""
        if self.vision.regions is None or not self.vision.regions.settings.has_region_tokens:
            return 0
        size = regions.texture.shape[-3:] if regions.texture is not None else (1, 1, 1)
        return self.vision.regions.tokens_per_region(size, self.vision.encoder)

    def region_instructions(self, instructions: Sequence[str | None] | None, regions: RegionBatch,
                            recognized: Sequence[Sequence[str]] | None = None,
                            calls: Sequence[Sequence[Sequence[str]] | None] | None = None) -> list[str]:
        """Each sample's instruction with its region slot lines after the image placeholder. A model with a
        recognition head names each slot: ``recognized`` (training: the true names), else the head's names. A model
        with a region classifier lists each slot's calls: ``calls[b]`` where given (training: the true findings of
        a teacher-forced sample), else the classifier's."""
        settings = self.region_settings
        if settings is None:
            raise ValueError("this model is not region-guided (vision.regions)")
        base = list(instructions) if instructions is not None else [None] * len(regions)
        if len(base) != len(regions):
            raise ValueError(f"{len(base)} instructions for {len(regions)} region sets")
        if settings.recognizer and settings.alignment and recognized is None:
            assert self.vision.regions is not None
            recognized = self.vision.regions.recognize(regions.to(self.device))
        shown = list(recognized) if recognized is not None else [None] * len(regions)
        tower = self.vision.regions
        listed: list[Sequence[Sequence[str]] | None] = [None] * len(regions)
        if tower is not None and tower.classifier is not None and settings.has_region_tokens:
            given = list(calls) if calls is not None else [None] * len(regions)
            if len(given) != len(regions):
                raise ValueError(f"{len(given)} region call lists for {len(regions)} region sets")
            found = tower.region_calls(regions) if any(g is None for g in given) else given
            listed = [g if g is not None else f for g, f in zip(given, found, strict=True)]
        out = []
        for text, names, named, called in zip(base, regions.names, shown, listed, strict=True):
            text = text or self.config.prompt.instruction
            block = region_block(names, settings, named, called)
            out.append(text.replace(IMAGE_TOKEN, f"{IMAGE_TOKEN}\n{block}", 1) if block else text)
        return out

    def _regions_required(self, regions: RegionBatch | None, batch_size: int) -> RegionBatch | None:
        if self.region_settings is None:
            if regions is not None:
                raise ValueError("regions were given to a model that is not region-guided (vision.regions)")
            return None
        if regions is None:
            raise ValueError("a region-guided model needs each study's regions (a label map: masks or --segment)")
        if len(regions) != batch_size:
            raise ValueError(f"{len(regions)} region sets for a batch of {batch_size}")
        return regions

    def _global_visual(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global visual embeddings and finding logits; a region model without global tokens gets [B, 0, H]."""
        settings = self.region_settings
        if settings is not None and not settings.global_tokens:
            logits = self.vision.finding_logits(volumes) if self.vision.classifier is not None else None
            hidden = int(base_model(self.lm).config.hidden_size)
            return volumes.new_zeros((volumes.shape[0], 0, hidden)), logits
        return self.vision.encode(volumes)

    # -- prompts and batches --------------------------------------------------------------------------------------
    def num_image_tokens(self, input_shape: Sequence[int]) -> int:
        settings = self.region_settings
        if settings is not None and not settings.global_tokens:
            return 0
        return self.vision.num_tokens(input_shape)

    def prompt_text(self, instruction: str | None = None) -> str:
        """The chat up to the assistant's turn, with one ``<image>`` placeholder."""
        instruction = instruction or self.config.prompt.instruction
        if instruction.count(IMAGE_TOKEN) != 1:
            raise ConfigError(f"the instruction must contain {IMAGE_TOKEN} exactly once: {instruction!r}")
        messages = []
        if self.config.prompt.system:
            messages.append({"role": "system", "content": self.config.prompt.system})
        messages.append({"role": "user", "content": instruction})
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        system = f"{self.config.prompt.system}\n\n" if self.config.prompt.system else ""
        return f"{system}{instruction}\nReport:"

    def prompt_ids(self, num_image_tokens: int, instruction: str | None = None, region_tokens: int = 0) -> list[int]:
        """Token ids of the prompt with ``<image>`` expanded to ``num_image_tokens`` ids and each ``<region_k>`` to
        ``region_tokens`` ids (region-guided models)."""
        before, after = self.prompt_text(instruction).split(IMAGE_TOKEN)
        encode = self.tokenizer.encode
        ids = [*encode(before, add_special_tokens=False), *self.image_ids(num_image_tokens),
               *encode(after, add_special_tokens=False)]
        if self.region_settings is None:
            return ids
        region_ids = set(self.region_token_ids)
        return [t for token in ids for t in ([token] * region_tokens if token in region_ids else [token])]

    def image_ids(self, num_image_tokens: int) -> list[int]:
        """What ``<image>`` becomes: ``num_image_tokens`` image ids; for a PET/CT model one labelled run per modality
        (``CT: <image>×n\nPET: <image>×n``), the tokens split evenly in the tower's modality order."""
        labels = self.vision.modality_labels
        if not labels:
            return [self.image_token_id] * num_image_tokens
        if num_image_tokens % len(labels):
            raise ValueError(f"{num_image_tokens} image tokens cannot be split evenly between the modalities "
                             f"{', '.join(labels)}")
        each = num_image_tokens // len(labels)
        ids: list[int] = []
        for i, label in enumerate(labels):
            prefix = ("\n" if i else "") + f"{label}: "
            ids += [*self.tokenizer.encode(prefix, add_special_tokens=False), *[self.image_token_id] * each]
        return ids

    def style_instructions(self, instructions: Sequence[str | None] | None,
                           styles: Sequence[tuple[str | None, str | None]] | None, batch_size: int,
                           ids: Sequence[str] | None = None) -> list[str | None] | None:
        """Each sample's instruction with its style block (``prompt.style``: the normal-report template of its
        hospital and sex); ``instructions`` unchanged for a model without a style prompt. ``styles``: one
        ``(style, sex)`` per sample, required by a style-prompted model."""
        prompt = self.config.prompt
        if prompt.style is None:
            return list(instructions) if instructions is not None else None
        if styles is None:
            raise ValueError("this model writes in the style of a hospital (prompt.style): give each study's "
                             "(style, sex)")
        if len(styles) != batch_size:
            raise ValueError(f"{len(styles)} styles for a batch of {batch_size}")
        base = list(instructions) if instructions is not None else [None] * batch_size
        names = list(ids) if ids is not None else [f"sample {i}" for i in range(batch_size)]
        return [prompt.with_style(text or prompt.instruction, style, sex, where=name)
                for text, (style, sex), name in zip(base, styles, names, strict=True)]

    def prompt_batch(self, num_image_tokens: int, batch_size: int,
                     instructions: Sequence[str | None] | None = None, region_tokens: int = 0
                     ) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and attention mask for generation."""
        instructions = list(instructions) if instructions is not None else [None] * batch_size
        if len(instructions) != batch_size:
            raise ValueError(f"{len(instructions)} instructions for a batch of {batch_size}")
        rows = [self.prompt_ids(num_image_tokens, text, region_tokens) for text in instructions]
        width = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def uses_findings_prompt(self) -> bool:
        """True when each prompt carries the finding classifier's calls (``prompt.findings``)."""
        return self.config.prompt.findings is not None and self.vision.classifier is not None

    def finding_instructions(self, logits: torch.Tensor | None,
                             instructions: Sequence[str | None] | None = None,
                             calls: Sequence[Sequence[str] | None] | None = None) -> list[str | None] | None:
        """Each sample's instruction with the diagnosis line for the findings its classifier logits call (or, where
        ``calls`` gives a list for a sample, those findings); ``instructions`` unchanged without a diagnosis
        prompt."""
        if not self.uses_findings_prompt or logits is None or self.vision.classifier is None:
            return list(instructions) if instructions is not None else None
        called = self.vision.classifier.calls(logits)
        if calls is not None:
            if len(calls) != len(called):
                raise ValueError(f"{len(calls)} call lists for a batch of {len(called)}")
            called = [list(given) if given is not None else found for given, found in zip(calls, called, strict=True)]
        base = list(instructions) if instructions is not None else [None] * len(called)
        if len(base) != len(called):
            raise ValueError(f"{len(base)} instructions for a batch of {len(called)}")
        return [self.config.prompt.with_findings(text or self.config.prompt.instruction, found)
                for text, found in zip(base, called, strict=True)]

    def report_batch(self, volumes: torch.Tensor, reports: Sequence[str], *, max_length: int | None = None,
                     instructions: Sequence[str | None] | None = None, ids: Sequence[str] | None = None,
                     true_labels: torch.Tensor | None = None, true_share: float = 0.0,
                     regions: RegionBatch | None = None,
                     styles: Sequence[tuple[str | None, str | None]] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`training_batch` for these volumes: with a diagnosis prompt, each instruction lists the findings
        the classifier calls in that volume (a gradient-free pass, as in generation). With ``true_labels`` (its
        :func:`~rrg3d.models.classifier.target_matrix`: [B, 18], or [B, 18 + U] with the uptake columns) and
        ``true_share`` > 0, that share of the samples (drawn from torch's RNG) lists its true findings instead
        — teacher forcing of the prompt, which teaches the LM to write what the list says. A region-guided model
        needs ``regions`` (slots in the order given: shuffle them before for alignment); its prompt gains the slot
        lines and its target is the region reports (:func:`~rrg3d.models.regions.region_target`), not
        ``reports``. A style-prompted model needs each sample's ``styles`` ``(style, sex)``."""
        regions = self._regions_required(regions, len(volumes))
        instructions = self.style_instructions(instructions, styles, len(volumes), ids)
        classifier = self.vision.classifier
        if self.uses_findings_prompt and classifier is not None:
            calls: list[list[str] | None] = [None] * len(volumes)
            if true_labels is not None and true_share > 0:
                true_calls = classifier.named(classifier.targets(true_labels.cpu()) == 1)
                chosen = (torch.rand(len(true_calls)) < true_share).tolist()
                calls = [found if pick else None for found, pick in zip(true_calls, chosen, strict=True)]
            # the classifier pass runs only for the samples that are not teacher-forced
            rest = [i for i, given in enumerate(calls) if given is None]
            logits = torch.zeros(len(volumes), len(classifier.labels))
            if rest:
                with torch.no_grad():
                    index = torch.tensor(rest, device=volumes.device)
                    found = self.vision.finding_logits(volumes.index_select(0, index).to(self.device))
                logits[rest] = found.float().cpu()
            instructions = self.finding_instructions(logits, instructions, calls)
        region_tokens = 0
        if regions is not None and self.region_settings is not None:
            names = list(ids) if ids is not None else [f"sample {i}" for i in range(len(volumes))]
            reports = [region_target(slots, given or {}, self.region_settings, where=name)
                       for slots, given, name in zip(regions.names, regions.reports or [None] * len(regions), names,
                                                     strict=True)]
            # a recognition head's slot names are teacher-forced in training: the true ones; so are a region
            # classifier's calls for a ``true_share`` of the samples (their slots' true findings)
            region_calls = None
            tower = self.vision.regions
            if tower is not None and tower.classifier is not None and true_share > 0 and regions.findings is not None:
                true_calls = split_slots(tower.classifier.named(regions.findings.cpu()), regions.counts)
                chosen = (torch.rand(len(true_calls)) < true_share).tolist()
                region_calls = [found if pick else None for found, pick in zip(true_calls, chosen, strict=True)]
            instructions = self.region_instructions(instructions, regions, recognized=regions.names,
                                                    calls=region_calls)
            region_tokens = self.region_tokens_per_slot(regions)
        return self.training_batch(reports, self.num_image_tokens(volumes.shape[-3:]), max_length=max_length,
                                   instructions=instructions, ids=ids, region_tokens=region_tokens)

    def training_batch(self, reports: Sequence[str], num_image_tokens: int, *, max_length: int | None = None,
                       instructions: Sequence[str | None] | None = None,
                       ids: Sequence[str] | None = None, region_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (loss on report + end-of-turn only)."""
        instructions = list(instructions) if instructions is not None else [None] * len(reports)
        names = list(ids) if ids is not None else [f"sample {i}" for i in range(len(reports))]
        rows: list[tuple[list[int], list[int]]] = []
        for name, report, instruction in zip(names, reports, instructions, strict=True):
            if not isinstance(report, str) or not report.strip():
                raise ValueError(f"{name}: the report is empty; every training sample needs report text")
            prompt = self.prompt_ids(num_image_tokens, instruction, region_tokens)
            target = self.tokenizer.encode(report.strip() + self.end_of_turn, add_special_tokens=False)
            if max_length is not None:
                room = max_length - len(prompt)
                if room <= 0:
                    raise ValueError(f"{name}: the prompt alone ({len(prompt)} tokens, {num_image_tokens} of them "
                                     f"visual) fills max_length={max_length}; no report token would carry loss")
                target = target[:room]
            rows.append((prompt, target))
        width = max(len(p) + len(t) for p, t in rows)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, target) in enumerate(rows):
            n = len(prompt) + len(target)
            input_ids[i, :n] = torch.tensor(prompt + target)
            attention_mask[i, :n] = 1
            labels[i, len(prompt):n] = torch.tensor(target)
        check_labels(labels, names)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    # -- forward ----------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, volumes: torch.Tensor | None = None,
              visual: torch.Tensor | None = None, regions: RegionBatch | None = None) -> torch.Tensor:
        """Token embeddings with every ``<image>`` embedding replaced by the visual embeddings of its sample (and,
        for a region-guided model, every ``<region_k>`` by the embeddings of that sample's slot ``k``)."""
        embeddings = base_model(self.lm).get_input_embeddings()(input_ids)
        if visual is None:
            if volumes is None:
                raise ValueError("embed() needs volumes or precomputed visual embeddings")
            visual = self._global_visual(volumes.to(self.device))[0]
        embeddings = splice_visual(embeddings, input_ids, visual.to(embeddings.dtype), self.image_token_id)
        if regions is not None and self.region_tokens_per_slot(regions):
            embeddings = splice_regions(embeddings, input_ids, self.vision.region_embeddings(regions), regions.counts,
                                        self.region_token_ids)
        return embeddings

    def forward(self, volumes: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, finding_labels: torch.Tensor | None = None,
                visual: torch.Tensor | None = None, regions: RegionBatch | None = None,
                num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The LM's outputs as a :class:`GeneratorOutput` (``.loss`` when labels are given); with a finding classifier
        also ``.finding_logits`` [B, L], and ``.classifier_loss`` when ``finding_labels`` [B, 18] (NaN: unknown)
        are given. ``visual`` [B, N, H]: visual embeddings computed before (a frozen tower's, reused for several
        texts); the vision tower then does not run and ``volumes`` may be None. ``regions``: the batch's region
        slots, in the order the prompt lists them (region-guided models). ``num_items_in_batch``: the loss is the
        summed token loss divided by it (token-weighted gradient accumulation) instead of the mean over this batch's
        target tokens."""
        device = self.device
        weighting = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        regions = self._regions_required(regions, input_ids.shape[0])
        if visual is not None:
            output = GeneratorOutput(self.lm(inputs_embeds=self.embed(input_ids, visual=visual.to(device),
                                                                      regions=regions),
                                             attention_mask=attention_mask,
                                             labels=None if labels is None else labels.to(device), **weighting))
            return output
        if volumes is None:
            raise ValueError("forward() needs volumes or precomputed visual embeddings")
        visual, logits = self._global_visual(volumes.to(device))
        inputs_embeds = self.embed(input_ids, visual=visual, regions=regions)
        output = GeneratorOutput(self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         labels=None if labels is None else labels.to(device), **weighting))
        if logits is not None and self.vision.classifier is not None:
            output["finding_logits"] = logits
            if finding_labels is not None:
                output["classifier_loss"] = self.vision.classifier.loss(logits, finding_labels)
        tower = self.vision.regions
        if labels is not None and regions is not None and tower is not None and tower.recognizer is not None:
            output["recognition_loss"] = tower.recognition_loss(regions.to(device))
        return output

    # -- generation -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, volumes: torch.Tensor, settings: GenerationSettings | None = None,
                     instructions: Sequence[str | None] | None = None, num_samples: int = 1,
                     regions: RegionBatch | None = None,
                     styles: Sequence[tuple[str | None, str | None]] | None = None) -> torch.Tensor:
        """New token ids [B × num_samples, T] for a batch of preprocessed volumes [B, C, D, H, W]: ``num_samples``
        rows per volume, consecutive (one vision pass and one prompt prefill per volume; sampled rows differ by the
        decoder's random stream). Region-guided models need ``regions`` (their slots in prompt order)."""
        from rrg3d.models.generation import decode

        settings = settings or self.config.generation
        volumes = volumes.to(self.device)
        regions = self._regions_required(regions, volumes.shape[0])
        instructions = self.style_instructions(instructions, styles, volumes.shape[0])
        visual, logits = self._global_visual(volumes)
        instructions = self.finding_instructions(logits, instructions)
        region_tokens = 0
        if regions is not None:
            instructions = self.region_instructions(instructions, regions)
            region_tokens = self.region_tokens_per_slot(regions)
        batch = self.prompt_batch(visual.shape[1], volumes.shape[0], instructions, region_tokens=region_tokens)
        input_ids = batch["input_ids"].to(self.device)
        inputs_embeds = self.embed(input_ids, visual=visual, regions=regions)
        return decode(self.lm, inputs_embeds, batch["attention_mask"].to(self.device), settings,
                      eos_ids=self.eos_ids, pad_id=int(self.tokenizer.pad_token_id), suppress_ids=self.suppress_ids,
                      num_samples=num_samples)

    @torch.inference_mode()
    def classify(self, volumes: torch.Tensor) -> list[dict[str, Any]] | None:
        """The finding classifier's view of each volume — ``{"threshold", "probabilities": {label: p}, "called":
        [labels]}``, what a diagnosis prompt lists — or None without a classifier."""
        classifier = self.vision.classifier
        if classifier is None:
            return None
        was_training = self.training
        self.eval()
        try:
            logits = self.vision.finding_logits(volumes.to(self.device)).float().cpu()
        finally:
            self.train(was_training)
        threshold = float(classifier.threshold)
        return [{"threshold": threshold,
                 "probabilities": {n: round(float(p), 4) for n, p in zip(classifier.labels, row.sigmoid().tolist(),
                                                                          strict=True)},
                 "called": called}
                for row, called in zip(logits, classifier.calls(logits), strict=True)]

    @torch.inference_mode()
    def classify_regions(self, regions: RegionBatch) -> list[dict[str, Any]] | None:
        """The region classifier's view of each study — ``{"threshold", "regions": {region: {"probabilities":
        {label: p}, "called": [labels]}}}``, what its slot lines list — or None without a region classifier."""
        tower = self.vision.regions
        if tower is None or tower.classifier is None:
            return None
        classifier = tower.classifier
        logits = tower.region_logits(regions).float().cpu()
        rows = [{"probabilities": {n: round(float(p), 4) for n, p in zip(classifier.labels, row.sigmoid().tolist(),
                                                                          strict=True)},
                 "called": called} for row, called in zip(logits, classifier.calls(logits), strict=True)]
        return [{"threshold": classifier.threshold, "regions": dict(zip(names, slots, strict=True))}
                for names, slots in zip(regions.names, split_slots(rows, regions.counts), strict=True)]

    def decode_text(self, token_ids: torch.Tensor) -> list[str]:
        return [str(t).strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def generate(self, volumes: torch.Tensor, settings: GenerationSettings | None = None,
                 instructions: Sequence[str | None] | None = None, regions: RegionBatch | None = None,
                 styles: Sequence[tuple[str | None, str | None]] | None = None) -> list[str]:
        """Reports for a batch of preprocessed volumes [B, C, D, H, W] (region-guided models: the raw text with its
        region lines; :meth:`generate_regions` splits it)."""
        was_training = self.training
        self.eval()
        try:
            return self.decode_text(self.generate_ids(volumes, settings, instructions, regions=regions,
                                                      styles=styles))
        finally:
            self.train(was_training)

    def generate_regions(self, volumes: torch.Tensor, regions: RegionBatch,
                         settings: GenerationSettings | None = None,
                         instructions: Sequence[str | None] | None = None,
                         styles: Sequence[tuple[str | None, str | None]] | None = None) -> list[RegionReport]:
        """Grounded reports of a region-guided model: each output split into region reports, the region recognised
        for each slot and the merged report (:func:`~rrg3d.models.regions.parse_region_report`)."""
        settings_regions = self.region_settings
        if settings_regions is None:
            raise ValueError("generate_regions needs a region-guided model (vision.regions)")
        texts = self.generate(volumes, settings, instructions, regions=regions, styles=styles)
        return [parse_region_report(text, slots, settings_regions) for text, slots in zip(texts, regions.names,
                                                                                         strict=True)]

    def sample_reports(self, volumes: torch.Tensor, num_samples: int, settings: GenerationSettings | None = None,
                       instructions: Sequence[str | None] | None = None,
                       styles: Sequence[tuple[str | None, str | None]] | None = None) -> list[list[str]]:
        """``num_samples`` reports per volume (``settings`` decides sampling: temperature > 0 and its seed)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        was_training = self.training
        self.eval()
        try:
            texts = self.decode_text(self.generate_ids(volumes, settings, instructions, num_samples=num_samples,
                                                       styles=styles))
        finally:
            self.train(was_training)
        return [texts[i: i + num_samples] for i in range(0, len(texts), num_samples)]

    def report_logprobs(self, reports: Sequence[str], visual: torch.Tensor, *,
                        instructions: Sequence[str | None] | None = None, max_length: int | None = None,
                        ids: Sequence[str] | None = None, model: nn.Module | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each report's log-probability given its visual embeddings [B, N, H] — the sum over the tokens SFT trains
        on (the report and the end-of-turn token; :meth:`training_batch`'s labels) — and the count of those tokens,
        both [B]. Differentiable; ``model`` is the module to call (a distributed wrapper of this one)."""
        batch = self.training_batch(reports, visual.shape[1], max_length=max_length, instructions=instructions,
                                    ids=ids)
        output = (model or self)(None, batch["input_ids"], batch["attention_mask"], visual=visual)
        return sequence_logprobs(output.logits, batch["labels"].to(output.logits.device))


def splice_visual(embeddings: torch.Tensor, input_ids: torch.Tensor, visual: torch.Tensor,
                  image_token_id: int) -> torch.Tensor:
    """Replace the ``<image>`` embeddings of each sample by its visual embeddings; counts must match exactly."""
    if visual.ndim != 3 or visual.shape[0] != input_ids.shape[0]:
        raise ValueError(f"visual embeddings must be [batch={input_ids.shape[0]}, tokens, dim], "
                         f"got {tuple(visual.shape)}")
    if visual.shape[-1] != embeddings.shape[-1]:
        raise ValueError(f"visual embeddings have dim {visual.shape[-1]}, the LM expects {embeddings.shape[-1]}")
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    expected = visual.shape[1]
    bad = (counts != expected).nonzero().flatten().tolist()
    if bad:
        found = ", ".join(f"sample {i}: {int(counts[i])}" for i in bad[:5])
        raise ValueError(f"{IMAGE_TOKEN} token count does not match the {expected} visual embeddings per sample "
                         f"({found}); build prompts with ReportGenerator.prompt_ids for this input size")
    return embeddings.masked_scatter(is_image.unsqueeze(-1), visual)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row and their count, both [B]: ``logits`` [B, T, V]
    predict the next token, ``labels`` [B, T] hold the token ids to score and −100 elsewhere (HF's convention,
    shifted here as in the LM's own loss). Log-softmax runs in float32 on the labelled positions only."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1).gather(-1, targets[mask].unsqueeze(-1))
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked[:, 0])
    return sums, mask.sum(dim=1)


def check_labels(labels: torch.Tensor, names: Sequence[str] | None = None) -> None:
    """Raise when a sample has no label left (it would add nothing to the loss, silently)."""
    empty = (labels != IGNORE_INDEX).sum(dim=1) == 0
    if bool(empty.any()):
        which = [names[i] if names else f"sample {i}" for i in empty.nonzero().flatten().tolist()]
        raise ValueError(f"every label is masked for {', '.join(which)}: no report token would carry loss")
