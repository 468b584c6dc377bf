"""Adapters that turn public CT / PET-CT report dataset layouts into rrg3d manifests.

Usage::

    from rrg3d.data.adapters import get_adapter

    result = get_adapter("ctrate").convert("/data/CT-RATE", "ctrate.jsonl", splits=["valid"])
    print(result.summary())

Command-line wiring: ``adapter.add_arguments(parser)`` adds the adapter's ``--options`` (their ``dest`` is the
keyword of ``convert``) and ``adapter.options_from_args(namespace)`` collects them back.
"""

from __future__ import annotations

from rrg3d.data.adapters import autopet, autopet_rg, ctrate, ctrg, radgenome
from rrg3d.data.adapters.base import Adapter, ConversionResult, Option
from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS
from rrg3d.errors import RRG3DError
from rrg3d.text.labels import CTRATE_LABELS

#: Every registered adapter by name.
ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (ctrate.ADAPTER, radgenome.ADAPTER, ctrg.ADAPTER, autopet.ADAPTER, autopet_rg.ADAPTER)
}


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name`` (case-insensitive, ``-``/``_`` ignored)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    for adapter_name, adapter in ADAPTERS.items():
        if adapter_name.replace("-", "").replace("_", "") == key:
            return adapter
    raise RRG3DError(f"unknown dataset adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")


__all__ = [
    "ADAPTERS",
    "CTRATE_LABELS",
    "RADGENOME_REGIONS",
    "Adapter",
    "ConversionResult",
    "Option",
    "get_adapter",
]
