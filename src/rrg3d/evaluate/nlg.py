"""Natural-language-generation metrics: the pycocoevalcap ("coco") set, and distinctly named extras.

**coco** — exactly what pycocoevalcap 1.2 computes when it is called the usual way (``PTBTokenizer`` on references and
candidates, then ``Bleu(4)``, ``Meteor()``, ``Rouge()``, ``Cider()``), one reference per sample:

* tokenisation: pycocoevalcap's Stanford PTB tokenizer jar with its flags (``-preserveLines -lowerCase``) and its
  punctuation list. We run the jar ourselves so that the temporary file goes to the system temp folder and its
  stderr chatter is captured; line-break characters inside a report are turned into spaces first (pycocoevalcap
  would silently misalign every later sample on them);
* ``bleu_1`` … ``bleu_4``: pycocoevalcap's ``BleuScorer`` (corpus-level, "closest" reference length);
* ``meteor``: METEOR 1.5 (Java) through :mod:`rrg3d.evaluate.meteor` — one process per batch, same scores;
* ``rouge_l``: ROUGE-L with β = 1.2, mean over samples, as ``Rouge.calc_score`` — with a bit-parallel LCS that
  returns the same integer as pycocoevalcap's dynamic programme, hundreds of times faster;
* ``cider``: pycocoevalcap's ``CiderScorer`` (CIDEr-D: clipped n-gram tf-idf, Gaussian length penalty σ = 6, ×10,
  document frequencies from the reference set).

Without Java the PTB tokenizer and METEOR 1.5 cannot run: the coco BLEU/ROUGE-L/CIDEr are then computed on a Python
approximation of the tokenizer (``implementation["coco"]["tokenizer"]`` says so and a warning is added) and
``coco["meteor"]`` is ``None`` — the NLTK METEOR is reported only as ``meteor_nltk``, never under the coco name.

**extra** — other implementations the papers use, each under its own name:
``rouge_score`` (Google's package: ROUGE-1/2/L F-measure, no stemming, mean over samples; its ROUGE-L table
is replaced by the same bit-parallel LCS), ``sacrebleu`` (corpus BLEU
on the 0–100 scale, default 13a tokenisation, with its signature) and ``meteor_nltk`` (NLTK's METEOR with WordNet 3.0
from :mod:`rrg3d.evaluate.wordnet`, on word/punctuation tokens, mean over samples).

**Chinese** (``lang="zh"``; reports such as AutoPET-RG-Lym's) — scored per character with :func:`zh_tokens`: after
NFKC normalisation (full-width letters, digits and punctuation become ASCII) and lower-casing, each CJK character is
one token, each run of Latin letters/digits is one word (a decimal point between digits stays inside: ``12.3``,
``suvmax``, ``3.2cm``), and punctuation (Unicode category P, ASCII and CJK: ``。，、；：（）【】“”/-`` ...) is
dropped as the PTB punctuation list drops it on the English path, except ``%`` and ``‰``, which stay as tokens like the
symbols (``×``, ``~``, ``±``, ``°``, ``+``, ``<``). Whitespace never matters. The pycocoevalcap scorers then run on the
space-joined tokens: ``coco`` BLEU-1..4, ROUGE-L and CIDEr-D are pycocoevalcap's own scorers on character tokens (no
Java, no PTB tokenizer). ``coco["meteor"]`` is ``None``: METEOR 1.5's resources are English. METEOR is reported as
``extra.meteor_nltk``: NLTK's ``meteor_score`` on the same tokens with exact and Porter-stem matching only; its
WordNet synonym stage is switched off, since WordNet synonymy does not apply to Chinese (one warning says so).
``extra.rouge_score`` (ROUGE-1/2/L) uses the rouge-score package with the same character tokenizer (its own drops
every non-ASCII character), and ``extra.sacrebleu`` uses sacreBLEU's ``zh`` tokenizer (signature ``tok:zh``). The
English labeler, keyword region rules and word counts do not apply: :func:`language_plan` tells the runner what to
skip and how to count report lengths.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import re
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rrg3d.errors import RRG3DError
from rrg3d.evaluate.bootstrap import Statistic, mean_statistic
from rrg3d.evaluate.meteor import MeteorError, additive_stats, find_java, meteor_from_stats, parse_stats, shared_meteor

log = logging.getLogger(__name__)

COCO_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
ROUGE_SCORE_KEYS = ("rouge1", "rouge2", "rougeL")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9
#: Languages :func:`nlg_metrics` scores: ``en`` (pycocoevalcap's PTB path) and ``zh`` (per character).
LANGS = ("en", "zh")


@dataclasses.dataclass
class NLGResult:
    """Corpus values, per-sample values and bootstrap statistics of the NLG metrics."""

    coco: dict[str, float | None] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: flat metric name (``coco.bleu_4``, ``extra.rouge_score.rouge1`` …) → per-sample values
    per_sample: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: flat metric name → :class:`Statistic` for bootstrap CIs
    statistics: dict[str, Statistic] = dataclasses.field(default_factory=dict)
    implementation: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: wall seconds per step (METEOR 1.5 runs beside the others: its time is from submission to its last answer)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    #: what the ``meanwhile`` callable of :func:`nlg_metrics` returned
    meanwhile: Any = None


# --------------------------------------------------------------------------------------------------- tokenisation

def one_line(text: str | None) -> str:
    """A report on one line (line-break characters become spaces)."""
    return _LINE_BREAKS.sub(" ", text or "")


def ptb_tokenize(texts: Sequence[str], java: str = "java") -> list[str]:
    """pycocoevalcap's PTB tokenisation (same jar, flags and punctuation removal) of each text."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    lines = [one_line(t) for t in texts]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    if not todo:
        return out
    with tempfile.TemporaryDirectory(prefix="rrg3d-ptb-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "wb") as handle:
            handle.write("\n".join(lines[i] for i in todo).encode("utf-8"))
        try:
            result = subprocess.run([java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                     "-lowerCase", path], capture_output=True, check=False)
        except OSError as exc:
            raise RRG3DError(f"cannot run Java for the PTB tokenizer ({exc.strerror or exc})") from exc
    if result.returncode != 0:
        tail = result.stderr.decode("utf-8", "replace").strip()[-300:]
        raise RRG3DError(f"the PTB tokenizer failed (exit {result.returncode}): {tail}")
    tokenized = result.stdout.decode("utf-8").split("\n")
    if len(tokenized) < len(todo):
        raise RRG3DError(f"the PTB tokenizer returned {len(tokenized)} lines for {len(todo)} texts")
    for i, line in zip(todo, tokenized[: len(todo)], strict=True):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w not in punctuation)
    return out


