"""Fixtures for the evaluation tests: a tiny stand-in labeler and real report pairs read from the shared data."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from rrg3d.text.labels import CTRATE_LABELS

#: label → keyword; "no <keyword>" in the same sentence negates it.
STUB_KEYWORDS = {"Cardiomegaly": "cardiomegaly", "Pleural effusion": "effusion", "Lung nodule": "nodule",
                 "Emphysema": "emphysema", "Atelectasis": "atelectasis"}


class StubLabeler:
    """Keyword labeler with sentence-level "no" negation, for tests that need exact, hand-checkable labels."""

    labels = CTRATE_LABELS
    name = "stub"

    def predict(self, texts):
        out = np.zeros((len(texts), len(CTRATE_LABELS)), dtype=np.int8)
        for i, text in enumerate(texts):
            for sentence in re.split(r"[.;\n]", (text or "").lower()):
                for label, word in STUB_KEYWORDS.items():
                    if word in sentence and not re.search(r"\bno\b", sentence):
                        out[i, CTRATE_LABELS.index(label)] = 1
        return out


@pytest.fixture()
def stub_labeler():
    return StubLabeler()


@pytest.fixture(scope="session")
def real_reports(shared_data):
    """The real CT-RATE report texts (read at test time; never copied into the repository)."""
    path = shared_data / "reports" / "ctrate_labeled_reports_train.csv"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    with open(path, encoding="utf-8", newline="") as handle:
        return [row["report_text"] for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def real_pairs(real_reports):
    """60 (reference, candidate) pairs: report i against report i + 1."""
    return [(real_reports[i], real_reports[i + 1]) for i in range(60)]
