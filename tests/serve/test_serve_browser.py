"""The web page in a real browser: ``rrg3d serve`` on a tiny region-guided model (untrained: it may write no region
sentence), a phantom uploaded through the file picker, the report and a link for every region of the label map shown,
the NiiVue viewer drawing the scan and a region link colouring that region with the crosshair inside it; the FHIR
download and the delete button; the page without the NiiVue bundle; the token prompt of a server that needs one.

Needs Debian's chromium (``apt-get install chromium``; skipped without it, failed on CI) driven by Playwright with
SwiftShader's WebGL2, and the NiiVue bundle (``python -m rrg3d.serve.assets``, part of ``make install``).
``RRG3D_SCREENSHOT=docs/images/serve_viewer.png`` keeps the final full-page screenshot there (default: tmp);
``RRG3D_BROWSER_MODEL=CKPT RRG3D_BROWSER_SCAN=SCAN`` serve that region-guided model and upload that scan instead of
the untrained tiny one and the phantom, with ``RRG3D_BROWSER_SERVE_ARGS`` added to ``rrg3d serve`` (how the README's
screenshot was made).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
pytest.importorskip("playwright.sync_api")
PIL_Image = pytest.importorskip("PIL.Image")

BROWSER_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"]
VIEWPORT = {"width": 1400, "height": 900}
SERVER_START_S = 120.0
REPORT_TIMEOUT_MS = 180_000


def _missing(message: str) -> None:
    """Skip, or fail on CI (where the browser and the bundle are installed on purpose)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _missing("no chromium found: apt-get install chromium")
    from rrg3d.serve.assets import INSTALL_COMMAND, niivue_path

    if niivue_path() is None:
        _missing(f"the NiiVue bundle is not installed: {INSTALL_COMMAND}")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.loads(response.read())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@contextmanager