_APPROX_TOKEN = re.compile(r"\w+(?:[-'./]\w+)*|\.\.\.|--|[^\w\s]")
_APPROX_MAP = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-", '"': "''"}


def approx_ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """A Python approximation of :func:`ptb_tokenize` for machines without Java (not pycocoevalcap-identical)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    punctuation = set(PUNCTUATIONS)
    out = []
    for text in texts:
        tokens = (_APPROX_MAP.get(t, t) for t in _APPROX_TOKEN.findall(one_line(text).lower()))
        out.append(" ".join(t for t in tokens if t not in punctuation))
    return out


#: CJK scripts scored one character per token: radicals, CJK symbols' iteration marks, kana, bopomofo, Hangul
#: syllables, and the unified / compatibility ideographs with their extensions.
_CJK_RANGES = ("\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3038-\u303b\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
               "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f")
_ZH_TOKEN = re.compile(rf"[{_CJK_RANGES}]|(?:(?![{_CJK_RANGES}])[^\W_]|(?<=\d)\.(?=\d))+|\S")
#: Punctuation kept as tokens on the Chinese path (they carry meaning in numbers, as PTB keeps them in English).
_ZH_KEPT_PUNCTUATION = frozenset("%‰")


def zh_tokens(text: str | None) -> list[str]:
    """Character tokens of a Chinese report (see the module doc): CJK characters, Latin/digit words, symbols."""
    normalized = unicodedata.normalize("NFKC", text or "").lower()
    return [token for token in _ZH_TOKEN.findall(normalized)
            if len(token) > 1 or token in _ZH_KEPT_PUNCTUATION or not unicodedata.category(token).startswith("P")]


def zh_tokenize(texts: Sequence[str | None]) -> list[str]:
    """:func:`zh_tokens` of each text, space-joined (the input of the pycocoevalcap scorers)."""
    return [" ".join(zh_tokens(text)) for text in texts]


def check_lang(lang: str) -> str:
    """``lang`` lower-cased when it is one of :data:`LANGS`; otherwise an :class:`RRG3DError`."""
    key = str(lang).strip().lower()
    if key not in LANGS:
        raise RRG3DError(f"unknown report language {lang!r} (known: {', '.join(LANGS)})")
    return key


@dataclasses.dataclass(frozen=True)
class LanguagePlan:
    """What an evaluation does for one report language beyond NLG (see :func:`language_plan`)."""

    lang: str
    #: whether the English-rule parts run: the 18-label labeler (CE, region CE, rule/label judges) and the region
    #: keyword rules
    english_rules: bool
    #: unit of the report lengths: ``words`` (whitespace-separated) or ``characters`` (:func:`zh_tokens`)
    length_unit: str
    #: notes for ``metrics.json`` warnings about the parts left out
    skipped: tuple[str, ...] = ()

    def lengths(self, texts: Sequence[str | None]) -> np.ndarray:
        """Length of each report in :attr:`length_unit`."""
        if self.length_unit == "characters":
            return np.array([len(zh_tokens(t)) for t in texts], dtype=np.float64)
        return np.array([len((t or "").split()) for t in texts], dtype=np.float64)


def language_plan(lang: str) -> LanguagePlan:
    """The runner's plan for ``lang``: English keeps everything; Chinese skips the English-rule metrics."""
    lang = check_lang(lang)
    if lang == "en":
        return LanguagePlan("en", english_rules=True, length_unit="words")
    return LanguagePlan("zh", english_rules=False, length_unit="characters", skipped=(
        "lang zh: clinical efficacy (CE) is not computed: the abnormality labeler reads English reports",
        "lang zh: region CE and region recognition from report text are not computed (English labeler and keyword "
        "rules); recognition from region reports or a region-guided model's slots is still scored",
        "lang zh: report lengths are counted in characters (CJK characters, Latin/digit words, symbols)",
    ))


