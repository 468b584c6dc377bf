"""Uploads: what kind of file arrived, a safe unpacking of DICOM zips, a check that it is a 3D image, and storage
that keeps nothing of the upload's identifiers: file and zip entry names are dropped, and a DICOM series is kept as
a NIfTI of its voxels and geometry (its headers, with the patient's name and IDs, are deleted once read).

Every refusal is an :class:`UploadRejected` with the HTTP status the API answers and one sentence: the same
sentence the CLI gives for the same file, with the server's internal path replaced by "upload".
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from rrg3d.errors import RRG3DError

#: what a stored upload is: one NIfTI file, or a folder of one DICOM series
KINDS = ("nifti", "dicom")
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class UploadRejected(RRG3DError):
    """An upload the server does not accept; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class ZipLimits:
    """Caps on a DICOM zip: total unpacked bytes, entry count, and the largest compression ratio of an entry."""

    max_unpacked_bytes: int = 4 << 30
    max_entries: int = 5000
    max_ratio: float = 200.0


@dataclass(frozen=True)
class StoredUpload:
    """Where an accepted upload lies (``path``: the NIfTI file or the DICOM folder) and its shape."""

    kind: str
    path: Path
    shape: tuple[int, int, int]


def sniff_kind(head: bytes, filename: str | None) -> str:
    """``nifti``, ``nifti.gz`` or ``zip`` from the first bytes (the file name only breaks no ties: it may lie)."""
    name = (filename or "").lower()
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(GZIP_MAGIC):
        if name.endswith(".zip"):
            raise UploadRejected(400, "upload: the file is gzip-compressed, not a zip of a DICOM series")
        return "nifti.gz"
    if len(head) >= 4 and (int.from_bytes(head[:4], "little") in (348, 540)
                           or int.from_bytes(head[:4], "big") in (348, 540)):
        return "nifti"
    if len(head) >= 132 and head[128:132] == b"DICM":
        raise UploadRejected(400, "upload: a single DICOM file is one slice; upload a .zip of the whole series")
    raise UploadRejected(400, "upload: not a NIfTI file (.nii, .nii.gz) or a .zip of one DICOM series")


def _unsafe_entry(name: str) -> bool:
    """An entry name that would land outside the target folder: absolute, a drive, or with a '..' part."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return posix.is_absolute() or windows.is_absolute() or bool(windows.drive) or ".." in posix.parts \
        or ".." in windows.parts


def extract_dicom_zip(archive: Path, target: Path, limits: ZipLimits = ZipLimits()) -> int:
    """Unpack the files of a zip into ``target`` as ``00000.dcm, 00001.dcm, ...`` (entry names are dropped: they
    may carry identifiers); refuses unsafe names, links, and archives over the caps, counting the bytes actually
    unpacked (headers can lie). Returns the number of files."""
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadRejected(400, f"upload: not a readable zip archive ({type(exc).__name__})") from None
    with bundle:
        entries = bundle.infolist()
        if len(entries) > limits.max_entries:
            raise UploadRejected(400, f"upload: the zip has {len(entries)} entries, more than the "
                                      f"{limits.max_entries} allowed")
        for entry in entries:
            if _unsafe_entry(entry.filename):
                raise UploadRejected(400, "upload: the zip has an entry with an absolute path or '..'; refused")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise UploadRejected(400, "upload: the zip has a symbolic link; refused")
        declared = sum(entry.file_size for entry in entries)
        if declared > limits.max_unpacked_bytes:
            raise UploadRejected(400, f"upload: the zip unpacks to {declared} bytes, more than the "
                                      f"{limits.max_unpacked_bytes} allowed")
        target.mkdir(parents=True, exist_ok=True)
        written = total = 0
        for entry in entries:
            parts = PurePosixPath(entry.filename.replace("\\", "/")).parts
            if entry.is_dir() or not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                continue
            budget = min(limits.max_unpacked_bytes - total, int(max(entry.compress_size, 1) * limits.max_ratio))
            out = target / f"{written:05d}.dcm"
            try:
                with bundle.open(entry) as source, open(out, "wb") as sink:
                    while chunk := source.read(1 << 20):
                        total += len(chunk)
                        budget -= len(chunk)
                        if budget < 0:
                            raise UploadRejected(400, "upload: the zip unpacks to more than allowed (a zip bomb?); "
                                                      "refused")
                        sink.write(chunk)
            except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
                raise UploadRejected(400, f"upload: a zip entry cannot be unpacked ({type(exc).__name__})") from None
            written += 1
        if not written:
            raise UploadRejected(400, "upload: the zip holds no files")
        return written


def _describe(exc: RRG3DError, internal: Path) -> str:
    """The CLI's sentence for a read error, with the server's path replaced by 'upload'."""
    problem = getattr(exc, "problem", None)
    if problem is not None:
        return f"upload: {problem}"
    return str(exc).replace(str(internal), "upload")


def check_image(path: Path) -> Any:
    """Read the stored upload as the CLI would (a :class:`~rrg3d.io.Volume`); a read error becomes a 400 with the
    same sentence."""
    from rrg3d.io import read_volume

    try:
        volume = read_volume(path)
    except RRG3DError as exc:
        raise UploadRejected(400, _describe(exc, path)) from None
    except MemoryError:
        raise UploadRejected(413, "upload: the volume is too large to read into memory") from None
    shape = tuple(int(n) for n in volume.array.shape)
    if len(shape) != 3 or min(shape) < 2:
        raise UploadRejected(400, f"upload: shape {shape} is not a 3D volume (a 2D slice?); a 3D scan is needed")
    return volume


def dicom_to_nifti(series: Path, target: Path) -> StoredUpload:
    """Read a DICOM series folder, keep its voxels and geometry as ``target`` (NIfTI: no header travels with it),
    and remove the DICOM files, whose headers hold the patient's identifiers."""
    from rrg3d.io import write_volume

    try:
        volume = check_image(series)
        write_volume(volume.replace(meta={}), target)
    finally:
        shutil.rmtree(series, ignore_errors=True)
    return StoredUpload(kind="dicom", path=target, shape=tuple(int(n) for n in volume.array.shape))


def store_upload(received: Path, kind: str, folder: Path, name: str, limits: ZipLimits = ZipLimits()
                 ) -> StoredUpload:
    """Move a received upload (``kind`` from :func:`sniff_kind`) into ``folder`` as ``name.nii[.gz]`` and check it
    reads as a 3D image; a DICOM zip is unpacked, read and kept as ``name.nii.gz`` alone. On refusal nothing stays."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        series = folder / f".{name}.dicom"
        try:
            extract_dicom_zip(received, series, limits)
        except UploadRejected:
            shutil.rmtree(series, ignore_errors=True)
            raise
        finally:
            received.unlink(missing_ok=True)
        return dicom_to_nifti(series, folder / f"{name}.nii.gz")
    stored = folder / f"{name}.{'nii.gz' if kind == 'nifti.gz' else 'nii'}"
    os.replace(received, stored)
    try:
        volume = check_image(stored)
    except UploadRejected:
        stored.unlink(missing_ok=True)
        raise
    return StoredUpload(kind="nifti", path=stored, shape=tuple(int(n) for n in volume.array.shape))
