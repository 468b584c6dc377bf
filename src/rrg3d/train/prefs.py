"""Preference pairs for the ``dpo`` stage: sample reports from an SFT model, score them with a judge, pair them.

3D-CT-GPT++ (stage 4) samples six reports per training scan at temperature 1.0 from the SFT model, has a judge rate
each against the reference from 1 to 5, and pairs them:

* ``split`` (their strategy 1, the one they kept): per study a random candidate scoring ≥ ``threshold`` is chosen
  and a random one scoring below it rejected; a study whose candidates all fall on one side gives no pair. With
  ``pairs_per_study`` K > 1 (ours), up to K distinct such combinations of a study are kept;
* ``best-worst`` (their strategy 2): the best candidate is chosen and the worst rejected; when no candidate reaches
  the threshold the reference report is chosen instead; a study whose candidates all score the same (at or above
  the threshold) gives no pair.

Pairs come from the training split only: the builder refuses the validation and test splits, so that a model is
never tuned on the studies it is judged on (the paper built its pairs on its test split; we do not).

Files (``OUT`` is the pairs file)::

    OUT                          one pair per line: id, chosen, rejected, chosen_score, rejected_score, judge,
                                 strategy, threshold, the study's candidates and scores, manifest, split
    OUT.candidates.jsonl         every study's candidates with their scores (or --candidates PATH): what resuming
                                 skips, and what another strategy or threshold re-pairs without sampling again
    OUT.errors.jsonl             studies that failed (unreadable volume, judge failure), retried on the next run
    OUT.summary.json             studies, pairs, dropped (by reason), score histogram, settings
    OUT.judge_cache.sqlite       the answers of a model judge (http:, local:), so a rerun asks nothing twice

Another judge on the same samples (``rescore_from``, ``--rescore-from CANDIDATES``): the candidates of a file built
with the same model and sampling settings but another judge are scored by this run's judge instead of being sampled
again, so judges are compared on identical candidates and a new judge costs only its own answers.

Sampling is seeded per study (the seed and the study id), so a resumed or repeated run draws the same candidates
whatever the order or the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.utils.files import append_jsonl, atomic_write_json, atomic_write_text, iter_jsonl

log = logging.getLogger(__name__)

STRATEGIES = ("split", "best-worst")
#: split names the builder refuses: pairs never come from the studies a model is evaluated on
HELD_OUT_SPLITS = ("val", "valid", "validation", "dev", "test", "testing")
DROP_REASONS = ("all_at_or_above_threshold", "all_below_threshold", "all_equal", "too_few_candidates", "identical")


@dataclasses.dataclass
class PrefsSettings:
    """What the candidates depend on (recorded in every candidates record; a resumed run must match it)."""

    model: str
    judge: str
    samples: int = 6
    temperature: float = 1.0
    seed: int = 0
    split: str = "train"
    field: str = "report"
    max_new_tokens: int | None = None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def sampling_fingerprint(self) -> str:
        """What the candidate texts depend on: every setting but the judge (two judges' files of the same samples
        share it)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "judge"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class PrefsSummary:
    studies: int = 0
    sampled: int = 0  # studies sampled and judged by this call
    resumed: int = 0  # studies found done in the candidates file
    rescored: int = 0  # studies whose candidates came from another judge's file (rescore_from), judged now
    failed: int = 0
    pairs: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    score_histogram: dict[str, int] = dataclasses.field(default_factory=dict)
    mean_score: float | None = None
    chosen_from_reference: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_split(split: str) -> None:
    """Refuse a held-out split: pairs are built on training studies only."""
    if str(split).strip().lower() in HELD_OUT_SPLITS:
        raise ConfigError(f"preference pairs come from the training split only; refusing split {split!r} (a model "
                          "tuned on the studies it is evaluated on would be judged on its own training data)")


