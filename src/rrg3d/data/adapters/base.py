"""Shared pieces of the dataset adapters: options, results, CSV reading, volume lookup and record collection.

An adapter reads one public dataset layout and writes an rrg3d manifest. One bad row never stops a
conversion: it is recorded in :class:`ConversionResult.skipped` with the reason. Only a wrong layout (a
missing report file, a CSV without the expected columns) raises :class:`~rrg3d.errors.RRG3DError`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rrg3d.data.manifest import check_record, relativize, write_manifest
from rrg3d.errors import RRG3DError

#: Folder/file split names of public releases → manifest split names.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "tr": "train",
    "valid": "val",
    "val": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "ts": "test",
}

#: File suffixes of single-file volumes rrg3d can read.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz", ".npy")

csv.field_size_limit(2**31 - 1)


@dataclasses.dataclass
class ConversionResult:
    """What a conversion produced: the manifest, how many records, and every row skipped with its reason."""

    manifest: Path
    n_records: int
    n_skipped: int
    skipped: list[tuple[str, str]]
    warnings: list[str] = dataclasses.field(default_factory=list)
    source: str = ""

    def summary(self, max_skipped: int = 10) -> str:
        """A few human-readable lines for the command line."""
        lines = [f"{self.source or 'conversion'}: wrote {self.n_records} record(s) to {self.manifest}, "
                 f"skipped {self.n_skipped}"]
        for study_id, reason in self.skipped[:max_skipped]:
            lines.append(f"  skipped {study_id}: {reason}")
        if self.n_skipped > max_skipped:
            lines.append(f"  ... and {self.n_skipped - max_skipped} more skipped")
        lines.extend(f"  warning: {message}" for message in self.warnings)
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Option:
    """One adapter option: a keyword of ``convert`` and a ``--flag`` of the command line.

    A ``False`` default with no ``type`` makes a ``store_true`` switch; ``nargs`` gives a list option.
    """

    name: str
    default: Any = None
    help: str = ""
    type: Callable[[str], Any] | None = None
    nargs: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return self.default is False and self.type is None and self.nargs is None

    def add_to(self, parser: argparse.ArgumentParser | Any) -> None:
        text = self.help.replace("%", "%%")
        if self.is_switch:
            parser.add_argument(self.flag, dest=self.name, action="store_true", default=False, help=text)
            return
        if self.default not in (None, (), []):
            shown = " ".join(map(str, self.default)) if isinstance(self.default, (list, tuple)) else self.default
            text += f" (default: {str(shown).replace('%', '%%')})"
        kwargs: dict[str, Any] = {"dest": self.name, "default": self.default, "help": text}
        if self.type is not None:
            kwargs["type"] = self.type
        if self.nargs is not None:
            kwargs["nargs"] = self.nargs
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        parser.add_argument(self.flag, **kwargs)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A registered dataset adapter: ``convert(root, out, **options)`` and its command-line options."""

    name: str
    description: str
    source: str
    options: tuple[Option, ...]
    run: Callable[..., ConversionResult]

    def add_arguments(self, parser: argparse.ArgumentParser | Any) -> None:
        """Add this adapter's ``--options`` to an argparse parser (dest = the ``convert`` keyword)."""
        for option in self.options:
            option.add_to(parser)

    def defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The keywords of ``convert`` found in a parsed namespace (other attributes are ignored)."""
        return {option.name: getattr(args, option.name) for option in self.options if hasattr(args, option.name)}

    def convert(self, root: str | os.PathLike[str], out: str | os.PathLike[str], **options: Any) -> ConversionResult:
        """Convert the dataset under ``root`` into the manifest ``out`` (options given as None keep their default)."""
        known = {option.name for option in self.options}
        unknown = sorted(set(options) - known)
        if unknown:
            raise RRG3DError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                             f"known options: {', '.join(sorted(known)) or 'none'}")
        values = self.defaults()
        values.update({key: value for key, value in options.items() if value is not None or key not in values})
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise RRG3DError(f"{root_path}: {self.source} root folder not found")
        out_path = Path(out).expanduser()
        if out_path.is_dir():
            raise RRG3DError(f"{out_path}: is a folder; --out must be a manifest file path (e.g. {self.name}.jsonl)")
        return self.run(root_path, out_path, **values)


class Collector:
    """Gathers records and skipped rows, then writes a deterministic manifest."""

    def __init__(self, source: str, out: Path) -> None:
        self.source = source
        self.out = out
        self.records: list[dict[str, Any]] = []
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self._ids: set[str] = set()

    def rel(self, path: str | os.PathLike[str]) -> str:
        """A path relative to the manifest file (POSIX separators)."""
        return relativize(path, self.out)

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append((key, reason))

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def seen(self, study_id: str) -> bool:
        return study_id in self._ids

    def add(self, record: dict[str, Any]) -> bool:
        """Keep a record if its id is new and it passes the schema check; otherwise skip it with the reason."""
        study_id = str(record.get("id"))
        if study_id in self._ids:
            self.skip(study_id, "duplicate id (an earlier row produced the same study)")
            return False
        errors = [(field, message) for field, message, severity in check_record(record) if severity == "error"]
        if errors:
            field, message = errors[0]
            self.skip(study_id, f"invalid record [{field}]: {message}")
            return False
        self._ids.add(study_id)
        self.records.append(record)
        return True

    def finish(self, root: Path) -> ConversionResult:
        """Write the manifest sorted by id; raise when nothing usable was found."""
        if not self.records:
            reasons = "; ".join(f"{key}: {reason}" for key, reason in self.skipped[:3])
            more = f" (first reasons: {reasons})" if reasons else ""
            raise RRG3DError(f"{root}: no usable {self.source} study found, {len(self.skipped)} row(s) skipped{more}")
        self.records.sort(key=lambda record: natural_key(record["id"]))
        self.skipped.sort(key=lambda item: natural_key(item[0]))
        write_manifest(self.records, self.out)
        return ConversionResult(
            manifest=self.out,
            n_records=len(self.records),
            n_skipped=len(self.skipped),
            skipped=list(self.skipped),
            warnings=list(self.warnings),
            source=self.source,
        )


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``train_2`` before ``train_10``."""
    parts = re.split(r"(\d+)", text)
    return [int(part) if index % 2 else part.lower() for index, part in enumerate(parts)]


