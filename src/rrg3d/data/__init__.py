"""Manifests, datasets and adapters for public dataset layouts."""

from rrg3d.data.manifest import (
    Problem,
    check_manifest,
    load_manifest,
    resolve,
    validate_manifest,
    write_manifest,
)

__all__ = ["Problem", "check_manifest", "load_manifest", "resolve", "validate_manifest", "write_manifest"]
