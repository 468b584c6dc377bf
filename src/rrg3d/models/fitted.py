"""Helpers for modules whose buffers are fitted on data (a PCA compressor, a standardising projector)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def adopt_incoming_shapes(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, names: Iterable[str]) -> None:
    """Resize ``module``'s buffers ``names`` to the shapes a state dict brings (call from ``_load_from_state_dict``):
    fitted buffers are sized by the fit, so a freshly built module must take them as they come."""
    for name in names:
        incoming = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(incoming, Tensor) and incoming.shape != current.shape:
            setattr(module, name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
