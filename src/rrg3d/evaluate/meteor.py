"""METEOR 1.5 through pycocoevalcap's jar: one Java process for a whole batch, plus its aggregate in Python.

pycocoevalcap's ``Meteor`` sends one ``SCORE`` line per pair and waits for each answer, then one ``EVAL`` line with
all the statistics. :class:`MeteorJava` sends the same lines to the same jar with the same options, but writes them
from a thread while it reads the answers (the JVM never waits for Python), and keeps the process for later batches
(its start — loading the paraphrase table — takes several seconds). Scores are those of pycocoevalcap.

:func:`meteor_from_stats` is METEOR 1.5's scoring of summed statistics (``MeteorScorer.computeMetrics`` with the
English defaults that ``-l en`` selects), used on sums of :func:`additive_stats` to recompute the corpus score on
bootstrap resamples; a test checks it against the jar.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence

import numpy as np

from rrg3d.errors import RRG3DError

log = logging.getLogger(__name__)

#: Number of values in one METEOR 1.5 statistics line (4 lengths, 4 stages x 4 match counts, chunks, 2 word matches).
STATS_LENGTH = 23
#: ``-l en`` defaults of METEOR 1.5 (task "default"): alpha, beta, gamma, delta and the 4 module weights.
ALPHA, BETA, GAMMA, DELTA = 0.85, 0.20, 0.60, 0.75
MODULE_WEIGHTS = (1.0, 0.6, 0.8, 0.6)


class MeteorError(RRG3DError):
    """The METEOR Java process could not be started or stopped answering."""


def jar_path() -> str:
    """Path of pycocoevalcap's ``meteor-1.5.jar``."""
    import pycocoevalcap.meteor.meteor as module

    return os.path.join(os.path.dirname(os.path.abspath(module.__file__)), module.METEOR_JAR)


def clean_segment(text: str) -> str:
    """pycocoevalcap's hypothesis cleaning (no ``|||``, double spaces halved), and no line breaks."""
    return text.replace("\n", " ").replace("\r", " ").replace("|||", "").replace("  ", " ")


class MeteorJava:
    """A running ``meteor-1.5.jar -stdio`` process (pycocoevalcap's command line)."""

    def __init__(self, java: str = "java") -> None:
        jar = jar_path()
        self.command = [java, "-jar", "-Xmx2G", "-XX:+UseSerialGC", os.path.basename(jar), "-", "-", "-stdio",
                        "-l", "en", "-norm"]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        try:
            self.process = subprocess.Popen(self.command, cwd=os.path.dirname(jar), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=self._stderr)
        except OSError as exc:
            raise MeteorError(f"cannot start Java for METEOR 1.5 ({exc.strerror or exc})") from exc
        self.lock = threading.Lock()

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read()[-500:].decode("utf-8", "replace").strip()
        return ""

    def _readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise MeteorError(f"the METEOR Java process stopped ({self._stderr_tail() or 'no message'})")
        return line.decode("utf-8").strip()

    def _send(self, lines: Sequence[str]) -> threading.Thread:
        """Write lines from a thread (so reading the answers can start at once); returns the thread."""
        errors: list[BaseException] = []

        def write() -> None:
            try:
                assert self.process.stdin is not None
                for line in lines:
                    self.process.stdin.write((line + "\n").encode("utf-8"))
                self.process.stdin.flush()
            except OSError as exc:  # the reader reports the dead process
                errors.append(exc)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    def score(self, references: Sequence[Sequence[str]], hypotheses: Sequence[str],
              progress: bool = False) -> tuple[float, list[float], list[str]]:
        """Corpus score, per-segment scores and statistics lines, as pycocoevalcap's ``Meteor.compute_score``."""
        if len(references) != len(hypotheses):
            raise ValueError("references and hypotheses differ in length")
        if not hypotheses:
            return float("nan"), [], []
        lines = [" ||| ".join(("SCORE", " ||| ".join(clean_segment(r) for r in refs), clean_segment(hyp)))
                 for refs, hyp in zip(references, hypotheses, strict=True)]
        with self.lock:
            try:
                writer = self._send(lines)
                iterator = range(len(lines))
                if progress:
                    from tqdm import tqdm

                    iterator = tqdm(iterator, desc="METEOR 1.5", unit="pair", leave=False)
                stats = [self._readline() for _ in iterator]
                writer.join()
                writer = self._send(["EVAL ||| " + " ||| ".join(stats)])
                segment_scores = [float(self._readline()) for _ in stats]
                corpus = float(self._readline())
                writer.join()
            except (MeteorError, ValueError) as exc:
                self.close()  # never reuse a process whose answers may be out of step
                raise MeteorError(str(exc)) from exc
        return corpus, segment_scores, stats

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.process.stdin:
                self.process.stdin.close()
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.wait(timeout=5)
        with contextlib.suppress(Exception):
            self._stderr.close()


