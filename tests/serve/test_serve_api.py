"""The REST API with FastAPI's test client: every endpoint, every refusal, the queue limit, restart recovery, and no
patient identifier from a DICOM upload in any answer, stored file or log line."""

from __future__ import annotations

import gzip
import io
import logging
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from rrg3d.serve.app import ServeSettings, create_app
from rrg3d.serve.uploads import ZipLimits
from rrg3d.serve.worker import ModelService

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PLANTED = ("Plantedname", "Testpatient", "PHI-ID-7781234", "19610307", "ACC-55501234", "Planted General Hospital",
           "Referrer")


@pytest.fixture(scope="module")
def region_service(region_checkpoint) -> ModelService:
    return ModelService.load(region_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def plain_service(tiny_checkpoint) -> ModelService:
    return ModelService.load(tiny_checkpoint, device="cpu")


def _client(service: ModelService, data: Path, **kw) -> TestClient:
    settings = ServeSettings(model=service.checkpoint, data_dir=data, token=kw.pop("token", TOKEN), service=service,
                             **kw)
    return TestClient(create_app(settings))


def _upload(client: TestClient, name: str, payload: bytes, headers: dict | None = None):
    return client.post("/v1/studies", files={"file": (name, payload, "application/octet-stream")},
                       headers=AUTH if headers is None else headers)


def _wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"/v1/studies/{job_id}", headers=AUTH).json()
        if answer["status"] in ("done", "failed"):
            return answer
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {answer}")


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def _nifti_bytes(array: np.ndarray) -> bytes:
    image = nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]))
    return gzip.compress(image.to_bytes())


def _all_bytes(folder: Path) -> bytes:
    """Every stored file's bytes, gzip members decompressed."""
    chunks = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            chunks.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return b"\n".join(chunks)


def test_region_study_end_to_end(region_service, phantom_scan, tmp_path):
    """Upload a NIfTI, poll to done: report + region reports, volume and regions on the model grid, FHIR, SR."""
    from pydicom import dcmread

    with _client(region_service, tmp_path / "data") as client:
        assert client.get("/healthz").json()["status"] == "ok"
        info = client.get("/v1/model", headers=AUTH).json()
        assert info["region_guided"] and info["preset"]["name"] == "tiny" and info["name"] == "tiny_reg2rg"
        answer = _upload(client, phantom_scan.name, phantom_scan.read_bytes())
        assert answer.status_code == 202 and answer.json()["status"] == "queued"
        job_id = answer.json()["id"]
        assert answer.headers["location"] == f"/v1/studies/{job_id}"
        done = _wait(client, job_id)
        assert done["status"] == "done", done
        # an untrained model may name no region in its text: the regions come from the label map all the same
        assert isinstance(done["report"], str) and isinstance(done["region_reports"], dict) and done["has_regions"]
        assert set(done["region_reports"]) <= set(done["regions"]) and "lung" in done["regions"]
        volume = client.get(f"/v1/studies/{job_id}/volume", headers=AUTH)
        assert volume.status_code == 200
        grid = nib.Nifti1Image.from_bytes(gzip.decompress(volume.content))
        assert grid.shape == (64, 64, 32)  # (W, H, D) of the tiny preset
        hu = np.asarray(grid.dataobj)
        assert hu.min() < -500 and hu.max() > 0  # HU, not the model's [0, 1] window
        regions = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/v1/studies/{job_id}/regions",
                                                                         headers=AUTH).content))
        assert regions.shape == grid.shape and np.allclose(regions.affine, grid.affine)
        assert int(done["regions"]["lung"]) in set(np.unique(np.asarray(regions.dataobj)).tolist())
        fhir = client.get(f"/v1/studies/{job_id}/fhir", headers=AUTH)
        assert fhir.status_code == 200 and fhir.json()["resourceType"] == "DiagnosticReport"
        sr = client.get(f"/v1/studies/{job_id}/sr", headers=AUTH)
        assert sr.status_code == 200 and dcmread(io.BytesIO(sr.content)).Modality == "SR"
        assert client.delete(f"/v1/studies/{job_id}", headers=AUTH).json() == {"id": job_id, "deleted": True}
        assert client.get(f"/v1/studies/{job_id}", headers=AUTH).status_code == 404
        assert not (tmp_path / "data" / "studies" / job_id).exists()


