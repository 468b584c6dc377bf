"""How well do the labelers recover manual labels from real reports they never saw?

On a CT-RATE-style labelled report CSV (default ../shared/data/reports/ctrate_labeled_reports_train.csv: 800 real
reports with manual labels for the 18 abnormalities), 5-fold cross-validation with a fixed seed. For every
fold, learned labelers are trained on the other four folds only (their L2 penalty chosen by an inner 4-fold
cross-validation on those four folds) and scored on the held-out fold; untrained labelers (keyword baseline,
rules) are scored on the same folds. Micro- and macro-F1 are computed over all held-out predictions.

* keyword: a plain substring match per label, no negation (the usual baseline, ~0.90 micro-F1);
* rules: rrg3d's RuleLabeler (patterns, negation and uncertainty scopes);
* learned: MiniLM sentence embeddings (mean and max over sentences) + per-label logistic regression;
* learned+rules: the same with the rule labeler's affirmed/negated/uncertain indicators as extra features.

Prints a table and writes benchmarks/results/labeler.json.

    python benchmarks/labeler.py [--csv PATH] [--folds 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from rrg3d.data.adapters.ctrate import CTRATE_LABELS
from rrg3d.text.labeler import LearnedLabeler, RuleLabeler

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "reports" / "ctrate_labeled_reports_train.csv"

#: The keyword baseline: one or two obvious stems per label, matched anywhere, no negation handling.
KEYWORDS = {
    "Medical material": ("stent", "pacemaker", "catheter", "prosthe", "port "),
    "Arterial wall calcification": ("aortic calcif", "atheroscler", "arterial wall calcif"),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart"),
    "Pericardial effusion": ("pericardial effusion", "pericardial fluid"),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal hernia", "hiatus hernia"),
    "Lymphadenopathy": ("lymphadenopathy", "lymph node"),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelecta",),
    "Lung nodule": ("nodule",),
    "Lung opacity": ("ground glass", "ground-glass", "opacit"),
    "Pulmonary fibrotic sequela": ("fibrotic", "fibrosis", "sequela"),
    "Pleural effusion": ("pleural effusion",),
    "Mosaic attenuation pattern": ("mosaic",),
    "Peribronchial thickening": ("peribronchial",),
    "Consolidation": ("consolidat",),
    "Bronchiectasis": ("bronchiectasis", "bronchiectatic"),
    "Interlobular septal thickening": ("septal thickening", "interlobular"),
}


def keyword_predict(texts: list[str]) -> np.ndarray:
    lowered = [t.lower() for t in texts]
    return np.array([[int(any(k in t for k in KEYWORDS[label])) for label in CTRATE_LABELS] for t in lowered],
                    dtype=np.int8)


def f1_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    pred, true = pred.astype(bool), true.astype(bool)
    tp, fp, fn = (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)
    per_label = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return {"micro_f1": float(2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())),
            "macro_f1": float(per_label.mean()),
            "per_label": {name: float(v) for name, v in zip(CTRATE_LABELS, per_label, strict=True)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "labeler.json")
    args = parser.parse_args(argv)
    with open(args.csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    texts = [row["report_text"] or "" for row in rows]
    truth = np.array([[int(float(row[name])) for name in CTRATE_LABELS] for row in rows], dtype=np.int8)
    order = np.random.default_rng(args.seed).permutation(len(texts))
    fold_of = np.empty(len(texts), dtype=int)
    fold_of[order] = np.arange(len(texts)) % args.folds

    start = time.perf_counter()
    predictions = {"keyword": keyword_predict(texts), "rules": RuleLabeler().predict(texts)}
    seconds = {"keyword": 0.0, "rules": time.perf_counter() - start}
    for name, rule_features in (("learned", False), ("learned+rules", True)):
        start = time.perf_counter()
        model = LearnedLabeler(rule_features=rule_features, progress=False)
        features = model.features(texts)  # embeddings do not depend on labels: computed once for all folds
        pred = np.zeros_like(truth)
        for k in range(args.folds):
            train, test = fold_of != k, fold_of == k
            model.fit([texts[i] for i in np.flatnonzero(train)], truth[train], folds=4, seed=args.seed,
                      features=features[train])
            pred[test] = model._predict_features(features[test]) >= 0.5
        predictions[name] = pred
        seconds[name] = time.perf_counter() - start
    results = {name: dict(f1_scores(pred, truth), seconds=round(seconds[name], 1))
               for name, pred in predictions.items()}

    names = list(results)
    print(f"{'label':<36}" + "".join(f"{n:>15}" for n in names))
    for label in CTRATE_LABELS:
        print(f"{label:<36}" + "".join(f"{results[n]['per_label'][label]:>15.3f}" for n in names))
    for metric in ("micro_f1", "macro_f1"):
        print(f"{metric:<36}" + "".join(f"{results[n][metric]:>15.4f}" for n in names))
    output = {"csv": args.csv.name, "n_reports": len(texts), "folds": args.folds, "seed": args.seed,
              "protocol": "held-out folds only; learned models trained on the other folds, L2 by inner 4-fold CV",
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