# --------------------------------------------------------------------------------------------------- coco scorers

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, exact)."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        m = masks.get(token)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def coco_rouge_l(candidate: str, reference: str, beta: float = 1.2) -> float:
    """pycocoevalcap's ``Rouge.calc_score`` for one candidate and one reference (tokens split on single spaces)."""
    token_c = candidate.split(" ")
    token_r = reference.split(" ")
    lcs = lcs_length(token_r, token_c)
    prec = lcs / float(len(token_c))
    rec = lcs / float(len(token_r))
    if prec != 0 and rec != 0:
        return ((1 + beta**2) * prec * rec) / float(rec + beta**2 * prec)
    return 0.0


def coco_bleu(references: Sequence[str], candidates: Sequence[str]) -> tuple[list[float], np.ndarray, np.ndarray]:
    """pycocoevalcap BLEU-1..4: corpus scores, per-sample scores ``(4, n)`` and statistics ``(n, 10)``."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for candidate, reference in zip(candidates, references, strict=True):
        scorer += (candidate, [reference])
    score, per_sample = scorer.compute_score(option="closest", verbose=0)
    stats = np.zeros((len(candidates), 10))
    for i, comps in enumerate(scorer.ctest):
        testlen = comps["testlen"]
        reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]
        stats[i] = [testlen, reflen, *comps["guess"], *comps["correct"]]
    return [float(s) for s in score], np.asarray(per_sample, dtype=np.float64), stats


def bleu_from_stats(sums: np.ndarray, n: int, order: int = 4) -> np.ndarray:
    """pycocoevalcap's corpus BLEU-``order`` from summed statistics ``(..., 10)``."""
    s = np.asarray(sums, dtype=np.float64)
    ratios = (s[..., 6:6 + order] + _BLEU_TINY) / (s[..., 2:2 + order] + _BLEU_SMALL)
    bleu = np.prod(ratios, axis=-1) ** (1.0 / order)
    ratio = (s[..., 0] + _BLEU_TINY) / (s[..., 1] + _BLEU_SMALL)
    with np.errstate(over="ignore", divide="ignore"):
        penalty = np.where(ratio < 1, np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), 1.0)
    return bleu * penalty


