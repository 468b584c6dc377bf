"""Does DPO on judge-scored pairs make the reports more faithful? SFT vs DPO on held-out phantoms.

Starts from an SFT checkpoint of the learnability benchmark (``--sft``; by default the ``small_resnet3d`` image arm
without diagnosis prompting in ``--work`` — the language model decides the findings from the visual tokens, as in
3D-CT-GPT++ — trained by ``benchmarks/learnability.py``, whose command is below; its minutes are not in this
script's budget). With diagnosis prompting the model copies its classifier's calls into every sample, so the
candidates of a study hardly differ in their findings and DPO has little to choose between (the earlier runs, kept
in ``benchmarks/results/dpo_classifier_fitted_on_all.json``). Then, timed:

1. ``rrg3d prefs build`` on ``--prefs-studies`` training phantoms that the SFT model never saw: by default
   (``--prefs-from fresh``) the training split of a new phantom set of the same shape (``--prefs-seed``), because
   the SFT model has learnt its own training studies — its samples there are nearly all right (mean label-judge
   score 4.3 where its greedy test reports score about 2.6), so pairs built on them do not show the mistakes it makes
   on new scans; ``--prefs-from train`` uses the SFT run's training split, skipping the first ``--prefs-skip``
   studies (by default the run's ``data.fit_samples``, those its finding classifier was fitted on).
   ``--samples`` impressions per study at temperature 1.0 (seeded per study), each scored against the phantom's
   true labels by a label judge: the candidates are sampled once, scored by the ``label`` judge (``max(1, 5 − wrong
   abnormalities)``, ``candidates_fresh.jsonl``), and ``--judge`` other than that rescores the same candidates
   (``rrg3d prefs build --rescore-from``). The default ``label:f0.75`` (``1 + 4·F0.75`` of the study's abnormalities)
   was chosen on the validation phantoms (``--eval-split val``; docs/benchmarks.md#dpo has every setting tried):
   ``label`` rewards stating fewer findings (an omission costs what a hallucination costs, and the SFT model's findings
   are mostly wrong), ``label:f1`` rewards stating more. Pairs by strategy 1 (``split``: a random candidate scoring ≥
   ``--threshold`` chosen, a random one below rejected; ``--pairs-per-study`` distinct ones) and, from the same
   candidates, strategy 2 (``best-worst``, the reference chosen when nothing reaches the threshold). The threshold is
   the paper's 3 (``pairs_at_threshold_3`` counts the pairs 3 gives when another threshold is chosen);
2. the ``dpo`` stage on each pair set (the recipe ``tiny_dpo`` with the overrides below: RPO (DPO + the chosen
   report's NLL; plain sigmoid DPO at lr 3e-4 collapsed to empty reports), β 0.1, lr 2e-4, one epoch at batch 1,
   linear schedule with 10% warm-up, the LoRA adapter trains, the vision tower stays frozen);
3. greedy reports for the test phantoms (``--eval-split``) from the SFT model and from each DPO model with identical
   decoding, scored against the phantoms' true labels — CE micro-F1 and precision, hallucinated findings per report
   (abnormalities the report states that the truth lacks), omitted findings per report, the mean label-judge score
   (the ``label`` judge's, whatever judge built the pairs; the F1 mode's beside it) — and against the reference
   impressions (BLEU-4, ROUGE-L: pycocoevalcap's, through the evaluation suite); each DPO − SFT difference
   with a paired bootstrap 95% interval over the test phantoms (2000 resamples, seeded).

Targets (issue 21): hallucinated findings per report down by ≥ 25% with the interval of the difference below 0;
CE micro-F1 not lower (the upper end of its interval ≥ 0); mean label-judge score up by ≥ 0.3; all within 60
minutes (``budget_minutes``). Writes ``benchmarks/results/dpo.json``: ``sft``, ``dpo`` (strategy 1), ``delta``
(``{NAME: {"value", "ci95": [lo, hi], "p_value"}}``), ``best_worst`` (strategy 2: its metrics and deltas), the pair
summaries, minutes per step and ``targets``. Each step's outputs stay in ``--work``/dpo and are reused when
present (the stage runs resume), so a rerun only redoes what is missing.

The SFT checkpoint (learnability's image arm: CT-CLIP with label supervision, align, LoRA SFT on the impressions;
about 45 minutes here)::

    python benchmarks/learnability.py --encoders small_resnet3d --clip-steps 1200 --clip-label-weight 1.0 \\
        --no-findings-prompt --max-new-tokens 128 --arms image --work /tmp/exp/p1200

For a diagnosis-prompting SFT model (``--sft``) fit its classifier on part of the training split
(``--findings-prompt ... --fit-samples 600 --classifier-lr-mult 0``) and use ``--prefs-from train``.

then::

    python benchmarks/dpo.py --work /tmp/exp/p1200 [--prefs-studies 200] [--threshold 3] [--samples 6] \\
        [--judge label:f0.75] [--pairs-per-study 1] [--lr 2e-4] [--beta 0.1] [--loss rpo] [--eval-split test]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import statistics, truth_scores

SFT_ARM = "small_resnet3d/image_labels1/sft/final"
TARGETS = {"hallucinated_reduction": 0.25, "judge_gain": 0.3}


def label_judge_spec(text: str) -> str:
    """``label`` or ``label:MODE`` (a label-judge mode: errors, f1, f0.5, ...)."""
    from rrg3d.judge.label import check_mode

    try:
        check_mode(text.partition(":")[2] or "errors")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not (text == "label" or text.startswith("label:")):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmark scores pairs with a label judge (label, label:f1, "
                                         "label:f0.5)")
    return "label" if text == "label:errors" else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/exp/p1200", help="the learnability work folder (phantoms, cache)")
    parser.add_argument("--sft", default=None, help=f"SFT checkpoint (default WORK/{SFT_ARM})")
    parser.add_argument("--folder", default="dpo", help="this run's folder under --work (one per SFT checkpoint)")
    parser.add_argument("--field", default="impression", choices=("report", "findings", "impression"),
                        help="the text the SFT model writes (learnability: impression)")
    parser.add_argument("--prefs-studies", type=int, default=200, help="training phantoms sampled for pairs")
    parser.add_argument("--prefs-from", choices=("fresh", "train"), default="fresh",
                        help="fresh: the training split of a new phantom set (studies the SFT model never saw); "
                             "train: the SFT run's own training split")
    parser.add_argument("--prefs-seed", type=int, default=5000, help="seed of the fresh phantom set")
    parser.add_argument("--prefs-skip", type=int, default=None,
                        help="leave out the first N training phantoms (default: the SFT run's data.fit_samples when "
                             "its model has a finding classifier, the studies the classifier was fitted on; else 0)")
    parser.add_argument("--judge", default="label:f0.75", type=label_judge_spec,
                        help="the pair judge: label (5 − wrong abnormalities), label:f1 (1 + 4·F1 of the study) or "
                             "label:fβ (e.g. label:f0.5: a hallucination costs four omissions); another judge "
                             "rescores the label judge's candidates")
    parser.add_argument("--eval-split", default="test", choices=("test", "val"),
                        help="the phantoms the systems are compared on: choose settings on val, report test")
    parser.add_argument("--pairs-per-study", type=int, default=1,
                        help="split pairs per study (distinct chosen and rejected candidates, default 1)")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=3.0,
                        help="good from this label-judge score (the paper's 3: at most two wrong abnormalities)")
    parser.add_argument("--lr", type=float, default=2e-4,
                        help="DPO learning rate (LoRA adapter; sigmoid DPO at 3e-4 collapsed to empty reports)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss", default="rpo", choices=("sigmoid", "ipo", "rpo"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="greedy test reports and the samples")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--strategies", nargs="+", default=["split", "best-worst"], choices=("split", "best-worst"))
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo.json"))
    return parser


# -- scoring -----------------------------------------------------------------------------------------------------------
def hallucination_origin(predictions: Path, references: Path, labeler: Any) -> dict[str, Any]:
    """Of the findings a system's reports state that the truth lacks: how many its finding classifier called (the
    diagnosis line the prompt listed, recorded in each prediction's ``meta.findings_classifier``), by label."""
    from collections import Counter

    from rrg3d.data.manifest import load_manifest

    refs = {r["id"]: r for r in load_manifest(references)}
    records = [json.loads(line) for line in Path(predictions).read_text().splitlines() if line.strip()]
    names = tuple(getattr(labeler, "labels", None) or labeler.label_names)
    stated = np.asarray(labeler.predict([r.get("report") or "" for r in records])).astype(bool)
    total, called, by_label = 0, 0, Counter()
    for record, row in zip(records, stated, strict=True):
        calls = set(((record.get("meta") or {}).get("findings_classifier") or {}).get("called") or [])
        truth = refs[record["id"]].get("labels") or {}
        for name, said in zip(names, row, strict=True):
            if said and truth.get(name) == 0:
                total += 1
                called += name in calls
                by_label[name] += 1
    return {"hallucinated": total, "called_by_classifier": called, "by_label": dict(by_label.most_common())}


