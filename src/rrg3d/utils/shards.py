"""Sharded batch work: split a batch (``rrg3d preprocess``, ``rrg3d generate``) over N independent processes.

A shard is ``I/N`` (``0 <= I < N``): from ``--shard I/N``, or from the launcher's environment (``RANK`` and
``WORLD_SIZE`` as torchrun and ``accelerate launch`` set them, else ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``).

**Assignment rule.** An item belongs to shard ``sha256(key) mod N``, its key being the study id (the first 8 bytes
of the SHA-256 of the UTF-8 id, read big-endian). The rule looks at the id alone, so it does not depend on the
order of the inputs or on the other items: a study keeps its shard when the manifest is reordered or grows, which is
what lets each shard resume from its own output files (a study done by shard 1 is never reassigned to shard 0 and
done twice). The price is balance: shard sizes are multinomial, about ``n/N ± sqrt(n/N)`` (±3 % for 10,000
studies over 8 shards, but 5 and 1 are possible for 6 studies over 2). Round-robin over the sorted ids would balance
to ±1, but one inserted id moves every later study to another shard, and resumed shards would then overlap. Changing
N reassigns everything under either rule; that is why N is part of every shard file's name.

Shard files sit beside the unsharded file: ``PRED.jsonl`` → ``PRED.shard-1-of-4.jsonl``. ``rrg3d merge`` joins them;
when a shard finishes and finds every other shard finished, it merges on its own (:func:`merge_when_complete`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from rrg3d.errors import ConfigError, RRG3DError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: (index variable, count variable) pairs read by :func:`shard_from_env`, first complete pair wins.
ENV_PAIRS: tuple[tuple[str, str], ...] = (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"shard {self.index}/{self.count}: the number of shards must be at least 1")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: the index counts from 0 and must be below "
                              f"{self.count} (0/{self.count} ... {self.count - 1}/{self.count})")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def label(self) -> str:
        """The file-name tag: ``shard-1-of-4``."""
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, key: str) -> bool:
        """Whether the item with this key (a study id) belongs to this shard."""
        return shard_of(key, self.count) == self.index


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> Shard:
    """``"1/4"`` → ``Shard(index=1, count=4)``; :class:`ConfigError` explaining the form otherwise."""
    match = _SHARD.match(str(text))
    if match is None:
        raise ConfigError(f"--shard takes I/N, shard I (counted from 0) of N, e.g. 0/4; got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text}: the number of shards N must be at least 1")
    if index >= count:
        raise ConfigError(f"--shard {text}: I counts from 0 and must be below N ({0}/{count} ... "
                          f"{count - 1}/{count})")
    return Shard(index, count)


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of this process under a distributed launcher, or ``None`` when it runs alone.

    Reads ``RANK``/``WORLD_SIZE`` (torchrun, ``accelerate launch``), else ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``;
    a world of one process is no sharding. Only a complete pair counts; values that do not form a shard raise
    :class:`ConfigError` naming the variables. Other launchers (SLURM, MPI) are not read, because their variables
    are also set around a single process: pass ``--shard $SLURM_PROCID/$SLURM_NTASKS`` there.
    """
    environ = os.environ if environ is None else environ
    for index_name, count_name in ENV_PAIRS:
        index_text, count_text = environ.get(index_name), environ.get(count_name)
        if index_text is None or count_text is None:
            if (index_text is None) != (count_text is None):
                log.debug("%s without %s: not a shard", index_name if index_text else count_name,
                          count_name if index_text else index_name)
            continue
        try:
            index, count = int(index_text), int(count_text)
            shard = Shard(index, count)
        except (ValueError, ConfigError):
            raise ConfigError(f"{index_name}={index_text!r} and {count_name}={count_text!r} do not give a shard "
                              f"(need integers with 0 <= {index_name} < {count_name}); pass --shard I/N to "
                              "override") from None
        return shard if shard.count > 1 else None
    return None


