"""`rrg3d evaluate`: the output contract on a tiny pair of files, the real labeler end to end, clear errors."""

from __future__ import annotations

import csv
import json

import pytest

from rrg3d.cli import main
from rrg3d.evaluate.runner import NO_REGION_REPORTS

REFS = [
    {"id": "s1", "report": "Cardiomegaly. Small right pleural effusion. Trachea and bronchi are patent.",
     "region_reports": {"heart": "Cardiomegaly.", "pleura": "Small right pleural effusion."}},
    {"id": "s2", "report": "Emphysema in both upper lobes. No nodule. Thyroid normal.",
     "region_reports": {"lungs": "Emphysema in both upper lobes. No nodule."}},
    {"id": "s3", "report": "Normal chest CT. Heart size normal. No effusion."},
    {"id": "s4", "report": "Lung nodule of 6 mm in the right lower lobe. Atelectasis at the left base."},
]
PREDS = [
    {"id": "s1", "report": "Cardiomegaly. No pleural effusion. Trachea is patent.",
     "regions": {"heart": "The region 0 is heart. Cardiomegaly.", "pleura": "No effusion."}},
    {"id": "s2", "report": "Emphysema in the upper lobes. A small nodule.", "regions": {"lungs": "Emphysema."}},
    {"id": "s3", "report": "", "error": "CUDA out of memory"},
    {"id": "zz", "report": "A prediction without a reference."},
]
PREDS_B = [{"id": r["id"], "report": r["report"]} for r in REFS]

CONTRACT_COCO = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}
CONTRACT_CE = {"micro_f1", "macro_f1", "micro_precision", "micro_recall", "macro_precision", "macro_recall",
               "per_label"}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("RRG3D_CACHE_DIR", str(tmp_path / "cache"))
    return (_write(tmp_path / "pred.jsonl", PREDS), _write(tmp_path / "refs.jsonl", REFS),
            _write(tmp_path / "b.jsonl", PREDS_B), tmp_path / "out")