def pair_contrast(pairs: Path, labeler: Any) -> dict[str, Any]:
    """What a pair set teaches: the mean hallucinated and omitted findings (against each study's true labels) of
    its chosen and of its rejected reports, and the share of pairs whose chosen report hallucinates less."""
    from rrg3d.judge.label import LabelJudge
    from rrg3d.train.data import labels_vector

    records = [json.loads(line) for line in Path(pairs).read_text().splitlines() if line.strip()]
    if not records:
        return {"pairs": 0}
    judge = LabelJudge(labeler)
    truth = [labels_vector(r.get("labels"), judge.label_names) for r in records]
    sides = {}
    for side in ("chosen", "rejected"):
        counts = judge.counts([r.get("reference") or "" for r in records], [r[side] for r in records], truth)
        sides[side] = counts
    fewer = float(np.mean(sides["chosen"][:, 1] < sides["rejected"][:, 1]))
    return {"pairs": len(records), "chosen_from_reference": sum(r.get("chosen_index") is None for r in records),
            **{side: {"hallucinated": float(c[:, 1].mean()), "omitted": float(c[:, 2].mean())}
               for side, c in sides.items()},
            "chosen_hallucinates_less": fewer}


def suite_scores(predictions: Path, references: Path, out: Path, compare: Path | None, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """BLEU-4 and ROUGE-L (pycocoevalcap's) from the evaluation suite, with its paired bootstrap against
    ``compare``."""
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files

    options = EvaluateOptions(bootstrap=args.bootstrap, seed=args.seed, progress=False,
                              compare=str(compare) if compare else None)
    metrics = evaluate_files(predictions, references, out, options)
    result = {"bleu_4": metrics["coco"]["bleu_4"], "rouge_l": metrics["coco"]["rouge_l"],
              "meteor": metrics["coco"]["meteor"]}
    if compare is not None:
        paired = metrics["compare"]["paired_bootstrap"]["metrics"]
        result["paired"] = {name: paired[key] for name, key in (("bleu_4", "coco.bleu_4"), ("rouge_l", "coco.rouge_l"))
                            if key in paired}
    return result


def compare(dpo: dict[str, Any], sft: dict[str, Any], suite: dict[str, Any], args: argparse.Namespace
            ) -> dict[str, Any]:
    from rrg3d.evaluate.bootstrap import paired_bootstrap

    if dpo["ids"] != sft["ids"]:
        raise SystemExit("the two systems were scored on different studies")
    a, b = statistics(dpo), statistics(sft)
    delta = {}
    for name in a:
        result = paired_bootstrap(a[name], b[name], args.bootstrap, args.seed)
        delta[name] = {"value": result["delta"], "ci95": [result["low"], result["high"]],
                       "p_value": result["p_value"]}
    for name, result in suite.get("paired", {}).items():
        delta[name] = {"value": result["delta"], "ci95": [result["low"], result["high"]],
                       "p_value": result["p_value"]}
    return delta


def summarise(scores: dict[str, Any], suite: dict[str, Any]) -> dict[str, float]:
    stats = statistics(scores)
    return {**{name: float(stat.value()) for name, stat in stats.items()},
            "bleu_4": suite["bleu_4"], "rouge_l": suite["rouge_l"], "meteor": suite["meteor"],
            "studies": len(scores["ids"])}


# -- steps -------------------------------------------------------------------------------------------------------------
def generate(checkpoint: Path, references: Path, out: Path, settings: Any) -> bool:
    """Greedy reports of the test studies into ``out``; False when they were there already."""
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports

    if out.is_file() and sum(1 for _ in out.open()) >= sum(1 for _ in references.open()):
        return False
    model = load_checkpoint(checkpoint, merge_lora=True)
    generate_reports(model, [str(references)], out, settings=settings, batch_size=8, progress=True)
    return True


def judge_tag(args: argparse.Namespace) -> str:
    """The judge's part of file names: empty for the label judge (the names it always had), ``_f1`` for label:f1."""
    return "" if args.judge == "label" else "_" + args.judge.partition(":")[2]


def per_study_tag(args: argparse.Namespace) -> str:
    """The pairs-per-study part of file names: empty for one pair per study (the names it always had)."""
    return f"_k{args.pairs_per_study}" if args.pairs_per_study != 1 else ""


def pairs_name(strategy: str, args: argparse.Namespace) -> str:
    return f"pairs_{args.prefs_from}{judge_tag(args)}_{strategy}{per_study_tag(args)}.jsonl"


def dpo_run_name(strategy: str, args: argparse.Namespace) -> str:
    """A DPO run's folder: the strategy and the settings that change it (reruns with others keep both)."""
    return (f"run_{args.prefs_from}{judge_tag(args)}_{strategy}{per_study_tag(args)}_{args.loss}_b{args.beta:g}"
            f"_lr{args.lr:g}_e{args.epochs}")


def split_suffix(args: argparse.Namespace) -> str:
    """File-name suffix of the evaluation split: none for test (the names it always had)."""
    return "" if args.eval_split == "test" else f"_{args.eval_split}"


def train_dpo(pairs: Path, sft: Path, run_dir: Path, cache: Path, args: argparse.Namespace) -> tuple[Path, bool]:
    from rrg3d.train import train
    from rrg3d.train.recipe import load_recipe, recipe_from_yaml

    overrides = [f"data.pairs={pairs}", f"model.init={sft}", f"run_dir={run_dir}", f"data.cache_dir={cache}",
                 "data.batch_size=1", f"data.max_length={args.max_length}", f"optim.lr={args.lr}",
                 f"phases.0.epochs={args.epochs}", f"dpo.beta={args.beta}", f"dpo.loss={args.loss}",
                 "optim.scheduler=linear", "optim.warmup_ratio=0.1", "optim.weight_decay=0.0",
                 "train.save_every=100", "train.progress=true", "train.tensorboard=false",
                 f"train.threads={os.cpu_count() or 1}", f"seed={args.seed}", "train.mixed_precision=auto"]
    recipe = load_recipe("tiny_dpo", overrides)
    config = run_dir / "config.yaml"
    same = config.is_file() and recipe_from_yaml(config.read_text()).fingerprint() == recipe.fingerprint()
    if (run_dir / "final" / "rrg3d.yaml").is_file() and same:
        print(f"reusing the finished run {run_dir}", flush=True)
        return run_dir / "final", False
    return Path(train(recipe, resume=same).final), True


def classifier_fit_studies(sft: Path) -> int:
    """How many of the first training studies the SFT model's finding classifier was fitted on (its run's
    ``data.fit_samples``); 0 when the model has no classifier or the run's config is not beside the checkpoint."""
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.train.recipe import recipe_from_yaml

    config = sft.parent / "config.yaml"
    if load_checkpoint(sft).vision.classifier is None or not config.is_file():
        return 0
    return int(recipe_from_yaml(config.read_text()).data.fit_samples)


def fresh_phantoms(work: Path, folder: Path, args: argparse.Namespace) -> Path:
    """A new phantom set like ``work/phantoms`` (shape, styles) of seed ``--prefs-seed``, with at least
    ``--prefs-studies`` studies in its training split (phantoms split 80/10/10; only the training split is used)."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    like = json.loads((work / "phantoms" / "phantom.json").read_text())
    count = -(-args.prefs_studies * 10 // 8) + 8
    return generate_phantoms(PhantomConfig(n=count, seed=args.prefs_seed, shape=tuple(like["shape"]),
                                           styles=int(like.get("styles") or 1)),
                             folder / f"prefs_phantoms_seed{args.prefs_seed}", workers=2, progress=False)


def minutes_since(tick: float) -> float:
    return round((time.perf_counter() - tick) / 60, 2)


class StepMinutes:
    """Minutes of each step as measured when it was computed (``dpo/step_minutes.json``): a rerun that reuses a
    step's outputs counts the minutes it took then, so the budget is that of a run from scratch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved = json.loads(path.read_text()) if path.is_file() else {}
        self.used: dict[str, float] = {}

    def record(self, name: str, tick: float, computed: bool) -> None:
        if computed or name not in self.saved:
            self.saved[name] = minutes_since(tick)
            self.path.write_text(json.dumps(self.saved, indent=2) + "\n")
        self.used[name] = self.saved[name]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.text.labeler import load_labeler
    from rrg3d.train.data import write_references
    from rrg3d.train.prefs import build_preferences

    start = time.perf_counter()
    work = Path(args.work).resolve()
    manifest = work / "phantoms" / "manifest.jsonl"
    sft = Path(args.sft).resolve() if args.sft else work / SFT_ARM
    if not (sft / "rrg3d.yaml").is_file():
        raise SystemExit(f"no SFT checkpoint at {sft}: run benchmarks/learnability.py first (see --help)")
    folder = work / args.folder
    folder.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    references = write_references(manifest, folder / f"{args.eval_split}_references.jsonl", split=args.eval_split,
                                  field=args.field)
    settings = load_checkpoint(sft).config.generation.replace(max_new_tokens=args.max_new_tokens, temperature=0.0,
                                                              num_beams=1)
    labeler = load_labeler(None)
    minutes = StepMinutes(folder / "step_minutes.json")
    tick = time.perf_counter()
    if args.prefs_from == "fresh":
        prefs_manifest = fresh_phantoms(work, folder, args)
        prefs_cache = prefs_manifest.parent.parent / f"{prefs_manifest.parent.name}_cache"  # ids repeat across sets
        skip = 0
    else:
        prefs_manifest, prefs_cache = manifest, cache
        skip = classifier_fit_studies(sft) if args.prefs_skip is None else args.prefs_skip
    print(f"pairs from {prefs_manifest}, training studies {skip}..{skip + args.prefs_studies - 1}", flush=True)

    # the label judge samples the candidates; another judge scores those same candidates (no sampling of its own)
    sampled_candidates = folder / f"candidates_{args.prefs_from}.jsonl"
    candidates = folder / f"candidates_{args.prefs_from}{judge_tag(args)}.jsonl"
    rescore_from = None
    sampling_step = f"prefs_{args.prefs_from}_{args.prefs_studies}x{args.samples}"
    if candidates != sampled_candidates:
        if not sampled_candidates.is_file():  # sample them first, with the label judge
            args_label = argparse.Namespace(**{**vars(args), "judge": "label"})
            build_preferences(prefs_manifest, sft, folder / pairs_name("split", args_label), judge="label",
                              samples=args.samples, temperature=args.temperature, threshold=args.threshold,
                              field=args.field, max_new_tokens=args.max_new_tokens, candidates=sampled_candidates,
                              cache_dir=prefs_cache, limit=args.prefs_studies, skip=skip, seed=args.seed)
            minutes.record(sampling_step, tick, True)
        else:
            minutes.record(sampling_step, tick, False)
        rescore_from = sampled_candidates
        tick = time.perf_counter()
    summaries = {}
    judged = 0
    for strategy in args.strategies:
        summary = build_preferences(prefs_manifest, sft, folder / pairs_name(strategy, args), judge=args.judge,
                                    samples=args.samples, temperature=args.temperature, strategy=strategy,
                                    threshold=args.threshold, field=args.field, max_new_tokens=args.max_new_tokens,
                                    candidates=candidates, cache_dir=prefs_cache, limit=args.prefs_studies, skip=skip,
                                    seed=args.seed, rescore_from=rescore_from,
                                    pairs_per_study=args.pairs_per_study if strategy == "split" else 1)
        summaries[strategy] = {**summary.as_dict(), "contrast": pair_contrast(folder / pairs_name(strategy, args),
                                                                              labeler)}
        judged += summary.sampled + summary.rescored
        print(f"pairs ({strategy}): {summary.pairs} of {summary.studies} studies; dropped {summary.dropped}; "
              f"scores {summary.score_histogram}", flush=True)
    minutes.record(sampling_step if rescore_from is None else f"rescore_{args.prefs_from}{judge_tag(args)}", tick,
                   judged > 0)
    from rrg3d.train.prefs import pair_records

    records = [json.loads(line) for line in candidates.read_text().splitlines() if line.strip()][: args.prefs_studies]
    at_three = {strategy: len(pair_records(records, strategy=strategy, threshold=3.0, seed=args.seed,
                                           judge=args.judge)[0]) for strategy in args.strategies}

    tick = time.perf_counter()
    sft_predictions = folder / f"predictions_sft{split_suffix(args)}.jsonl"
    fresh = generate(sft, references, sft_predictions, settings)
    sft_scores = truth_scores(sft_predictions, references, labeler)
    sft_suite = suite_scores(sft_predictions, references, folder / f"eval_sft{split_suffix(args)}", None, args)
    minutes.record(f"sft_eval{split_suffix(args)}", tick, fresh)

    arms: dict[str, Any] = {}
    for strategy in args.strategies:
        tick = time.perf_counter()
        name = dpo_run_name(strategy, args)
        final, fresh = train_dpo(folder / pairs_name(strategy, args), sft, folder / name, prefs_cache, args)
        minutes.record(name, tick, fresh)
        tick = time.perf_counter()
        predictions = folder / f"predictions_{name}{split_suffix(args)}.jsonl"
        fresh = generate(final, references, predictions, settings)
        scores = truth_scores(predictions, references, labeler)
        suite = suite_scores(predictions, references, folder / f"eval_{name}{split_suffix(args)}", sft_predictions,
                             args)
        minutes.record(f"{name}_eval{split_suffix(args)}", tick, fresh)
        arms[strategy] = {"metrics": summarise(scores, suite), "delta": compare(scores, sft_scores, suite, args)}

    sft_metrics = summarise(sft_scores, sft_suite)
    total = round(sum(minutes.used.values()), 2)  # as from scratch: reused steps count the minutes they took
    main_arm = arms.get("split") or next(iter(arms.values()))
    delta = main_arm["delta"]
    hallucinated = delta["hallucinated_per_report"]
    reduction = -hallucinated["value"] / sft_metrics["hallucinated_per_report"] \
        if sft_metrics["hallucinated_per_report"] else 0.0
    targets = {
        "hallucinated_down_25pct": bool(reduction >= TARGETS["hallucinated_reduction"] and hallucinated["ci95"][1] < 0),
        "ce_micro_f1_not_lower": bool(delta["ce_micro_f1"]["ci95"][1] >= 0),
        "judge_up_0.3": bool(delta["label_judge_score"]["value"] >= TARGETS["judge_gain"]),
        "within_budget": bool(total <= args.budget_minutes),
    }
    result = {"benchmark": "dpo", "args": vars(args), "sft_checkpoint": str(sft), "budget_minutes": args.budget_minutes,
              "prefs_manifest": str(prefs_manifest), "prefs_skipped": skip,
              "minutes": {**minutes.used, "total": total, "this_invocation": minutes_since(start)},
              "pairs": summaries, "pairs_at_threshold_3": at_three, "sft": sft_metrics,
              "sft_hallucination_origin": hallucination_origin(sft_predictions, references, labeler),
              "dpo": main_arm["metrics"], "delta": delta, "hallucinated_reduction": reduction,
              "best_worst": arms.get("best-worst"), "targets": targets, "met": all(targets.values()),
              "python": sys.version.split()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    names = ["ce_micro_f1", "ce_precision", "ce_recall", "hallucinated_per_report", "omitted_per_report",
             "label_judge_score", "label_f1_judge_score", "bleu_4", "rouge_l"]
    header = f"{'metric':26s} {'SFT':>8s}" + "".join(f" {'DPO ' + s:>14s} {'Δ [95% CI]':>26s}" for s in arms)
    print(header)
    for name in names:
        row = f"{name:26s} {sft_metrics[name]:8.3f}"
        for arm in arms.values():
            d = arm["delta"].get(name)
            interval = f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "-"
            row += f" {arm['metrics'][name]:14.3f} {interval:>26s}"
        print(row)
    print(f"hallucinated findings per report: {100 * reduction:.0f}% fewer; targets {targets}; "
          f"{total:.1f} minutes (budget {args.budget_minutes:g}); minutes {minutes.used}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
