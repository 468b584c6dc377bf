"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this is imported by path)."""

from __future__ import annotations

import argparse
import resource
from pathlib import Path


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