def coco_cider(references: Sequence[str], candidates: Sequence[str]) -> tuple[float, np.ndarray]:
    """pycocoevalcap's CIDEr-D: corpus score and per-sample scores."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, reference in zip(candidates, references, strict=True):
        scorer += (candidate, [reference])
    score, per_sample = scorer.compute_score()
    return float(score), np.asarray(per_sample, dtype=np.float64)


def _meteor_reduce(sums: np.ndarray, n: int) -> np.ndarray:
    return meteor_from_stats(sums)


# ------------------------------------------------------------------------------------------------------- extras

def _rouge_score(references: Sequence[str], candidates: Sequence[str], progress: bool) -> dict[str, np.ndarray]:
    """rouge-score F-measures: ROUGE-1/2 from ``RougeScorer``; ROUGE-L with the package's tokenizer and F-measure
    but :func:`lcs_length` instead of its Python LCS table (same values, tested; ~10x faster on 200-word reports)."""
    from rouge_score import rouge_scorer, scoring, tokenizers

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=False)
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
    values = {key: np.zeros(len(candidates)) for key in ROUGE_SCORE_KEYS}
    pairs = zip(references, candidates, strict=True)
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, total=len(candidates), desc="rouge-score", unit="pair", leave=False)
    for i, (reference, candidate) in enumerate(pairs):
        scores = scorer.score(reference, candidate)
        values["rouge1"][i] = scores["rouge1"].fmeasure
        values["rouge2"][i] = scores["rouge2"].fmeasure
        target, prediction = tokenizer.tokenize(reference), tokenizer.tokenize(candidate)
        if target and prediction:
            lcs = lcs_length(target, prediction)
            values["rougeL"][i] = scoring.fmeasure(lcs / len(prediction), lcs / len(target))
    return values


def _sacrebleu_reduce(sums: np.ndarray, n: int) -> np.ndarray:
    from sacrebleu.metrics.bleu import BLEU

    flat = np.asarray(sums, dtype=np.float64).reshape(-1, sums.shape[-1])
    out = np.array([BLEU.compute_bleu(correct=[int(v) for v in row[2:6]], total=[int(v) for v in row[6:10]],
                                      sys_len=int(row[0]), ref_len=int(row[1])).score for row in flat])
    return out.reshape(np.shape(sums)[:-1])


def _sacrebleu(references: Sequence[str], candidates: Sequence[str]) -> tuple[float, str, Statistic | None]:
    from sacrebleu.metrics.bleu import BLEU

    bleu = BLEU()
    score = bleu.corpus_score(list(candidates), [list(references)])
    statistic = None
    try:  # per-sample sufficient statistics (sacrebleu's own, as its bootstrap uses them)
        stats = np.asarray(bleu._extract_corpus_statistics(list(candidates), [list(references)]), dtype=np.float64)
        if stats.shape == (len(candidates), 10):
            statistic = Statistic(stats, _sacrebleu_reduce)
    except Exception as exc:  # pragma: no cover - only if sacrebleu's internals change
        log.warning("sacreBLEU statistics unavailable for bootstrap: %s", exc)
    return float(score.score), bleu.get_signature().format(), statistic


_NLTK_TOKEN = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def nltk_tokens(text: str) -> list[str]:
    """Word and punctuation tokens (close to ``nltk.word_tokenize``, which needs the punkt data)."""
    return _NLTK_TOKEN.findall(text or "")


def meteor_nltk_scores(references: Sequence[str], candidates: Sequence[str], progress: bool = False) -> np.ndarray:
    """NLTK's METEOR per sample (WordNet 3.0 made available offline by :func:`ensure_wordnet`)."""
    from rrg3d.evaluate.wordnet import ensure_wordnet

    ensure_wordnet()
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    wordnet.ensure_loaded()
    pairs = zip(references, candidates, strict=True)
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, total=len(candidates), desc="METEOR (NLTK)", unit="pair", leave=False)
    return np.array([meteor_score([nltk_tokens(r)], nltk_tokens(c), wordnet=wordnet) for r, c in pairs],
                    dtype=np.float64)


# ------------------------------------------------------------------------------------------------------ together