def sanitize_id(text: str) -> str:
    """Keep letters, digits, ``.``, ``-`` and ``_``; any other run of characters becomes one ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def split_name(name: str) -> str:
    """Manifest split name for a release's split name (``valid`` → ``val``); unknown names pass through."""
    return SPLIT_NAMES.get(name.strip().lower(), name.strip())


def clean_text(value: Any) -> str:
    """Report text with whitespace collapsed; ``None``/NaN/"nan" (pandas-written blanks) become ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = " ".join(str(value).split())
    return "" if text.lower() in ("nan", "none", "null") else text


def build_report(findings: str, impression: str) -> str:
    """``"Findings: ... Impression: ..."`` from whichever sections are present."""
    parts = []
    if findings:
        parts.append(f"Findings: {findings}")
    if impression:
        parts.append(f"Impression: {impression}")
    return " ".join(parts)


def parse_binary(value: Any) -> int:
    """A 0/1 label from ``0``, ``1``, ``0.0``, ``1.0``, ``true``/``false``; anything else raises ``ValueError``."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no"):
        return 0
    raise ValueError(f"not a 0/1 label: {value!r}")


def volume_stem(name: str) -> str:
    """File name without its volume suffix (``train_1_a_1.nii.gz`` → ``train_1_a_1``)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    lower = base.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return base[: -len(suffix)]
    return base


def volume_suffix(path: Path) -> str:
    lower = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_csv(path: Path, required: Sequence[str], what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV as ``(columns, [(line, row), ...])``; raise a clear error when columns are missing."""
    if not path.is_file():
        raise RRG3DError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() if name else "" for name in (reader.fieldnames or [])]
            reader.fieldnames = columns
            missing = [name for name in required if name not in columns]
            if missing:
                raise RRG3DError(
                    f"{path}: {what} lacks required column(s) {', '.join(map(repr, missing))}; "
                    f"found columns: {', '.join(map(repr, columns)) or 'none'}; "
                    f"expected at least: {', '.join(map(repr, required))}"
                )
            rows = []
            for row in reader:
                rows.append((reader.line_num, {key: value for key, value in row.items() if key is not None}))
    except UnicodeDecodeError as exc:
        raise RRG3DError(f"{path}: {what} is not UTF-8 text (byte offset {exc.start})") from exc
    except csv.Error as exc:
        raise RRG3DError(f"{path}: malformed CSV ({exc})") from exc
    return columns, rows


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    """The first ``folder / name`` that exists."""
    for name in names:
        candidate = folder / name
        if candidate.exists():
            return candidate
    return None


