"""Evaluation outputs: ``metrics.json``, ``metrics.md``, ``per_sample.csv``, ``lengths.png`` and a self-contained
``report.html`` (the PNG inlined as base64, the tables, and the best and worst samples); with a judge also
``judge.jsonl`` (every answer, parsed or not), with PETRG-Score also ``petrg.jsonl`` (the non-normal region statuses
read from each reference and generated report). Every file is written atomically."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.evaluate.lengths import plot_lengths
from rrg3d.utils.files import atomic_path, atomic_write_json, atomic_write_text

#: Headline rows of the tables: (flat metric name, label).
HEADLINE = (
    ("coco.bleu_1", "BLEU-1 (coco)"), ("coco.bleu_2", "BLEU-2 (coco)"), ("coco.bleu_3", "BLEU-3 (coco)"),
    ("coco.bleu_4", "BLEU-4 (coco)"), ("coco.meteor", "METEOR 1.5 (coco)"), ("coco.rouge_l", "ROUGE-L (coco)"),
    ("coco.cider", "CIDEr-D (coco)"), ("extra.rouge_score.rouge1", "ROUGE-1 (rouge-score)"),
    ("extra.rouge_score.rouge2", "ROUGE-2 (rouge-score)"), ("extra.rouge_score.rougeL", "ROUGE-L (rouge-score)"),
    ("extra.sacrebleu", "BLEU (sacreBLEU, 0-100)"), ("extra.meteor_nltk", "METEOR (NLTK)"),
    ("ce.micro_precision", "CE micro precision"), ("ce.micro_recall", "CE micro recall"),
    ("ce.micro_f1", "CE micro F1"), ("ce.macro_precision", "CE macro precision"),
    ("ce.macro_recall", "CE macro recall"), ("ce.macro_f1", "CE macro F1"),
    ("judge.score", "Judge score (1-5)"), ("judge.findings_match", "Judge findings-match rubric (0-1)"),
    ("petrg.pet_all", "PETRG PET-All (macro F1)"), ("petrg.pet_abnormal", "PETRG PET-Abnormal (macro F1)"),
    ("petrg.ct_all", "PETRG CT-All (macro F1)"), ("petrg.ct_abnormal", "PETRG CT-Abnormal (macro F1)"),
    ("lengths.generated_mean", "Mean length, generated (words)"),
    ("lengths.reference_mean", "Mean length, reference (words)"),
)
SAMPLE_COLUMNS = ("coco.bleu_1", "coco.bleu_2", "coco.bleu_3", "coco.bleu_4", "coco.meteor", "coco.rouge_l",
                  "coco.cider",
                  "extra.rouge_score.rouge1", "extra.rouge_score.rouge2", "extra.rouge_score.rougeL",
                  "extra.meteor_nltk", "ce.tp", "ce.fp", "ce.fn", "ce.f1", "judge.score", "judge.findings_match",
                  "petrg.pet_agreement", "petrg.ct_agreement",
                  "lengths.reference", "lengths.generated")


def jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become ``null``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def lookup(metrics: dict[str, Any], name: str) -> float | None:
    """Value of a flat metric name in a ``metrics.json`` structure."""
    section, _, rest = name.partition(".")
    if section == "judge":
        value = ((metrics.get("judge") or {}).get("prompts") or {}).get(rest, {}).get("mean")
    elif section == "lengths":
        which = "generated" if rest.startswith("generated") else "reference"
        value = ((metrics.get("lengths") or {}).get(which) or {}).get("mean")
    else:
        value = metrics.get(section)
        for part in rest.split(".") if value is not None else []:
            value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) else None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.{digits}f}"


def _ci(ci: dict[str, Any], name: str) -> str:
    entry = ci.get(name)
    if not entry or entry.get("low") is None:
        return ""
    return f"[{_fmt(entry['low'])}, {_fmt(entry['high'])}]"


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    ci = metrics.get("ci") or {}
    rows = []
    for name, label in HEADLINE:
        value = lookup(metrics, name)
        if value is None and name not in ci:
            continue
        rows.append((label, name, _fmt(value), _ci(ci, name)))
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


_PETRG_SCORES = (("pet_all", "PET-All"), ("pet_abnormal", "PET-Abnormal"), ("ct_all", "CT-All"),
                 ("ct_abnormal", "CT-Abnormal"))


def _petrg_rows(petrg: dict[str, Any]) -> list[list[str]]:
    """Score rows (name, value, CI) of a PETRG entry (the system's, or ``extractor_vs_truth``)."""
    ci = petrg.get("ci") or {}
    return [[label, _fmt(petrg.get(key)), f"[{_fmt(ci[key]['low'])}, {_fmt(ci[key]['high'])}]"
             if ci.get(key) and ci[key].get("low") is not None else ""] for key, label in _PETRG_SCORES]


def _petrg_class_rows(petrg: dict[str, Any], axis: str) -> list[list[str]]:
    return [[name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"]), str(v["predicted"])]
            for name, v in (petrg.get("per_class") or {}).get(axis, {}).items()]


def _confusion_rows(matrix: list[list[int]], classes: list[str]) -> list[list[str]]:
    return [[name, *(str(x) for x in row)] for name, row in zip(classes, matrix, strict=True)]


def _abnormal_regions(confusion: dict[str, Any]) -> list[str]:
    """Regions whose matrices hold a non-normal status on either axis (reference or generated)."""
    out = []
    for axis in ("pet", "ct"):
        entry = confusion.get(axis) or {}
        last = len(entry.get("classes", [])) - 1
        for region, matrix in (entry.get("per_region") or {}).items():
            if region not in out and sum(v for i, row in enumerate(matrix) for j, v in enumerate(row)
                                         if i != last or j != last):
                out.append(region)
    return out


def _petrg_markdown(petrg: dict[str, Any]) -> list[str]:
    parts = ["", f"## PETRG-Score (extractor `{petrg.get('extractor', '')}`; {petrg.get('n_patients', 0)} patients, "
                 f"{petrg.get('n_region_pairs', 0)} patient x region pairs)", "",
             _md_table(["score", "macro F1", "95% CI"], _petrg_rows(petrg))]
    truth = petrg.get("extractor_vs_truth")
    if truth:
        parts += ["", f"Extractor against the references' truth ({truth.get('n_patients', 0)} studies, "
                      f"{truth.get('n_region_pairs', 0)} region pairs):", "",
                  _md_table(["score", "macro F1", "95% CI"], _petrg_rows(truth))]
    confusion = petrg.get("confusion") or {}
    for axis in ("pet", "ct"):
        entry = confusion.get(axis)
        if not entry:
            continue
        parts += ["", f"### {axis.upper()} classes", "",
                  _md_table(["class", "precision", "recall", "F1", "support", "predicted"],
                            _petrg_class_rows(petrg, axis)),
                  "", "Pooled confusion (rows: reference, columns: generated):", "",
                  _md_table([axis.upper(), *entry["classes"]], _confusion_rows(entry["pooled"], entry["classes"]))]
    return parts


def markdown(metrics: dict[str, Any]) -> str:
    """The ``metrics.md`` text."""
    counts = metrics.get("counts", {})
    parts = [f"# Evaluation of `{Path(metrics.get('predictions', '')).name}`", "",
             f"References: `{metrics.get('references', '')}` — {counts.get('scored', 0)} scored of "
             f"{counts.get('references', 0)} references ({counts.get('ok', 0)} usable predictions, "
             f"{counts.get('missing_predictions', 0)} missing, {counts.get('empty_predictions', 0)} empty, "
             f"{counts.get('errors', 0)} failed, {counts.get('extra_predictions', 0)} extra; missing policy "
             f"`{counts.get('missing_policy', '')}`).", "",
             _md_table(["metric", "value", "95% CI"], [[label, value, ci] for label, _, value, ci in
                                                      headline_rows(metrics)])]
    ce = metrics.get("ce") or {}
    if ce.get("per_label"):
        parts += ["", "## Clinical efficacy per label", "",
                  _md_table(["label", "precision", "recall", "F1", "support", "predicted"],
                            [[name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"]),
                              str(v["predicted"])] for name, v in ce["per_label"].items()])]
    regions = metrics.get("ce_regions") or {}
    if regions:
        parts += ["", "## Clinical efficacy per region", "",
                  _md_table(["region", "n", "micro F1", "macro F1"],
                            [[name, str(v["n"]), _fmt(v["micro_f1"]), _fmt(v["macro_f1"])]
                             for name, v in regions.items()])]
    recognition = metrics.get("region_recognition") or {}
    if recognition.get("per_region"):
        parts += ["", f"## Region recognition ({recognition.get('source', '')})", "",
                  _md_table(["region", "precision", "recall", "F1", "support"],
                            [[name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])]
                             for name, v in recognition["per_region"].items()]
                            + [["micro", _fmt(recognition["micro_precision"]), _fmt(recognition["micro_recall"]),
                                _fmt(recognition["micro_f1"]), ""]])]
    lengths = metrics.get("lengths") or {}
    if lengths:
        parts += ["", "## Report lengths (words)", "",
                  _md_table(["", "mean", "median", "std", "min", "max"],
                            [[side] + [_fmt(lengths[side].get(k), 1) for k in ("mean", "median", "std", "min", "max")]
                             for side in ("reference", "generated")]),
                  "", f"{lengths.get('kl_direction', 'KL')}: {_fmt(lengths.get('kl_divergence'))}"]
    judge = metrics.get("judge")
    if judge:
        rows = [[kind, _fmt(v.get("mean")), str(v.get("n_scored")), str(v.get("parse_failures")),
                 str(v.get("errors")), str(v.get("cached"))] for kind, v in judge.get("prompts", {}).items()]
        parts += ["", f"## Judge `{judge.get('id')}`", "",
                  _md_table(["prompt", "mean", "scored", "parse failures", "errors", "cached"], rows)]
    if metrics.get("petrg"):
        parts += _petrg_markdown(metrics["petrg"])
    compare = metrics.get("compare")
    if compare:
        paired = compare.get("paired_bootstrap", {})
        rows = [[name, _fmt(v["a"]), _fmt(v["b"]), _fmt(v["delta"]), f"[{_fmt(v['low'])}, {_fmt(v['high'])}]",
                 _fmt(v["p_value"], 3)] for name, v in paired.get("metrics", {}).items()]
        parts += ["", f"## Paired bootstrap against `{Path(compare['predictions']).name}` "
                      f"({paired.get('n_common', 0)} common samples)", "",
                  _md_table(["metric", "A", "B", "A - B", "95% CI", "p"], rows)]
    warnings = metrics.get("warnings") or []
    if warnings:
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(parts) + "\n"


