"""The inference side of the server: the model, loaded once, and one worker thread that runs the queued jobs.

Each job goes through the same code as ``rrg3d generate`` (the checkpoint's preset, the same errors), so a scan
gives the same report from the CLI and from the API. A region-guided model reads the label map a segmentation
backend makes of the upload (``rules`` needs no weights). Beside the report the worker writes what the viewer shows:
the scan on the model's grid in HU (``volume.nii.gz``) and, for region-guided models, the label map the model read.

On CPU the worker takes one job at a time and leaves a core to the API; on a GPU it takes up to ``batch_size``
queued jobs into one forward pass.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.errors import RRG3DError
from rrg3d.serve.jobs import Job, JobStore

log = logging.getLogger(__name__)

VOLUME_NAME = "volume.nii.gz"
REGIONS_NAME = "regions.nii.gz"
PREDICTIONS_NAME = "pred.jsonl"


@dataclass
class ModelService:
    """A loaded checkpoint and what the API says about it."""

    checkpoint: Path
    model: Any
    preset: Any
    manifest: dict[str, Any]
    device: str
    segment: str | None

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], *, device: str | None = None, dtype: str | None = None,
             segment: str = "rules") -> ModelService:
        import torch

        from rrg3d.models.checkpoint import load_checkpoint, read_manifest
        from rrg3d.preprocess.presets import load_preset

        path = Path(checkpoint)
        manifest = read_manifest(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_checkpoint(path, device=device, dtype=dtype)
        preset = load_preset(model.config.preprocess)
        region_guided = getattr(model, "region_settings", None) is not None
        return cls(checkpoint=path, model=model, preset=preset, manifest=manifest, device=device,
                   segment=segment if region_guided else None)

    @property
    def region_guided(self) -> bool:
        return self.segment is not None

    def describe(self) -> dict[str, Any]:
        """``GET /v1/model``: architecture, preset and versions (no local paths beyond the checkpoint's name)."""
        from rrg3d import __version__

        config = self.model.config
        vision = (self.manifest.get("model") or {}).get("vision") or {}
        return {
            "name": config.name,
            "checkpoint": self.checkpoint.name,
            "created": self.manifest.get("created"),
            "trained_with_rrg3d": self.manifest.get("rrg3d_version"),
            "rrg3d_version": __version__,
            "architecture": {
                "encoder": (vision.get("encoder") or {}).get("name"),
                "compressor": (vision.get("compressor") or {}).get("name"),
                "projector": (vision.get("projector") or {}).get("name"),
                "language_model": config.lm.name_or_path,
                "lm_weights": (self.manifest.get("lm") or {}).get("weights"),
                "finding_classifier": "classifier" in vision,
            },
            "preset": {"name": self.preset.name, "sha256": self.preset.sha256, "shape": list(self.preset.shape),
                       "spacing": list(self.preset.spacing) if self.preset.spacing is not None else None},
            "region_guided": self.region_guided,
            "regions": list(self.model.region_settings.names) if self.region_guided else None,
            "segmentation": self.segment,
            "pet_ct": self.preset.pet is not None,
            "style_prompted": getattr(config.prompt, "style", None) is not None,
            "device": self.device,
            "generation": dict(vars(config.generation)),
        }


def _viewer_volume(source: Path, preset: Any, out: Path) -> None:
    """The scan on the model's grid in HU (the preset's geometry, not its intensity window), for the viewer."""
    from rrg3d.io import read_volume, write_volume

    volume = preset.apply_geometry(read_volume(source), order=1)
    array = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)
    write_volume(volume.replace(array=array), out)


class Worker(threading.Thread):
    """Runs queued jobs one batch at a time until stopped; a job's failure is recorded and the queue goes on."""

    def __init__(self, store: JobStore, service: ModelService, data_dir: Path, *, batch_size: int = 1,
                 poll_seconds: float = 1.0, generation: Any = None) -> None:
        super().__init__(name="rrg3d-inference", daemon=True)
        self.store = store
        self.service = service
        self.data_dir = data_dir
        self.batch_size = max(1, batch_size)
        self.poll_seconds = poll_seconds
        self.generation = generation or service.model.config.generation
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self.busy = False

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop_event.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        while not self._stop_event.is_set():
            jobs = self.store.claim(self.batch_size)
            if not jobs:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            self.busy = True
            try:
                self.process(jobs)
            except Exception as exc:  # never let the thread die: the jobs fail, the queue goes on
                log.error("inference batch failed: %s", type(exc).__name__)
                log.debug("inference batch failure", exc_info=True)
                for job in jobs:
                    self.store.fail(job.id, f"internal error ({type(exc).__name__}); the server log has details")
            finally:
                self.busy = False

    def job_dir(self, job: Job) -> Path:
        return self.data_dir / "studies" / job.id

    def process(self, jobs: list[Job]) -> None:
        """Prepare each job's viewer volume, generate all reports in one call, store each result."""
        from rrg3d.models.inference import generate_reports

        service = self.service
        ready: list[Job] = []
        for job in jobs:
            self.store.progress(job.id, 0.1, "preprocessing")
            source = self.data_dir / job.input
            try:
                _viewer_volume(source, service.preset, self.job_dir(job) / VOLUME_NAME)
                ready.append(job)
            except RRG3DError as exc:
                self.store.fail(job.id, _sentence(exc, source))
        if not ready:
            return
        for job in ready:
            self.store.progress(job.id, 0.3, "generating")
        # one predictions file per batch, in the first job's folder; each job keeps its own record
        out = self.job_dir(ready[0]) / PREDICTIONS_NAME
        out.unlink(missing_ok=True)
        records: dict[str, dict[str, Any]] = {}
        generate_reports(service.model, [self.data_dir / job.input for job in ready], out,
                         settings=self.generation, batch_size=len(ready), checkpoint=service.checkpoint.name,
                         progress=False, resume=False,
                         segment=service.segment, on_record=lambda record: records.__setitem__(record["id"], record))
        for job in ready:
            record = records.get(job.id)
            source = self.data_dir / job.input
            if record is None:
                self.store.fail(job.id, "internal error: no record was written for this study")
            elif record.get("error"):
                self.store.fail(job.id, _sentence(RRG3DError(record["error"]), source))
            else:
                self.store.progress(job.id, 0.9, "saving")
                self.store.finish(job.id, self._result(job, record, out.parent))
        shutil.rmtree(out.with_suffix(".masks"), ignore_errors=True)

    def _result(self, job: Job, record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """The stored result: the prediction record without local paths, the label map moved into the job's folder."""
        result = {key: value for key, value in record.items() if key not in ("masks", "meta")}
        result["id"] = job.id
        meta = dict(record.get("meta") or {})
        meta.pop("source", None)
        result["meta"] = meta
        masks = record.get("masks")
        if masks and masks.get("path"):
            label_map = out_dir / masks["path"]
            if label_map.is_file():
                os.replace(label_map, self.job_dir(job) / REGIONS_NAME)
                result["region_labels"] = masks.get("labels")
        result["finished_seconds"] = round(time.time() - (job.started or time.time()), 3)
        return result


def _sentence(exc: RRG3DError, source: Path) -> str:
    """The error's sentence with the server's internal path replaced by 'upload'."""
    text = str(exc)
    for path in (str(source), str(source.resolve())):
        text = text.replace(path, "upload")
    return text
