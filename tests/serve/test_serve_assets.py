"""The NiiVue bundle installer (rrg3d.serve.assets) on fake registry tarballs: no network."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from rrg3d.serve import assets

BUNDLE = b"(function(g){g.niivue={Niivue:function(){}}})(this);\n"


def _tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture()
def asset_env(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "assets" / "niivue"
    monkeypatch.setenv("RRG3D_ASSETS", str(folder))
    return folder


def test_pinned_tarball_url(monkeypatch):
    monkeypatch.delenv("NPM_CONFIG_REGISTRY", raising=False)
    assert assets.tarball_url() == "https://registry.npmjs.org/@niivue/niivue/-/niivue-0.69.0.tgz"
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", "https://mirror.example/npm/")
    assert assets.tarball_url() == "https://mirror.example/npm/@niivue/niivue/-/niivue-0.69.0.tgz"
    assert assets.NIIVUE_INTEGRITY.startswith("sha512-") and len(assets.NIIVUE_INTEGRITY) == 95


def test_default_asset_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RRG3D_ASSETS", raising=False)
    monkeypatch.setenv("RRG3D_CACHE_DIR", str(tmp_path))
    assert assets.asset_dir() == tmp_path / "assets" / "niivue-0.69.0"


def test_niivue_path_none_when_absent(asset_env):
    assert assets.niivue_path() is None
    asset_env.mkdir(parents=True)
    (asset_env / assets.BUNDLE_NAME).write_bytes(BUNDLE)  # no marker: an unfinished install
    assert assets.niivue_path() is None


def test_wrong_tarball_refused(asset_env, monkeypatch):
    fake = _tarball({assets.BUNDLE_MEMBER: BUNDLE})
    fetched: list[str] = []
    monkeypatch.setattr(assets, "download", lambda url: fetched.append(url) or fake)
    with pytest.raises(assets.AssetError, match="integrity"):
        assets.ensure_niivue()
    assert fetched == [assets.tarball_url()]
    assert assets.niivue_path() is None
    assert not asset_env.exists() or not any(asset_env.iterdir())
    assert assets.main() == 1


def test_install_from_fake_tarball(asset_env, monkeypatch):
    fake = _tarball({"package/package.json": b"{}", assets.BUNDLE_MEMBER: BUNDLE,
                     "package/../../escape.js": b"nope"})
    monkeypatch.setattr(assets, "NIIVUE_INTEGRITY", _sri(fake))
    calls: list[str] = []
    monkeypatch.setattr(assets, "download", lambda url: calls.append(url) or fake)
    path = assets.ensure_niivue()
    assert path == asset_env / "niivue.umd.js" and path.read_bytes() == BUNDLE
    assert "BSD 2-Clause" in (asset_env / "LICENSE").read_text()  # 0.69.0's tarball has no LICENSE
    assert sorted(p.name for p in asset_env.iterdir()) == ["LICENSE", "niivue.json", "niivue.umd.js"]
    assert not (asset_env.parent.parent / "escape.js").exists()
    assert not [p for p in asset_env.parent.iterdir() if p.name.startswith(".")]  # no leftover temp folder
    assert assets.niivue_path() == path
    assert assets.ensure_niivue() == path and len(calls) == 1  # present: no second download


def test_licence_taken_from_tarball(tmp_path, monkeypatch):
    fake = _tarball({assets.BUNDLE_MEMBER: BUNDLE, assets.LICENSE_MEMBER: b"licence text\n"})
    path = assets.install_tarball(fake, tmp_path / "nv", integrity=_sri(fake))
    assert (path.parent / "LICENSE").read_bytes() == b"licence text\n"


@pytest.mark.parametrize("members, links, problem", [
    ({"package/README.md": b"x"}, None, "has no"),
    ({}, {assets.BUNDLE_MEMBER: "/etc/passwd"}, "not a regular file"),
])
def test_bad_tarballs_refused(tmp_path, members, links, problem):
    fake = _tarball(members, links)
    with pytest.raises(assets.AssetError, match=problem):
        assets.install_tarball(fake, tmp_path / "nv", integrity=_sri(fake))
    assert not (tmp_path / "nv").exists()


def test_unreachable_registry_warns_and_exits_0(asset_env, monkeypatch, capsys):
    def offline(url: str) -> bytes:
        raise assets.AssetDownloadError(f"could not download {url}: offline")

    monkeypatch.setattr(assets, "download", offline)
    assert assets.main() == 0
    err = capsys.readouterr().err
    assert "warning" in err and "python -m rrg3d.serve.assets" in err
    assert assets.niivue_path() is None


def test_download_error_is_wrapped():
    with pytest.raises(assets.AssetDownloadError, match="could not download"):
        assets.download("http://127.0.0.1:9/nothing.tgz")


def test_static_page_ships_with_package():
    static = Path(assets.__file__).parent / "static"
    for name in ("index.html", "viewer.js", "style.css"):
        assert (static / name).is_file(), name
    html = (static / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # no CDN: everything from the server
