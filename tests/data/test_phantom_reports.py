"""Phantom report writer: layout per style, determinism, details in the text, and label agreement with the labeler.

The sentence-bank tests read the real labelled reports of ../shared/data at run time only (skipped without them);
no text of those reports appears in this file. The small CSV written by ``test_bank_mining_rules`` is made of
sentences written for this test.
"""

from __future__ import annotations

import csv
import dataclasses
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from rrg3d.data.phantom.model import LABEL_REGION, LOBES, REGIONS, SEVERITIES, SIDES, STYLES, Anatomy, Case, Finding
from rrg3d.data.phantom.reports import PhantomReport, SentenceBank, format_size, lobes_phrase, write_report
from rrg3d.text.labels import CTRATE_LABELS

REPORTS_CSV = ("reports", "ctrate_labeled_reports_train.csv")

# ------------------------------------------------------------------------------------------------ case samplers

_MATERIAL_REGION = {"pacemaker": "heart", "sternotomy wires": "bone", "port catheter": "mediastinum",
                    "aortic stent": "mediastinum", None: "mediastinum"}
_STATIONS = ("right paratracheal", "left paratracheal", "subcarinal", "right hilar", "left hilar", "prevascular")


def _edge_finding(label: str, rng: np.random.Generator) -> Finding:
    """A finding with any subset of its optional fields filled (exercises the writer's fallbacks)."""

    def maybe(value, p: float = 0.6):
        return value if rng.random() < p else None

    region = LABEL_REGION[label]
    kind = None
    detail: dict = {}
    lobes: list[str] = []
    if label == "Medical material":
        kind = [*_MATERIAL_REGION][int(rng.integers(len(_MATERIAL_REGION)))]
        region = _MATERIAL_REGION[kind]
    elif label == "Lymphadenopathy":
        kind = maybe("mediastinal")
        if rng.random() < 0.7:
            detail["stations"] = sorted(rng.choice(_STATIONS, size=int(rng.integers(1, 4)), replace=False).tolist())
    elif label == "Emphysema":
        kind = maybe(str(rng.choice(["centrilobular", "paraseptal"])))
    elif label == "Atelectasis":
        kind = maybe(str(rng.choice(["subsegmental", "lobar"])))
    elif label == "Lung nodule":
        kind = maybe("solid")
    elif label == "Bronchiectasis":
        kind = maybe("cylindrical")
    elif label == "Coronary artery wall calcification" and rng.random() < 0.6:
        detail["vessels"] = ["LAD", "RCA", "LCx"][: int(rng.integers(1, 4))]
    elif label == "Arterial wall calcification":
        detail["vessel"] = "aorta"
    elif label == "Cardiomegaly" and rng.random() < 0.5:
        detail["cardiothoracic_ratio"] = round(float(rng.uniform(0.55, 0.7)), 2)
    if region in ("lung", "trachea and bronchi") and rng.random() < 0.7:
        lobes = sorted(rng.choice(LOBES, size=int(rng.integers(1, 4)), replace=False).tolist(), key=LOBES.index)
    size = None
    if rng.random() < 0.7:
        size = float(round(rng.uniform(50, 70))) if label == "Cardiomegaly" else float(round(rng.uniform(3, 60)))
    return Finding(label, region, side=maybe(str(rng.choice(SIDES))), lobes=lobes, size_mm=size,
                   severity=maybe(str(rng.choice(SEVERITIES))), count=maybe(int(rng.integers(1, 6))), kind=kind,
                   suv_max=maybe(round(float(rng.uniform(2, 12)), 1), 0.3), detail=detail)


def _edge_case(rng: np.random.Generator, index: int) -> Case:
    """A case with random labels and sparse, irregular finding details (test-only sampler)."""
    labels = [label for label in CTRATE_LABELS if rng.random() < 0.25]
    anatomy = Anatomy(sex=str(rng.choice(["female", "male"])), heart_scale=1.0, cardiothoracic_ratio=0.5,
                      body_width_mm=300.0, thyroid_in_view=bool(rng.random() < 0.7), has_pet=bool(rng.random() < 0.3))
    return Case(id=f"edge_{index}", seed=index, style=STYLES[index % len(STYLES)], anatomy=anatomy,
                findings=[_edge_finding(label, rng) for label in labels])


