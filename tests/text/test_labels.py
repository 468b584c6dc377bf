"""The label set's own module: the adapter re-exports it, and the labelers and CE learn it without a dataset adapter."""

from __future__ import annotations

import subprocess
import sys

from rrg3d.text.labels import CTRATE_LABELS


def test_one_label_set_everywhere():
    from rrg3d.data.adapters import ctrate
    from rrg3d.evaluate.clinical import label_names
    from rrg3d.text.labeler import RuleLabeler

    assert len(CTRATE_LABELS) == 18 and len(set(CTRATE_LABELS)) == 18
    assert ctrate.CTRATE_LABELS is CTRATE_LABELS and RuleLabeler().labels == CTRATE_LABELS
    assert label_names(None) == CTRATE_LABELS


def test_text_and_evaluate_do_not_import_a_dataset_adapter():
    code = ("import sys, rrg3d.text.labeler, rrg3d.evaluate.clinical; "
            "print(sorted(m for m in sys.modules if m.startswith('rrg3d.data.adapters')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
