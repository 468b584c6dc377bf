"""One exception family for everything rrg3d reports to a user.

Every error names the file (or manifest line) and the problem in one sentence. Library exceptions are
wrapped, never shown as bare tracebacks, and their text is never allowed to carry DICOM header values
(see :mod:`rrg3d.io.phi`).
"""

from __future__ import annotations

from os import PathLike


class RRG3DError(Exception):
    """Base class of every error raised on purpose by rrg3d."""


class VolumeReadError(RRG3DError):
    """A scan could not be read or is not a usable 3D volume."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ManifestError(RRG3DError):
    """A manifest (JSONL) line or field is malformed."""

    def __init__(self, path: str | PathLike[str], problem: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        if field:
            where += f" [{field}]"
        super().__init__(f"{where}: {problem}")


class PresetError(RRG3DError):
    """A preprocessing preset is unknown or invalid."""


class ConfigError(RRG3DError):
    """A configuration file or key=value override is invalid."""