def write_per_sample(path: Path, system: Any) -> None:
    paired = system.paired
    columns = [c for c in SAMPLE_COLUMNS if c in system.per_sample]
    columns += sorted(c for c in system.per_sample if c not in columns)
    judge_columns = [kind for kind in system.judge_details]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "status", *columns, *(f"judge.{k}.parse_ok" for k in judge_columns)])
        for i, sample_id in enumerate(paired.ids):
            row: list[Any] = [sample_id, paired.status[i]]
            for column in columns:
                value = float(system.per_sample[column][i])
                row.append("" if not math.isfinite(value) else f"{value:.6g}")
            for kind in judge_columns:
                detail = system.judge_details[kind][i]
                row.append("" if "parse_ok" not in detail else int(bool(detail["parse_ok"])))
            writer.writerow(row)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _samples_html(system: Any, count: int = 3) -> str:
    key = "coco.rouge_l" if "coco.rouge_l" in system.per_sample else next(iter(system.per_sample), None)
    if key is None or not system.paired.ids:
        return ""
    values = np.nan_to_num(np.asarray(system.per_sample[key], dtype=np.float64), nan=-1.0)
    order = np.argsort(values, kind="stable")
    picks = [("Worst", order[:count]), ("Best", order[::-1][:count])]
    out = [f"<h2>Samples by {html.escape(key)}</h2>"]
    paired = system.paired
    for title, indices in picks:
        out.append(f"<h3>{title}</h3>")
        for i in indices:
            out.append(f"<div class='sample'><p><b>{html.escape(paired.ids[i])}</b> — {html.escape(key)} "
                       f"{values[i]:.4f} — status {html.escape(paired.status[i])}</p>"
                       f"<p class='label'>Reference</p><p>{html.escape(paired.references[i])}</p>"
                       f"<p class='label'>Generated</p><p>{html.escape(paired.candidates[i] or '(empty)')}</p>"
                       "</div>")
    return "\n".join(out)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.sample{border:1px solid #ddd;padding:0.5em 1em;margin:0.5em 0}.label{color:#666;
margin-bottom:0}.warn{color:#a33}img{max-width:100%}"""


def _petrg_html(petrg: dict[str, Any]) -> str:
    """PETRG-Score: the four scores, the extractor against truth, per-class F1, pooled and per-region confusion."""
    parts = [f"<h2>PETRG-Score (extractor {html.escape(str(petrg.get('extractor', '')))})</h2>",
             f"<p>{petrg.get('n_patients', 0)} patients, {petrg.get('n_region_pairs', 0)} patient &times; region "
             "pairs; macro F1 over pooled pairs, classes absent from both sides left out.</p>",
             _html_table(["score", "macro F1", "95% CI"], _petrg_rows(petrg))]
    truth = petrg.get("extractor_vs_truth")
    if truth:
        parts += [f"<h3>Extractor against the references' truth ({truth.get('n_patients', 0)} studies)</h3>",
                  _html_table(["score", "macro F1", "95% CI"], _petrg_rows(truth))]
    confusion = petrg.get("confusion") or {}
    for axis in ("pet", "ct"):
        entry = confusion.get(axis)
        if not entry:
            continue
        parts += [f"<h3>{axis.upper()} classes</h3>",
                  _html_table(["class", "precision", "recall", "F1", "support", "predicted"],
                              _petrg_class_rows(petrg, axis)),
                  "<p>Pooled confusion (rows: reference, columns: generated)</p>",
                  _html_table([axis.upper(), *entry["classes"]], _confusion_rows(entry["pooled"], entry["classes"]))]
    regions = _abnormal_regions(confusion)
    parts.append(f"<h3>Per-region confusion ({len(regions)} regions with a non-normal status; the others are all "
                 "normal)</h3>")
    for region in regions:
        tables = []
        for axis in ("pet", "ct"):
            entry = confusion.get(axis) or {}
            matrix = (entry.get("per_region") or {}).get(region)
            if matrix is not None:
                tables.append(_html_table([f"{axis.upper()}: {region}", *entry["classes"]],
                                          _confusion_rows(matrix, entry["classes"])))
        parts.append(f"<details><summary>{html.escape(region)}</summary>{''.join(tables)}</details>")
    return "\n".join(parts)


def report_html(metrics: dict[str, Any], system: Any, png: bytes | None) -> str:
    """The self-contained HTML report."""
    counts = metrics.get("counts", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>rrg3d evaluation</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Evaluation of {html.escape(Path(metrics.get('predictions', '')).name)}</h1>",
             _html_table(["count", "value"], [[k, str(v)] for k, v in counts.items()]),
             "<h2>Metrics</h2>",
             _html_table(["metric", "key", "value", "95% CI"], [list(r) for r in headline_rows(metrics)])]
    ce = metrics.get("ce") or {}
    if ce.get("per_label"):
        parts += ["<h2>Clinical efficacy per label</h2>",
                  _html_table(["label", "precision", "recall", "F1", "support", "predicted"],
                              [[n, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"]),
                                str(v["predicted"])] for n, v in ce["per_label"].items()])]
    recognition = metrics.get("region_recognition") or {}
    if recognition.get("per_region"):
        parts += [f"<h2>Region recognition ({html.escape(recognition.get('source', ''))})</h2>",
                  _html_table(["region", "precision", "recall", "F1", "support"],
                              [[n, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])]
                               for n, v in recognition["per_region"].items()])]
    lengths = metrics.get("lengths") or {}
    parts.append("<h2>Report lengths</h2>")
    if png:
        parts.append(f"<img alt='report length distributions' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode('ascii')}'>")
    parts.append(f"<p>{html.escape(str(lengths.get('kl_direction', 'KL')))}: "
                 f"{_fmt(lengths.get('kl_divergence'))}</p>")
    if metrics.get("petrg"):
        parts.append(_petrg_html(metrics["petrg"]))
    compare = metrics.get("compare")
    if compare:
        paired = compare.get("paired_bootstrap", {})
        parts += [f"<h2>Paired bootstrap against {html.escape(Path(compare['predictions']).name)}</h2>",
                  _html_table(["metric", "A", "B", "A - B", "95% CI", "p"],
                              [[n, _fmt(v["a"]), _fmt(v["b"]), _fmt(v["delta"]),
                                f"[{_fmt(v['low'])}, {_fmt(v['high'])}]", _fmt(v["p_value"], 3)]
                               for n, v in paired.get("metrics", {}).items()])]
    parts.append(_samples_html(system))
    warnings = metrics.get("warnings") or []
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in warnings)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(out_dir: Path, metrics: dict[str, Any], system: Any, other: Any = None) -> None:
    """Write all five outputs into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series = {system.name: system.per_sample["lengths.generated"]}
    if other is not None:
        series[other.name if other.name != system.name else f"{other.name} (B)"] = other.per_sample[
            "lengths.generated"]
    png_path = plot_lengths(system.per_sample["lengths.reference"], series, out_dir / "lengths.png")
    metrics.setdefault("lengths", {})["png"] = png_path.name
    clean = jsonable(metrics)
    atomic_write_json(out_dir / "metrics.json", clean)
    atomic_write_text(out_dir / "metrics.md", markdown(clean))
    write_per_sample(out_dir / "per_sample.csv", system)
    atomic_write_text(out_dir / "report.html", report_html(clean, system, png_path.read_bytes()))
    if system.judge_details:
        lines = [json.dumps(jsonable({"id": sample_id, "prompt": kind, **details[i]}), ensure_ascii=False)
                 for kind, details in system.judge_details.items() for i, sample_id in enumerate(system.paired.ids)]
        atomic_write_text(out_dir / "judge.jsonl", "\n".join(lines) + "\n")
    if getattr(system, "petrg_details", None):
        lines = [json.dumps(jsonable(detail), ensure_ascii=False) for detail in system.petrg_details]
        atomic_write_text(out_dir / "petrg.jsonl", "\n".join(lines) + "\n")
