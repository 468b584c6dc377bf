"""Does the demo's model work? `rrg3d demo` timed as a new user runs it, then its installed model scored on unseen
phantoms (a seed and a count the demo never used) against constant reports, and asked about a real chest CT.

    python benchmarks/demo.py --work /tmp/demo_bench [--reuse] [--unseen 60] [--unseen-seed 1]

Targets (issue 24): the demo finishes within 600 s on 2 CPU cores; on the unseen phantoms the model's clinical
efficacy (CE micro-F1 over the 18 abnormalities) is >= 0.50 and >= the majority-class report + 0.15; its reports
have findings and an impression and >= 20 words on average; on a real CT it writes a report of several sentences.
The best constant report (the training report whose labels, said of every study, score best) is the stronger
constant and is reported beside the majority-class one. ``--reuse`` scores an existing demo output instead of
running the demo again (its time then comes from the earlier run's log, if any). Writes
``benchmarks/results/demo.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_SECONDS_TARGET = 600.0
CE_TARGET, MARGIN_TARGET, WORDS_TARGET = 0.50, 0.15, 20.0
REAL_CT = Path("ct") / "totalseg_chest_cta" / "ct_cropped.nii.gz"


def run_demo(out: Path, extra: list[str]) -> float:
    """``rrg3d demo --out OUT`` in a child process (as a user runs it); its wall seconds. The output goes to
    ``OUT.log``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    with open(f"{out}.log", "w", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, "-m", "rrg3d.cli", "demo", "--out", str(out), *extra],
                               stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - tick
    if code != 0:
        raise SystemExit(f"rrg3d demo failed (exit {code}); see {out}.log")
    return seconds


def logged_seconds(out: Path) -> float | None:
    """The demo's own ``done in N s`` line from ``OUT.log``, when there is one."""
    log = Path(f"{out}.log")
    if not log.exists():
        return None
    found = re.findall(r"done in ([0-9.]+) s", log.read_text(encoding="utf-8", errors="replace"))
    return float(found[-1]) if found else None