def _serve(checkpoint: str, root: Path, *options: str) -> Iterator[str]:
    """``rrg3d serve OPTIONS`` of ``checkpoint`` on a free loopback port; yields its base URL (ending in /)."""
    port = _free_port()
    exe = shutil.which("rrg3d", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-c", "import sys; from rrg3d.cli import main; sys.exit(main())"]
    command += ["serve", "--model", checkpoint, "--host", "127.0.0.1", "--port", str(port), "--data",
                str(root / "data"), "--threads", "1", "--log-level", "warning", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log_path = root / "server.log"
    base = f"http://127.0.0.1:{port}/"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"rrg3d serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if _get_json(base + "healthz").get("status") == "ok":
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rrg3d serve did not answer /healthz in {SERVER_START_S:.0f} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def server(chromium, region_checkpoint, tmp_path_factory) -> Iterator[str]:
    """``rrg3d serve --no-auth`` of the untrained region-guided checkpoint (or ``$RRG3D_BROWSER_MODEL``)."""
    checkpoint = os.environ.get("RRG3D_BROWSER_MODEL") or str(region_checkpoint)
    extra = shlex.split(os.environ.get("RRG3D_BROWSER_SERVE_ARGS", ""))  # e.g. --max-new-tokens 320
    with _serve(checkpoint, tmp_path_factory.mktemp("serve"), "--no-auth", *extra) as base:
        yield base


@pytest.fixture(scope="module")
def browser(chromium) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def page(browser) -> Iterator:
    """A fresh page; JavaScript errors are collected in ``page.errors`` (every test asserts there are none)."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    opened = context.new_page()
    opened.errors = []
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL_Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def _coloured(pixels: np.ndarray) -> int:
    """Pixels far from grey (the CT is grey; the region overlay and the crosshair are not)."""
    return int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 60).sum())


def _settle(page) -> None:
    """Two animation frames: NiiVue has drawn what the last call asked for."""
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


def _words(text: str) -> str:
    return " ".join(text.split())


def _upload_and_wait(page, scan: Path) -> str:
    """Pick ``scan`` in the page's file field; wait for the report; return the study id."""
    page.wait_for_function("window.rrg3d && window.rrg3d.state === 'idle'")
    page.set_input_files("#file-input", str(scan))
    page.wait_for_function("['done', 'failed'].includes(window.rrg3d.state)", timeout=REPORT_TIMEOUT_MS)
    assert page.evaluate("window.rrg3d.state") == "done", page.inner_text("#status")
    return page.evaluate("window.rrg3d.studyId")


#: The label under the crosshair in the region overlay (1 inside the region shown, 0 outside).
UNDER_CROSSHAIR = """() => {
  const nv = window.rrg3d.niivue;
  const mm = nv.frac2mm(nv.scene.crosshairPos);
  const overlay = nv.volumes[1];
  const voxel = overlay.mm2vox(mm);
  return overlay.getValue(voxel[0], voxel[1], voxel[2]);
}"""


def test_upload_report_viewer_and_region_overlay(server, page, phantom_scan, tmp_path):
    scan = Path(os.environ.get("RRG3D_BROWSER_SCAN") or phantom_scan)
    page.goto(server)
    assert page.locator("#viewer").evaluate("node => node.tagName") == "CANVAS"
    assert page.locator("#auth").is_hidden()  # no token asked of a --no-auth server
    study = _upload_and_wait(page, scan)
    job = _get_json(f"{server}v1/studies/{study}")
    assert job["status"] == "done" and job["has_regions"] and job["report"]
    assert page.evaluate("window.location.hash") == f"#study={study}"
    shown = _words(page.inner_text("#report"))
    for body in (job.get("sections") or {"findings": job["report"]}).values():
        assert _words(body) in shown

    # one link per region of the label map, with the model's sentence or a muted note when it wrote none
    titles = page.locator("a.region-link.region-title")
    assert sorted(titles.evaluate_all("links => links.map((a) => a.dataset.region)")) == sorted(job["regions"])
    for region in job["regions"]:
        item = page.locator(f'.region-list li[data-region="{region}"]')
        said = (job.get("region_reports") or {}).get(region, "").strip()
        if said:
            assert _words(said) in _words(item.inner_text())
        else:
            assert item.locator(".region-text.muted").inner_text() == "No sentence for this region."

    page.wait_for_function("window.rrg3d.viewerReady === true", timeout=60_000)
    assert page.locator("#viewer-notice").is_hidden()
    _settle(page)
    before = _pixels(page.locator("#viewer").screenshot())
    assert before.var() > 100, "the viewer canvas is blank"

    region = "lung" if "lung" in job["regions"] else titles.first.get_attribute("data-region")
    page.locator(f'a.region-title[data-region="{region}"]').click()
    page.wait_for_function("name => window.rrg3d.activeRegion === name", arg=region, timeout=30_000)
    _settle(page)
    after = _pixels(page.locator("#viewer").screenshot())
    assert np.abs(after - before).mean() > 1.0, "clicking a region changed nothing in the viewer"
    assert _coloured(after) > _coloured(before) + 500, "no coloured region overlay appeared"
    assert page.evaluate(UNDER_CROSSHAIR) == 1, "the crosshair is not inside the region shown"
    assert "active" in (page.locator(f'.region-list li[data-region="{region}"]').get_attribute("class") or "")

    # the views and windows change what is drawn
    page.locator('button[data-window="lung"]').click()
    _settle(page)
    windowed = _pixels(page.locator("#viewer").screenshot())
    assert np.abs(windowed - after).mean() > 1.0, "the lung window changed nothing"
    assert page.locator('button[data-window="lung"]').get_attribute("aria-pressed") == "true"

    target = Path(os.environ.get("RRG3D_SCREENSHOT") or tmp_path / "serve_viewer.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    page.locator('button[data-window="mediastinum"]').click()
    _settle(page)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000

    with page.expect_download() as download:
        page.locator("#download-fhir").click()
    fhir = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert fhir["resourceType"] == "DiagnosticReport"

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#delete-study").click()
    page.wait_for_function("window.rrg3d.state === 'idle' && window.rrg3d.studyId === null")
    assert _status(f"{server}v1/studies/{study}") == 404
    assert page.evaluate("window.location.hash") == ""
    assert not page.errors, page.errors


def test_page_without_the_viewer_bundle(server, page, phantom_scan):
    """A server without the NiiVue bundle (its URL answers 404): the page says how to install it and still shows
    the report, its regions as plain text."""
    page.route("**/static/niivue.umd.js", lambda route: route.fulfill(status=404, body="not installed"))
    page.goto(server)
    notice = page.locator("#viewer-notice")
    notice.wait_for(state="visible")
    assert "python -m rrg3d.serve.assets" in notice.inner_text()
    study = _upload_and_wait(page, phantom_scan)
    job = _get_json(f"{server}v1/studies/{study}")
    assert _words(job["report"]) in _words(page.inner_text("#report"))
    assert page.locator("a.region-link").count() == 0
    assert page.locator(".region-list li").count() == len(job["regions"])
    assert page.locator('button[data-view="axial"]').is_disabled()
    assert not page.errors, page.errors


def test_token_prompt(chromium, region_checkpoint, page, phantom_scan, tmp_path):
    """A server that needs a token: the page asks for it, says when one is refused, and uploads with the right one
    (kept for the session only)."""
    token = "browser-test-token-0123456789"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    with _serve(str(region_checkpoint), tmp_path, "--token-file", str(tmp_path / "token")) as base:
        page.goto(base)
        page.locator("#auth").wait_for(state="visible")
        page.fill("#token-input", "wrong-token-0123456789")
        page.locator("#auth-form button[type=submit]").click()
        page.wait_for_function("document.getElementById('auth-message').textContent.includes('refused')")
        page.fill("#token-input", token)
        page.locator("#auth-form button[type=submit]").click()
        page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny_reg2rg')")
        assert page.locator("#auth").is_hidden()
        study = _upload_and_wait(page, phantom_scan)
        assert _get_json(f"{base}v1/studies/{study}", token=token)["status"] == "done"
        assert page.evaluate("sessionStorage.getItem('rrg3d.token')") == token
        assert page.evaluate("localStorage.length") == 0
        # the volume and the region map are fetched with the token too
        page.wait_for_function("window.rrg3d.viewerReady === true", timeout=60_000)
        page.locator('a.region-title[data-region="lung"]').click()
        page.wait_for_function("window.rrg3d.activeRegion === 'lung'", timeout=30_000)
        assert page.evaluate(UNDER_CROSSHAIR) == 1
    assert not page.errors, page.errors


def test_report_rendering_from_a_study_answer(server, page):
    """The report panel from a (routed) study answer: sections, a region's sentences as links to it, a region the
    model did not write about, a region the label map lacks (plain text), the finding classifier's calls, and model
    text shown as text, never as markup."""
    study = "f" * 32
    answer = {
        "id": study, "status": "done", "progress": 1.0, "stage": "done", "shape": [32, 64, 64], "created": 1.0,
        "started": 2.0, "finished": 5.5, "has_volume": False, "has_regions": True,
        "report": "Findings: The lungs are clear. Impression: <img src=x onerror=\"window.pwned=1\">No acute finding.",
        "sections": {"findings": "The lungs are clear.",
                     "impression": "<img src=x onerror=\"window.pwned=1\">No acute finding."},
        "region_reports": {"lung": "The lungs are clear. No nodule.", "pleura": "No effusion."},
        "regions": {"heart": 4, "lung": 1}, "region_labels": {"1": "lung", "4": "heart"},
        "model": {"model": "tiny_reg2rg", "checkpoint": "tiny_reg2rg", "preset": None, "seconds": 3.5},
        "findings_classifier": {"threshold": 0.5, "probabilities": {"Cardiomegaly": 0.91, "Emphysema": 0.12},
                                "called": ["Cardiomegaly"]},
    }
    page.route(f"**/v1/studies/{study}", lambda route: route.fulfill(json=answer))
    page.route(f"**/v1/studies/{study}/volume",
               lambda route: route.fulfill(status=409, json={"detail": "no volume in this test"}))
    page.goto(f"{server}#study={study}")
    page.wait_for_function("window.rrg3d.state === 'done'")
    report = page.locator("#report")
    assert report.locator("h3").all_text_contents()[:2] == ["Findings", "Impression"]
    assert '<img src=x onerror="window.pwned=1">No acute finding.' in report.inner_text()
    assert report.locator("img").count() == 0 and page.evaluate("window.pwned") is None
    items = page.locator(".region-list li")
    assert items.evaluate_all("nodes => nodes.map((li) => li.dataset.region)") == ["lung", "heart", "pleura"]
    lung = page.locator('.region-list li[data-region="lung"]')
    assert lung.locator("a.region-sentence").all_inner_texts() == ["The lungs are clear.", "No nodule."]
    heart = page.locator('.region-list li[data-region="heart"]')
    assert heart.locator("a.region-title").count() == 1 and "No sentence for this region." in heart.inner_text()
    pleura = page.locator('.region-list li[data-region="pleura"]')
    assert pleura.locator("a").count() == 0 and "No effusion." in pleura.inner_text()
    assert "Called: Cardiomegaly (threshold 0.50)." in report.inner_text()
    assert "Model: tiny_reg2rg" in report.inner_text()
    assert not page.errors, page.errors
