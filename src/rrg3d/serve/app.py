"""The REST API and the web page (FastAPI). ``create_app(ServeSettings(...))`` builds it; ``rrg3d serve`` runs it.

Endpoints (``/v1/*`` need ``Authorization: Bearer TOKEN`` unless the server runs without auth on loopback):

- ``POST /v1/studies``: multipart field ``file``: a ``.nii``/``.nii.gz`` file or a ``.zip`` of one DICOM series (or
  several ``file`` fields, the slices of one series) → 202 ``{"id", "status"}``; 413 over the size limit (refused
  from the Content-Length before the body is read), 400 for anything not a readable 3D image, 429 + Retry-After
  when the queue is full.
- ``GET /v1/studies/{id}``: ``status`` (queued, running, done, failed), ``progress``, ``report`` and
  ``region_reports`` when done, ``error`` (one sentence) when failed.
- ``GET /v1/studies/{id}/fhir`` (DiagnosticReport), ``/sr`` (DICOM Comprehensive SR), ``/volume`` (the scan on the
  model grid, NIfTI, HU), ``/regions`` (the region label map, region-guided models); ``DELETE /v1/studies/{id}``.
- ``GET /healthz``, ``GET /v1/model``; ``/`` the web page.

Errors are JSON ``{"detail": ...}``. Nothing of an upload's name or headers is stored, logged or answered.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from rrg3d.serve.jobs import JobStore, new_job_id
from rrg3d.serve.uploads import UploadRejected, ZipLimits, dicom_to_nifti, sniff_kind, store_upload
from rrg3d.serve.worker import REGIONS_NAME, VOLUME_NAME, ModelService, Worker

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
UPLOAD_PATH = "/v1/studies"
JOB_ID_LENGTH = 32


@dataclass
class ServeSettings:
    """Everything ``rrg3d serve`` configures; ``token=None`` means no auth (allowed on loopback only)."""

    model: str | Path
    data_dir: str | Path
    token: str | None = None
    max_upload_mb: float = 1024.0
    queue: int = 32
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1
    segment: str = "rules"
    generation: dict[str, Any] = field(default_factory=dict)  # overrides of the checkpoint's generation settings
    zip_limits: ZipLimits = field(default_factory=ZipLimits)
    start_worker: bool = True
    service: ModelService | None = None  # a model already loaded (tests, embedding)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: uploads over the limit get 413 from their Content-Length without being read, and chunked
    bodies are cut off as soon as they pass it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = f"upload is larger than the server's limit of {self.max_bytes // (1 << 20)} MB"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": too_large}, status_code=413, headers={"Connection": "close"})(
                scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if started:
                raise
            await JSONResponse({"detail": too_large}, status_code=413, headers={"Connection": "close"})(
                scope, receive, send)


def create_app(settings: ServeSettings) -> FastAPI:
    """The application: job store and model opened at startup, the worker started, both closed at shutdown."""
    data_dir = Path(settings.data_dir)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(data_dir / "jobs.sqlite3")
        recovered = store.recover()
        if recovered:
            log.warning("%d job(s) left running by a stopped server are queued again", recovered)
        service = settings.service or await run_in_threadpool(
            ModelService.load, settings.model, device=settings.device, dtype=settings.dtype, segment=settings.segment)
        generation = service.model.config.generation.replace(**settings.generation)
        worker = Worker(store, service, data_dir, batch_size=settings.batch_size, generation=generation)
        state.update(store=store, service=service, worker=worker)
        if settings.start_worker:
            worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    app = FastAPI(title="rrg3d", summary="Radiology reports from 3D CT", lifespan=lifespan,
                  version=_version(), docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.state.rrg3d = state

    @app.exception_handler(UploadRejected)
    async def _rejected(_: Request, exc: UploadRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    def authorized(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    guard = [Depends(authorized)]

    def store() -> JobStore:
        return state["store"]

    def job_or_404(job_id: str) -> Any:
        job = store().get(job_id) if len(job_id) == JOB_ID_LENGTH and job_id.isalnum() else None
        if job is None:
            raise HTTPException(404, f"no study {job_id[:64]!r}")
        return job

    def done_or_409(job_id: str) -> Any:
        job = job_or_404(job_id)
        if job.status != "done":
            raise HTTPException(409, f"study {job_id} is {job.status}, not done")
        return job

    def job_dir(job_id: str) -> Path:
        return data_dir / "studies" / job_id

    # -- page and health ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/niivue.umd.js", include_in_schema=False)
    def niivue() -> FileResponse:
        from rrg3d.serve.assets import niivue_path

        path = niivue_path()
        if path is None:
            raise HTTPException(404, "the NiiVue viewer is not installed: run `python -m rrg3d.serve.assets`")
        return FileResponse(path, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        worker = state.get("worker")
        return {"status": "ok", "model": state["service"].model.config.name if "service" in state else None,
                "worker_alive": bool(worker and worker.is_alive()), "jobs": store().counts()}

    @app.get("/v1/model", dependencies=guard)
    def model_info() -> dict[str, Any]:
        return state["service"].describe()

    # -- studies -----------------------------------------------------------------------------------
    def queue_full(pending: int) -> JSONResponse:
        per_job = store().mean_seconds() or 10.0
        wait = max(1, math.ceil(per_job * (pending - settings.queue + 1) / settings.batch_size))
        return JSONResponse({"detail": f"the queue is full ({pending} studies waiting); retry later"},
                            status_code=429, headers={"Retry-After": str(wait)})

    @app.post(UPLOAD_PATH, status_code=202, dependencies=guard)
    async def upload(request: Request) -> JSONResponse:
        pending = store().pending()
        if pending >= settings.queue:  # before the body is read; checked again, atomically, when the job is made
            return queue_full(pending)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(400, "upload a multipart form with the field 'file'")
        form = await request.form(max_files=settings.zip_limits.max_entries, max_fields=16)
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if not files:
            raise HTTPException(400, "the multipart form has no file in the field 'file'")
        job_id = new_job_id()
        folder = job_dir(job_id)
        try:
            stored = await run_in_threadpool(_receive, files, folder, job_id, settings.zip_limits)
            job = store().create(job_id, stored.kind, str(stored.path.relative_to(data_dir)), stored.shape,
                                 limit=settings.queue)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            await form.close()
        if job is None:
            shutil.rmtree(folder, ignore_errors=True)
            return queue_full(store().pending())
        state["worker"].wake()
        return JSONResponse({"id": job.id, "status": job.status, "url": f"{UPLOAD_PATH}/{job.id}"}, status_code=202,
                            headers={"Location": f"{UPLOAD_PATH}/{job.id}"})

    @app.get(UPLOAD_PATH + "/{job_id}", dependencies=guard)
    def study(job_id: str) -> dict[str, Any]:
        return _describe(job_or_404(job_id), job_dir(job_id))

    @app.get(UPLOAD_PATH + "/{job_id}/fhir", dependencies=guard)
    def fhir(job_id: str) -> Response:
        from rrg3d.serve.fhir import diagnostic_report

        job = done_or_409(job_id)
        resource = diagnostic_report(job.result)
        return Response(json.dumps(resource, indent=1), media_type="application/fhir+json")

    @app.get(UPLOAD_PATH + "/{job_id}/sr", dependencies=guard)
    def structured_report(job_id: str) -> Response:
        from rrg3d.serve.sr import comprehensive_sr

        job = done_or_409(job_id)
        buffer = io.BytesIO()
        comprehensive_sr(job.result).save_as(buffer, enforce_file_format=True)
        return Response(buffer.getvalue(), media_type="application/dicom",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.sr.dcm"'})

    @app.get(UPLOAD_PATH + "/{job_id}/volume", dependencies=guard)
    def volume(job_id: str) -> FileResponse:
        job_or_404(job_id)
        path = job_dir(job_id) / VOLUME_NAME
        if not path.is_file():
            raise HTTPException(409, f"study {job_id} has no volume yet (it is prepared when the job starts)")
        return FileResponse(path, media_type="application/gzip", filename=f"{job_id}_volume.nii.gz")

    @app.get(UPLOAD_PATH + "/{job_id}/regions", dependencies=guard)
    def regions(job_id: str) -> FileResponse:
        job = job_or_404(job_id)
        if not state["service"].region_guided:
            raise HTTPException(404, "the model is not region-guided: it reads no region label map")
        path = job_dir(job_id) / REGIONS_NAME
        if not path.is_file():
            raise HTTPException(409, f"study {job_id} is {job.status}: no region label map yet")
        return FileResponse(path, media_type="application/gzip", filename=f"{job_id}_regions.nii.gz")

    @app.delete(UPLOAD_PATH + "/{job_id}", dependencies=guard)
    def delete(job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        if job.status == "running":
            raise HTTPException(409, f"study {job_id} is being reported; delete it when it is done or failed")
        store().delete(job_id)
        shutil.rmtree(job_dir(job_id), ignore_errors=True)
        return {"id": job_id, "deleted": True}

    return app


def _receive(files: list[UploadFile], folder: Path, job_id: str, limits: ZipLimits) -> Any:
    """Copy the upload under the job's folder (names of our own) and check it: one NIfTI or zip, or DICOM slices."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(files) == 1:
        source = files[0].file
        source.seek(0)
        head = source.read(512)
        kind = sniff_kind(head, files[0].filename)
        received = folder / "upload.part"
        source.seek(0)
        with open(received, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        return store_upload(received, kind, folder, job_id, limits)
    series = folder / f".{job_id}.dicom"  # several fields: the slices of one DICOM series, renamed in arrival order
    series.mkdir()
    try:
        for index, item in enumerate(files):
            item.file.seek(0)
            head = item.file.read(132)
            if head[128:132] != b"DICM":
                raise UploadRejected(400, f"upload: part {index + 1} of {len(files)} is not a DICOM file; several "
                                          "files must be the slices of one DICOM series")
            item.file.seek(0)
            with open(series / f"{index:05d}.dcm", "wb") as sink:
                shutil.copyfileobj(item.file, sink, 1 << 20)
    except BaseException:
        shutil.rmtree(series, ignore_errors=True)
        raise
    return dicom_to_nifti(series, folder / f"{job_id}.nii.gz")


def _describe(job: Any, folder: Path) -> dict[str, Any]:
    """``GET /v1/studies/{id}``: the job's state and, when done, its report."""
    from rrg3d.text.reports import split_sections

    answer: dict[str, Any] = {"id": job.id, "status": job.status, "progress": round(job.progress, 3),
                              "stage": job.stage, "shape": job.shape, "created": job.created, "started": job.started,
                              "finished": job.finished, "has_volume": (folder / VOLUME_NAME).is_file(),
                              "has_regions": (folder / REGIONS_NAME).is_file()}
    if job.status == "failed":
        answer["error"] = job.error
    if job.status == "done" and job.result is not None:
        result = job.result
        answer["report"] = result.get("report")
        answer["sections"] = split_sections(result.get("report"))
        for key in ("region_reports", "regions", "region_recognition", "region_labels"):
            if result.get(key) is not None:
                answer[key] = result[key]
        meta = result.get("meta") or {}
        answer["model"] = {key: meta.get(key) for key in ("model", "checkpoint", "preset", "seconds")}
        if meta.get("findings_classifier") is not None:
            answer["findings_classifier"] = meta["findings_classifier"]
    return answer


def _version() -> str:
    from rrg3d import __version__

    return __version__
