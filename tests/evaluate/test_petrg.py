"""PETRG-Score: the rule extractor on hand-written sentences, the metric on known confusions, the LLM extractor with a
fake model, and `rrg3d evaluate --petrg` end to end on tiny PET phantoms."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from rrg3d.cli import main
from rrg3d.evaluate.bootstrap import bootstrap_ci
from rrg3d.evaluate.petrg import (
    LLMExtractor,
    MemoExtractor,
    build_prompt,
    evaluate_petrg,
    make_extractor,
    parse_answer,
    petrg_scores,
    petrg_statistics,
)
from rrg3d.judge.base import LLMJudge
from rrg3d.judge.cache import JudgeCache
from rrg3d.text.petrg import (
    CT_CLASSES,
    PET_CLASSES,
    PETRG_REGIONS,
    REGION_NAMES,
    RuleExtractor,
    check_statuses,
    merge_status,
    normal_statuses,
)


def _found(text: str) -> dict[str, dict[str, str]]:
    """The non-normal regions the rule extractor reads in ``text``."""
    return {r: s for r, s in RuleExtractor().extract(text).items() if s != {"pet": "normal", "ct": "normal"}}


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_is_stable_and_complete():
    assert len(PETRG_REGIONS) == 24 and len(set(PETRG_REGIONS)) == 24 and set(REGION_NAMES) == set(PETRG_REGIONS)
    assert len(PET_CLASSES) == 5 and PET_CLASSES[-1] == "normal"
    assert len(CT_CLASSES) == 8 and CT_CLASSES[-1] == "normal"
    assert all(c == c.lower() and " " not in c for c in (*PET_CLASSES, *CT_CLASSES, *PETRG_REGIONS))
    assert merge_status("pet", "physiological", "mild_uptake") == "mild_uptake"
    assert merge_status("ct", "calcification", "other") == "other"
    assert merge_status("ct", "focal_lesion", "bone_lesion") == "bone_lesion"


def test_check_statuses_is_strict_and_records_problems():
    statuses, problems = check_statuses({"Lung": {"pet": "Marked uptake", "ct": "focal-lesion"},
                                         "kidneys": {"pet": "marked_uptake", "ct": "normal"},
                                         "liver": {"pet": "glowing", "ct": "other"}, "spleen": "big"})
    assert statuses["lung"] == {"pet": "marked_uptake", "ct": "focal_lesion"}
    assert statuses["liver"] == {"pet": "normal", "ct": "other"} and statuses["spleen"] == {"pet": "normal",
                                                                                          "ct": "normal"}
    assert len(statuses) == 24
    assert any("kidneys" in p for p in problems) and any("glowing" in p for p in problems)
    assert any("spleen" in p for p in problems)
    only, _ = check_statuses({"lung": {"pet": "normal", "ct": "other"}}, fill=False)
    assert list(only) == ["lung"]


# ------------------------------------------------------------------------------------------------ rule extractor


@pytest.mark.parametrize(("text", "expected"), [
    # synonyms of node groups
    ("Enlarged para-aortic lymph nodes.", {"retroperitoneal_nodes": ("normal", "enlarged_node")}),
    ("A bulky node in the left axilla.", {"axillary_nodes": ("normal", "enlarged_node")}),
    ("Enlarged node in the right supraclavicular fossa.", {"supraclavicular_nodes": ("normal", "enlarged_node")}),
    ("Bilateral hilar lymphadenopathy.", {"hilar_nodes": ("normal", "enlarged_node")}),
    ("Enlarged lymph nodes in the neck.", {"cervical_nodes": ("normal", "enlarged_node")}),
    ("Mass in the neck.", {"head_neck": ("normal", "focal_lesion")}),
    ("Enlarged pelvic lymph nodes.", {"iliac_nodes": ("normal", "enlarged_node")}),
    ("Lymph nodes with a short axis reaching 11 mm in the mediastinum.", {"mediastinal_nodes": ("normal",
                                                                                              "enlarged_node")}),
    ("A mediastinal lymph node with a short axis of 8 mm.", {}),
    ("Mediastinal and hilar lymphadenopathy.", {"mediastinal_nodes": ("normal", "enlarged_node"),
                                               "hilar_nodes": ("normal", "enlarged_node")}),
    # a bare "mediastinal" naming the group of hilar stations is not a second place
    ("There is mediastinal lymphadenopathy in the right hilar station.", {"hilar_nodes": ("normal", "enlarged_node")}),
    # organs, organ enlargement, the node/organ distinction
    ("The heart is enlarged (cardiomegaly).", {"heart": ("normal", "other")}),
    ("Splenomegaly.", {"spleen": ("normal", "other")}),
    ("Calcified plaques in the wall of the thoracic aorta.", {"heart": ("normal", "calcification")}),
    ("Diffuse thickening of the gastric wall.", {"gastrointestinal": ("normal", "wall_thickening")}),
    ("A 3 cm hypodense lesion in the liver.", {"liver": ("normal", "focal_lesion")}),
    ("There is a small sliding hiatal hernia.", {"esophagus": ("normal", "other"),
                                                 "gastrointestinal": ("normal", "other")}),
    ("Small left pleural effusion.", {"pleura": ("normal", "other")}),
    ("There is moderate smooth interlobular septal thickening in both lungs.",
     {"lung": ("normal", "lung_parenchymal_change")}),
    ("Mild peribronchial thickening in the right lower lobe.", {"lung": ("normal", "wall_thickening")}),
    ("Emphysema.", {"lung": ("normal", "lung_parenchymal_change")}),  # the cue's own region
    ("A lytic lesion in the T7 vertebral body.", {"bone": ("normal", "bone_lesion")}),
    ("Sclerotic metastases.", {"bone": ("normal", "bone_lesion")}),
    # negation (pre and post cues, lists)
    ("No mediastinal or hilar lymphadenopathy.", {}),
    ("No lytic or sclerotic bone lesion is seen.", {}),
    ("Pleural effusion is not seen.", {}),
    ("No pathological FDG uptake.", {}),
    ("Non-calcified nodule in the left lower lobe.", {"lung": ("normal", "focal_lesion")}),
    # devices are not findings
    ("A pacemaker generator lies in the left chest wall; its leads end in the right atrium.", {}),
    # uptake wording and grading
    ("Intense FDG uptake in the spleen.", {"spleen": ("marked_uptake", "normal")}),
    ("Mildly increased FDG uptake in the right axillary node.", {"axillary_nodes": ("mild_uptake", "normal")}),
    ("Low-grade uptake in the thyroid.", {"thyroid": ("mild_uptake", "normal")}),
    ("Equivocal uptake in a left supraclavicular node.", {"supraclavicular_nodes": ("mild_uptake", "normal")}),
    ("Hypermetabolic liver lesion, SUVmax 12.", {"liver": ("marked_uptake", "focal_lesion")}),
    ("Hypermetabolic nodule in the right upper lobe (SUVmax 3.1).", {"lung": ("mild_uptake", "focal_lesion")}),
    ("Consolidation in the left lower lobe (SUVmax 5.2).", {"lung": ("marked_uptake", "lung_parenchymal_change")}),
    ("Physiological FDG uptake is seen in the myocardium, liver and stomach.",
     {"heart": ("physiological", "normal"), "liver": ("physiological", "normal"),
      "gastrointestinal": ("physiological", "normal")}),
    ("FDG uptake in the bowel is physiological.", {"gastrointestinal": ("physiological", "normal")}),
    ("Photopenic defect in the liver.", {"liver": ("reduced", "normal")}),
    ("Decreased uptake in the left kidney.", {"kidney_adrenal": ("reduced", "normal")}),
    ("Normal FDG uptake in the brain.", {}),
    ("Possible intense uptake in the spleen.", {"spleen": ("mild_uptake", "normal")}),  # hedged: equivocal
])
def test_rule_extractor_reads_sentences(text, expected):
    assert _found(text) == {r: {"pet": pet, "ct": ct} for r, (pet, ct) in expected.items()}


def test_most_severe_status_wins_and_line_labels_give_context():
    text = ("Findings: Calcified granuloma in the right lower lobe. Ground-glass opacity in the right lower lobe. "
            "A 2 cm mass in the right upper lobe with mild FDG uptake. Physiological uptake in the lungs.\n"
            "LIVER: Hypodense lesion with intense uptake. Another one in segment 7.\n"
            "BONES: Unremarkable.\nImpression: Lung mass, SUVmax 9.")
    found = _found(text)
    assert found["lung"] == {"pet": "marked_uptake", "ct": "focal_lesion"}
    assert found["liver"] == {"pet": "marked_uptake", "ct": "focal_lesion"}
    assert set(found) == {"lung", "liver"}
    hits = RuleExtractor().explain("No pleural effusion. Enlarged axillary nodes.")
    assert [(h["region"], h["class"], h["counted"]) for h in hits] == [
        ("pleura", "other", False), ("axillary_nodes", "enlarged_node", True)]


def test_clinical_history_is_not_read():
    assert _found("Clinical information: lymphoma with enlarged axillary nodes.\nFindings: No abnormality.") == {}


# ------------------------------------------------------------------------------------------------ metric


def _statuses(**regions: tuple[str, str]) -> dict[str, dict[str, str]]:
    out = normal_statuses()
    for region, (pet, ct) in regions.items():
        out[region] = {"pet": pet, "ct": ct}
    return out


def test_scores_on_a_known_confusion():
    refs = [_statuses(lung=("marked_uptake", "focal_lesion"), heart=("physiological", "normal")),
            _statuses(axillary_nodes=("marked_uptake", "enlarged_node"))]
    cands = [_statuses(lung=("mild_uptake", "focal_lesion"), heart=("physiological", "normal")),
             _statuses(axillary_nodes=("marked_uptake", "normal"), liver=("normal", "other"))]
    scores = petrg_scores(refs, cands)
    # PET over 48 pairs: marked TP1 FN1; mild FP1; physiological TP1; reduced absent; normal TP45
    f_marked, f_mild, f_phys, f_normal = 2 / 3, 0.0, 1.0, 1.0
    assert scores["pet_all"] == pytest.approx(np.mean([f_marked, f_mild, f_phys, f_normal]))
    assert scores["pet_abnormal"] == pytest.approx(np.mean([f_marked, f_mild, f_phys]))
    # CT: focal TP1; enlarged FN1; other FP1; normal TP45 FP1 FN1
    f_normal_ct = 2 * 45 / (2 * 45 + 1 + 1)
    assert scores["ct_all"] == pytest.approx(np.mean([1.0, 0.0, 0.0, f_normal_ct]))
    assert scores["ct_abnormal"] == pytest.approx(np.mean([1.0, 0.0, 0.0]))
    assert scores["per_class"]["pet"]["reduced"] == {"precision": None, "recall": None, "f1": None, "support": 0,
                                                     "predicted": 0}
    assert scores["per_class"]["ct"]["enlarged_node"]["support"] == 1
    confusion = scores["confusion"]["pet"]
    marked, mild = PET_CLASSES.index("marked_uptake"), PET_CLASSES.index("mild_uptake")
    assert confusion["per_region"]["lung"][marked][mild] == 1
    assert np.asarray(confusion["pooled"]).sum() == 48 == scores["n_region_pairs"]
    ct_axillary = np.asarray(scores["confusion"]["ct"]["per_region"]["axillary_nodes"])
    assert ct_axillary[CT_CLASSES.index("enlarged_node"), CT_CLASSES.index("normal")] == 1
    # the bootstrap statistic reproduces the value and resamples patients
    stats = petrg_statistics(refs, cands)
    assert stats["ct_all"].value() == pytest.approx(scores["ct_all"]) and stats["ct_all"].n == 2
    ci = bootstrap_ci(stats["pet_all"], n_resamples=50, seed=1)
    assert ci["low"] <= ci["value"] + 1e-9 and ci["method"] == "exact"


def test_perfect_agreement_and_region_subsets():
    refs = [_statuses(lung=("mild_uptake", "lung_parenchymal_change"))]
    assert petrg_scores(refs, refs)["pet_all"] == 1.0 and petrg_scores(refs, refs)["ct_abnormal"] == 1.0
    everything_normal = petrg_scores([normal_statuses()], [normal_statuses()])
    assert everything_normal["pet_abnormal"] is None and everything_normal["pet_all"] == 1.0
    truth = [{"lung": {"pet": "mild_uptake", "ct": "lung_parenchymal_change"}, "liver": {"pet": "normal",
                                                                                     "ct": "normal"}}]
    sub = petrg_scores(truth, refs, regions=[list(truth[0])])
    assert sub["n_region_pairs"] == 2 and sub["ct_all"] == 1.0


# ------------------------------------------------------------------------------------------------ LLM extractor


class ScriptedJudge(LLMJudge):
    """A language model stand-in: answers each prompt with ``answer(prompt)``; counts calls."""

    def __init__(self, answer, cache=None):
        super().__init__(cache=cache, concurrency=2)
        self.answer = answer
        self.id = "fake:scripted"
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    def complete(self, prompt):
        with self.lock:
            self.prompts.append(prompt)
        return self.answer(prompt)


def _report_of(prompt: str) -> str:
    return prompt.split("Report:\n", 1)[1].split("\n\nAnswer with", 1)[0]


def test_prompt_names_every_region_and_class_and_the_report():
    prompt = build_prompt("Intense uptake in the spleen.")
    assert all(region in prompt for region in PETRG_REGIONS)
    assert all(cls in prompt for cls in (*PET_CLASSES, *CT_CLASSES))
    assert _report_of(prompt) == "Intense uptake in the spleen."


def test_answers_are_parsed_strictly():
    good = parse_answer('Here you are:\n```json\n{"lung": {"pet": "marked_uptake", "ct": "focal_lesion"}}\n```')
    assert good.parse_ok and not good.problems and good.statuses["lung"]["pet"] == "marked_uptake"
    odd = parse_answer('{"lungs": {"pet": "marked_uptake", "ct": "focal_lesion"}, "liver": {"pet": "hot", '
                       '"ct": "other"}}')
    assert odd.parse_ok and odd.statuses["liver"] == {"pet": "normal", "ct": "other"}
    assert any("lungs" in p for p in odd.problems) and any("hot" in p for p in odd.problems)
    assert odd.statuses["lung"] == {"pet": "normal", "ct": "normal"}
    for garbage in ("I cannot tell.", "{not json}", "", None, "[1, 2]"):
        bad = parse_answer(garbage)
        assert not bad.parse_ok and bad.statuses == normal_statuses() and bad.problems


def test_llm_extractor_caches_answers_and_records_failures(tmp_path):
    def answer(prompt):
        report = _report_of(prompt)
        if "boom" in report:
            raise RuntimeError("model crashed")
        if "garbage" in report:
            return "no idea"
        return json.dumps({r: s for r, s in RuleExtractor().extract(report).items() if s["ct"] != "normal"
                           or s["pet"] != "normal"})

    texts = ["Enlarged right axillary node with intense FDG uptake.", "Splenomegaly.", "garbage", "boom"]
    judge = ScriptedJudge(answer, cache=tmp_path / "cache.sqlite")
    extractor = LLMExtractor(judge)
    first = extractor.extract_many(texts)
    assert first[0].statuses["axillary_nodes"] == {"pet": "marked_uptake", "ct": "enlarged_node"}
    assert first[1].statuses["spleen"]["ct"] == "other" and not first[1].cached
    assert not first[2].parse_ok and first[2].error is None
    assert first[3].error and "model crashed" in first[3].error and first[3].statuses == normal_statuses()
    assert len(judge.prompts) == 4
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 3  # failed calls are never cached
    again_judge = ScriptedJudge(answer, cache=tmp_path / "cache.sqlite")
    again = LLMExtractor(again_judge).extract_many(texts)
    assert [e.cached for e in again] == [True, True, True, False] and len(again_judge.prompts) == 1
    assert again[0].statuses == first[0].statuses
    memo = MemoExtractor(LLMExtractor(ScriptedJudge(answer)))
    memo.extract_many(texts[:2] * 3)
    assert len(memo.extractor.judge.prompts) == 2


def test_make_extractor_specs():
    assert isinstance(make_extractor("rule"), RuleExtractor)
    from rrg3d.judge import JudgeError

    with pytest.raises(JudgeError):
        make_extractor("label")
    llm = make_extractor("http:some-model@http://127.0.0.1:9/v1", cache=False)  # built, never called
    assert isinstance(llm, LLMExtractor) and llm.name.startswith("llm:http:some-model@")


def test_failed_predictions_count_as_all_normal_reports():
    result = evaluate_petrg(["a", "b"], ["Splenomegaly.", "Emphysema."], ["Splenomegaly.", ""], ["ok", "missing"],
                            RuleExtractor())
    assert result["details"][1]["generated"] == {} and result["details"][1]["reference"]
    assert result["metrics"]["ct_abnormal"] == pytest.approx(0.5)  # other: TP; parenchymal: FN


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pet_phantoms(tmp_path_factory):
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    out = tmp_path_factory.mktemp("petrg_phantoms")
    manifest = generate_phantoms(PhantomConfig(n=6, seed=5, shape=(16, 32, 32), pet=True, styles=3), out,
                                 workers=1, progress=False)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    return manifest, records


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_evaluate_petrg_end_to_end(pet_phantoms, tmp_path, stub_labeler, monkeypatch, capsys):
    import rrg3d.evaluate.runner as runner

    monkeypatch.setattr(runner, "load_default_labeler", lambda model_dir=None: stub_labeler)
    manifest, records = pet_phantoms
    shifted = _write(tmp_path / "shifted.jsonl", [{"id": r["id"], "report": records[(i + 1) % len(records)]["report"]}
                                                  for i, r in enumerate(records)])
    copied = _write(tmp_path / "copied.jsonl", [{"id": r["id"], "report": r["report"]} for r in records])
    out = tmp_path / "eval"
    assert main(["evaluate", shifted, "--refs", str(manifest), "--out", str(out), "--petrg", "--no-java",
                 "--bootstrap", "100", "--no-progress", "--compare", copied]) == 0
    assert "PETRG PET-All (macro F1)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    petrg = metrics["petrg"]
    for name in ("pet_all", "pet_abnormal", "ct_all", "ct_abnormal"):
        assert 0.0 <= petrg[name] < 1.0, name
        assert petrg["ci"][name]["low"] <= petrg["ci"][name]["high"] and petrg["ci"][name]["n_resamples"] == 100
        assert metrics["ci"][f"petrg.{name}"]["value"] == pytest.approx(petrg[name])
        assert petrg["extractor_vs_truth"][name] == pytest.approx(1.0), name  # rules read the phantom truth
        assert metrics["compare"]["petrg"][name] == pytest.approx(1.0)  # B copies the references
        assert metrics["compare"]["paired_bootstrap"]["metrics"][f"petrg.{name}"]["delta"] < 0
    assert petrg["extractor"] == "rule-v1" and petrg["n_patients"] == 6 and petrg["n_region_pairs"] == 6 * 24
    assert petrg["extractor_vs_truth"]["n_patients"] == 6 and petrg["extractor_vs_truth"]["ci"]["ct_all"]["low"] == 1
    assert set(petrg["confusion"]["pet"]["per_region"]) == set(PETRG_REGIONS)
    assert np.asarray(petrg["confusion"]["ct"]["pooled"]).sum() == 6 * 24
    md = (out / "metrics.md").read_text()
    assert "| PETRG CT-Abnormal (macro F1) |" in md and "## PETRG-Score" in md and "Extractor against" in md
    html = (out / "report.html").read_text()
    assert "PETRG-Score" in html and "Per-region confusion" in html and "<details><summary>heart</summary>" in html
    details = [json.loads(line) for line in (out / "petrg.jsonl").read_text().splitlines()]
    assert [d["id"] for d in details] == [r["id"] for r in records]
    assert all(d["reference"]["heart"]["pet"] == "physiological" for d in details)
    assert not any(d.get("truth_disagreements") for d in details)


def test_evaluate_petrg_with_a_language_model_extractor(pet_phantoms, tmp_path, stub_labeler, monkeypatch):
    """--petrg-extractor SPEC goes through the judge framework; a model that answers like the rules scores alike."""
    import rrg3d.evaluate.runner as runner
    import rrg3d.judge as judge_module

    monkeypatch.setattr(runner, "load_default_labeler", lambda model_dir=None: stub_labeler)
    made = []

    def fake_make_judge(spec, **kwargs):
        def answer(prompt):
            statuses = RuleExtractor().extract(_report_of(prompt))
            return json.dumps({r: s for r, s in statuses.items() if s != {"pet": "normal", "ct": "normal"}})

        made.append((spec, kwargs))
        return ScriptedJudge(answer, cache=kwargs.get("cache"))

    monkeypatch.setattr(judge_module, "make_judge", fake_make_judge)
    manifest, records = pet_phantoms
    pred = _write(tmp_path / "pred.jsonl", [{"id": r["id"], "report": records[(i + 2) % len(records)]["report"]}
                                            for i, r in enumerate(records)])
    for extractor, out in (("rule", tmp_path / "rule"), ("http:fake@http://127.0.0.1:9/v1", tmp_path / "llm")):
        assert main(["evaluate", pred, "--refs", str(manifest), "--out", str(out), "--petrg-extractor", extractor,
                     "--petrg", "--no-java", "--bootstrap", "0", "--no-progress", "--judge-cache",
                     str(tmp_path / "cache.sqlite")]) == 0
    rule = json.loads((tmp_path / "rule" / "metrics.json").read_text())["petrg"]
    llm = json.loads((tmp_path / "llm" / "metrics.json").read_text())["petrg"]
    assert made and made[0][0] == "http:fake@http://127.0.0.1:9/v1"
    assert llm["extractor"].startswith("llm:fake:scripted") and llm["extraction"]["reference"]["problems"] == 0
    for name in ("pet_all", "pet_abnormal", "ct_all", "ct_abnormal"):
        assert llm[name] == pytest.approx(rule[name])
        assert llm["extractor_vs_truth"][name] == pytest.approx(1.0)


def test_reference_truth_is_loaded_and_checked(tmp_path):
    from rrg3d.evaluate.records import EvaluationError, load_references, pair

    good = _write(tmp_path / "good.jsonl", [{"id": "a", "report": "Splenomegaly.",
                                             "petrg": {"spleen": {"pet": "normal", "ct": "other"}}},
                                            {"id": "b", "report": "Normal."}])
    refs, _ = load_references(good)
    assert refs[0].petrg == {"spleen": {"pet": "normal", "ct": "other"}} and refs[1].petrg is None
    from rrg3d.evaluate.records import Prediction

    paired = pair(refs, [Prediction("a", "x"), Prediction("b", "y")])
    assert paired.reference_petrg == [refs[0].petrg, None]
    bad = _write(tmp_path / "bad.jsonl", [{"id": "a", "report": "r", "petrg": {"spleen": {"pet": "hot", "ct": "x"}}}])
    with pytest.raises(EvaluationError, match=r"bad.jsonl:1 \[petrg\]: spleen: unknown PET class 'hot'"):
        load_references(bad)