def test_dicom_zip_keeps_no_identifier(plain_service, shared_data, tmp_path, caplog):
    """A zip of the planted-identifier series, its entries named after the patient: reported, and none of the
    planted values is in any answer, stored file or log line."""
    planted = shared_data / "ct" / "phi_planted_dicom"
    if not planted.is_dir():
        pytest.skip(f"{planted} is absent")
    payload = _zip({f"Plantedname^Testpatient/PHI-ID-7781234/{p.name}": p.read_bytes()
                    for p in sorted(planted.glob("*.dcm"))})
    answers: list[str] = []
    caplog.set_level(logging.DEBUG)
    with _client(plain_service, tmp_path / "data") as client:
        answer = _upload(client, "Plantedname_PHI-ID-7781234.zip", payload)
        answers.append(answer.text)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        done = _wait(client, job_id)
        assert done["status"] == "done", done
        for suffix in ("", "/fhir", "/sr", "/volume"):
            response = client.get(f"/v1/studies/{job_id}{suffix}", headers=AUTH)
            assert response.status_code == 200
            answers.append(response.content.decode("latin-1") if suffix != "/volume"
                           else gzip.decompress(response.content).decode("latin-1"))
        answers.append(client.get("/v1/model", headers=AUTH).text)
    stored = _all_bytes(tmp_path / "data").decode("latin-1")
    names = " ".join(str(p) for p in (tmp_path / "data").rglob("*"))
    for value in PLANTED:
        assert value not in stored and value not in names and value not in caplog.text
        assert all(value not in text for text in answers), value


