"""The exit-code rule shared by batch commands (preprocess, generate, phantom, evaluate, prefs, merge)."""

from __future__ import annotations

#: Text for the batch commands' --help and docstrings.
EXIT_RULE = ("Exit 0 when the batch ran, even if some items failed (failures are recorded); 1 with --strict when any "
             "failure was recorded; 2 when nothing could run (every item failed, or bad arguments).")

STRICT_HELP = "exit 1 when any failure was recorded (default: 0 once the batch ran)"


def batch_exit_code(done: int, failed: int, strict: bool = False) -> int:
    """``2`` when items failed and none was done, ``1`` for any failure under ``strict``, else ``0``.

    ``done`` counts items with a result (this run's and those resumed), ``failed`` items recorded as failed. An empty
    batch (``0, 0``, e.g. a shard that owns no study) ran: ``0``. Bad arguments never get here: they raise."""
    if failed and not done:
        return 2
    if strict and failed:
        return 1
    return 0