def test_evaluate_writes_every_output_with_the_contract_keys(files, stub_labeler, monkeypatch, capsys):
    import rrg3d.evaluate.runner as runner

    monkeypatch.setattr(runner, "load_default_labeler", lambda model_dir=None: stub_labeler)
    pred, refs, other, out = files
    code = main(["evaluate", pred, "--refs", refs, "--out", str(out), "--judge", "rule", "--compare", other,
                 "--bootstrap", "200", "--seed", "3", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr()
    assert "4 references scored (2 usable predictions, 1 missing, 0 empty, 1 failed, 1 extra)" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["coco"]) == CONTRACT_COCO and all(isinstance(metrics["coco"][k], float) for k in CONTRACT_COCO)
    assert set(metrics["ce"]) >= CONTRACT_CE and len(metrics["ce"]["per_label"]) == 18
    assert set(metrics["extra"]) == {"rouge_score", "sacrebleu", "meteor_nltk"}
    assert set(metrics["extra"]["rouge_score"]) == {"rouge1", "rouge2", "rougeL"}
    assert metrics["counts"] | {"missing_policy": None} == {
        "references": 4, "predictions": 4, "matched": 3, "scored": 4, "ok": 2, "missing_predictions": 1,
        "empty_predictions": 0, "errors": 1, "extra_predictions": 1, "references_without_report": 0,
        "missing_policy": None}
    assert metrics["problems"] == {"missing": ["s4"], "error": ["s3"], "extra": ["zz"]}
    for name in ("coco.bleu_4", "coco.meteor", "coco.cider", "extra.sacrebleu", "ce.micro_f1", "judge.score"):
        ci = metrics["ci"][name]
        assert ci["n_resamples"] == 200 and ci["low"] <= ci["high"], name
    assert set(metrics["judge"]["prompts"]) == {"score", "findings_match"}
    assert metrics["judge"]["prompts"]["findings_match"]["prompt_version"] == "findings-match-v1"
    assert metrics["judge"]["prompts"]["score"]["n_sent"] == 2
    assert metrics["lengths"]["kl_divergence"] > 0 and metrics["lengths"]["png"] == "lengths.png"
    assert metrics["ce_regions"]["heart"]["micro_f1"] == 1.0
    assert metrics["region_recognition"]["source"] == "region reports"
    # B has no region reports: no tables of zeros, one line that says why
    assert "region_recognition" not in metrics["compare"] and "ce_regions" not in metrics["compare"]
    assert f"compare: {NO_REGION_REPORTS}" in metrics["warnings"]
    assert not any(w.startswith("no region reports") for w in metrics["warnings"])
    paired = metrics["compare"]["paired_bootstrap"]
    assert paired["n_common"] == 4 and paired["metrics"]["coco.bleu_1"]["delta"] < 0  # B copies the references
    assert metrics["compare"]["coco"]["bleu_1"] == pytest.approx(1.0, abs=1e-6)

    md = (out / "metrics.md").read_text()
    assert "| BLEU-4 (coco) |" in md and "| CE micro F1 |" in md and "Paired bootstrap" in md
    assert "| Judge findings-match rubric (0-1) |" in md and "GREEN" not in md
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert [r["id"] for r in rows] == ["s1", "s2", "s3", "s4"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "missing"]
    assert {"coco.bleu_4", "coco.meteor", "ce.f1", "judge.score", "judge.findings_match"} <= set(rows[0])
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "Worst" in html and "Best" in html
    assert "Judge findings-match rubric" in html and "GREEN" not in html and NO_REGION_REPORTS in html
    assert "src='http" not in html and 'src="http' not in html
    answers = [json.loads(line) for line in (out / "judge.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and {a["prompt"] for a in answers} == {"score", "findings_match"}


def test_evaluate_end_to_end_with_the_real_labeler(files):
    pytest.importorskip("rrg3d.text.labeler")
    from rrg3d.text.labeler import load_labeler  # noqa: F401 - the default labeler must exist

    pred, refs, _, out = files
    assert main(["evaluate", pred, "--refs", refs, "--out", str(out), "--judge", "rule", "--bootstrap", "100",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["ce"]["micro_f1"] <= 1 and metrics["ce"]["labeler"] != "StubLabeler"
    per_label = metrics["ce"]["per_label"]
    assert per_label["Cardiomegaly"]["tp"] == 1  # s1: both reports state cardiomegaly
    assert per_label["Pleural effusion"]["fn"] == 1  # s1: the effusion is negated in the prediction
    assert per_label["Emphysema"]["tp"] == 1


def test_clear_errors(files, tmp_path, capsys):
    pred, refs, _, out = files
    duplicated = _write(tmp_path / "dup.jsonl", [*PREDS, PREDS[0]])
    assert main(["evaluate", duplicated, "--refs", refs, "--out", str(out)]) == 2
    assert "duplicate prediction id 's1'" in capsys.readouterr().err
    unrelated = _write(tmp_path / "unrelated.jsonl", [{"id": "x1", "report": "text"}])
    assert main(["evaluate", unrelated, "--refs", refs, "--out", str(out)]) == 2
    assert "no prediction id matches a reference id" in capsys.readouterr().err
    assert main(["evaluate", pred, "--refs", refs, "--out", str(out), "--missing", "fail"]) == 2
    assert "2 of 4 references have no usable prediction" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_without_predicted_region_reports_region_tables_are_left_out(files, stub_labeler, monkeypatch):
    import rrg3d.evaluate.runner as runner

    monkeypatch.setattr(runner, "load_default_labeler", lambda model_dir=None: stub_labeler)
    _, refs, plain, out = files  # the references have region reports, these predictions none
    with pytest.warns(FutureWarning, match="not the GREEN model"):  # the deprecated prompt name still works
        assert main(["evaluate", plain, "--refs", refs, "--out", str(out), "--judge", "rule", "--judge-prompts",
                     "score,green", "--bootstrap", "0", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "region_recognition" not in metrics and "ce_regions" not in metrics
    assert metrics["warnings"].count(NO_REGION_REPORTS) == 1
    assert NO_REGION_REPORTS in (out / "metrics.md").read_text()
    assert "Region recognition" not in (out / "report.html").read_text()
    assert set(metrics["judge"]["prompts"]) == {"score", "findings_match"}