def nlg_metrics(references: Sequence[str], candidates: Sequence[str], *, coco: bool = True, extra: bool = True,
                java: str | bool | None = True, progress: bool = False,
                meanwhile: Callable[[], Any] | None = None, lang: str = "en") -> NLGResult:
    """All NLG metrics of ``candidates`` against ``references`` (one reference each, same order).

    ``java``: ``True`` finds ``java`` on PATH, a string is the executable, ``False``/``None`` runs without Java.
    METEOR 1.5 runs in its Java process while the Python metrics are computed; ``meanwhile`` (e.g. labelling for
    CE) is called after them, still before waiting for METEOR, and its return value lands in ``result.meanwhile``.
    ``lang``: ``"en"`` (the pycocoevalcap path above) or ``"zh"`` (per character, no Java; see the module doc).
    """
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if check_lang(lang) == "zh":
        return _nlg_zh(references, candidates, coco=coco, extra=extra, progress=progress, meanwhile=meanwhile)
    result = NLGResult()
    started = time.perf_counter()
    java_exe = find_java() if java is True else (java or None)
    n = len(candidates)
    meteor_job = None
    executor = None
    if coco and n:
        meteor_proc = None
        if java_exe:
            try:
                meteor_proc = shared_meteor(java_exe)  # the JVM loads while we tokenize
            except MeteorError as exc:
                result.warnings.append(f"METEOR 1.5 unavailable: {exc}")
        tokenizer = "PTBTokenizer (pycocoevalcap's Stanford CoreNLP 3.4.1 jar, Java)"
        start = time.perf_counter()
        try:
            if not java_exe:
                raise RRG3DError("Java not found")
            tokens = ptb_tokenize(list(references) + list(candidates), java_exe)
        except RRG3DError as exc:
            tokens = approx_ptb_tokenize(list(references) + list(candidates))
            tokenizer = "python approximation of PTBTokenizer (NOT pycocoevalcap-identical)"
            result.warnings.append(f"coco tokenisation fell back to a Python approximation: {exc}; coco BLEU, "
                                   "ROUGE-L and CIDEr are close to but not identical with pycocoevalcap")
            meteor_proc = None
        result.timings["coco.tokenize"] = time.perf_counter() - start
        ref_tok, cand_tok = tokens[:n], tokens[n:]
        if meteor_proc is not None:
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            meteor_job = executor.submit(_timed, meteor_proc.score, [[r] for r in ref_tok], cand_tok, progress)
        elif not any("METEOR 1.5" in w for w in result.warnings):
            reason = "Java not found" if not java_exe else "the PTB tokenizer failed"
            result.warnings.append(f"{reason}: coco METEOR (1.5, Java) is not computed; the NLTK METEOR is "
                                   "reported separately as extra.meteor_nltk")
        result.implementation["coco"] = {"tokenizer": tokenizer, "bleu": "pycocoevalcap BleuScorer (closest)",
                                         "meteor": "METEOR 1.5 jar (-l en -norm)" if meteor_job else None,
                                         "rouge_l": "pycocoevalcap Rouge (beta 1.2), bit-parallel LCS",
                                         "cider": "pycocoevalcap CiderScorer (CIDEr-D, sigma 6)"}
        try:
            _coco_python(result, ref_tok, cand_tok)
            if extra:
                _extras(result, references, candidates, progress)
            if meanwhile is not None:
                result.meanwhile = meanwhile()
                meanwhile = None
        finally:
            if meteor_job is not None:
                _collect_meteor(result, meteor_job)
            if executor is not None:
                executor.shutdown(wait=True)
    elif coco:
        result.coco = dict.fromkeys(COCO_KEYS)
    if extra and not (coco and n):
        _extras(result, references, candidates, progress)
    if meanwhile is not None:
        result.meanwhile = meanwhile()
    result.timings["total"] = time.perf_counter() - started
    return result