def test_refusals(plain_service, phantom_scan, tmp_path):
    limits = ZipLimits(max_unpacked_bytes=4 << 20, max_entries=5, max_ratio=50)
    with _client(plain_service, tmp_path / "data", max_upload_mb=1, zip_limits=limits, start_worker=False) as client:
        # auth
        assert _upload(client, "a.nii.gz", b"x", headers={}).status_code == 401
        wrong = _upload(client, "a.nii.gz", b"x", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"detail": "missing or wrong bearer token"}
        assert client.get("/v1/model").status_code == 401
        # too large: refused from the Content-Length, and a chunked body cut off
        big = _upload(client, "big.nii.gz", b"\0" * (2 << 20))
        assert big.status_code == 413 and "limit" in big.json()["detail"]

        def chunks():
            for _ in range(3):
                yield b"\0" * (1 << 20)
        chunked = client.post("/v1/studies", content=chunks(),
                              headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"})
        assert chunked.status_code == 413
        # not an image, a 2D slice, a corrupt file, a single DICOM slice
        cases = {
            "notes.txt": (b"hello, not a scan", "not a NIfTI file"),
            "slice.nii.gz": (_nifti_bytes(np.zeros((64, 64), np.int16)), "2D input"),
            "cut.nii.gz": (_nifti_bytes(np.random.default_rng(0).integers(-1000, 1000, (32, 32, 32), np.int16))[:4000],
                           "upload:"),
        }
        for name, (payload, expected) in cases.items():
            answer = _upload(client, name, payload)
            assert answer.status_code == 400 and expected in answer.json()["detail"], (name, answer.text)
            assert str(tmp_path) not in answer.json()["detail"]
        slice_dcm = b"\0" * 128 + b"DICM" + b"\0" * 64
        assert "single DICOM file" in _upload(client, "one.dcm", slice_dcm).json()["detail"]
        # unsafe zips: traversal, absolute path, too many entries, a bomb
        for files, expected in (({"../evil.dcm": b"x"}, "'..'"), ({"/etc/evil.dcm": b"x"}, "absolute"),
                                ({f"{i}.dcm": b"x" for i in range(6)}, "entries"),
                                ({"bomb.dcm": b"\0" * (8 << 20)}, "more than")):
            payload = _zip(files)
            assert len(payload) < (1 << 20)
            answer = _upload(client, "series.zip", payload)
            assert answer.status_code == 400 and expected in answer.json()["detail"], answer.text
        assert client.get("/v1/studies/" + "0" * 32, headers=AUTH).status_code == 404
        assert client.get("/v1/studies/../../etc", headers=AUTH).status_code == 404
        # nothing was kept of the refused uploads
        studies = tmp_path / "data" / "studies"
        assert not studies.exists() or not any(studies.iterdir())
        # a queued study: its report and exports are not ready (409)
        job_id = _upload(client, phantom_scan.name, phantom_scan.read_bytes()).json()["id"]
        for suffix in ("/fhir", "/sr"):
            answer = client.get(f"/v1/studies/{job_id}{suffix}", headers=AUTH)
            assert answer.status_code == 409 and "queued" in answer.json()["detail"]


def test_full_queue_answers_429_and_a_restart_finishes_the_jobs(plain_service, phantom_scan, tmp_path):
    data = tmp_path / "data"
    payload = phantom_scan.read_bytes()
    with _client(plain_service, data, queue=2, start_worker=False) as client:
        first = _upload(client, "a.nii.gz", payload).json()["id"]
        second = _upload(client, "b.nii.gz", payload).json()["id"]
        full = _upload(client, "c.nii.gz", payload)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        store = client.app.state.rrg3d["store"]
        assert [job.id for job in store.claim(1)] == [first]  # a job the stopped server was running
        assert client.delete(f"/v1/studies/{first}", headers=AUTH).status_code == 409
    with _client(plain_service, data, queue=2) as client:  # restart: the running job is queued again, both finish
        for job_id in (first, second):
            done = _wait(client, job_id)
            assert done["status"] == "done" and done["report"] is not None and "region_reports" not in done
        assert client.get(f"/v1/studies/{first}/regions", headers=AUTH).status_code == 404
        assert client.get("/healthz").json()["jobs"]["done"] == 2


def test_multipart_slices_of_a_dicom_series(plain_service, shared_data, tmp_path):
    series = shared_data / "ct" / "totalseg_example" / "dicom"
    if not series.is_dir():
        pytest.skip(f"{series} is absent")
    files = [("file", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(series.glob("*"))
             if p.is_file()]
    with _client(plain_service, tmp_path / "data") as client:
        answer = client.post("/v1/studies", files=files, headers=AUTH)
        assert answer.status_code == 202, answer.text
        done = _wait(client, answer.json()["id"])
        assert done["status"] == "done" and done["shape"][0] == len(files)
        mixed = client.post("/v1/studies", files=[*files[:2], ("file", ("x.txt", b"text", "text/plain"))],
                            headers=AUTH)
        assert mixed.status_code == 400 and "not a DICOM file" in mixed.json()["detail"]


def test_failed_job_reports_one_sentence(region_service, tmp_path):
    """A scan the region model cannot use (no region found in a uniform volume): the job fails with a sentence."""
    payload = _nifti_bytes(np.full((40, 40, 40), -1000, np.int16))
    with _client(region_service, tmp_path / "data") as client:
        job_id = _upload(client, "air.nii.gz", payload).json()["id"]
        failed = _wait(client, job_id)
        assert failed["status"] == "failed" and failed["error"] and str(tmp_path) not in failed["error"]
        assert "\n" not in failed["error"]


def test_serve_command_refuses_no_auth_off_loopback(tmp_path):
    from rrg3d.cli import main
    from rrg3d.commands.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert main(["serve", "--no-auth", "--host", "0.0.0.0", "--data", str(tmp_path)]) == 2


def test_serve_token_is_made_once_and_kept_private(tmp_path, monkeypatch):
    import argparse

    from rrg3d.commands.serve import resolve_token

    monkeypatch.delenv("RRG3D_TOKEN", raising=False)
    args = argparse.Namespace(no_auth=False, host="127.0.0.1", token_file=None)
    token = resolve_token(args, tmp_path)
    assert len(token) >= 32 and resolve_token(args, tmp_path) == token
    assert (tmp_path / "token").stat().st_mode & 0o077 == 0
    short = tmp_path / "short"
    short.write_text("abc")
    from rrg3d.errors import RRG3DError

    with pytest.raises(RRG3DError, match="at least 16"):
        resolve_token(argparse.Namespace(no_auth=False, host="127.0.0.1", token_file=str(short)), tmp_path)
