"""Report text handling and the 18-label abnormality labelers (rule and learned), plus `rrg3d labeler`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from rrg3d.cli import main
from rrg3d.text.labeler import LabelerError, LearnedLabeler, RuleLabeler, load_labeler, mention_order
from rrg3d.text.labels import CTRATE_LABELS
from rrg3d.text.reports import split_sections, split_sentences


def _labels(text: str) -> set[str]:
    row = RuleLabeler().predict([text])[0]
    return {name for name, value in zip(CTRATE_LABELS, row, strict=True) if value}


def test_sections_and_sentences():
    sections = split_sections("Technique: Non-contrast CT. Findings: A 3.5 mm nodule. No effusion. Impression: Nodule.")
    assert sections["findings"].startswith("A 3.5 mm nodule")
    assert sections["impression"].startswith("Nodule")
    sentences = split_sentences("A 3.5 mm nodule is seen in the right upper lobe. No effusion. 1. Emphysema.")
    assert sentences[0] == "A 3.5 mm nodule is seen in the right upper lobe."
    assert len(sentences) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("There is a small right pleural effusion.", {"Pleural effusion"}),
        ("No pleural effusion.", set()),
        ("There is no pericardial or pleural effusion.", set()),
        ("Pleural effusion is not seen. Cardiomegaly is present.", {"Cardiomegaly"}),
        ("A pulmonary nodule cannot be excluded.", {"Lung nodule"}),  # uncertain counts as positive
        ("Centrilobular emphysema in both upper lobes.", {"Emphysema"}),
        ("Ground-glass opacity in the left lower lobe.", {"Lung opacity"}),
        ("Calcified plaques in the coronary arteries.", {"Coronary artery wall calcification"}),
        ("A pacemaker is present.", {"Medical material"}),
        ("Sliding hiatal hernia.", {"Hiatal hernia"}),
        ("Subcarinal lymphadenopathy, 18 mm.", {"Lymphadenopathy"}),
        ("No consolidation. Right lower lobe consolidation with air bronchograms.", {"Consolidation"}),
    ],
)
def test_rule_labeler_negation_uncertainty_and_synonyms(text, expected):
    assert _labels(text) == expected


def test_predict_shape_order_and_explain():
    labeler = load_labeler(None)
    out = labeler.predict(["Cardiomegaly.", "", "No emphysema."])
    assert out.shape == (3, 18) and out.dtype == np.int8
    assert out[0, CTRATE_LABELS.index("Cardiomegaly")] == 1 and out[1:].sum() == 0
    mentions = RuleLabeler().explain("No emphysema. Mild cardiomegaly.")
    by_label = {m["label"]: m for m in mentions}
    assert by_label["Emphysema"]["negated"] and not by_label["Cardiomegaly"]["negated"]


TINY = [
    ("Mild cardiomegaly. Lungs clear.", "Cardiomegaly"),
    ("The heart is enlarged.", "Cardiomegaly"),
    ("Small left pleural effusion.", "Pleural effusion"),
    ("Bilateral pleural effusions with compressive changes.", "Pleural effusion"),
    ("Paraseptal emphysema in the upper lobes.", "Emphysema"),
    ("Emphysematous changes are present.", "Emphysema"),
    ("No abnormality.", None),
    ("The lungs are clear. No effusion.", None),
    ("Normal heart size. No emphysema.", None),
    ("Unremarkable study.", None),
]


@pytest.fixture(scope="module")
def tiny_learned():
    texts = [t for t, _ in TINY] * 2
    labels = np.zeros((len(texts), 18), dtype=np.int8)
    for i, (_, label) in enumerate(TINY * 2):
        if label:
            labels[i, CTRATE_LABELS.index(label)] = 1
    return LearnedLabeler(progress=False).fit(texts, labels), texts, labels


def test_mention_order_recovers_the_order_reports_name_findings_in():
    reports = [
        "Right pleural effusion. Two lung nodules. Cardiac pacemaker in situ.",
        "Lung nodule in the left upper lobe. Mild emphysema.",
        "Left pleural effusion. Mild emphysema. No lung nodule.",  # a negated mention casts no vote
        "Moderate emphysema. Median sternotomy wires.",
        "The lungs are clear.",
        None,
    ]
    order = mention_order(reports)
    named = ["Pleural effusion", "Lung nodule", "Emphysema", "Medical material"]
    assert order[:4] == named
    assert order[4:] == [label for label in CTRATE_LABELS if label not in named]  # never named: label order
    assert sorted(order) == sorted(CTRATE_LABELS)


def test_learned_labeler_learns_and_round_trips(tmp_path, tiny_learned):
    model, texts, labels = tiny_learned
    pred = model.predict(texts)
    assert (pred == labels).mean() > 0.95
    model.save(tmp_path / "lab")
    again = LearnedLabeler.load(tmp_path / "lab", progress=False)
    np.testing.assert_array_equal(again.predict(texts), pred)
    config = json.loads((tmp_path / "lab" / "labeler.json").read_text())
    config["labels"] = list(reversed(config["labels"]))
    (tmp_path / "lab" / "labeler.json").write_text(json.dumps(config))
    with pytest.raises(LabelerError, match="label order"):
        LearnedLabeler.load(tmp_path / "lab")
    with pytest.raises(LabelerError, match="not trained"):
        LearnedLabeler(progress=False).predict(["x"])


def test_cli_apply_csv_and_jsonl(tmp_path, capsys):
    source = tmp_path / "in.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["AccessionNo", "report_text"])
        writer.writerows([["a1", "Small right pleural effusion."], ["a2", ""], ["a3", "No effusion."]])
    assert main(["labeler", "apply", str(source), "--out", str(tmp_path / "out.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "out.csv").read_text().splitlines()))
    assert list(rows[0]) == ["id", *CTRATE_LABELS]
    assert [r["id"] for r in rows] == ["a1", "a2", "a3"]
    assert rows[0]["Pleural effusion"] == "1" and rows[2]["Pleural effusion"] == "0"
    assert "a2" in capsys.readouterr().err  # the empty report is reported by id
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"id": "x", "report": "Cardiomegaly."}) + "\n")
    assert main(["labeler", "apply", str(jsonl), "--out", str(tmp_path / "o2.csv")]) == 0
    assert next(csv.DictReader((tmp_path / "o2.csv").read_text().splitlines()))["Cardiomegaly"] == "1"
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    assert main(["labeler", "apply", str(bad), "--out", str(tmp_path / "o3.csv")]) == 2
    assert "report_text" in capsys.readouterr().err


def test_cli_train_then_apply(tmp_path, capsys):
    train = tmp_path / "train.csv"
    with open(train, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["report_text", *CTRATE_LABELS])
        for text, label in TINY * 2:
            writer.writerow([text, *(int(name == label) for name in CTRATE_LABELS)])
    assert main(["labeler", "train", str(train), "--out", str(tmp_path / "model"), "--folds", "2"]) == 0
    assert (tmp_path / "model" / "labeler.json").exists()
    assert main(["labeler", "apply", str(train), "--out", str(tmp_path / "p.csv"), "--model",
                 str(tmp_path / "model")]) == 0
    missing = tmp_path / "missing.csv"
    missing.write_text("report_text,Cardiomegaly\nx,1\n")
    assert main(["labeler", "train", str(missing), "--out", str(tmp_path / "m2")]) == 2
    assert "missing column(s)" in capsys.readouterr().err


def test_rule_labeler_on_real_reports(shared_data):
    """The untrained rule labeler against the 800 manually labelled CT-RATE reports (no leakage: no training)."""
    with open(shared_data / "reports" / "ctrate_labeled_reports_train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = np.array([[int(float(r[name])) for name in CTRATE_LABELS] for r in rows], dtype=bool)
    pred = RuleLabeler().predict([r["report_text"] for r in rows]).astype(bool)
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    assert 2 * tp / (2 * tp + fp + fn) >= 0.93
