"""The NiiVue viewer bundle for the web page: fetched from the npm registry at install time, never committed.

NiiVue (https://github.com/niivue/niivue, BSD-2-Clause) is pinned to :data:`NIIVUE_VERSION`. The registry tarball
is downloaded from ``$NPM_CONFIG_REGISTRY`` (a mirror) or https://registry.npmjs.org, checked against the
``integrity`` that npm publishes for it (:data:`NIIVUE_INTEGRITY`, refused on mismatch) and only its UMD build
``package/dist/niivue.umd.js`` (and ``package/LICENSE`` if the tarball has one; 0.69.0 has none, so the upstream
BSD-2 text is written beside it) is read out of it: no other member, link or path is ever extracted.

The files live in the asset folder: ``$RRG3D_ASSETS`` if set, else ``<cache>/assets/niivue-<version>/`` with
``<cache>`` = ``$RRG3D_CACHE_DIR`` or ``~/.cache/rrg3d``. The folder is built in a temporary sibling and renamed into
place (atomic, safe from several processes); a finished one is recognised by its ``niivue.json`` marker, so
:func:`ensure_niivue` downloads only when the bundle is missing or of another version.

``python -m rrg3d.serve.assets`` (run by ``make install``) installs it and prints its path; if the registry cannot
be reached it prints a warning and exits 0, and ``rrg3d serve`` then shows a notice that the 3D viewer is missing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from rrg3d.errors import RRG3DError

NIIVUE_PACKAGE = "@niivue/niivue"
NIIVUE_VERSION = "0.69.0"
#: Subresource-integrity string of the registry tarball (``npm view @niivue/niivue@0.69.0 dist.integrity``).
NIIVUE_INTEGRITY = ("sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJk"
                    "A==")
DEFAULT_REGISTRY = "https://registry.npmjs.org"
BUNDLE_NAME = "niivue.umd.js"
LICENSE_NAME = "LICENSE"
MARKER_NAME = "niivue.json"
#: The only tarball members ever read: member name -> file name in the asset folder (the licence is optional).
BUNDLE_MEMBER = "package/dist/niivue.umd.js"
LICENSE_MEMBER = "package/LICENSE"
#: Refuse downloads or members larger than this (the tarball is about 7 MB, the bundle about 2.3 MB).
MAX_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 60.0
INSTALL_COMMAND = "python -m rrg3d.serve.assets"

#: The upstream licence (github.com/niivue/niivue, file LICENSE), written when the tarball carries none.
NIIVUE_LICENSE = """\
BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


class AssetError(RRG3DError):
    """The NiiVue bundle could not be installed (bad tarball, integrity mismatch)."""


class AssetDownloadError(AssetError):
    """The npm registry could not be reached or did not answer with the tarball."""


def asset_dir() -> Path:
    """``$RRG3D_ASSETS``, else ``<$RRG3D_CACHE_DIR or ~/.cache/rrg3d>/assets/niivue-<version>``."""
    env = os.environ.get("RRG3D_ASSETS")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("RRG3D_CACHE_DIR") or Path.home() / ".cache" / "rrg3d").expanduser()
    return cache / "assets" / f"niivue-{NIIVUE_VERSION}"


def registry() -> str:
    """The npm registry base: ``$NPM_CONFIG_REGISTRY`` (a mirror), else https://registry.npmjs.org."""
    base = os.environ.get("NPM_CONFIG_REGISTRY") or DEFAULT_REGISTRY
    return base.strip().rstrip("/")


def tarball_url(base: str | None = None) -> str:
    """URL of the pinned NiiVue tarball on the registry ``base`` (default: :func:`registry`)."""
    name = NIIVUE_PACKAGE.split("/")[-1]
    return f"{(base or registry()).rstrip('/')}/{NIIVUE_PACKAGE}/-/{name}-{NIIVUE_VERSION}.tgz"


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished install of :data:`NIIVUE_VERSION`."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("version") == NIIVUE_VERSION
            and (folder / BUNDLE_NAME).is_file())


def niivue_path(target: Path | None = None) -> Path | None:
    """The installed ``niivue.umd.js`` in ``target`` (default: :func:`asset_dir`), or None; never downloads."""
    folder = Path(target).expanduser() if target is not None else asset_dir()
    return folder / BUNDLE_NAME if _complete(folder) else None


