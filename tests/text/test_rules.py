"""The rule labeler: synonyms of every label, negation and uncertainty scopes, conflicts (texts written for these
tests, none taken from the CT-RATE reports)."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.text.labeler import RuleLabeler
from rrg3d.text.labels import CTRATE_LABELS
from rrg3d.text.negation import polarity
from rrg3d.text.rules import LABEL_RULES

RULES = RuleLabeler()


def labels(text: str, labeler: RuleLabeler = RULES) -> set[str]:
    row = labeler.predict([text])[0]
    return {name for name, value in zip(CTRATE_LABELS, row, strict=True) if value}


SYNONYMS = {
    "Medical material": [
        "A coronary stent is present.", "Dual-chamber pacemaker with leads in the right heart.",
        "Central venous catheter tip in the superior vena cava.", "Right chest port-a-cath.",
        "Sternotomy wires are noted.", "Surgical clips in the left axilla.", "Nasogastric tube in the stomach.",
        "Status post aortic valve replacement with a prosthetic valve.", "Endotracheal tube above the carina.",
        "Right-sided chest tube.",
    ],
    "Arterial wall calcification": [
        "Calcified atherosclerotic plaques in the thoracic aorta.", "Atherosclerotic calcification of the aorta.",
        "Aortic wall calcifications.", "Atheromatous plaques along the aortic arch.",
        "Calcific plaques in the supra-aortic branches.",
    ],
    "Cardiomegaly": [
        "Cardiomegaly.", "The heart is enlarged.", "Enlarged heart.", "Increased cardiothoracic ratio.",
        "Heart size is increased.", "The cardiothoracic index is increased.",
    ],
    "Pericardial effusion": [
        "Small pericardial effusion.", "Pericardial fluid up to 8 mm.", "Fluid in the pericardial space.",
        "An effusion of 10 mm is seen in the pericardial recess.",
    ],
    "Coronary artery wall calcification": [
        "Coronary artery calcification.", "Calcified plaques in the coronary arteries.",
        "Dense calcification of the LAD.", "Coronary atherosclerosis.",
    ],
    "Hiatal hernia": ["Small hiatal hernia.", "Hiatus hernia.", "Sliding type hernia at the esophageal hiatus."],
    "Lymphadenopathy": [
        "Mediastinal lymphadenopathy.", "Enlarged lymph nodes in the right hilum.",
        "Lymph nodes of pathological size in the subcarinal station.", "Subcarinal adenopathy.",
    ],
    "Emphysema": ["Centrilobular emphysema.", "Emphysematous changes in both upper lobes.",
                  "Paraseptal emphysema with apical bullae."],
    "Atelectasis": ["Bibasilar atelectasis.", "Atelectatic changes in the lingula.",
                    "Plate-like subsegmental atelectasis.", "Collapse of the right middle lobe."],
    "Lung nodule": ["A 4 mm pulmonary nodule.", "Multiple micronodules in both lungs.",
                    "Nodular opacity in the left upper lobe.", "Calcified granuloma in the right lung."],
    "Lung opacity": ["Ground-glass opacity in the left lower lobe.", "Patchy ground glass areas in both lungs.",
                     "Hazy opacities at the bases."],
    "Pulmonary fibrotic sequela": ["Fibrotic bands in the lingula.", "Fibrotic sequelae in the right apex.",
                                   "Parenchymal bands in both lower lobes.", "Linear fibroatelectasis in the lingula."],
    "Pleural effusion": ["Right pleural effusion.", "Bilateral pleural effusions.",
                         "Fluid in the pleural space on the left.", "Small left effusion.", "Right hydrothorax."],
    "Mosaic attenuation pattern": ["Mosaic attenuation in both lungs.", "A mosaic perfusion pattern.",
                                   "Areas of air trapping in the lower lobes."],
    "Peribronchial thickening": ["Peribronchial thickening in the lower lobes.",
                                 "Mild peribronchial cuffing.", "Thickening of the peribronchial interstitium."],
    "Consolidation": ["Right lower lobe consolidation.", "Consolidative opacity with air bronchograms.",
                      "Areas of consolidation in the left lung."],
    "Bronchiectasis": ["Cylindrical bronchiectasis in the lower lobes.", "Bronchiectatic changes in the lingula.",
                       "Dilated bronchi in the middle lobe."],
    "Interlobular septal thickening": ["Interlobular septal thickening.", "Smooth septal thickenings at the bases.",
                                       "Thickening of the interlobular septa."],
}


@pytest.mark.parametrize(("label", "text"), [(label, t) for label, texts in SYNONYMS.items() for t in texts])
def test_synonyms(label, text):
    assert label in labels(text), RULES.explain(text)


def test_every_label_has_rules_and_synonym_tests():
    assert {rule.label for rule in LABEL_RULES} == set(CTRATE_LABELS) == set(SYNONYMS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # negation cues before the finding
        ("No pleural effusion.", set()),
        ("There is no pneumothorax or pleural effusion.", set()),
        ("Without consolidation.", set()),
        ("The lungs are free of nodules.", set()),
        ("Absence of lymphadenopathy.", set()),
        ("Negative for pulmonary emphysema.", set()),
        ("No pleural or pericardial effusion.", set()),
        ("No nodule, consolidation or ground glass opacity was detected.", set()),
        # negation cues after the finding
        ("Pericardial effusion is not observed.", set()),
        ("Mediastinal lymphadenopathy was not detected.", set()),
        ("Pleural effusion and atelectasis were not seen.", set()),
        ("Pulmonary embolism and consolidation were ruled out.", set()),
        ("Bronchiectasis is absent.", set()),
        # the scope of a negation ends at a clause boundary or an affirming verb
        ("No effusion; atelectasis in the right lower lobe.", {"Atelectasis"}),
        ("No pleural effusion, but there is a small pericardial effusion.", {"Pericardial effusion"}),
        ("No nodule is seen, and bilateral pleural effusions are present.", {"Pleural effusion"}),
        ("Atelectasis is observed in the left lower lobe and no effusion was seen.", {"Atelectasis"}),
        ("Emphysema is present, consolidation was not seen.", {"Emphysema"}),
        # pseudo-negations do not deny the finding
        ("No significant change in the size of the right lung nodule.", {"Lung nodule"}),
        ("Mediastinal lymph nodes not reaching pathological size.", {"Lymphadenopathy"}),
        ("Due to the lack of contrast the heart cannot be evaluated, and a small pericardial effusion is seen.",
         {"Pericardial effusion"}),
        ("The nodule seen in the previous examination was not detected in the current study.", set()),
        # laterality and extent words do not break matching
        ("Right pleural effusion.", {"Pleural effusion"}),
        ("Minimal left-sided pleural effusion.", {"Pleural effusion"}),
        ("No pleural effusion on the left. Small pleural effusion on the right.", {"Pleural effusion"}),
        # affirmed in one sentence wins over negated in another
        ("No consolidation. Consolidation in the right lower lobe.", {"Consolidation"}),
        # another organ's finding is not a lung finding
        ("A hypodense nodule in the left thyroid lobe.", set()),
        ("Subcutaneous emphysema in the chest wall.", set()),
        ("Contrast material was not given.", set()),
    ],
)
def test_negation_scopes(text, expected):
    assert labels(text) == expected, RULES.explain(text)


@pytest.mark.parametrize(
    "text",
    [
        "Pneumonic consolidation cannot be excluded.",
        "Possible consolidation in the right lower lobe.",
        "Findings suspicious for consolidation.",
        "Right lower lobe consolidation?",
        "The opacity may represent consolidation.",
        "Consolidation can not be ruled out.",
    ],
)
def test_uncertainty_policy(text):
    mentions = [m for m in RULES.explain(text) if m["label"] == "Consolidation"]
    assert mentions and all(m["uncertain"] and not m["negated"] for m in mentions), mentions
    assert "Consolidation" in labels(text)  # default: uncertain counts as positive
    assert "Consolidation" not in labels(text, RuleLabeler(uncertain="negative"))


def test_question_mark_in_parenthesis_hedges_only_its_parenthesis():
    text = "Consolidation in the left lower lobe (pneumonia? atelectasis?)."
    by_label = {m["label"]: m for m in RULES.explain(text)}
    assert not by_label["Consolidation"]["uncertain"] and by_label["Atelectasis"]["uncertain"]


def test_explain_fields():
    text = "Findings: No emphysema. Mild cardiomegaly. Possible small right pleural effusion."
    mentions = RULES.explain(text)
    assert [m["label"] for m in mentions] == ["Emphysema", "Cardiomegaly", "Pleural effusion"]
    emphysema, cardio, effusion = mentions
    assert emphysema["negated"] and not emphysema["counted"] and emphysema["span"] == "emphysema"
    assert not cardio["negated"] and cardio["counted"] and cardio["sentence"] == "Mild cardiomegaly."
    assert effusion["uncertain"] and effusion["counted"]
    for m in mentions:
        assert m["sentence"][m["start"]:m["end"]] == m["span"]


def test_indication_section_is_ignored():
    text = "Clinical information: rule out pneumonia and pleural effusion. Findings: Lungs are clear."
    assert labels(text) == set()
    assert labels("Indication: follow-up of a lung nodule.") == {"Lung nodule"}  # only an indication: read it


def test_predict_shape_dtype_order_and_empty():
    out = RULES.predict(["Cardiomegaly and bilateral pleural effusions.", "", None, "   "])
    assert out.shape == (4, 18) and out.dtype == np.int8
    assert out[0].nonzero()[0].tolist() == [CTRATE_LABELS.index("Cardiomegaly"),
                                            CTRATE_LABELS.index("Pleural effusion")]
    assert out[1:].sum() == 0
    assert RULES.predict([]).shape == (0, 18)
    with pytest.raises(TypeError):
        RULES.predict("a single string")
    with pytest.raises(ValueError):
        RuleLabeler(uncertain="maybe")


def test_polarity_of_spans():
    sentence = "No effusion; atelectasis is seen."
    pol = polarity(sentence, [(3, 11), (13, 24)])
    assert pol[0].negated and not pol[1].negated
    # a comma-separated list shares the negation of its head ("no A, B or C was detected") ...
    sentence = "No nodule, mass or consolidation was detected."
    assert all(p.negated for p in polarity(sentence, [(3, 9), (11, 15), (19, 32)]))
    # ... but a fragment with its own verb before the finding has its own polarity
    sentence = "No nodule, and there is consolidation."
    assert [p.negated for p in polarity(sentence, [(3, 9), (24, 37)])] == [True, False]
