"""Judges that score generated reports against references: used by evaluation and by DPO preference building.

* :class:`~rrg3d.judge.http.OpenAIJudge` — any OpenAI-compatible chat-completions endpoint;
* :class:`~rrg3d.judge.local.LocalLMJudge` — a local Hugging Face causal LM (default: the packaged SmolLM2);
* :class:`~rrg3d.judge.rule.RuleJudge` — deterministic, from the abnormality labeler's agreement;
* :class:`~rrg3d.judge.label.LabelJudge` — deterministic and verifiable: the candidate's abnormality labels against
  the study's truth labels (or the reference's): one point off per hallucinated or omitted abnormality, or
  (``label:f1``) the study's F1 mapped to 1–5.

Prompts (:mod:`rrg3d.judge.prompts`): ``score`` (1–5 on accuracy, completeness, clarity, consistency) and
``findings_match`` (the matched-findings rubric: error counts in GREEN's six categories and matched findings, scored
matched / (matched + significant errors); our prompt, not the GREEN model; ``green`` is a deprecated alias).
:func:`make_judge` builds a judge from a command-line spec::

    rule                      the labeler-agreement judge
    label                     the truth-label judge (truth passed to evaluate(..., truths=...)): 5 − errors
    label:f1                  the same labels, scored 1 + 4 · F1 of the study (label:f0.5: Fβ, β = 0.5)
    http:MODEL@BASE_URL       e.g. http:gpt-4o@https://api.openai.com/v1 (key from $RRG3D_JUDGE_API_KEY)
    local                     the packaged SmolLM2-135M-Instruct
    local:PATH_OR_HUB_ID      any causal LM folder (or hub id where a hub is reachable)
"""

from __future__ import annotations

import os
import re
from typing import Any

from rrg3d.judge.base import KINDS, Judge, JudgeError, JudgeResult, LLMJudge
from rrg3d.judge.cache import JudgeCache, default_cache_path

__all__ = ["KINDS", "Judge", "JudgeCache", "JudgeError", "JudgeResult", "LLMJudge", "make_judge"]

_HTTP_SPEC = re.compile(r"^http:(?P<model>.+?)@(?P<url>https?://.+)$")


def make_judge(spec: str, *, cache: JudgeCache | str | os.PathLike[str] | bool | None = True, labeler: Any = None,
               concurrency: int = 4, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
               api_key_env: str = "RRG3D_JUDGE_API_KEY", max_new_tokens: int = 256) -> Judge:
    """A judge from a spec (see the module doc). ``cache=True`` uses ``~/.cache/rrg3d/judge_cache.sqlite``."""
    spec = (spec or "").strip()
    resolved: JudgeCache | str | os.PathLike[str] | None
    resolved = default_cache_path() if cache is True else (None if cache is False else cache)
    if spec == "rule":
        from rrg3d.judge.rule import RuleJudge

        return RuleJudge(labeler)
    if spec == "label" or spec.startswith("label:"):
        from rrg3d.judge.label import LabelJudge, check_mode

        mode = spec.partition(":")[2] or "errors"
        try:
            check_mode(mode)
        except ValueError as exc:
            raise JudgeError(f"{spec!r}: {exc}") from None
        return LabelJudge(labeler, mode=mode)
    if spec.startswith("http:"):
        match = _HTTP_SPEC.match(spec)
        if not match:
            raise JudgeError(f"bad HTTP judge spec {spec!r}: expected http:MODEL@BASE_URL, e.g. "
                             "http:gpt-4o@https://api.openai.com/v1")
        from rrg3d.judge.http import OpenAIJudge

        return OpenAIJudge(match["model"], match["url"], api_key_env=api_key_env, timeout=timeout, retries=retries,
                           backoff=backoff, concurrency=concurrency, cache=resolved)
    if spec == "local" or spec.startswith("local:"):
        from rrg3d.judge.local import LocalLMJudge

        target = spec.partition(":")[2] or None
        return LocalLMJudge(target, max_new_tokens=max_new_tokens, cache=resolved)
    raise JudgeError(f"unknown judge spec {spec!r} (use label, label:f1, label:f0.5, rule, http:MODEL@BASE_URL, "
                     "local or local:PATH)")