def verify_integrity(data: bytes, integrity: str) -> None:
    """Raise :class:`AssetError` unless ``data`` matches the subresource-integrity string ``integrity``."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm not in ("sha512", "sha384", "sha256") or not expected:
        raise AssetError(f"unsupported integrity string {integrity!r} (expected sha512-<base64>)")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode("ascii")
    if not hmac.compare_digest(actual, expected):
        raise AssetError(f"NiiVue {NIIVUE_VERSION} tarball failed its integrity check: expected {integrity}, got "
                         f"{algorithm}-{actual}; refusing to install it")


def download(url: str) -> bytes:
    """The bytes at ``url`` (at most :data:`MAX_BYTES`); :class:`AssetDownloadError` when it cannot be fetched."""
    request = urllib.request.Request(url, headers={"Accept": "application/octet-stream",
                                                   "User-Agent": "rrg3d-assets"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            data = response.read(MAX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AssetDownloadError(f"could not download {url}: {reason}") from exc
    if len(data) > MAX_BYTES:
        raise AssetDownloadError(f"{url} is larger than {MAX_BYTES} bytes; refusing it")
    return data


def _read_member(tar: tarfile.TarFile, name: str, required: bool) -> bytes | None:
    """The bytes of the regular-file member ``name`` (never a link, never written to disk by tarfile)."""
    try:
        member = tar.getmember(name)
    except KeyError:
        if required:
            raise AssetError(f"the NiiVue tarball has no {name}") from None
        return None
    if not member.isfile():
        raise AssetError(f"{name} in the NiiVue tarball is not a regular file")
    if member.size > MAX_BYTES:
        raise AssetError(f"{name} in the NiiVue tarball is larger than {MAX_BYTES} bytes")
    handle = tar.extractfile(member)
    if handle is None:
        raise AssetError(f"{name} in the NiiVue tarball cannot be read")
    return handle.read(MAX_BYTES + 1)


def install_tarball(data: bytes, target: Path | None = None, integrity: str | None = None) -> Path:
    """Check ``data`` (a registry tarball) against ``integrity`` (default :data:`NIIVUE_INTEGRITY`), then install
    its bundle into ``target`` (default :func:`asset_dir`) atomically; returns the path of ``niivue.umd.js``."""
    verify_integrity(data, integrity or NIIVUE_INTEGRITY)
    folder = Path(target).expanduser() if target is not None else asset_dir()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            bundle = _read_member(tar, BUNDLE_MEMBER, required=True)
            licence = _read_member(tar, LICENSE_MEMBER, required=False)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"the NiiVue tarball cannot be read: {exc}") from exc
    assert bundle is not None
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (work / BUNDLE_NAME).write_bytes(bundle)
        (work / LICENSE_NAME).write_bytes(licence if licence is not None else NIIVUE_LICENSE.encode("utf-8"))
        marker = {"package": NIIVUE_PACKAGE, "version": NIIVUE_VERSION, "integrity": integrity or NIIVUE_INTEGRITY,
                  "license": "BSD-2-Clause", "license_from_tarball": licence is not None}
        (work / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        for path in work.iterdir():
            path.chmod(0o644)
        work.chmod(0o755)
        if folder.exists() and not _complete(folder):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink()
        try:
            os.replace(work, folder)
        except OSError:
            if not _complete(folder):  # another process finished first, or a real failure
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return folder / BUNDLE_NAME


def ensure_niivue(target: Path | None = None) -> Path:
    """Path of ``niivue.umd.js`` in ``target`` (default :func:`asset_dir`), downloaded and installed if absent.

    Raises :class:`AssetDownloadError` when the registry cannot be reached and :class:`AssetError` when the
    tarball is refused (integrity mismatch, missing bundle)."""
    found = niivue_path(target)
    if found is not None:
        return found
    return install_tarball(download(tarball_url()), target)


def main(argv: list[str] | None = None) -> int:
    """``python -m rrg3d.serve.assets``: install the bundle and print its path (exit 0 with a warning if the
    registry is unreachable, 1 if the tarball is refused)."""
    del argv
    try:
        path = ensure_niivue()
    except AssetDownloadError as exc:
        print(f"warning: the NiiVue {NIIVUE_VERSION} web viewer was not installed ({exc}); `rrg3d serve` works "
              f"without its 3D viewer. Install it later with: {INSTALL_COMMAND} (a registry mirror can be set with "
              "NPM_CONFIG_REGISTRY)", file=sys.stderr)
        return 0
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"NiiVue {NIIVUE_VERSION} web viewer: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
