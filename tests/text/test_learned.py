"""The learned labeler: persistence checks, the sentence-embedding cache and load_labeler (own tiny texts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rrg3d.text.labeler import LabelerError, LearnedLabeler, RuleLabeler, SentenceEncoder, load_labeler
from rrg3d.text.labels import CTRATE_LABELS

TEXTS = [
    ("Findings: Small right pleural effusion. Heart normal.", "Pleural effusion"),
    ("Bilateral pleural effusions. No nodules.", "Pleural effusion"),
    ("Findings: A 5 mm nodule in the left upper lobe.", "Lung nodule"),
    ("Two small pulmonary nodules. No effusion.", "Lung nodule"),
    ("Findings: The lungs are clear. No effusion.", None),
    ("Normal study without nodules.", None),
]


def _data() -> tuple[list[str], np.ndarray]:
    texts = [t for t, _ in TEXTS]
    labels = np.zeros((len(texts), len(CTRATE_LABELS)), dtype=np.int8)
    for i, (_, label) in enumerate(TEXTS):
        if label:
            labels[i, CTRATE_LABELS.index(label)] = 1
    return texts, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts, labels = _data()
    cache = tmp_path_factory.mktemp("cache")
    model = LearnedLabeler(progress=False, cache_dir=cache).fit(texts, labels)
    directory = model.save(tmp_path_factory.mktemp("model") / "labeler")
    return model, directory, texts, labels, cache


def test_fit_predict_and_load_labeler(trained):
    model, directory, texts, labels, _ = trained
    np.testing.assert_array_equal(model.predict(texts), labels)
    loaded = load_labeler(directory)
    assert isinstance(loaded, LearnedLabeler) and isinstance(load_labeler(None), RuleLabeler)
    np.testing.assert_array_equal(loaded.predict(texts), model.predict(texts))
    np.testing.assert_allclose(loaded.predict_proba(texts), model.predict_proba(texts), rtol=1e-5, atol=1e-6)
    assert loaded.predict([]).shape == (0, 18)
    assert loaded.predict([""])[0].sum() == 0  # an empty report scores the bias only


def test_explain_gives_probability_and_evidence(trained):
    model = trained[0]
    entries = {e["label"]: e for e in model.explain("Small left pleural effusion. No nodules.")}
    effusion = entries["Pleural effusion"]
    assert effusion["predicted"] and effusion["probability"] > 0.5
    assert effusion["sentence"] == "Small left pleural effusion."
    assert entries["Lung nodule"]["mentions"][0]["negated"]


def test_load_rejects_other_versions_label_orders_and_broken_files(trained, tmp_path):
    _, directory, *_ = trained
    config = json.loads((directory / "labeler.json").read_text())
    for change, message in (
        ({"format_version": 99}, "format version"),
        ({"labels": [*CTRATE_LABELS[1:], CTRATE_LABELS[0]]}, "label order"),
        ({"kind": "something"}, "not a learned"),
    ):
        broken = tmp_path / message.replace(" ", "_")
        broken.mkdir()
        (broken / "weights.npz").write_bytes((directory / "weights.npz").read_bytes())
        (broken / "labeler.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LabelerError, match=message):
            LearnedLabeler.load(broken)
    with pytest.raises(LabelerError, match="not a labeler directory"):
        LearnedLabeler.load(tmp_path / "nowhere")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "labeler.json").write_text("{not json")
    with pytest.raises(LabelerError, match="unreadable"):
        LearnedLabeler.load(tmp_path / "garbage")


def test_fit_rejects_bad_labels():
    texts, labels = _data()
    model = LearnedLabeler(progress=False)
    with pytest.raises(LabelerError, match="shape"):
        model.fit(texts, labels[:, :5])
    with pytest.raises(LabelerError, match="0 or 1"):
        model.fit(texts, labels * 2)
    with pytest.raises(LabelerError, match="folds"):
        model.fit(texts, labels, folds=50)
    with pytest.raises(LabelerError, match="not trained"):
        model.save("unused")


def test_embedding_cache_is_reused(trained):
    cache = trained[4]
    files = list(cache.glob("embeddings-*.npz"))
    assert len(files) == 1
    encoder = SentenceEncoder(cache_dir=cache, progress=False)
    vectors = encoder.encode(["Small right pleural effusion."])
    assert encoder._model is None  # served from the disk cache, the encoder was never loaded
    assert vectors.shape == (1, 384) and abs(float(np.linalg.norm(vectors[0])) - 1) < 1e-5
