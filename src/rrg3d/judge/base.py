"""The judge interface: score generated reports against references with a prompt (``score`` or ``findings_match``).

A :class:`Judge` turns pairs ``(reference, candidate)`` into :class:`JudgeResult`\\ s. :class:`LLMJudge` does it for
anything that completes a prompt (``complete(prompt) -> str``): it builds the prompt, consults the cache, calls the
model for what is missing (``concurrency`` threads), parses the answer and stores the raw answer in the cache. A
failed call is an ``error`` result, an answer that cannot be parsed a ``parse_ok=False`` result — never an exception.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from rrg3d.errors import RRG3DError
from rrg3d.judge.cache import JudgeCache, cache_key
from rrg3d.judge.parsing import parse
from rrg3d.judge.prompts import build_prompt, canonical_kind, prompt_version

log = logging.getLogger(__name__)

KINDS = ("score", "findings_match")


class JudgeError(RRG3DError):
    """A judge could not be built or a call to it failed."""


@dataclasses.dataclass
class JudgeResult:
    """One judged pair: ``score`` (1–5 for ``score``, in [0, 1] for ``findings_match``) or why there is none."""

    score: float | None
    parse_ok: bool
    raw: str | None = None
    explanation: str | None = None
    counts: dict[str, Any] | None = None
    error: str | None = None
    parse_error: str | None = None
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Judge(abc.ABC):
    """Scores generated reports against references."""

    #: stable identity (part of cache keys): kind of judge, model, endpoint, generation settings
    id: str = "judge"

    @abc.abstractmethod
    def evaluate(self, references: Sequence[str], candidates: Sequence[str], kind: str = "score",
                 progress: bool = False) -> list[JudgeResult]:
        """One result per pair, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP sessions, models)."""


class LLMJudge(Judge):
    """A judge that asks a language model; subclasses implement :meth:`complete`."""

    def __init__(self, cache: JudgeCache | str | os.PathLike[str] | None = None, concurrency: int = 1) -> None:
        self.cache = cache if cache is None or isinstance(cache, JudgeCache) else JudgeCache(cache)
        self.concurrency = max(1, int(concurrency))
        self.calls = 0  # model calls made (not counting cache hits)
        self._calls_lock = threading.Lock()

    @abc.abstractmethod
    def complete(self, prompt: str) -> str:
        """The model's answer to one prompt; raise :class:`JudgeError` when it cannot be had."""

    def evaluate(self, references: Sequence[str], candidates: Sequence[str], kind: str = "score",
                 progress: bool = False) -> list[JudgeResult]:
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        kind = canonical_kind(kind)  # a deprecated alias shares the current name's version and cache keys
        version = prompt_version(kind)
        results: list[JudgeResult | None] = [None] * len(candidates)
        todo: list[tuple[int, str, str]] = []
        for i, (reference, candidate) in enumerate(zip(references, candidates, strict=True)):
            key = cache_key(self.id, version, reference or "", candidate or "")
            answer = self.cache.get(key) if self.cache is not None else None
            if answer is not None:
                results[i] = self._result(kind, answer, cached=True)
            else:
                todo.append((i, key, build_prompt(kind, reference, candidate)))
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"judge {kind}", unit="report", leave=False)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = {pool.submit(self._call, prompt): (i, key) for i, key, prompt in todo}
                for future in concurrent.futures.as_completed(futures):
                    i, key = futures[future]
                    answer, error = future.result()
                    if error is not None:
                        results[i] = JudgeResult(None, False, error=error)
                    else:
                        if self.cache is not None:
                            self.cache.put(key, answer, self.id, version)
                        results[i] = self._result(kind, answer)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [r if r is not None else JudgeResult(None, False, error="not judged") for r in results]

    def _call(self, prompt: str) -> tuple[str, str | None]:
        with self._calls_lock:
            self.calls += 1
        try:
            return self.complete(prompt), None
        except JudgeError as exc:
            return "", str(exc)
        except Exception as exc:  # a judge failure is a recorded result, never a crash
            log.debug("judge call failed", exc_info=True)
            return "", f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _result(kind: str, answer: str, cached: bool = False) -> JudgeResult:
        parsed = parse(kind, answer)
        return JudgeResult(parsed.score if parsed.ok else None, parsed.ok, raw=answer,
                           explanation=parsed.explanation, counts=parsed.counts,
                           parse_error=parsed.error, cached=cached)
