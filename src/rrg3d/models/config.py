"""Model architectures as data: the typed config of a report generator, read from YAML by name or path.

Built-in architectures live in ``rrg3d/configs/models/*.yaml`` (inside the package, so an installed rrg3d can build
them by name); each full-size file has a ``tiny_*`` sibling that fast tests build. A config has five sections::

    vision:     {encoder: {name: ctvit_v, ...}, compressor: {name: pool, ...}, projector: {name: mlp2x_gelu},
                 classifier: {hidden: 0} | null}
    lm:         {name_or_path: smollm2-135m-instruct, dtype: auto, lora: {r: 16, ...} | null, ...}
    preprocess: a preset name (``rrg3d presets``) or an inline preset mapping
    prompt:     {system: ..., instruction: "<image>\\n...", findings: "...{findings}..." | null}
    generation: {max_new_tokens: 256, temperature: 0.0, top_p: 1.0, num_beams: 1, repetition_penalty: 1.0}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rrg3d.errors import ConfigError
from rrg3d.models.language import IMAGE_TOKEN, LMConfig, LoraSettings
from rrg3d.models.registry import config_from_mapping, config_to_dict

SECTIONS = ("name", "description", "vision", "lm", "preprocess", "prompt", "generation")


@dataclass
class VisionConfig:
    """Encoder → compressor → projector, each a registry mapping ``{name: ..., **config}``."""

    encoder: dict[str, Any]
    compressor: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    projector: dict[str, Any] = field(default_factory=lambda: {"name": "mlp2x_gelu"})
    #: optional finding classifier on the encoder grid (:mod:`rrg3d.models.classifier`), e.g. ``{hidden: 0}``
    classifier: dict[str, Any] | None = None
    #: region-guided generation (Reg2RG): texture + geometry tokens per region (:mod:`rrg3d.models.regions`)
    regions: dict[str, Any] | None = None
    #: extra modality branches after the CT (PETRG-3D): ``{pet: {encoder: shared, compressor, projector}}``
    #: (:mod:`rrg3d.models.branches`); the CT branch is ``encoder``/``compressor``/``projector`` above
    branches: dict[str, Any] | None = None


#: ``prompt.findings_order`` value asking a training run for the order its training reports name findings
FINDINGS_ORDER_FROM_REPORTS = "reports"


@dataclass
class PromptConfig:
    """The chat the report is generated in; ``instruction`` holds exactly one ``<image>``."""

    system: str | None = "You are an expert radiologist. Write concise, accurate chest CT reports."
    instruction: str = IMAGE_TOKEN + "\nWrite the radiology report (findings and impression) for this chest CT."
    #: diagnosis prompt: a line appended to the instruction with the classifier's calls, e.g. "Findings the image
    #: classifier calls: {findings}." (needs ``vision.classifier``); None: no diagnosis prompt
    findings: str | None = None
    #: what ``{findings}`` becomes when the classifier calls nothing
    no_findings: str = "none"
    #: the order the diagnosis line lists findings in (label names, e.g. the order reports name them:
    #: ``rrg3d.text.labeler.mention_order``); findings it leaves out follow in label order. None: label order;
    #: ``reports``: a training run fills in the order its training reports name findings, and the checkpoint keeps it
    findings_order: list[str] | str | None = None
    #: style-adaptive prompt (PETRG-3D): a block added to the instruction holding a normal-study report written in the
    #: study's hospital style (``{template}``); None: no style prompt. See :mod:`rrg3d.text.styles`.
    style: str | None = None
    #: the templates: style (hospital) → {"female" | "male" | "any": normal report}; a training run fills them from
    #: its training split when empty, and the checkpoint keeps them
    style_templates: dict[str, dict[str, str]] | None = None
    #: the style a study without one is written in; None: such a study is an error for a style-prompted model
    default_style: str | None = None

    def __post_init__(self) -> None:
        if self.instruction.count(IMAGE_TOKEN) != 1:
            raise ConfigError(f"prompt.instruction must contain {IMAGE_TOKEN} exactly once: {self.instruction!r}")
        if self.findings is not None and (self.findings.count("{findings}") != 1 or IMAGE_TOKEN in self.findings):
            raise ConfigError(f"prompt.findings must contain {{findings}} exactly once and no {IMAGE_TOKEN}: "
                              f"{self.findings!r}")
        if self.style is not None and (self.style.count("{template}") != 1 or IMAGE_TOKEN in self.style):
            raise ConfigError(f"prompt.style must contain {{template}} exactly once and no {IMAGE_TOKEN}: "
                              f"{self.style!r}")
        if self.style_templates is not None:
            for style, by_sex in self.style_templates.items():
                if not isinstance(by_sex, Mapping) or not by_sex or set(by_sex) - {"female", "male", "any"} \
                        or not all(isinstance(t, str) and t.strip() for t in by_sex.values()):
                    raise ConfigError(f"prompt.style_templates.{style} must map female / male / any to report text")
        if self.default_style is not None and self.style_templates is not None \
                and self.default_style not in self.style_templates:
            raise ConfigError(f"prompt.default_style {self.default_style!r} has no template "
                              f"(styles: {', '.join(sorted(self.style_templates))})")
        if isinstance(self.findings_order, str) and self.findings_order != FINDINGS_ORDER_FROM_REPORTS:
            raise ConfigError(f"prompt.findings_order must be a list of labels or {FINDINGS_ORDER_FROM_REPORTS!r}, "
                              f"got {self.findings_order!r}")
        if isinstance(self.findings_order, list):
            from rrg3d.text.labels import CTRATE_LABELS

            order = list(self.findings_order)
            unknown = sorted(set(order) - set(CTRATE_LABELS))
            if unknown or len(set(order)) != len(order):
                raise ConfigError(f"prompt.findings_order must name CT-RATE labels, each once: "
                                  f"{'unknown ' + ', '.join(unknown) if unknown else 'a label is named twice'}")

    def with_style(self, instruction: str, style: str | None, sex: str | None, *, where: str = "study") -> str:
        """``instruction`` followed by the style block with the template of ``style`` for ``sex`` (the style's
        ``any`` template when there is none for that sex, or the sex is unknown); unchanged without a style prompt."""
        if self.style is None:
            return instruction
        from rrg3d.text.styles import pick_template

        template = pick_template(self.style_templates or {}, style or self.default_style, sex, where=where)
        return f"{instruction}\n{self.style.replace('{template}', template)}"

    def with_findings(self, instruction: str, findings: list[str]) -> str:
        """``instruction`` followed by the diagnosis line for ``findings`` (unchanged without ``findings``)."""
        if self.findings is None:
            return instruction
        if isinstance(self.findings_order, list):  # "reports" before a training run filled it: label order
            rank = {name: i for i, name in enumerate(self.findings_order)}
            findings = sorted(findings, key=lambda name: rank.get(name, len(rank)))  # stable: the rest keep order
        called = ", ".join(name[0].lower() + name[1:] for name in findings) or self.no_findings
        return f"{instruction}\n{self.findings.replace('{findings}', called)}"


@dataclass
class GenerationSettings:
    """Decoding: ``temperature`` 0 is greedy; ``num_beams`` > 1 is beam search."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("generation.max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ConfigError("generation.temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("generation.top_p must be in (0, 1]")
        if self.num_beams < 1:
            raise ConfigError("generation.num_beams must be >= 1")
        if self.num_beams > 1 and self.temperature > 0:
            raise ConfigError("beam search (num_beams > 1) is deterministic: use temperature 0")
        if self.repetition_penalty <= 0:
            raise ConfigError("generation.repetition_penalty must be > 0")

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with the non-``None`` changes applied (CLI flags override the checkpoint's defaults)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class ModelConfig:
    """A complete report-generator architecture (what ``rrg3d.yaml`` of a checkpoint records)."""

    name: str
    vision: VisionConfig
    lm: LMConfig = field(default_factory=LMConfig)
    preprocess: str | dict[str, Any] = "ctrate"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> ModelConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a model config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {list(SECTIONS)}")
        if "vision" not in data or "name" not in data:
            raise ConfigError(f"{source}: a model config needs 'name' and 'vision'")
        from rrg3d.models.branches import normalize_branches

        vision_data = data["vision"] or {}
        if not isinstance(vision_data, Mapping):
            raise ConfigError(f"{source}: vision must be a mapping")
        vision = config_from_mapping(VisionConfig, normalize_branches(dict(vision_data), source),
                                     where=f"{source}: vision")
        for part in ("encoder", "compressor", "projector"):
            value = getattr(vision, part)
            if not isinstance(value, Mapping) or "name" not in value:
                raise ConfigError(f"{source}: vision.{part} must be a mapping with a 'name' key")
        if vision.classifier is not None:
            if not isinstance(vision.classifier, Mapping):
                raise ConfigError(f"{source}: vision.classifier must be a mapping (e.g. {{hidden: 0}}) or null")
            from rrg3d.models.classifier import ClassifierConfig

            config_from_mapping(ClassifierConfig, vision.classifier, where=f"{source}: vision.classifier")
        lm_data = dict(data.get("lm") or {})
        if vision.regions is not None:
            if not isinstance(vision.regions, Mapping):
                raise ConfigError(f"{source}: vision.regions must be a mapping ({{}}: Reg2RG's defaults) or null")
            from rrg3d.models.regions import RegionSettings

            regions = config_from_mapping(RegionSettings, vision.regions, where=f"{source}: vision.regions")
            available = int(lm_data.get("num_region_tokens", LMConfig.num_region_tokens))
            if len(regions.names) > available:
                raise ConfigError(f"{source}: vision.regions names {len(regions.names)} regions, the LM reserves "
                                  f"{available} region tokens (lm.num_region_tokens)")
        if lm_data.get("lora") is not None:
            lm_data["lora"] = config_from_mapping(LoraSettings, lm_data["lora"], where=f"{source}: lm.lora")
        preprocess = data.get("preprocess", "ctrate")
        if not isinstance(preprocess, (str, Mapping)):
            raise ConfigError(f"{source}: preprocess must be a preset name or a preset mapping")
        if vision.encoder.get("name") == "multiwindow":  # the stem must read the window the preset writes
            from rrg3d.models.encoders.multiwindow import check_preset_window

            check_preset_window(dict(vision.encoder), preprocess, where=source)
        check_input_channels(vision, preprocess, source)
        prompt = config_from_mapping(PromptConfig, data.get("prompt") or {}, where=f"{source}: prompt")
        if prompt.findings is not None and vision.classifier is None:
            raise ConfigError(f"{source}: prompt.findings (a diagnosis prompt) needs vision.classifier")
        return cls(
            name=str(data["name"]),
            description=str(data.get("description") or ""),
            vision=vision,
            lm=config_from_mapping(LMConfig, lm_data, where=f"{source}: lm"),
            preprocess=preprocess if isinstance(preprocess, str) else dict(preprocess),
            prompt=prompt,
            generation=config_from_mapping(GenerationSettings, data.get("generation") or {},
                                           where=f"{source}: generation"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "vision": config_to_dict(self.vision),
            "lm": config_to_dict(self.lm),
            "preprocess": self.preprocess,
            "prompt": config_to_dict(self.prompt),
            "generation": config_to_dict(self.generation),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def check_input_channels(vision: VisionConfig, preprocess: str | Mapping[str, Any], source: str) -> None:
    """The channels the vision tower reads (CT encoder + branches) must be those the preset gives: a PET/CT preset
    gives 2 (CT, PET) — a ``pet`` branch, or a 2-channel encoder (early fusion) — a CT preset 1."""
    from rrg3d.errors import PresetError
    from rrg3d.preprocess.presets import load_preset

    if vision.branches and vision.regions is not None:
        raise ConfigError(f"{source}: vision.branches (PET/CT) and vision.regions (Reg2RG) cannot be combined yet")
    if vision.encoder.get("name") == "multiwindow":
        return  # the stem makes its channels from one CT window (checked by check_preset_window)
    try:
        preset = load_preset(dict(preprocess) if isinstance(preprocess, Mapping) else preprocess)
    except (PresetError, OSError):
        return  # an unknown preset name is reported where the preset is used
    reads = int(vision.encoder.get("in_channels", 1))
    reads += sum(int(b.get("channels", 1)) for b in (vision.branches or {}).values())
    if reads != preset.channels:
        what = "CT and PET (a PET/CT preset)" if preset.pet is not None else "one CT channel"
        raise ConfigError(f"{source}: preset {preset.name!r} gives {what}, {preset.channels} channel(s); the vision "
                          f"tower reads {reads} (vision.encoder.in_channels + vision.branches)")


def _builtin_dir() -> Any:
    return resources.files("rrg3d") / "configs" / "models"


def list_model_configs() -> list[str]:
    """Names of the built-in architectures."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_model_config(name_or_path: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A built-in architecture by name, a YAML file, a mapping, or a config (returned as is)."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return ModelConfig.from_dict(name_or_path)
    text_name = str(name_or_path)
    builtin = _builtin_dir() / f"{text_name}.yaml"
    path = Path(text_name).expanduser()
    if builtin.is_file() and not path.exists():
        source, text = f"rrg3d:configs/models/{text_name}.yaml", builtin.read_text(encoding="utf-8")
    elif path.is_file():
        source, text = str(path), path.read_text(encoding="utf-8")
    else:
        raise ConfigError(f"no model config {text_name!r}: not a file and not one of {', '.join(list_model_configs())}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return ModelConfig.from_dict(data, source=source)
