"""Loading and pairing predictions and references: every mismatch counted or a clear error."""

from __future__ import annotations

import json
import re

import pytest

from rrg3d.evaluate.records import EvaluationError, load_predictions, load_references, pair


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_statuses_and_counts(tmp_path):
    refs = _jsonl(tmp_path / "refs.jsonl", [{"id": i, "report": f"report {i}"} for i in "abcde"]
                  + [{"id": "f", "report": ""}])
    preds = _jsonl(tmp_path / "pred.jsonl", [
        {"id": "a", "report": "fine"}, {"id": "b", "report": "   "}, {"id": "c", "report": "x", "error": "OOM"},
        {"id": "e", "report": None}, {"id": "f", "report": "no reference text"}, {"id": "zz", "report": "extra"}])
    references, without = load_references(refs)
    assert without == ["f"]
    paired = pair(references, load_predictions(preds), "score-empty", without)
    assert paired.status == ["ok", "empty", "error", "missing", "empty"]
    assert paired.candidates == ["fine", "", "", "", ""]
    assert paired.counts == {"references": 5, "predictions": 6, "matched": 4, "scored": 5, "ok": 1,
                             "missing_predictions": 1, "empty_predictions": 2, "errors": 1, "extra_predictions": 1,
                             "references_without_report": 1, "missing_policy": "score-empty"}
    assert paired.problems["extra"] == ["zz"] and paired.problems["reference_without_report"] == ["f"]
    skipped = pair(references, load_predictions(preds), "skip", without)
    assert skipped.ids == ["a"] and skipped.counts["missing_predictions"] == 1
    with pytest.raises(EvaluationError, match="4 of 5 references have no usable prediction"):
        pair(references, load_predictions(preds), "fail", without)


def test_clear_errors(tmp_path):
    refs, _ = load_references(_jsonl(tmp_path / "refs.jsonl", [{"id": "a", "report": "x"}]))
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": "a", "report": "x"}, {"id": "a", "report": "y"}])
    message = "dup.jsonl:2 [id]: duplicate prediction id 'a' (first on line 1)"
    with pytest.raises(EvaluationError, match=re.escape(message)):
        load_predictions(dup)
    other = _jsonl(tmp_path / "other.jsonl", [{"id": "q", "report": "x"}])
    with pytest.raises(EvaluationError, match="no prediction id matches a reference id"):
        pair(refs, load_predictions(other))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "report": "x"}\n{oops\n')
    with pytest.raises(EvaluationError, match=re.escape("bad.jsonl:2: invalid JSON")):
        load_predictions(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvaluationError, match="empty"):
        load_predictions(tmp_path / "empty.jsonl")
    with pytest.raises(EvaluationError, match="not found"):
        load_predictions(tmp_path / "missing.jsonl")
    dup_refs = _jsonl(tmp_path / "duprefs.jsonl", [{"id": "a", "report": "x"}, {"id": "a", "report": "x"}])
    with pytest.raises(EvaluationError, match="duplicate reference id"):
        load_references(dup_refs)


def test_manifest_and_csv_references(tmp_path):
    manifest = _jsonl(tmp_path / "manifest.jsonl", [
        {"id": "s1", "images": {"ct": "a.nii.gz"}, "report": "Findings: clear.",
         "region_reports": {"lungs": "Clear."}},
        {"id": "s2", "images": {"ct": "b.nii.gz"}}])
    references, without = load_references(manifest)
    assert [r.id for r in references] == ["s1"] and without == ["s2"]
    assert references[0].region_reports == {"lungs": "Clear."}
    csv_path = tmp_path / "refs.csv"
    csv_path.write_text('AccessionNo,report_text,Emphysema\ntrain_1,"Mild emphysema.",1\ntrain_2,"",0\n')
    references, without = load_references(csv_path)
    assert [(r.id, r.report) for r in references] == [("train_1", "Mild emphysema.")] and without == ["train_2"]