_shared: MeteorJava | None = None
_shared_lock = threading.Lock()


def shared_meteor(java: str = "java") -> MeteorJava:
    """The process-wide METEOR process (started on first use, restarted if it died, stopped at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.process.poll() is not None:
            _shared = MeteorJava(java)
        return _shared


def close_shared_meteor() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


atexit.register(close_shared_meteor)


def find_java() -> str | None:
    """The ``java`` executable on PATH, or ``None`` (``RRG3D_NO_JAVA=1`` pretends there is none)."""
    if os.environ.get("RRG3D_NO_JAVA", "").strip() not in ("", "0"):
        return None
    return shutil.which("java")


def parse_stats(lines: Sequence[str]) -> np.ndarray:
    """Statistics lines → ``(n, 23)`` float array."""
    rows = [np.array(line.split(), dtype=np.float64) for line in lines]
    if any(row.shape != (STATS_LENGTH,) for row in rows):
        raise MeteorError("unexpected METEOR statistics line")
    return np.stack(rows) if rows else np.zeros((0, STATS_LENGTH))


def additive_stats(stats: np.ndarray) -> np.ndarray:
    """Per-segment statistics whose column sums are METEOR 1.5's corpus statistics.

    ``MeteorStats.addStats`` leaves out the chunk count of a perfectly matched segment (all words matched, one
    chunk), so those rows get ``chunks = 0`` here; :func:`meteor_from_stats` of such a row is still 1.
    """
    out = np.array(stats, dtype=np.float64, copy=True)
    stages = out[:, 4:20].reshape(len(out), 4, 4)
    test_total = stages[:, :, 0].sum(1) + stages[:, :, 2].sum(1)
    ref_total = stages[:, :, 1].sum(1) + stages[:, :, 3].sum(1)
    perfect = (test_total == out[:, 0]) & (ref_total == out[:, 1]) & (out[:, 20] == 1)
    out[perfect, 20] = 0.0
    return out


def meteor_from_stats(stats: np.ndarray) -> np.ndarray:
    """METEOR 1.5 score of (summed) statistics, vectorised over leading axes: ``(..., 23)`` → ``(...)``."""
    s = np.asarray(stats, dtype=np.float64)
    test_len, ref_len, test_fn, ref_fn = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    stages = s[..., 4:20].reshape(*s.shape[:-1], 4, 4)  # per stage: test content, ref content, test fn, ref fn
    chunks, test_word_matches, ref_word_matches = s[..., 20], s[..., 21], s[..., 22]
    weights = np.asarray(MODULE_WEIGHTS)
    test_weighted_len = DELTA * (test_len - test_fn) + (1 - DELTA) * test_fn
    ref_weighted_len = DELTA * (ref_len - ref_fn) + (1 - DELTA) * ref_fn
    test_weighted = (stages[..., 0] * weights).sum(-1) * DELTA + (stages[..., 2] * weights).sum(-1) * (1 - DELTA)
    ref_weighted = (stages[..., 1] * weights).sum(-1) * DELTA + (stages[..., 3] * weights).sum(-1) * (1 - DELTA)
    test_total = stages[..., 0].sum(-1) + stages[..., 2].sum(-1)
    ref_total = stages[..., 1].sum(-1) + stages[..., 3].sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = test_weighted / test_weighted_len
        recall = ref_weighted / ref_weighted_len
        f_mean = 1.0 / ((1 - ALPHA) / precision + ALPHA / recall)
        frag = chunks / ((test_word_matches + ref_word_matches) / 2.0)
        perfect = (test_total == test_len) & (ref_total == ref_len) & (chunks == 1)
        frag = np.where(perfect, 0.0, frag)
        score = f_mean * (1.0 - GAMMA * np.power(frag, BETA))
    return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))