def _cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` cases from the project sampler when it exists (plus a fifth of edge cases), else edge cases only."""
    rng = np.random.default_rng(seed)
    try:
        from rrg3d.data.phantom.sampling import sample_case
    except ImportError:  # pragma: no cover - the sampler is part of the package
        return [_edge_case(rng, i) for i in range(n)]
    n_edge = n // 5
    cases = [sample_case(f"case_{i}", i, rng, n_styles=len(STYLES), pet=i % 3 == 0) for i in range(n - n_edge)]
    return cases + [_edge_case(rng, i) for i in range(n_edge)]


def _in_style(case: Case, style: str) -> Case:
    return dataclasses.replace(case, style=style)


def _write_all(cases: list[Case], bank: SentenceBank | None = None) -> list[tuple[Case, PhantomReport]]:
    out = []
    for i, case in enumerate(cases):
        for style in STYLES:
            styled = _in_style(case, style)
            out.append((styled, write_report(styled, np.random.default_rng([7, i]), bank)))
    return out


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = int((pred & truth).sum())
    fp = int((pred & (1 - truth)).sum())
    fn = int(((1 - pred) & truth).sum())
    return 2 * tp / max(1, 2 * tp + fp + fn)


def _agreement(written: list[tuple[Case, PhantomReport]]) -> tuple[float, float, dict[str, float]]:
    """Micro-F1, macro-F1 and per-label F1 of the rule labeler on the reports against the case labels."""
    from rrg3d.text.labeler import RuleLabeler

    pred = RuleLabeler().predict([report.text for _, report in written]).astype(int)
    truth = np.array([[case.labels[label] for label in CTRATE_LABELS] for case, _ in written])
    per_label = {label: _f1(pred[:, k], truth[:, k]) for k, label in enumerate(CTRATE_LABELS) if truth[:, k].any()}
    return _f1(pred, truth), float(np.mean(list(per_label.values()))), per_label


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return _cases(300)


@pytest.fixture(scope="module")
def labeler():
    module = pytest.importorskip("rrg3d.text.labeler")
    return module.RuleLabeler()


@pytest.fixture(scope="module")
def bank(shared_data: Path, labeler) -> SentenceBank:
    path = shared_data.joinpath(*REPORTS_CSV)
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return SentenceBank.mine(path, labeler)


# ------------------------------------------------------------------------------------------------------ wording


def test_format_size_and_lobes():
    assert format_size(8.0) == "8 mm"
    assert format_size(8.4) == "8 mm"
    assert format_size(12.0) == "1.2 cm"
    assert format_size(20.0) == "2 cm"
    assert format_size(23.0, "mm") == "23 mm"
    assert lobes_phrase(["right lower lobe", "right upper lobe"]) == "the right upper and lower lobes"
    assert lobes_phrase(["left lower lobe", "right middle lobe"]) == "the right middle lobe and the left lower lobe"


# ----------------------------------------------------------------------------------------------------- structure


def test_same_seed_same_text(cases):
    for case in cases[:20]:
        for style in STYLES:
            styled = _in_style(case, style)
            first = write_report(styled, np.random.default_rng(3))
            assert first == write_report(styled, np.random.default_rng(3))
    texts = {write_report(_in_style(cases[0], "hospital_a"), np.random.default_rng(s)).text for s in range(5)}
    assert len(texts) > 1, "the phrasing should vary with the generator"


def test_unknown_style_is_refused(cases):
    with pytest.raises(ValueError, match="style"):
        write_report(_in_style(cases[0], "hospital_z"), np.random.default_rng(0))


def test_every_style_has_both_sections_and_all_regions(cases):
    split_sections = pytest.importorskip("rrg3d.text.reports").split_sections
    for case, report in _write_all(cases[:40] + cases[-20:]):
        assert "Findings:" in report.text and "Impression:" in report.text
        assert set(report.sections) == {"findings", "impression"}
        assert all(report.sections.values())
        parsed = split_sections(report.text)
        for name in ("findings", "impression"):
            assert parsed[name].split() == report.sections[name].split(), case.style
        assert list(report.region_reports) == list(REGIONS)
        assert all(text.strip() for text in report.region_reports.values())
        assert list(report.lobe_reports) == list(LOBES)
        for finding in case.findings:
            assert report.region_reports[finding.region].strip()


def test_region_reports_agree_with_region_truth(cases, labeler):
    reports = _write_all(cases[:60])
    texts = [report.region_reports[region] for _, report in reports for region in REGIONS]
    pred = labeler.predict(texts)
    row = 0
    for case, _ in reports:
        truth = case.region_truth
        for region in REGIONS:
            found = {label for label, value in zip(CTRATE_LABELS, pred[row], strict=True) if value}
            assert found == set(truth[region]), (case.style, region, texts[row])
            row += 1


def test_style_lengths_differ():
    cases = _cases(50, seed=1)
    means = {}
    for style in STYLES:
        words = [len(write_report(_in_style(c, style), np.random.default_rng(i)).text.split())
                 for i, c in enumerate(cases)]
        means[style] = float(np.mean(words))
    assert means["hospital_a"] > 1.4 * means["hospital_b"], means
    assert means["hospital_b"] > 1.3 * means["hospital_c"], means


# ------------------------------------------------------------------------------------------------------ content


#: Abnormalities whose size is quoted (the cardiothoracic ratio for cardiomegaly).
_SIZED = ("Cardiomegaly", "Pericardial effusion", "Hiatal hernia", "Lymphadenopathy", "Lung nodule", "Pleural effusion",
          "Consolidation")


def _size_strings(finding: Finding) -> set[str]:
    if finding.label == "Cardiomegaly":
        ratio = finding.detail.get("cardiothoracic_ratio", (finding.size_mm or 0) / 100)
        return {f"{float(ratio):.2f}"}
    return {format_size(finding.size_mm), format_size(finding.size_mm, "mm")}


def _count_strings(n: int) -> set[str]:
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    return {str(n), words[n]} if n < len(words) else {str(n)}


def test_finding_details_appear_in_the_text(cases):
    for case, report in _write_all(cases):
        for finding in case.findings:
            text = report.region_reports[finding.region].lower()
            if finding.size_mm is not None and finding.label in _SIZED:
                assert any(s in text for s in _size_strings(finding)), (finding, text)
            if finding.suv_max is not None and finding.label in ("Lymphadenopathy", "Lung nodule", "Consolidation"):
                assert f"suvmax {finding.suv_max:.1f}" in text, (finding, text)
            for lobe in finding.lobes:
                side, level = lobe.split()[:2]
                assert side in text and level in text, (finding, text)
            if finding.side in ("right", "left") and finding.label in ("Pleural effusion", "Lung nodule"):
                assert finding.side in text, (finding, text)
            if finding.side == "bilateral" and finding.label == "Pleural effusion":
                assert "bilateral" in text or "both" in text, (finding, text)
            if finding.count and finding.count > 1 and finding.label in ("Lung nodule", "Lymphadenopathy"):
                assert any(re.search(rf"\b{c}\b", text) for c in _count_strings(finding.count)), (finding, text)
            if finding.label == "Medical material" and finding.kind:
                assert any(word in text for word in ("pacemaker", "sternotomy", "port", "stent")), text


def test_cardiomegaly_ratio_is_quoted():
    anatomy = Anatomy("male", 1.3, 0.65, 300.0, True)
    case = Case("c", 0, "hospital_a", anatomy, [Finding("Cardiomegaly", "heart", severity="moderate", size_mm=65.0,
                                                        detail={"cardiothoracic_ratio": 0.65})])
    texts = {write_report(case, np.random.default_rng(s)).text for s in range(10)}
    assert any("0.65" in text for text in texts)


def test_narrative_style_negates_absent_abnormalities(labeler):
    cases = _cases(50, seed=2)
    counts = []
    for i, case in enumerate(cases):
        text = write_report(_in_style(case, "hospital_a"), np.random.default_rng(i)).text
        negated = {m["label"] for m in labeler.explain(text) if m["negated"]}
        assert not negated & {f.label for f in case.findings}
        counts.append(len(negated))
    assert min(counts) >= 1 and float(np.mean(counts)) >= 3.0, counts
    normal = Case("n", 0, "hospital_a", Anatomy("female", 1.0, 0.5, 300.0, True), [])
    for seed in range(5):
        text = write_report(normal, np.random.default_rng(seed)).text
        negated = {m["label"] for m in labeler.explain(text) if m["negated"]}
        assert len(negated) >= 3, text
        assert not labeler.predict([text]).any(), text


def test_impression_lists_every_positive_finding(cases, labeler):
    written = _write_all(cases[:100])
    pred = labeler.predict([report.sections["impression"] for _, report in written])
    for (case, report), row in zip(written, pred, strict=True):
        found = {label for label, value in zip(CTRATE_LABELS, row, strict=True) if value}
        assert found == {f.label for f in case.findings}, report.sections["impression"]


# ---------------------------------------------------------------------------------------------- label agreement


def test_labeler_recovers_the_case_labels(cases):
    pytest.importorskip("rrg3d.text.labeler")
    micro, macro, per_label = _agreement(_write_all(cases))
    print(f"labeler agreement without bank: micro-F1 {micro:.4f}, macro-F1 {macro:.4f}")
    assert micro >= 0.98, per_label
    assert macro >= 0.95, per_label


# ------------------------------------------------------------------------------------------------ sentence bank


def _write_csv(path: Path, rows: list[tuple[str, set[str]]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["AccessionNo", "report_text", *CTRATE_LABELS])
        for i, (text, labels) in enumerate(rows):
            writer.writerow([f"r{i}", text, *[int(label in labels) for label in CTRATE_LABELS]])
    return path


def test_bank_mining_rules(tmp_path, labeler):
    # Sentences written for this test (not taken from any report corpus).
    rows = [
        ("Findings: Cardiomegaly is noted. There is a small right pleural effusion. The trachea is patent. "
         "No pericardial effusion was found. The thyroid gland looks normal. Impression: Enlarged heart.",
         {"Cardiomegaly", "Pleural effusion"}),
        ("Findings: A hiatal hernia is noted. No pleural effusion was found. Vertebral bodies look normal. "
         "The liver is normal. Emphysema might be present.", {"Hiatal hernia", "Emphysema"}),
        ("Findings: A pacemaker is noted. Pleural effusion is noted. No lymphadenopathy is found.",
         {"Medical material"}),
    ]
    bank = SentenceBank.mine(_write_csv(tmp_path / "labels.csv", rows), labeler)
    positives = {key: [m.text for m in items] for key, items in bank.positives.items()}
    assert positives["Cardiomegaly"] == ["Cardiomegaly is noted."]
    assert positives["Hiatal hernia"] == ["A hiatal hernia is noted."]
    assert positives["Medical material/pacemaker"] == ["A pacemaker is noted."]
    assert "Pleural effusion" not in positives  # sided in one report, manual label 0 in the other
    assert "Emphysema" not in positives  # hedged
    negations = sorted(m.text for m in bank.negations)
    assert negations == ["No lymphadenopathy is found.", "No pericardial effusion was found.",
                         "No pleural effusion was found."]
    normals = {region: sorted(m.text for m in items) for region, items in bank.normals.items()}
    assert normals["trachea and bronchi"] == ["The trachea is patent."]
    assert normals["thyroid"] == ["The thyroid gland looks normal."]
    assert normals["bone"] == ["Vertebral bodies look normal."]
    assert normals["abdomen"] == ["The liver is normal."]
    counts = bank.counts
    assert counts["positive"]["Medical material"] == 1 and counts["negated"]["Pleural effusion"] == 1
    assert counts["normal"]["abdomen"] == 1 and set(counts["normal"]) == set(REGIONS)
    assert pickle.loads(pickle.dumps(bank)).counts == counts  # travels to worker processes

    # A finding gets a bank sentence plus its own details; absent labels get bank negations.
    case = Case("b", 0, "hospital_a", Anatomy("male", 1.3, 0.6, 300.0, True),
                [Finding("Hiatal hernia", "esophagus", size_mm=35.0, severity="mild")])
    bank.p_use = 1.0
    text = write_report(case, np.random.default_rng(0), bank).text
    assert "A hiatal hernia is noted. It is small, 3.5 cm across." in text
    assert "No pericardial effusion was found." in text
    assert labeler.predict([text]).nonzero()[1].tolist() == [CTRATE_LABELS.index("Hiatal hernia")]


def test_bank_needs_report_text(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("AccessionNo,text\nx,Nothing here.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="report_text"):
        SentenceBank.mine(path, labeler=object())


def test_mined_bank_sentences_agree_with_the_labeler(bank, labeler):
    counts = bank.counts
    print("sentence bank counts:", counts)
    assert len(bank) > 200
    assert sum(v > 0 for v in counts["positive"].values()) >= 8
    assert sum(v > 0 for v in counts["normal"].values()) >= 8
    for key, items in bank.positives.items():
        pred = labeler.predict([m.text for m in items])
        assert (pred.sum(axis=1) == 1).all() and (pred[:, CTRATE_LABELS.index(key.split("/")[0])] == 1).all()
    assert not labeler.predict([m.text for m in bank.negations]).any()
    assert not labeler.predict([m.text for items in bank.normals.values() for m in items]).any()


def test_labeler_recovers_the_case_labels_with_bank(cases, bank):
    # Only the narrative style uses the bank (the other styles are the same as without it, tested above).
    written = [(case, report) for case, report in _write_all(cases, bank) if case.style == "hospital_a"]
    mined = {m.text for items in bank.normals.values() for m in items} | {m.text for m in bank.negations}
    used = sum(any(s in report.text for s in mined) for _, report in written)
    assert used > len(cases) // 2, "the narrative style should use bank sentences"
    first = write_report(_in_style(cases[0], "hospital_a"), np.random.default_rng(5), bank)
    assert first == write_report(_in_style(cases[0], "hospital_a"), np.random.default_rng(5), bank)
    micro, macro, per_label = _agreement(written)
    print(f"labeler agreement with bank: micro-F1 {micro:.4f}, macro-F1 {macro:.4f}")
    assert micro >= 0.98, per_label
    assert macro >= 0.95, per_label
