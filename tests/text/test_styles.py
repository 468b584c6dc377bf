"""Style templates and the style classifier (rrg3d.text.styles)."""

from __future__ import annotations

import json

import pytest

from rrg3d.errors import RRG3DError
from rrg3d.text.styles import StyleClassifier, build_style_templates, pick_template, style_features

NARRATIVE = ["Findings: The lungs are clear. The heart is normal in size. Impression: No acute abnormality.",
             "Findings: There is a small nodule in the right upper lobe. Impression: Pulmonary nodule.",
             "Findings: Mild emphysema. The heart is normal. Impression: Emphysema."]
STRUCTURED = ["Findings:\nLUNGS: Clear.\nHEART/MEDIASTINUM: Normal.\nImpression:\n1. No acute abnormality.",
              "Findings:\nLUNGS: Nodule, right upper lobe.\nHEART/MEDIASTINUM: Normal.\nImpression:\n1. Nodule.",
              "Findings:\nLUNGS: Emphysema.\nPLEURA: No effusion.\nImpression:\n1. Emphysema."]


def test_style_classifier_tells_layouts_apart():
    assert "^UPPER_HEADER" in style_features(STRUCTURED[0]) and "order=findings>impression" in style_features(
        NARRATIVE[0])
    classifier = StyleClassifier().fit(NARRATIVE + STRUCTURED, ["a"] * 3 + ["b"] * 3)
    unseen = ["Findings: The lungs are clear. Impression: Normal study.",
              "Findings:\nLUNGS: Consolidation, left lower lobe.\nImpression:\n1. Pneumonia."]
    assert classifier.predict(unseen) == ["a", "b"]
    assert classifier.accuracy(unseen, ["a", "b"]) == 1.0
    with pytest.raises(ValueError, match="not fitted"):
        StyleClassifier().predict(["x"])


def test_templates_prefer_normal_studies_per_style_and_sex(tmp_path):
    rows = [
        {"id": "1", "split": "train", "style": "a", "sex": "female", "report": "Normal female A.",
         "labels": {"Emphysema": 0}},
        {"id": "2", "split": "train", "style": "a", "sex": "male", "report": "Emphysema in a male.",
         "labels": {"Emphysema": 1}},
        {"id": "3", "split": "train", "style": "b", "sex": "M", "report": "Normal male B.", "labels": {"Emphysema": 0}},
        {"id": "4", "split": "test", "style": "c", "sex": "female", "report": "Test only.", "labels": {"Emphysema": 0}},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**r, "images": {"ct": f"{r['id']}.nii.gz"}}) + "\n" for r in rows))
    templates = build_style_templates(manifest)
    assert set(templates) == {"a", "b"}  # the test split never makes a template
    assert templates["a"]["any"] == "Normal female A."  # the normal study wins over the abnormal one
    assert templates["a"]["male"] == "Emphysema in a male."  # the least abnormal of that group
    assert pick_template(templates, "b", "female") == "Normal male B."  # no female template: the style's any
    with pytest.raises(RRG3DError, match="knows a, b"):
        pick_template(templates, "c", None)
    with pytest.raises(RRG3DError, match="no reporting style"):
        pick_template(templates, None, None)