def find_dataset_dir(root: Path, markers: Sequence[str], source: str) -> Path:
    """``root`` or ``root/dataset``, whichever holds one of ``markers`` (the repository or its dataset folder)."""
    for candidate in (root, root / "dataset"):
        if any((candidate / marker).exists() for marker in markers):
            return candidate
    raise RRG3DError(
        f"{root}: does not look like a {source} download: none of {', '.join(markers)} found in it or in "
        f"{root / 'dataset'} (pass the repository root or its dataset/ folder)"
    )


def expand_folders(base: Path, patterns: Sequence[str], split: str) -> list[Path]:
    """Folder patterns (``{split}`` placeholder, relative to ``base`` or absolute) for one split."""
    folders = []
    for pattern in patterns:
        folder = Path(pattern.format(split=split)).expanduser()
        folders.append(folder if folder.is_absolute() else base / folder)
    return folders


_CTRATE_NAME = re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<patient>\d+)_(?P<scan>[A-Za-z]+)_(?P<recon>\d+)$")


class VolumeIndex:
    """Find a volume file by name under some folders.

    The CT-RATE nesting ``<split>_<n>/<split>_<n>_<s>/<name>`` (and RadGenome's ``<split>_<n>/<split>_<n><s>/``)
    is tried first, then the file directly in the folder, then any depth (the folders are walked once).
    """

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = list(folders)
        self._index: dict[str, Path] | None = None

    def candidates(self, name: str) -> list[Path]:
        stem = volume_stem(name)
        match = _CTRATE_NAME.match(stem)
        paths = []
        for folder in self.folders:
            if match:
                patient = f"{match['prefix']}_{match['patient']}"
                paths.append(folder / patient / f"{patient}_{match['scan']}" / name)
                paths.append(folder / patient / f"{patient}{match['scan']}" / name)
            paths.append(folder / name)
        return paths

    def expected(self, name: str) -> Path:
        """Where the file should be in the first folder (used for ``--keep-missing`` records)."""
        return self.candidates(name)[0] if self.folders else Path(name)

    def find(self, name: str) -> Path | None:
        for candidate in self.candidates(name):
            if candidate.is_file():
                return candidate
        return self._walk().get(name)

    def _walk(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for folder in self.folders:
                if not folder.is_dir():
                    continue
                for directory, subdirs, files in os.walk(folder):
                    subdirs.sort()
                    for file_name in sorted(files):
                        self._index.setdefault(file_name, Path(directory) / file_name)
        return self._index


def user_path(value: str | os.PathLike[str], root: Path) -> Path:
    """A path given by the user: absolute or existing as given (from the working folder), else under ``root``."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return root / path


def display(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (for short skip reasons), else as is."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def require_nibabel() -> Any:
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - nibabel is a core dependency
        raise RRG3DError("nibabel is needed to read NIfTI masks (pip install nibabel)") from exc
    return nibabel