def score_unseen(checkpoint: Path, demo_manifest: Path, work: Path, *, n: int, seed: int, style: str,
                 bootstrap: int = 1000) -> dict[str, Any]:
    """Reports of ``checkpoint`` for ``n`` phantoms of ``seed`` (every split: none was trained on), scored with CE
    and NLG metrics beside the demo's two constant baselines (from its training split); words per report and the
    share with both sections."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports
    from rrg3d.text.reports import split_sections
    from rrg3d.train.data import best_constant_text, majority_text

    manifest = generate_phantoms(PhantomConfig(n=n, seed=seed, shape=(64, 128, 128), pet=False, styles=1,
                                               style=style), work / f"unseen_seed{seed}", workers=2, progress=False)
    records = load_manifest(manifest)
    references = work / "unseen_references.jsonl"
    references.write_text("".join(json.dumps({"id": r["id"], "report": r["report"], "labels": r["labels"]}) + "\n"
                                  for r in records))
    predictions = work / "unseen_predictions.jsonl"
    tick = time.perf_counter()
    model = load_checkpoint(checkpoint, merge_lora=True)
    generate_reports(model, [manifest], predictions, batch_size=16, progress=False, resume=False,
                     checkpoint=str(checkpoint))
    generation_seconds = time.perf_counter() - tick
    options = EvaluateOptions(bootstrap=bootstrap, progress=False, judge="rule", judge_cache=False)
    rows: dict[str, Any] = {}
    texts = {"model": None, "majority-class report": majority_text(demo_manifest, split="train"),
             "best constant report": best_constant_text(demo_manifest, split="train")}
    for name, text in texts.items():
        path = predictions
        if text is not None:
            path = work / f"unseen_{name.split()[0].replace('-', '_')}.jsonl"
            path.write_text("".join(json.dumps({"id": r["id"], "report": text}) + "\n" for r in records))
        metrics = evaluate_files(path, references, work / f"evaluation_{path.stem}", options)
        ce = metrics["ce"]
        interval = metrics.get("ci", {}).get("ce.micro_f1") or {}
        rows[name] = {"ce_micro_f1": ce["micro_f1"], "ce_macro_f1": ce["macro_f1"],
                      "ci95": [interval["low"], interval["high"]] if interval else [],
                      "bleu_4": metrics["coco"]["bleu_4"], "rouge_l": metrics["coco"]["rouge_l"]}
    reports = [json.loads(line)["report"] for line in predictions.read_text().splitlines() if line.strip()]
    both = sum(bool(s.get("findings")) and bool(s.get("impression")) for s in map(split_sections, reports))
    rows["model"].update({"words_mean": sum(len(r.split()) for r in reports) / max(1, len(reports)),
                          "share_with_findings_and_impression": both / max(1, len(reports)),
                          "generation_seconds": round(generation_seconds, 1), "example": reports[0] if reports else ""})
    return {"n": len(records), "seed": seed, "rows": rows}


def real_ct_report(checkpoint: Path, work: Path) -> dict[str, Any] | None:
    """The model's report for the shared real chest CT (None when ../shared/data is not on this machine)."""
    from rrg3d.commands.demo import shared_data_dir
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports
    from rrg3d.text.reports import split_sentences

    shared = shared_data_dir()
    if shared is None or not (shared / REAL_CT).exists():
        return None
    out = work / "real_ct_prediction.jsonl"
    generate_reports(load_checkpoint(checkpoint, merge_lora=True), [shared / REAL_CT], out, progress=False,
                     resume=False, checkpoint=str(checkpoint))
    report = json.loads(out.read_text().splitlines()[0])["report"]
    return {"scan": str(REAL_CT), "report": report, "sentences": len(split_sentences(report)),
            "words": len(report.split())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="work folder (the demo output goes to WORK/demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo.json")
    parser.add_argument("--reuse", action="store_true", help="score WORK/demo as it is (do not run the demo)")
    parser.add_argument("--unseen", type=int, default=60, help="unseen phantoms to score (default 60)")
    parser.add_argument("--unseen-seed", type=int, default=1, help="their seed (the demo uses 0)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("demo_args", nargs="*", help="extra `rrg3d demo` arguments (after --)")
    args = parser.parse_args(argv)

    demo = args.work / "demo"
    env_model = args.work / "installed_model"
    os.environ["RRG3D_MODEL"] = str(env_model)  # never replace the user's own default model
    seconds = logged_seconds(demo) if args.reuse else run_demo(demo, args.demo_args)
    checkpoint = demo / "runs" / "sft" / "final"
    config = json.loads((demo / "phantoms" / "phantom.json").read_text())
    unseen = score_unseen(checkpoint, demo / "phantoms" / "manifest.jsonl", args.work, n=args.unseen,
                          seed=args.unseen_seed, style=config.get("style") or "hospital_a", bootstrap=args.bootstrap)
    real = real_ct_report(checkpoint, args.work)
    rows = unseen["rows"]
    model, majority, constant = rows["model"], rows["majority-class report"], rows["best constant report"]
    verdicts = {
        "demo_within_600_s": seconds is not None and seconds <= DEMO_SECONDS_TARGET,
        "ce_at_least_0_50": model["ce_micro_f1"] >= CE_TARGET,
        "ce_at_least_majority_plus_0_15": model["ce_micro_f1"] >= majority["ce_micro_f1"] + MARGIN_TARGET,
        "words_at_least_20_with_findings_and_impression": (model["words_mean"] >= WORDS_TARGET
                                                           and model["share_with_findings_and_impression"] >= 0.9),
        "real_ct_several_sentences": real is None or real["sentences"] >= 2,
    }
    result = {"benchmark": "demo", "demo_seconds": seconds, "cpu_count": os.cpu_count(), "unseen": unseen,
              "margin_over_majority": model["ce_micro_f1"] - majority["ce_micro_f1"],
              "margin_over_best_constant": model["ce_micro_f1"] - constant["ce_micro_f1"],
              "real_ct": real, "verdicts": verdicts, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"demo: {seconds if seconds is not None else float('nan'):.0f} s on {os.cpu_count()} CPUs; "
          f"{unseen['n']} unseen phantoms (seed {unseen['seed']})")
    print(f"{'':<24}{'CE micro-F1':>12}  {'95% CI':<16}{'macro-F1':>9}{'BLEU-4':>8}")
    for name, row in rows.items():
        ci = "[" + ", ".join(f"{v:.3f}" for v in row["ci95"]) + "]" if row["ci95"] else ""
        print(f"{name:<24}{row['ce_micro_f1']:>12.3f}  {ci:<16}{row['ce_macro_f1']:>9.3f}{row['bleu_4']:>8.3f}")
    print(f"words per report {model['words_mean']:.1f}; with findings and impression "
          f"{model['share_with_findings_and_impression']:.0%}")
    if real is not None:
        print(f"real CT ({real['scan']}): {real['sentences']} sentences: {real['report']}")
    for name, ok in verdicts.items():
        print(f"  {'met' if ok else 'NOT met'}: {name}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