def study_seed(seed: int, study_id: str) -> int:
    """The sampling seed of one study: independent of order, batch and resume."""
    digest = hashlib.sha256(f"{int(seed)}:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def side_files(out: str | os.PathLike[str], candidates: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    out = Path(out)
    default_candidates = out.with_name(out.name + ".candidates.jsonl")
    return {"pairs": out, "candidates": Path(candidates) if candidates else default_candidates,
            "errors": out.with_name(out.name + ".errors.jsonl"), "summary": out.with_name(out.name + ".summary.json"),
            "judge_cache": out.with_name(out.name + ".judge_cache.sqlite")}


# -- pairing -----------------------------------------------------------------------------------------------------------
def make_pair(candidates: Sequence[str], scores: Sequence[float | None], *, strategy: str, threshold: float,
              rng: random.Random, reference: str | None = None, reference_score: float | None = None
              ) -> tuple[dict[str, Any] | None, str | None]:
    """One study's pair, or ``(None, reason)`` when the study gives none. Candidates without a score or with empty
    text take no part. The pair names its candidates by index (``None``: the reference)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown pairing strategy {strategy!r} (use {' or '.join(STRATEGIES)})")
    usable = [i for i, (text, score) in enumerate(zip(candidates, scores, strict=True))
              if score is not None and isinstance(text, str) and text.strip()]
    if not usable:
        return None, "too_few_candidates"
    if strategy == "split":
        good = [i for i in usable if scores[i] >= threshold]
        bad = [i for i in usable if scores[i] < threshold]
        if not bad:
            return None, "all_at_or_above_threshold"
        if not good:
            return None, "all_below_threshold"
        chosen, rejected = rng.choice(good), rng.choice(bad)
    else:
        best_score = max(scores[i] for i in usable)
        worst_score = min(scores[i] for i in usable)
        rejected = rng.choice([i for i in usable if scores[i] == worst_score])
        if best_score >= threshold:
            if best_score == worst_score:
                return None, "all_equal"
            chosen = rng.choice([i for i in usable if scores[i] == best_score])
        else:
            if not reference or not reference.strip():
                return None, "all_below_threshold"
            chosen = None
    chosen_text = reference if chosen is None else candidates[chosen]
    if str(chosen_text).strip() == str(candidates[rejected]).strip():
        return None, "identical"
    return {"chosen": str(chosen_text).strip(), "rejected": str(candidates[rejected]).strip(),
            "chosen_score": reference_score if chosen is None else scores[chosen],
            "rejected_score": scores[rejected], "chosen_index": chosen, "rejected_index": rejected}, None


def split_pairs(candidates: Sequence[str], scores: Sequence[float | None], *, threshold: float, rng: random.Random,
                count: int) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``count`` split pairs of one study: distinct (chosen ≥ threshold, rejected < threshold) combinations
    of different texts, drawn at random; ``count=1`` draws exactly :func:`make_pair`'s pair."""
    if count == 1:
        pair, reason = make_pair(candidates, scores, strategy="split", threshold=threshold, rng=rng)
        return ([pair] if pair else []), reason
    usable = [i for i, (text, score) in enumerate(zip(candidates, scores, strict=True))
              if score is not None and isinstance(text, str) and text.strip()]
    if not usable:
        return [], "too_few_candidates"
    good = [i for i in usable if scores[i] >= threshold]
    bad = [i for i in usable if scores[i] < threshold]
    if not bad or not good:
        return [], "all_at_or_above_threshold" if not bad else "all_below_threshold"
    combos = [(c, r) for c in good for r in bad if str(candidates[c]).strip() != str(candidates[r]).strip()]
    if not combos:
        return [], "identical"
    return [{"chosen": str(candidates[c]).strip(), "rejected": str(candidates[r]).strip(),
             "chosen_score": scores[c], "rejected_score": scores[r], "chosen_index": c, "rejected_index": r}
            for c, r in rng.sample(combos, min(count, len(combos)))], None


def check_pairs_per_study(strategy: str, pairs_per_study: int) -> None:
    """Refuse a pairs-per-study count below 1, or above 1 with best-worst (one best and one worst per study)."""
    if pairs_per_study < 1:
        raise ConfigError(f"--pairs-per-study must be >= 1, got {pairs_per_study}")
    if pairs_per_study > 1 and strategy != "split":
        raise ConfigError("--pairs-per-study > 1 needs the split strategy (best-worst has one best and one worst)")


def pair_records(records: Sequence[dict[str, Any]], *, strategy: str, threshold: float, seed: int, judge: str,
                 pairs_per_study: int = 1) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Pairs of candidates records (one per study, or up to ``pairs_per_study`` with the split strategy) and the
    count of studies dropped, by reason."""
    check_pairs_per_study(strategy, pairs_per_study)
    pairs, dropped = [], Counter()
    for record in records:
        rng = random.Random(study_seed(seed + 1, record["id"]))  # the pairing draw, apart from the sampling seed
        if strategy == "split":
            found, reason = split_pairs(record["candidates"], record["scores"], threshold=threshold, rng=rng,
                                        count=pairs_per_study)
        else:
            pair, reason = make_pair(record["candidates"], record["scores"], strategy=strategy, threshold=threshold,
                                     rng=rng, reference=record.get("reference"),
                                     reference_score=record.get("reference_score"))
            found = [pair] if pair else []
        if not found:
            dropped[str(reason)] += 1
            continue
        pairs += [{"id": record["id"], **pair, "judge": judge, "strategy": strategy, "threshold": threshold,
                   "candidates": record["candidates"], "scores": record["scores"],
                   "reference": record.get("reference"), "split": record.get("split"),
                   "manifest": record.get("manifest"), "labels": record.get("labels")} for pair in found]
    return pairs, dropped


# -- the builder -------------------------------------------------------------------------------------------------------
def _read_done(path: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: a truncated line (an interrupted write) is ignored", path, number)
                continue
            if record.get("settings") != fingerprint:
                raise ConfigError(f"{path}: made with other settings (model, judge, samples, temperature, seed, split "
                                  "or field) than this run; give another --out or --candidates")
            done[str(record["id"])] = record
    return done


def _read_samples(path: Path, sampling: str) -> dict[str, dict[str, Any]]:
    """The candidates of another judge's candidates file, by study, where they were sampled as this run samples."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such candidates file to rescore")
    found, other = {}, 0
    for number, record in iter_jsonl(path, what="candidates"):
        if record.get("sampling") != sampling:
            other += 1
            continue
        if not isinstance(record.get("candidates"), list) or not record.get("id"):
            raise RRG3DError(f"{path}:{number}: a candidates record needs an id and a list of candidates")
        found[str(record["id"])] = record
    if not found:
        raise ConfigError(f"{path}: none of its {other} records was sampled with this run's model and settings "
                          "(model, samples, temperature, seed, split, field, max_new_tokens; records written before "
                          "rrg3d recorded them carry no sampling fingerprint), so there is nothing to rescore")
    return found


def _judge_scores(judge: Any, reference: str, candidates: list[str], truth: Sequence[float] | None
                  ) -> tuple[list[float | None], list[str | None]]:
    """Each candidate's score (None where the judge gave none) and why not."""
    if getattr(judge, "uses_truth", False):
        results = judge.evaluate([reference] * len(candidates), candidates, "score",
                                 truths=[truth] * len(candidates))
    else:
        results = judge.evaluate([reference] * len(candidates), candidates, "score")
    scores = [None if r.score is None else float(r.score) for r in results]
    problems = [None if r.score is not None else (r.error or r.parse_error or "no score") for r in results]
    return scores, problems


def build_preferences(manifest: str | os.PathLike[str], model_path: str | os.PathLike[str],
                      out: str | os.PathLike[str], *, judge: str = "label", samples: int = 6,
                      temperature: float = 1.0, strategy: str = "split", threshold: float = 3.0,
                      split: str = "train", seed: int = 0, field: str = "report", max_new_tokens: int | None = None,
                      candidates: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                      limit: int | None = None, skip: int = 0, device: str | None = None, progress: bool = True,
                      judge_options: dict[str, Any] | None = None,
                      rescore_from: str | os.PathLike[str] | None = None, pairs_per_study: int = 1) -> PrefsSummary:
    """Sample ``samples`` reports per study of ``split`` from the checkpoint ``model_path``, score each with
    ``judge`` (a :func:`rrg3d.judge.make_judge` spec), pair them by ``strategy`` and write ``out`` (see the module
    doc for the files). ``skip`` leaves out the split's first studies and ``limit`` keeps the next ones: skip those a
    finding classifier was fitted on (the first ``data.fit_samples`` training studies), whose calls are better there
    than on studies it never saw, so pairs built on them would not show the errors it makes at test time.
    ``rescore_from`` (another judge's candidates file of the same samples) gives the candidates to judge instead of
    sampling them. ``pairs_per_study`` > 1 (split strategy) keeps up to that many distinct pairs of a study.
    Resumable; failures are recorded and the batch goes on."""
    import torch
    from tqdm.auto import tqdm

    from rrg3d.judge import make_judge
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.train.data import build_dataset, labels_vector
    from rrg3d.train.generator import resolve_checkpoint_dir

    check_split(split)
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown pairing strategy {strategy!r} (use {' or '.join(STRATEGIES)})")
    if skip < 0:
        raise ConfigError(f"--skip must be >= 0, got {skip}")
    check_pairs_per_study(strategy, pairs_per_study)  # before any sampling
    if samples < 2:
        raise ConfigError(f"--samples must be >= 2 to form a pair, got {samples}")
    if temperature <= 0:
        raise ConfigError("--temperature must be > 0: greedy decoding gives the same report every time")
    start = time.perf_counter()
    files = side_files(out, candidates)
    manifest = Path(manifest).resolve()
    folder = resolve_checkpoint_dir(model_path)
    model = load_checkpoint(folder, device=device)
    from rrg3d.judge.cache import JudgeCache

    cache = JudgeCache(files["judge_cache"]) if judge.startswith(("http:", "local")) else None
    scorer = make_judge(judge, cache=cache if cache is not None else False, **(judge_options or {}))
    settings = PrefsSettings(model=str(folder.resolve()), judge=str(scorer.id), samples=samples,
                             temperature=temperature, seed=seed, split=split, field=field,
                             max_new_tokens=max_new_tokens)
    fingerprint, sampling = settings.fingerprint(), settings.sampling_fingerprint()
    done = _read_done(files["candidates"], fingerprint)
    if rescore_from is not None and Path(rescore_from).resolve() == files["candidates"].resolve():
        raise ConfigError(f"{rescore_from}: --rescore-from names this run's own candidates file; give the other "
                          "judge's file and a new --out (or --candidates)")
    samples_from = _read_samples(Path(rescore_from), sampling) if rescore_from is not None else {}
    dataset = build_dataset(manifest, model.config.preprocess, split=split, cache_dir=cache_dir, progress=progress,
                            report_field=field)
    if len(dataset) == 0:
        raise RRG3DError(f"{manifest}: no study of split {split!r} has a {field!r} text and a CT")
    records_by_id = {str(r["id"]): r for r in _manifest_records(manifest)}
    label_names = getattr(scorer, "label_names", None)
    indices = list(range(len(dataset)))[skip:][: limit if limit is not None else None]
    if not indices:
        raise RRG3DError(f"{manifest}: --skip {skip} leaves none of the {len(dataset)} studies of split {split!r}")
    summary = PrefsSummary(studies=len(indices))
    generation = model.config.generation.replace(temperature=float(temperature), num_beams=1,
                                                 **({"max_new_tokens": int(max_new_tokens)} if max_new_tokens else {}))
    if files["errors"].exists():
        files["errors"].unlink()  # failures of an earlier run are retried now
    bar = tqdm(total=len(indices), desc="prefs", unit="study", disable=not progress)
    for index in indices:
        entry = dataset.entries[index]
        if entry.id in done:
            summary.resumed += 1
            bar.update(1)
            continue
        record = records_by_id.get(entry.id, {})
        truth = labels_vector(record.get("labels"), label_names) if label_names else None
        source = samples_from.get(entry.id)
        try:
            if source is not None:  # another judge's candidates: judged again, not sampled again
                texts = [str(text) for text in source["candidates"]]
            else:
                volume = torch.from_numpy(dataset.load_volume(index))[None]
                texts = model.sample_reports(volume, samples, generation.replace(seed=study_seed(seed, entry.id)),
                                             styles=[(entry.style, entry.sex)])[0]
            scores, problems = _judge_scores(scorer, entry.report, texts, truth)
            if all(score is None for score in scores):
                raise RRG3DError(f"the judge scored none of the {samples} candidates ({problems[0]})")
        except RRG3DError as exc:
            append_jsonl(files["errors"], {"id": entry.id, "error": str(exc)})
            summary.failed += 1
            log.warning("study %s: %s", entry.id, exc)
            bar.update(1)
            continue
        done[entry.id] = {"id": entry.id, "split": entry.split, "settings": fingerprint, "sampling": sampling,
                          "judge": str(scorer.id), "reference": entry.report,
                          "reference_score": None, "candidates": texts, "scores": scores,
                          "judge_problems": problems if any(problems) else None, "manifest": str(manifest),
                          "labels": record.get("labels"),
                          **({"rescored_from": str(Path(rescore_from).resolve())} if source is not None else {})}
        append_jsonl(files["candidates"], done[entry.id])
        if source is not None:
            summary.rescored += 1
        else:
            summary.sampled += 1
        bar.update(1)
    bar.close()
    chosen = [done[dataset.entries[i].id] for i in indices if dataset.entries[i].id in done]
    if strategy == "best-worst":
        _fill_reference_scores(chosen, scorer, label_names, files["candidates"], fingerprint)
    pairs, dropped = pair_records(chosen, strategy=strategy, threshold=threshold, seed=seed, judge=str(scorer.id),
                                  pairs_per_study=pairs_per_study)
    atomic_write_text(files["pairs"], "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    all_scores = [s for r in chosen for s in r["scores"] if s is not None]
    summary.pairs = len(pairs)
    summary.dropped = {reason: dropped.get(reason, 0) for reason in DROP_REASONS}
    summary.score_histogram = {str(k): v for k, v in sorted(Counter(round(s) for s in all_scores).items())}
    summary.mean_score = sum(all_scores) / len(all_scores) if all_scores else None
    summary.chosen_from_reference = sum(1 for p in pairs if p["chosen_index"] is None)
    summary.seconds = time.perf_counter() - start
    atomic_write_json(files["summary"], {**summary.as_dict(), "settings": dataclasses.asdict(settings),
                                         "strategy": strategy, "threshold": threshold, "manifest": str(manifest),
                                         "skip": skip, "limit": limit, "pairs_per_study": pairs_per_study,
                                         "rescore_from": str(rescore_from) if rescore_from is not None else None,
                                         "files": {k: str(v) for k, v in files.items()}})
    if cache is not None:
        scorer.close()
    return summary


def _fill_reference_scores(records: list[dict[str, Any]], scorer: Any, label_names: Any, path: Path,
                           fingerprint: str) -> None:
    """Score the references that have no score yet (best-worst may choose them) and keep the scores in the
    candidates file."""
    from rrg3d.train.data import labels_vector

    missing = [r for r in records if r.get("reference_score") is None and r.get("reference")]
    for record in missing:
        truth = labels_vector(record.get("labels"), label_names) if label_names else None
        record["reference_score"] = _judge_scores(scorer, record["reference"], [record["reference"]], truth)[0][0]
    if missing:  # keep them: the candidates file is rewritten whole, atomically
        scored = {r["id"]: r for r in missing}
        lines = [json.dumps(scored.get(r["id"], r), ensure_ascii=False) + "\n"
                 for r in _read_done(path, fingerprint).values()]
        atomic_write_text(path, "".join(lines))


def _manifest_records(manifest: Path) -> list[dict[str, Any]]:
    from rrg3d.data.manifest import check_manifest

    records, _ = check_manifest(manifest)
    return records


def read_pairs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The pairs of a pairs file; :class:`RRG3DError` naming the line for a malformed one."""
    path = Path(path)
    if not path.is_file():
        raise RRG3DError(f"{path}: no such pairs file (build one with `rrg3d prefs build`)")
    pairs = []
    for number, pair in iter_jsonl(path, what="pairs"):
        for key in ("id", "chosen", "rejected"):
            if not isinstance(pair.get(key), str) or not pair[key].strip():
                raise RRG3DError(f"{path}:{number}: {key!r} is missing or empty")
        check_split(str(pair.get("split") or "train"))
        pairs.append(pair)
    if not pairs:
        raise RRG3DError(f"{path}: holds no pair")
    return pairs
