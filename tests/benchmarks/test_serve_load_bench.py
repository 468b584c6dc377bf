"""The load test of ``rrg3d serve`` (benchmarks/serve_load.py): a live uvicorn on loopback with a tiny model, 200
requests from 16 concurrent clients; no request lost or errored other than the documented 429s, every accepted study
finished, latency percentiles written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def test_serve_load_200_requests_16_clients(tmp_path):
    out = tmp_path / "serve_load.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--out", str(out),
                           "--requests", "200", "--clients", "16", "--queue", "4", "--max-seconds", "240"],
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["verdicts"] == {"no_request_lost_or_errored": True, "every_accepted_study_finished": True,
                                  "all_requests_spent": True}
    counts = result["status_counts"]
    assert sum(n for key, n in counts.items() if not key.startswith("drain")) == 200
    assert set(counts) <= {"upload 202", "upload 429", "poll 200", "drain 200"}
    assert result["rejected_429"] > 0  # a queue of 4 under 16 clients: the documented 429s happen
    assert result["finished"] == {"done": result["accepted"]} and result["accepted"] >= 4
    assert result["latency_all"]["p50_ms"] > 0 and result["latency_all"]["p95_ms"] >= result["latency_all"]["p50_ms"]
    assert "p95" in done.stdout
