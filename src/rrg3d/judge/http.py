"""A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, Ollama, …).

Standard library only (``urllib``). The API key is read from an environment variable (``RRG3D_JUDGE_API_KEY`` by
default) at call time and never stored or logged; without it no ``Authorization`` header is sent (local servers).
Timeouts, connection failures, HTTP 408/409/425/429 and 5xx are retried with exponential backoff (``Retry-After``
is honoured, capped); other HTTP errors and a body that is not a chat completion fail at once. Calls run in
``concurrency`` threads.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from rrg3d.judge.base import JudgeError, LLMJudge
from rrg3d.judge.cache import JudgeCache

RETRY_STATUS = frozenset({408, 409, 425, 429})
DEFAULT_KEY_ENV = "RRG3D_JUDGE_API_KEY"


def completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class OpenAIJudge(LLMJudge):
    """``OpenAIJudge(model, base_url)``: chat completions at ``base_url/chat/completions``."""

    def __init__(self, model: str, base_url: str, *, api_key_env: str = DEFAULT_KEY_ENV, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, concurrency: int = 4,
                 temperature: float = 0.0, max_tokens: int = 512, system_prompt: str | None = None,
                 cache: JudgeCache | str | os.PathLike[str] | None = None) -> None:
        super().__init__(cache=cache, concurrency=concurrency)
        if not model or not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"HTTP judge needs a model and an http(s) base URL (got {model!r}, {base_url!r})")
        self.model = model
        self.url = completions_url(base_url)
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.system_prompt = system_prompt
        self.id = f"http:{model}@{self.url}|temperature={self.temperature}|max_tokens={self.max_tokens}"
        if system_prompt:
            self.id += f"|system={system_prompt}"

    def _request(self, prompt: str) -> urllib.request.Request:
        messages: list[dict[str, str]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def complete(self, prompt: str) -> str:
        last = "no attempt"
        for attempt in range(self.retries + 1):
            wait: float | None = None
            try:
                with urllib.request.urlopen(self._request(prompt), timeout=self.timeout) as response:
                    payload = response.read()
                return self._content(payload)
            except urllib.error.HTTPError as exc:
                try:
                    detail = _snippet(exc.read() if exc.fp else b"")
                except OSError:
                    detail = ""
                last = f"HTTP {exc.code} from {self.url}" + (f": {detail}" if detail else "")
                if exc.code not in RETRY_STATUS and exc.code < 500:
                    raise JudgeError(last) from None
                wait = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except TimeoutError as exc:
                last = f"timed out after {self.timeout:g} s ({exc})"
            except urllib.error.URLError as exc:
                reason = exc.reason
                last = (f"timed out after {self.timeout:g} s" if isinstance(reason, TimeoutError)
                        else f"cannot reach {self.url} ({reason})")
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = f"connection to {self.url} failed ({type(exc).__name__}: {exc})"
            if attempt < self.retries:
                delay = self.backoff * (2**attempt)
                time.sleep(min(self.max_backoff, max(delay, wait or 0.0)))
        raise JudgeError(f"{last} (after {self.retries + 1} attempts)")

    def _content(self, payload: bytes) -> str:
        try:
            data: Any = json.loads(payload.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"malformed chat completion from {self.url} ({type(exc).__name__}): "
                             f"{_snippet(payload)}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise JudgeError(f"malformed chat completion from {self.url}: content is {type(content).__name__}")
        return content


def _snippet(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