def _timed(function: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return function(*args), time.perf_counter() - start


def _coco_python(result: NLGResult, ref_tok: list[str], cand_tok: list[str]) -> None:
    start = time.perf_counter()
    bleu, bleu_per_sample, bleu_stats = coco_bleu(ref_tok, cand_tok)
    result.timings["coco.bleu"] = time.perf_counter() - start
    for k in range(4):
        name = f"bleu_{k + 1}"
        result.coco[name] = bleu[k]
        result.per_sample[f"coco.{name}"] = bleu_per_sample[k]
        result.statistics[f"coco.{name}"] = Statistic(bleu_stats, functools.partial(bleu_from_stats, order=k + 1))
    result.coco["meteor"] = None
    start = time.perf_counter()
    rouge = np.array([coco_rouge_l(c, r) for r, c in zip(ref_tok, cand_tok, strict=True)], dtype=np.float64)
    result.timings["coco.rouge_l"] = time.perf_counter() - start
    result.coco["rouge_l"] = float(np.mean(rouge))
    result.per_sample["coco.rouge_l"] = rouge
    result.statistics["coco.rouge_l"] = mean_statistic(rouge)
    start = time.perf_counter()
    cider, cider_per_sample = coco_cider(ref_tok, cand_tok)
    result.timings["coco.cider"] = time.perf_counter() - start
    result.coco["cider"] = cider
    result.per_sample["coco.cider"] = cider_per_sample
    result.statistics["coco.cider"] = mean_statistic(
        cider_per_sample, method="mean of per-sample CIDEr-D; document frequencies fixed from all references")


def _collect_meteor(result: NLGResult, job: concurrent.futures.Future) -> None:
    start = time.perf_counter()
    try:
        (corpus, per_segment, stats), seconds = job.result()
        result.timings["coco.meteor"] = seconds
        result.timings["coco.meteor_wait"] = time.perf_counter() - start
    except MeteorError as exc:
        result.warnings.append(f"coco METEOR 1.5 failed: {exc}")
        result.implementation["coco"]["meteor"] = None
        return
    result.coco["meteor"] = corpus
    result.per_sample["coco.meteor"] = np.asarray(per_segment, dtype=np.float64)
    result.statistics["coco.meteor"] = Statistic(additive_stats(parse_stats(stats)), _meteor_reduce)


def _extras(result: NLGResult, references: Sequence[str], candidates: Sequence[str], progress: bool) -> None:
    refs = [one_line(r) for r in references]
    cands = [one_line(c) for c in candidates]
    if not cands:
        result.extra = {"rouge_score": dict.fromkeys(ROUGE_SCORE_KEYS), "sacrebleu": None, "meteor_nltk": None}
        return
    start = time.perf_counter()
    rouge = _rouge_score(refs, cands, progress)
    result.timings["extra.rouge_score"] = time.perf_counter() - start
    result.extra["rouge_score"] = {key: float(np.mean(values)) for key, values in rouge.items()}
    for key, values in rouge.items():
        result.per_sample[f"extra.rouge_score.{key}"] = values
        result.statistics[f"extra.rouge_score.{key}"] = mean_statistic(values)
    start = time.perf_counter()
    score, signature, statistic = _sacrebleu(refs, cands)
    result.timings["extra.sacrebleu"] = time.perf_counter() - start
    result.extra["sacrebleu"] = score
    if statistic is not None:
        result.statistics["extra.sacrebleu"] = statistic
    start = time.perf_counter()
    try:
        meteor = meteor_nltk_scores(refs, cands, progress)
        result.timings["extra.meteor_nltk"] = time.perf_counter() - start
    except (RRG3DError, LookupError, OSError) as exc:
        result.extra["meteor_nltk"] = None
        result.warnings.append(f"NLTK METEOR unavailable: {exc}")
    else:
        result.extra["meteor_nltk"] = float(np.mean(meteor))
        result.per_sample["extra.meteor_nltk"] = meteor
        result.statistics["extra.meteor_nltk"] = mean_statistic(meteor)
    result.implementation["extra"] = {
        "rouge_score": "rouge-score package, F-measure, use_stemmer=False, mean over samples",
        "sacrebleu": signature + " (corpus BLEU, 0-100)",
        "meteor_nltk": "nltk.translate.meteor_score, WordNet 3.0, word/punctuation tokens, mean over samples",
    }


# ------------------------------------------------------------------------------------------------------- Chinese

ZH_METEOR_NOTE = ("lang zh: coco METEOR (METEOR 1.5, English resources) is not computed; METEOR is reported as "
                  "extra.meteor_nltk on character tokens with exact and stem matches only: WordNet synonymy does not "
                  "apply to Chinese")


class _NoSynonyms:
    """A stand-in for NLTK's WordNet reader with no synsets: METEOR's synonym stage matches nothing."""

    @staticmethod
    def synsets(word: str) -> list[Any]:
        return []


class _ZhRougeTokenizer:
    """rouge-score tokenizer interface over :func:`zh_tokens` (the package's default drops non-ASCII text)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return zh_tokens(text)


def _nlg_zh(references: Sequence[str], candidates: Sequence[str], *, coco: bool, extra: bool, progress: bool,
            meanwhile: Callable[[], Any] | None) -> NLGResult:
    """:func:`nlg_metrics` for Chinese reports: the pycocoevalcap scorers and the extras on character tokens."""
    result = NLGResult()
    started = time.perf_counter()
    n = len(candidates)
    result.implementation["lang"] = "zh"
    if coco and n:
        start = time.perf_counter()
        tokens = zh_tokenize(list(references) + list(candidates))
        result.timings["coco.tokenize"] = time.perf_counter() - start
        result.implementation["coco"] = {
            "tokenizer": "rrg3d zh: NFKC, lower case, one token per CJK character, Latin/digit runs as words, "
                         "punctuation dropped except % and ‰",
            "bleu": "pycocoevalcap BleuScorer (closest) on characters", "meteor": None,
            "rouge_l": "pycocoevalcap Rouge (beta 1.2) on characters, bit-parallel LCS",
            "cider": "pycocoevalcap CiderScorer (CIDEr-D, sigma 6) on characters"}
        _coco_python(result, tokens[:n], tokens[n:])
    elif coco:
        result.coco = dict.fromkeys(COCO_KEYS)
    if coco:
        result.warnings.append(ZH_METEOR_NOTE)
    if extra:
        _extras_zh(result, references, candidates, progress)
    if meanwhile is not None:
        result.meanwhile = meanwhile()
    result.timings["total"] = time.perf_counter() - started
    return result


def meteor_zh_scores(references: Sequence[str], candidates: Sequence[str], progress: bool = False) -> np.ndarray:
    """NLTK's METEOR per sample on :func:`zh_tokens`: exact and Porter-stem matches, no WordNet synonyms."""
    from nltk.translate.meteor_score import meteor_score

    pairs = zip(references, candidates, strict=True)
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, total=len(candidates), desc="METEOR (NLTK, zh)", unit="pair", leave=False)
    return np.array([meteor_score([zh_tokens(r)], zh_tokens(c), wordnet=_NoSynonyms()) for r, c in pairs],
                    dtype=np.float64)


