"""Judge prompts (rrg3d's own wording) and their versions.

* ``score`` — a 1–5 rating of a generated report against the reference on the four criteria 3D-CT-GPT++ grades
  (accuracy, completeness, clarity, consistency), answered as ``Explanation: …`` then ``Score: n``.
* ``findings_match`` — the matched-findings rubric: the judge counts clinically significant and insignificant errors
  in six categories (false finding, missing finding, wrong location, wrong severity, false comparison, missing
  comparison) and the number of matched findings; the score is matched / (matched + significant errors). The
  categories and the ratio follow GREEN (Ostmeier et al. 2024), but this is our prompt to whatever model judges: it
  is not the GREEN model, and its numbers are not GREEN scores (not comparable with GREEN values in papers).

``green`` is a deprecated alias of ``findings_match`` (a warning says so). It is resolved before any prompt is built
or any cache key is made, so both names share one prompt version and one cache entry per pair. Answers cached under
the former version string ``green-v1`` are not reused: they are asked again once under ``findings-match-v1``.

A prompt's version is part of every judge cache key: change the wording, bump the version.
"""

from __future__ import annotations

import warnings

from rrg3d.errors import RRG3DError

#: The six error categories of the findings-match rubric, in order (letters a–f; GREEN's categories).
ERROR_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("a", "false finding"),
    ("b", "missing finding"),
    ("c", "wrong location"),
    ("d", "wrong severity"),
    ("e", "false comparison"),
    ("f", "missing comparison"),
)

SCORE_VERSION = "score-v1"
FINDINGS_MATCH_VERSION = "findings-match-v1"

SCORE_TEMPLATE = """\
You are an experienced radiologist checking a chest CT report that was written by a computer program. \
Read the reference report, written by a radiologist for the same scan, and rate the generated report.

Take four things into account:
1. Accuracy: are the findings and diagnoses that the generated report states supported by the reference?
2. Completeness: does it include every important finding of the reference, or does it leave some out?
3. Clarity: is it easy to read, without repeated sentences, vague wording or grammar mistakes?
4. Consistency: do its descriptions and its conclusion agree with those of the reference?

Reference report:
{reference}

Generated report:
{candidate}

Answer in exactly this form and write nothing else:
Explanation: <two to four sentences about the four points>
Score: <one whole number from 1 (unusable) to 5 (as good as the reference)>
"""

_ERROR_LINES = "\n".join(f"({letter}) {name}: <number>" for letter, name in ERROR_CATEGORIES)

FINDINGS_MATCH_TEMPLATE = f"""\
You are an experienced radiologist comparing a chest CT report written by a computer program with the reference \
report that a radiologist wrote for the same scan. Count the ways in which the generated report differs from the \
reference.

Error types:
(a) false finding: the generated report describes a finding that the reference does not have
(b) missing finding: a finding of the reference is absent from the generated report
(c) wrong location: a finding is placed in the wrong organ, lobe or side
(d) wrong severity: a finding is given the wrong size, extent or severity
(e) false comparison: the generated report compares with an earlier examination where the reference does not
(f) missing comparison: the reference compares with an earlier examination and the generated report does not

Count every error once, either as clinically significant (it could change what happens to the patient) or as \
clinically insignificant (it would not). Also count the findings that both reports describe in the same way \
(matched findings).

Reference report:
{{reference}}

Generated report:
{{candidate}}

Answer with these lines only, with a whole number in place of each <number>:
[Clinically significant errors]
{_ERROR_LINES}
[Clinically insignificant errors]
{_ERROR_LINES}
[Matched findings]
<number>
"""

PROMPTS: dict[str, tuple[str, str]] = {
    "score": (SCORE_VERSION, SCORE_TEMPLATE),
    "findings_match": (FINDINGS_MATCH_VERSION, FINDINGS_MATCH_TEMPLATE),
}

#: Former prompt names still accepted, with a warning: old name → current name.
DEPRECATED_ALIASES: dict[str, str] = {"green": "findings_match"}


def canonical_kind(kind: str) -> str:
    """The current name of prompt ``kind``: a deprecated alias is mapped (with a ``FutureWarning``), any other name
    returned unchanged (unknown names are reported where the prompt is used)."""
    current = DEPRECATED_ALIASES.get(kind)
    if current is None:
        return kind
    warnings.warn(f"judge prompt {kind!r} is deprecated: it is rrg3d's matched-findings rubric, not the GREEN model "
                  f"(Ostmeier et al. 2024); use {current!r} (the same prompt; scores under 'judge.{current}')",
                  FutureWarning, stacklevel=3)
    return current


def prompt_version(kind: str) -> str:
    return _entry(kind)[0]


def build_prompt(kind: str, reference: str, candidate: str) -> str:
    """The full prompt of ``kind`` (``score`` or ``findings_match``) for one pair of reports."""
    _, template = _entry(kind)
    return template.format(reference=(reference or "").strip() or "(empty)",
                           candidate=(candidate or "").strip() or "(empty)")


def _entry(kind: str) -> tuple[str, str]:
    try:
        return PROMPTS[canonical_kind(kind)]
    except KeyError:
        raise RRG3DError(f"unknown judge prompt {kind!r} (known: {', '.join(PROMPTS)})") from None
