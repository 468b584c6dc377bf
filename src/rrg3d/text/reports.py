"""Report text normalisation, section splitting and sentence splitting.

* :func:`normalize_report` — Unicode NFKC, typographic quotes and dashes to ASCII, control characters removed,
  runs of spaces collapsed (line breaks kept unless ``keep_newlines=False``).
* :func:`split_sections` — ``{"findings": ..., "impression": ...}`` (plus ``clinical_information``,
  ``technique``, ``comparison``, ``other``) from headers such as ``Findings:``, ``IMPRESSION`` or ``Conclusion:``.
* :func:`split_sentences` — sentences, robust to abbreviations (``e.g.``, ``approx.``, ``vs.``), decimals
  (``3.5 mm``), measurements (``3 x 4.5 cm``) and enumerations (``1. ... 2. ...``). Line breaks end a sentence
  unless the next line continues it (starts in lower case); straight double quotes standing between items
  (CT-RATE impressions separate their items with them) also end one.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["SECTION_NAMES", "normalize_report", "split_clauses", "split_sections", "split_sentences"]

_TRANSLATE = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
    "\u00d7": "x", "\u2022": "-", "\u00b7": "-", "\u2026": "...", "\u00a0": " ", "\t": " ",
})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize_report(text: str | None, keep_newlines: bool = True) -> str:
    """Canonical form of a report: NFKC, ASCII quotes/dashes, no control characters, collapsed spaces."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).translate(_TRANSLATE)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"[ \u200b]+", " ", text)
    if keep_newlines:
        text = re.sub(r" *\n *", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
    else:
        text = re.sub(r"\s+", " ", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------- sections

#: Canonical section name → header words that open it.
SECTION_NAMES: dict[str, tuple[str, ...]] = {
    "clinical_information": ("clinical information", "clinical history", "history", "indication", "indications"),
    "technique": ("technique", "protocol"),
    "comparison": ("comparison",),
    "findings": ("findings", "finding", "report"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "summary", "opinion", "result"),
}
_HEADER_TO_SECTION = {word: name for name, words in SECTION_NAMES.items() for word in words}
_HEADER_WORDS = "|".join(sorted((re.escape(w) for w in _HEADER_TO_SECTION), key=len, reverse=True))
# A header: either "Word:" (any case) at a line/sentence start, or an all-caps word on its own / before a colon.
_HEADER = re.compile(
    rf"(?:(?<=^)|(?<=\n)|(?<=[.!?]\s))\s*(?P<a>{_HEADER_WORDS})\s*:"
    rf"|(?P<b>\b(?:{_HEADER_WORDS.upper()})\b)(?:\s*:|\s*\n|(?=\s+[A-Z0-9]))",
    re.IGNORECASE,
)


def _header_hits(text: str) -> list[tuple[int, int, str]]:
    hits = []
    for match in _HEADER.finditer(text):
        word = match.group("a") or match.group("b")
        if match.group("b") and not word.isupper():  # bare header words only count in capitals
            continue
        hits.append((match.start(), match.end(), _HEADER_TO_SECTION[word.lower()]))
    return hits


def split_sections(text: str | None) -> dict[str, str]:
    """Sections of a report keyed by canonical name (text before the first header goes to ``other``).

    A report without any header is all ``findings``. A section that appears twice is joined with a space.
    """
    text = normalize_report(text)
    if not text:
        return {}
    hits = _header_hits(text)
    if not hits:
        return {"findings": text}
    sections: dict[str, str] = {}

    def add(name: str, body: str) -> None:
        body = body.strip(" \n:-")
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body

    add("other", text[: hits[0][0]])
    for index, (_, end, name) in enumerate(hits):
        stop = hits[index + 1][0] if index + 1 < len(hits) else len(text)
        add(name, text[end:stop])
    return sections


# -------------------------------------------------------------------------------------------------- sentences

#: Tokens ending in "." that do not end a sentence (compared lower case, without the final dot).
ABBREVIATIONS = frozenset({
    "e.g", "i.e", "eg", "ie", "vs", "approx", "appr", "cf", "etc", "dr", "prof", "mr", "mrs", "ms", "fig", "figs",
    "no", "nos", "nr", "ref", "resp", "incl", "max", "min", "avg", "ca", "cca", "st", "sr", "jr", "al",
    "sec", "ser", "img", "ima", "im", "lt", "rt", "bil", "bilat", "ant", "post", "sup", "inf", "lat", "med", "sag",
    "cor", "ax", "mid", "prox", "dist", "seg", "segs", "l", "r", "u.s", "w", "wk", "yr", "yrs", "mo", "pt", "pts",
    "hx", "dx", "ddx", "s/p", "esp", "vol", "dept",
})
#: Titles, always followed by a capitalised name: never a sentence end.
_TITLES = frozenset({"dr", "prof", "mr", "mrs", "ms", "st"})
_BOUNDARY = re.compile(r"[.!?]+(?=[\s\"')\]]|$)")
_ENUM_START = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|\(?[a-zA-Z][)]|[-*+]|#)\s+")
_INLINE_ENUM = re.compile(r"(?<=\s)(?=\(?\d{1,2}[.)]\s+[A-Z])")
_LEADING_HEADER = re.compile(rf"^(?:{_HEADER_WORDS})\s*:\s*|^(?:{_HEADER_WORDS.upper()})\b\s*:?\s*(?=[A-Z0-9]|$)",
                             re.IGNORECASE)
_QUOTE_SEPARATOR = re.compile(r'(?:^|(?<=\s)|(?<=[.!?]))"(?=\s|$)|(?:^|(?<=\s))"(?=[A-Z])')


def _split_lines(text: str) -> list[str]:
    """Join hard-wrapped lines; a new line starts a new block unless it begins in lower case."""
    blocks: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            blocks.append("")
            continue
        if blocks and blocks[-1] and line[0].islower() and not blocks[-1].endswith((".", ":", ";")):
            blocks[-1] = f"{blocks[-1]} {line}"
        else:
            blocks.append(line)
    return [block for block in blocks if block]


def _previous_token(text: str, end: int) -> str:
    start = end
    while start > 0 and not text[start - 1].isspace() and text[start - 1] not in "(\"'":
        start -= 1
    return text[start:end]


def _split_block(block: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(block):
        end = match.end()
        token = _previous_token(block, match.start())
        after = block[end:].lstrip(" \"')]")
        next_char = after[:1]
        current = block[start:match.start()].strip()
        if match.group() == "." and token:
            low = token.lower()
            if low in _TITLES and next_char.isupper():
                continue
            if (low in ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+[a-z]", low)) and (not next_char or
                                                                                     not next_char.isupper()
                                                                                     or low in {"e.g", "i.e"}):
                continue
            if re.fullmatch(r"\(?\d{1,2}", token) and current in {token, ""}:  # "1." opening an enumerated item
                continue
            if re.fullmatch(r"\d{1,2}", token) and next_char.islower():  # "the 5. rib" (ordinal)
                continue
            if len(token) == 1 and token.isalpha() and token.isupper() and next_char.isupper():  # initials
                continue
        piece = block[start:end].strip()
        if piece:
            sentences.append(piece)
        start = end
    tail = block[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _strip_header(sentence: str) -> str:
    """Remove a leading section header ("Findings:", "IMPRESSION") from a sentence."""
    match = _LEADING_HEADER.match(sentence)
    if match and (match.group().rstrip().endswith(":") or match.group().strip().isupper()):
        return sentence[match.end():]
    return sentence


def split_sentences(text: str | None) -> list[str]:
    """Sentences of a report (or section), in order, stripped; section headers and enumeration markers removed."""
    text = normalize_report(text)
    if not text:
        return []
    out: list[str] = []
    for block in _split_lines(text):
        for part in _QUOTE_SEPARATOR.split(block):
            for item in _INLINE_ENUM.split(part):
                for sentence in _split_block(item):
                    sentence = _strip_header(sentence)
                    sentence = _ENUM_START.sub("", sentence).strip(" \"")
                    if sentence and re.search(r"[A-Za-z0-9]", sentence):
                        out.append(sentence)
    return out


# ---------------------------------------------------------------------------------------------------- clauses

_CLAUSE_BREAK = re.compile(
    r"\s*;\s*|:\s+|\s*,?\s+\b(?:but|however|although|though|whereas|while|yet|except(?: for)?|apart from|"
    r"other than|besides|nevertheless|on the other hand)\b\s*,?\s*",
    re.IGNORECASE,
)


def split_clauses(sentence: str) -> list[tuple[int, str]]:
    """Clauses of a sentence (split at semicolons, colons and contrastive words) as ``(offset, text)``."""
    pieces: list[tuple[int, str]] = []
    start = 0
    for match in _CLAUSE_BREAK.finditer(sentence):
        if match.start() > start:
            pieces.append((start, sentence[start:match.start()]))
        start = match.end()
    if start < len(sentence):
        pieces.append((start, sentence[start:]))
    return pieces
