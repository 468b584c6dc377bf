"""The demo's model works (slow: runs `rrg3d demo` as a user does, about 10 minutes on 2 CPU cores, then scores its
model on unseen phantoms of another seed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_the_demo_model_beats_constant_reports_on_unseen_phantoms(tmp_path):
    spec = importlib.util.spec_from_file_location("_benchmark_demo", BENCHMARKS / "demo.py")
    assert spec is not None and spec.loader is not None
    demo_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_benchmark)

    out = tmp_path / "demo.json"
    assert demo_benchmark.main(["--work", str(tmp_path / "work"), "--out", str(out), "--unseen", "40",
                                "--bootstrap", "200"]) == 0
    result = json.loads(out.read_text())
    model = result["unseen"]["rows"]["model"]
    majority = result["unseen"]["rows"]["majority-class report"]
    assert model["ce_micro_f1"] >= 0.50, model
    assert model["ce_micro_f1"] >= majority["ce_micro_f1"] + 0.15
    assert model["words_mean"] >= 20 and model["share_with_findings_and_impression"] >= 0.9
