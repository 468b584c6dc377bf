"""Judge prompts (rrg3d's own wording) and their versions.

* ``score`` — a 1–5 rating of a generated report against the reference on the four criteria 3D-CT-GPT++ grades
  (accuracy, completeness, clarity, consistency), answered as ``Explanation: …`` then ``Score: n``.
* ``green`` — GREEN-style error counting: clinically significant and insignificant errors in six categories
  (false finding, missing finding, wrong location, wrong severity, false comparison, missing comparison) and the
  number of matched findings.

A prompt's version is part of every judge cache key: change the wording, bump the version.
"""

from __future__ import annotations

from rrg3d.errors import RRG3DError

#: The six GREEN error categories, in order (letters a–f).
GREEN_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("a", "false finding"),
    ("b", "missing finding"),
    ("c", "wrong location"),
    ("d", "wrong severity"),
    ("e", "false comparison"),
    ("f", "missing comparison"),
)

SCORE_VERSION = "score-v1"
GREEN_VERSION = "green-v1"

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

_GREEN_LINES = "\n".join(f"({letter}) {name}: <number>" for letter, name in GREEN_CATEGORIES)

GREEN_TEMPLATE = f"""\
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
{_GREEN_LINES}
[Clinically insignificant errors]
{_GREEN_LINES}
[Matched findings]
<number>
"""

PROMPTS: dict[str, tuple[str, str]] = {
    "score": (SCORE_VERSION, SCORE_TEMPLATE),
    "green": (GREEN_VERSION, GREEN_TEMPLATE),
}


def prompt_version(kind: str) -> str:
    return _entry(kind)[0]


def build_prompt(kind: str, reference: str, candidate: str) -> str:
    """The full prompt of ``kind`` (``score`` or ``green``) for one pair of reports."""
    _, template = _entry(kind)
    return template.format(reference=(reference or "").strip() or "(empty)",
                           candidate=(candidate or "").strip() or "(empty)")


def _entry(kind: str) -> tuple[str, str]:
    try:
        return PROMPTS[kind]
    except KeyError:
        raise RRG3DError(f"unknown judge prompt {kind!r} (known: {', '.join(PROMPTS)})") from None
