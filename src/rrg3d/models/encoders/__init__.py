"""3D vision encoders. Importing this package registers every encoder in :data:`ENCODERS`.

Common interface (the rest of the model relies on it):

* ``Config`` dataclass with at least ``in_channels`` and ``input_shape`` (the reference ``(D, H, W)`` that
  position embeddings are made for; other sizes are handled by resizing them);
* attributes ``out_dim`` (channels of the output grid) and ``in_channels``;
* ``grid_shape((D, H, W)) -> (d, h, w)``: the output grid of an input size, without running the model;
* ``forward(x)``: ``x [B, C, D, H, W]`` float → ``[B, d, h, w, out_dim]`` channel-last grid;
* ``set_gradient_checkpointing(enabled)`` (recomputes activations in training only).

Build by name: ``ENCODERS.build({"name": "ctvit_v", "dim": 256})``.
"""

from rrg3d.models.encoders import ctvit, ctvit_v, multiwindow, resnet3d, vit3d
from rrg3d.models.encoders.ctvit import CTViT, FactorisedEncoder
from rrg3d.models.encoders.ctvit_v import CTViTV, RelativePositionBias
from rrg3d.models.encoders.multiwindow import MultiWindowEncoder
from rrg3d.models.encoders.resnet3d import ResNet3D
from rrg3d.models.encoders.vit3d import ViT3D
from rrg3d.models.registry import ENCODERS

__all__ = [
    "ENCODERS",
    "CTViT",
    "CTViTV",
    "FactorisedEncoder",
    "MultiWindowEncoder",
    "RelativePositionBias",
    "ResNet3D",
    "ViT3D",
    "ctvit",
    "ctvit_v",
    "multiwindow",
    "resnet3d",
    "vit3d",
]
