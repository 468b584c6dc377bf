"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this is imported by path)."""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path
from typing import Any

import numpy as np


def parse_size(text: str) -> tuple[int, int, int]:
    """``"240x480x480"`` → ``(240, 480, 480)``."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size must be DxHxW, got {text!r}")
    return parts  # type: ignore[return-value]


def vm_hwm_gb() -> float:
    """Peak resident memory of this process (Linux VmHWM; ru_maxrss as a fallback), in GB (1e9 bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_vm_hwm() -> bool:
    """Reset this process's peak resident memory (Linux ≥ 4.0: ``5`` into ``/proc/self/clear_refs``) to its current
    resident set, so that :func:`vm_hwm_gb` measures from here; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_info(probe_seconds: float = 0.5) -> dict[str, Any]:
    """What a wall-time budget depends on: CPU model, cores, torch threads and version, GPU, and a measured fp32
    matmul speed (GFLOP/s over ``probe_seconds``; on the GPU where there is one), so that runs of one benchmark made
    on different machines can be told apart and compared."""
    import os
    import platform
    import time

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 1024
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()  # the timer starts with the warm-up finished, not merely launched
    runs, start = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - start < probe_seconds:
        torch.mm(a, b)
        runs += 1
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "matmul_gflops": round(2 * size**3 * runs / seconds / 1e9, 1)}


def truth_scores(predictions: Path, references: Path, labeler: Any) -> dict[str, Any]:
    """Per test study, in reference order: the report's labels against the phantom's true labels (the label judge's
    counts, its score and the score of its ``f1`` mode)."""
    from rrg3d.data.manifest import load_manifest
    from rrg3d.judge.label import LabelJudge, f1_score, label_score
    from rrg3d.train.data import labels_vector

    refs = load_manifest(references)
    predicted = {r["id"]: r.get("report") or "" for r in map(json.loads, Path(predictions).read_text().splitlines())}
    missing = [r["id"] for r in refs if r["id"] not in predicted]
    if missing:
        raise SystemExit(f"{predictions}: no report for {len(missing)} test studies (first {missing[:3]})")
    judge = LabelJudge(labeler)
    counts = judge.counts([r["report"] for r in refs], [predicted[r["id"]] for r in refs],
                          [labels_vector(r.get("labels"), judge.label_names) for r in refs])
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    scores = np.array([label_score(int(a), int(b)) for a, b in zip(fp, fn, strict=True)])
    f1_scores = np.array([f1_score(int(a), int(b), int(c)) for a, b, c in zip(tp, fp, fn, strict=True)])
    return {"ids": [r["id"] for r in refs], "tp": tp, "fp": fp, "fn": fn, "judge": scores, "judge_f1": f1_scores}


def statistics(scores: dict[str, Any]) -> dict[str, Any]:
    """Bootstrap statistics (exact on every resample) of the truth-based metrics."""
    from rrg3d.evaluate.bootstrap import Statistic, mean_statistic

    def micro_f1(sums: np.ndarray, n: int) -> np.ndarray:
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp, dtype=float), where=(2 * tp + fp + fn) > 0)

    def precision(sums: np.ndarray, n: int) -> np.ndarray:
        tp, fp = sums[..., 0], sums[..., 1]
        return np.divide(tp, tp + fp, out=np.zeros_like(tp, dtype=float), where=(tp + fp) > 0)

    def recall(sums: np.ndarray, n: int) -> np.ndarray:
        tp, fn = sums[..., 0], sums[..., 2]
        return np.divide(tp, tp + fn, out=np.zeros_like(tp, dtype=float), where=(tp + fn) > 0)

    counts = np.stack([scores["tp"], scores["fp"], scores["fn"]], axis=1).astype(float)
    return {"ce_micro_f1": Statistic(counts, micro_f1), "ce_precision": Statistic(counts, precision),
            "ce_recall": Statistic(counts, recall),
            "hallucinated_per_report": mean_statistic(scores["fp"].astype(float)),
            "omitted_per_report": mean_statistic(scores["fn"].astype(float)),
            "label_judge_score": mean_statistic(scores["judge"].astype(float)),
            **({"label_f1_judge_score": mean_statistic(scores["judge_f1"].astype(float))} if "judge_f1" in scores
               else {})}


def reused_minutes(previous: dict[str, Any], stage: str, run: Path, redone: bool) -> dict[str, Any] | None:
    """The minutes an earlier invocation measured for this very run (a rerun that only rescores keeps them)."""
    earlier = (previous.get("minutes_per_arm") or {}).get(stage)
    if redone or not earlier or earlier.get("run") != str(run):
        return None
    return earlier


def arm_minutes(previous: dict[str, Any], arm: str, run: Path, *, trained: bool, generated: bool,
                train_minutes: float, generate_minutes: float) -> dict[str, Any]:
    """An arm's minutes: what this invocation measured, an earlier invocation's for the same run when nothing was
    redone, and, when only the decoding was redone on a reused run, the new generation minutes with the training
    minutes that invocation measured (``train_measured_earlier``)."""
    minutes = reused_minutes(previous, arm, run, trained or generated) or {
        "train": round(train_minutes, 2), "generate": round(generate_minutes, 2), "measured": trained and generated,
        "run": str(run)}
    earlier = reused_minutes(previous, arm, run, False)
    if generated and not trained and earlier is not None:  # new decoding of a reused run: its training minutes
        minutes.update(train=earlier["train"], measured=bool(earlier.get("train_measured", earlier.get("measured"))),
                       train_measured_earlier=True)
    return minutes