def resolve_shard(option: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard a command works on: ``--shard`` when given (``0/1`` = everything, also under a launcher), else
    the environment's; ``None`` means the whole batch, written under the unsharded names."""
    shard = parse_shard(option) if option is not None else shard_from_env(environ)
    return shard if shard is not None and shard.count > 1 else None


def shard_of(key: str, count: int) -> int:
    """The shard (of ``count``) that owns ``key``: the first 8 bytes of its SHA-256, big-endian, mod ``count``."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select(items: Iterable[T], shard: Shard | None, key: Callable[[T], str] = str) -> list[T]:
    """The items of ``shard`` (all of them for ``None``), in their input order."""
    if shard is None:
        return list(items)
    return [item for item in items if shard.owns(key(item))]


def _split_suffix(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def shard_path(path: str | os.PathLike[str], shard: Shard | None) -> Path:
    """``PRED.jsonl`` → ``PRED.shard-1-of-4.jsonl`` (the path itself for ``None``)."""
    path = Path(path)
    if shard is None:
        return path
    stem, suffix = _split_suffix(path.name)
    return path.with_name(f"{stem}.{shard.label}{suffix}")


def find_shards(path: str | os.PathLike[str], count: int | None = None) -> tuple[int, dict[int, Path]]:
    """The shard files of ``path`` (``PRED.shard-I-of-N.jsonl`` beside it): ``(N, {I: file})``.

    Raises :class:`RRG3DError` when there are none, when files of several N are present and ``count`` does not
    choose, or when some of the N are missing."""
    path = Path(path)
    stem, suffix = _split_suffix(path.name)
    pattern = re.compile(rf"^{re.escape(stem)}\.shard-(\d+)-of-(\d+){re.escape(suffix)}$")
    found: dict[int, dict[int, Path]] = {}
    if path.parent.is_dir():
        for file in path.parent.iterdir():
            match = pattern.match(file.name)
            if match and file.is_file():
                found.setdefault(int(match.group(2)), {})[int(match.group(1))] = file
    hint = path.parent / f"{stem}.shard-I-of-N{suffix}"
    if count is not None:
        if count not in found:
            raise RRG3DError(f"{hint}: no shard file of {count} shards found")
    elif not found:
        raise RRG3DError(f"{hint}: no shard files found (run the batch with --shard I/N first)")
    elif len(found) > 1:
        raise RRG3DError(f"{hint}: shard files of {' and '.join(map(str, sorted(found)))} shards are present; "
                         "choose with --shards N")
    count = count if count is not None else next(iter(found))
    files = {i: f for i, f in found[count].items() if i < count}
    missing = [i for i in range(count) if i not in files]
    if missing:
        names = ", ".join(shard_path(path, Shard(i, count)).name for i in missing)
        raise RRG3DError(f"{path}: {len(missing)} of {count} shards missing: {names}")
    return count, dict(sorted(files.items()))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Create ``path`` exclusively (``O_EXCL``): yields ``True`` for the one process that made it (removed on exit)
    and ``False`` to any other while it exists. A lock left by a killed process stays until removed by hand."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        yield False
        return
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.close(fd)
        yield True
    finally:
        path.unlink(missing_ok=True)


def merge_when_complete(lock: str | os.PathLike[str], ready: Callable[[], bool], merge: Callable[[], T]) -> T | None:
    """Run ``merge`` when ``ready()`` says every shard has finished, in one process at a time.

    Each shard calls this after writing its own completion marker, so of two shards finishing together at least
    one sees the other's marker; the lock keeps them from merging at once (merges are atomic and idempotent, so a
    later rerun merging again is harmless). Returns ``None`` when not ready or another process holds the lock."""
    if not ready():
        return None
    with exclusive_lock(lock) as mine:
        if not mine:
            log.warning("%s exists: another shard is merging (or a merge was killed: remove the file and run "
                        "`rrg3d merge`)", lock)
            return None
        if not ready():  # a shard restarted between the check and the lock
            return None
        return merge()
