"""A disk cache of judge answers (sqlite3), so re-running an evaluation asks no judge twice.

Key: sha256 of ``(judge id, prompt version, reference, candidate)`` as canonical JSON. The raw answer is stored
(parsing is deterministic and redone on read, so a parser fix applies to cached answers too). Transport errors are
never cached. One connection per call: safe across threads and processes (sqlite locks the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from rrg3d.errors import RRG3DError


def default_cache_path() -> Path:
    root = Path(os.environ.get("RRG3D_CACHE_DIR") or Path.home() / ".cache" / "rrg3d").expanduser()
    return root / "judge_cache.sqlite"


def cache_key(judge_id: str, prompt_version: str, reference: str, candidate: str) -> str:
    payload = json.dumps([judge_id, prompt_version, reference, candidate], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """``get(key)`` / ``put(key, ...)`` over one sqlite file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, judge TEXT, version TEXT, "
                           "answer TEXT NOT NULL, created REAL)")
        except (OSError, sqlite3.Error) as exc:
            raise RRG3DError(f"{self.path}: cannot open the judge cache ({exc})") from exc

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, key: str) -> str | None:
        db = self._connect()
        try:
            row = db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        finally:
            db.close()
        return None if row is None else str(row[0])

    def put(self, key: str, answer: str, judge: str = "", version: str = "") -> None:
        db = self._connect()
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                           (key, judge, version, answer, time.time()))
        finally:
            db.close()

    def __len__(self) -> int:
        db = self._connect()
        try:
            return int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
        finally:
            db.close()