def _extras_zh(result: NLGResult, references: Sequence[str], candidates: Sequence[str], progress: bool) -> None:
    refs = [one_line(r) for r in references]
    cands = [one_line(c) for c in candidates]
    if not cands:
        result.extra = {"rouge_score": dict.fromkeys(ROUGE_SCORE_KEYS), "sacrebleu": None, "meteor_nltk": None}
        return
    from rouge_score import rouge_scorer
    from sacrebleu.metrics.bleu import BLEU

    start = time.perf_counter()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_SCORE_KEYS), tokenizer=_ZhRougeTokenizer())
    rouge = {key: np.zeros(len(cands)) for key in ROUGE_SCORE_KEYS}
    for i, (reference, candidate) in enumerate(zip(refs, cands, strict=True)):
        scores = scorer.score(reference, candidate)
        for key in ROUGE_SCORE_KEYS:
            rouge[key][i] = scores[key].fmeasure
    result.timings["extra.rouge_score"] = time.perf_counter() - start
    result.extra["rouge_score"] = {key: float(np.mean(values)) for key, values in rouge.items()}
    for key, values in rouge.items():
        result.per_sample[f"extra.rouge_score.{key}"] = values
        result.statistics[f"extra.rouge_score.{key}"] = mean_statistic(values)

    start = time.perf_counter()
    bleu = BLEU(tokenize="zh")
    result.extra["sacrebleu"] = float(bleu.corpus_score(cands, [refs]).score)
    signature = bleu.get_signature().format()
    try:
        stats = np.asarray(bleu._extract_corpus_statistics(cands, [refs]), dtype=np.float64)
        if stats.shape == (len(cands), 10):
            result.statistics["extra.sacrebleu"] = Statistic(stats, _sacrebleu_reduce)
    except Exception as exc:  # pragma: no cover - only if sacrebleu's internals change
        log.warning("sacreBLEU statistics unavailable for bootstrap: %s", exc)
    result.timings["extra.sacrebleu"] = time.perf_counter() - start

    start = time.perf_counter()
    meteor = meteor_zh_scores(refs, cands, progress)
    result.timings["extra.meteor_nltk"] = time.perf_counter() - start
    result.extra["meteor_nltk"] = float(np.mean(meteor))
    result.per_sample["extra.meteor_nltk"] = meteor
    result.statistics["extra.meteor_nltk"] = mean_statistic(meteor)
    result.implementation["extra"] = {
        "rouge_score": "rouge-score package, F-measure, rrg3d zh character tokenizer, mean over samples",
        "sacrebleu": signature + " (corpus BLEU, 0-100)",
        "meteor_nltk": "nltk.translate.meteor_score on rrg3d zh character tokens, exact + Porter-stem matches, "
                       "no WordNet synonyms (WordNet is English), mean over samples",
    }
