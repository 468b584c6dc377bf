"""The job store: one sqlite file under the server's data folder, so that a restart finishes what was accepted.

A job is ``queued`` → ``running`` → ``done`` or ``failed``. On start, jobs left ``running`` by a stopped server go
back to ``queued``. The store holds no identifier of the upload: ids are random, inputs are stored under the id.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "done", "failed")
PENDING = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT,
    kind TEXT NOT NULL,
    input TEXT NOT NULL,
    shape TEXT,
    error TEXT,
    result TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass
class Job:
    """One study's row: ``input`` is relative to the data folder; ``result`` the prediction record when done."""

    id: str
    status: str
    kind: str
    input: str
    progress: float = 0.0
    stage: str | None = None
    shape: list[int] | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["shape"] = json.loads(data["shape"]) if data["shape"] else None
        data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)


def new_job_id() -> str:
    """A random id (32 hex digits): nothing of the upload is in it."""
    return uuid.uuid4().hex


class JobStore:
    """Thread-safe access to the jobs table (one connection, one lock; WAL so readers do not wait on the worker)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def create(self, job_id: str, kind: str, input_path: str, shape: tuple[int, ...] | None = None, *,
               limit: int | None = None) -> Job | None:
        """Queue a new job; None (nothing created) when ``limit`` jobs are already queued or running. The count and
        the insert are one transaction, so concurrent uploads cannot overfill the queue."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if limit is not None:
                    pending = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                                               ).fetchone()[0]
                    if pending >= limit:
                        self._db.execute("ROLLBACK")
                        return None
                self._db.execute("INSERT INTO jobs (id, status, kind, input, shape, created, stage) VALUES "
                                 "(?, 'queued', ?, ?, ?, ?, 'queued')",
                                 (job_id, kind, input_path, json.dumps(list(shape)) if shape else None, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(row) if row is not None else None

    def pending(self) -> int:
        """Jobs queued or running (what the queue limit counts)."""
        row = self._one("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")
        return int(row[0]) if row is not None else 0

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {row[0]: int(row[1]) for row in rows}

    def mean_seconds(self, last: int = 20) -> float | None:
        """Mean run time of the last finished jobs (for Retry-After), None before the first."""
        with self._lock:
            rows = self._db.execute("SELECT finished - started FROM jobs WHERE status = 'done' AND started IS NOT NULL "
                                    "ORDER BY finished DESC LIMIT ?", (last,)).fetchall()
        times = [float(row[0]) for row in rows if row[0] is not None]
        return sum(times) / len(times) if times else None

    def claim(self, limit: int = 1) -> list[Job]:
        """Move up to ``limit`` of the oldest queued jobs to running and return them."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created LIMIT ?",
                                        (limit,)).fetchall()
                ids = [row[0] for row in rows]
                now = time.time()
                for job_id in ids:
                    self._db.execute("UPDATE jobs SET status = 'running', stage = 'starting', started = ?, "
                                     "progress = 0, attempts = attempts + 1 WHERE id = ?", (now, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [job for job in (self.get(job_id) for job_id in ids) if job is not None]

    def progress(self, job_id: str, progress: float, stage: str) -> None:
        self._run("UPDATE jobs SET progress = ?, stage = ? WHERE id = ? AND status = 'running'",
                  (float(progress), stage, job_id))

    def finish(self, job_id: str, result: dict[str, Any]) -> None:
        self._run("UPDATE jobs SET status = 'done', progress = 1, stage = 'done', result = ?, error = NULL, "
                  "finished = ? WHERE id = ?", (json.dumps(result), time.time(), job_id))

    def fail(self, job_id: str, error: str) -> None:
        self._run("UPDATE jobs SET status = 'failed', stage = 'failed', error = ?, finished = ? WHERE id = ?",
                  (error, time.time(), job_id))

    def delete(self, job_id: str) -> bool:
        return self._run("DELETE FROM jobs WHERE id = ?", (job_id,)) > 0

    def recover(self) -> int:
        """Jobs a stopped server left running go back to the queue; returns how many."""
        return self._run("UPDATE jobs SET status = 'queued', stage = 'queued', progress = 0 WHERE status = 'running'")
