"""Models: 3D vision encoders, token compressors, projectors, the LLM glue, CT-CLIP, checkpoints.

Architectures are data (``rrg3d/configs/models/*.yaml``) built by name::

    from rrg3d.models import ReportGenerator, load_checkpoint, save_checkpoint
    model = ReportGenerator.from_config("tiny_ctvit_v")      # pretrained LM + fresh vision tower
    save_checkpoint(model, "ckpt/")                          # one call saves ...
    reports = load_checkpoint("ckpt/").generate(volumes)     # ... one call loads

Importing this package registers every encoder, compressor and projector; heavy libraries (transformers, peft)
are imported only when a language model is loaded.
"""

from rrg3d.models import compress, encoders, projector  # noqa: F401  (registration)
from rrg3d.models.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from rrg3d.models.config import GenerationSettings, ModelConfig, list_model_configs, load_model_config
from rrg3d.models.registry import COMPRESSORS, ENCODERS, PROJECTORS
from rrg3d.models.vlm import ReportGenerator, VisionTower

__all__ = [
    "COMPRESSORS",
    "ENCODERS",
    "PROJECTORS",
    "CheckpointError",
    "GenerationSettings",
    "ModelConfig",
    "ReportGenerator",
    "VisionTower",
    "list_model_configs",
    "load_checkpoint",
    "load_model_config",
    "read_manifest",
    "save_checkpoint",
]
