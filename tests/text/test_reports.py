"""Report normalisation, section splitting, sentence and clause splitting (texts written for these tests)."""

from __future__ import annotations

import pytest

from rrg3d.text.reports import normalize_report, split_clauses, split_sections, split_sentences


def test_normalize_unicode_quotes_dashes_and_spaces():
    text = "  \u201cRight\u201d  effusion \u2013 small\u00a0(3\u00d74 mm)\t\r\nnext   line  "
    assert normalize_report(text) == '"Right" effusion - small (3x4 mm)\nnext line'
    assert normalize_report(text, keep_newlines=False) == '"Right" effusion - small (3x4 mm) next line'
    assert normalize_report(None) == "" and normalize_report("   ") == ""
    assert normalize_report("a\x00b\x07c") == "a b c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Findings: Lungs clear. Impression: Normal.", {"findings": "Lungs clear.", "impression": "Normal."}),
        ("FINDINGS\nLungs clear.\nIMPRESSION\nNormal.", {"findings": "Lungs clear.", "impression": "Normal."}),
        ("Clinical information: cough. Technique: low dose. Findings: Nodule. Conclusion: Nodule.",
         {"clinical_information": "cough.", "technique": "low dose.", "findings": "Nodule.",
          "impression": "Nodule."}),
        ("Lungs are clear. No effusion.", {"findings": "Lungs are clear. No effusion."}),
        ("Comparison none. Findings: Clear.", {"other": "Comparison none.", "findings": "Clear."}),
    ],
)
def test_split_sections(text, expected):
    assert split_sections(text) == expected


def test_sections_ignore_header_words_inside_sentences():
    # "findings" and "impression" in running text (lower case, no colon) are not headers
    text = "Findings consistent with emphysema. The impression is of mild disease."
    assert split_sections(text) == {"findings": text}
    assert split_sections("") == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A 3.5 mm nodule in the right upper lobe. No effusion.",
         ["A 3.5 mm nodule in the right upper lobe.", "No effusion."]),
        ("Mass of 3 x 4.5 cm, e.g. in the hilum, approx. 2 cm from the carina. Next.",
         ["Mass of 3 x 4.5 cm, e.g. in the hilum, approx. 2 cm from the carina.", "Next."]),
        ("Reviewed by Dr. Jones. Heart normal.", ["Reviewed by Dr. Jones.", "Heart normal."]),
        ("Impression: 1. Emphysema. 2. Small effusion. 3. Cardiomegaly.",
         ["Emphysema.", "Small effusion.", "Cardiomegaly."]),
        ("IMPRESSION: 1. Emphysema 2. Small effusion 3) Cardiomegaly",
         ["Emphysema", "Small effusion", "Cardiomegaly"]),
        ("Fracture of the 5. rib on the left. Normal heart.", ["Fracture of the 5. rib on the left.", "Normal heart."]),
        ("Nodule in the\nright lower lobe.\nNo effusion\nHeart normal",
         ["Nodule in the right lower lobe.", "No effusion", "Heart normal"]),
        ("- Emphysema\n- Bronchiectasis\n* Nodule", ["Emphysema", "Bronchiectasis", "Nodule"]),
        ('Effusion on the right " Consolidation on the left " Nodule.',
         ["Effusion on the right", "Consolidation on the left", "Nodule."]),
        ("Atelectasis? Effusion! Normal heart", ["Atelectasis?", "Effusion!", "Normal heart"]),
        ("Measured 12.5 mm. Stable.", ["Measured 12.5 mm.", "Stable."]),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_empty_and_punctuation_only():
    assert split_sentences(None) == [] and split_sentences("") == [] and split_sentences(" . ; ") == []


def test_split_clauses_offsets():
    sentence = "No effusion; atelectasis is seen, but no nodule however consolidation."
    clauses = split_clauses(sentence)
    assert [text for _, text in clauses] == ["No effusion", "atelectasis is seen", "no nodule", "consolidation."]
    for offset, text in clauses:
        assert sentence[offset:offset + len(text)] == text
