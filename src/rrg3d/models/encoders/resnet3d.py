"""``resnet3d``: 3D ResNet (basic blocks) returning its last feature map as a channel-last token grid.

The CNN family of encoder comparisons (Argus compares 3D CNN and ViT encoders). Two backends build the same
architecture: ``native`` (implemented here) and ``monai`` (``monai.networks.nets.ResNet``, imported lazily, with
its pooling and classifier dropped; parameter names match the native backend, so weights load into either).
Depth is set by ``layers`` (blocks per stage): ResNet-10 ``(1, 1, 1, 1)``, ResNet-18 ``(2, 2, 2, 2)``, ResNet-34
``(3, 4, 6, 3)``.

Layout: stem conv (``stem_kernel``, ``stem_stride``, padding ``k // 2``) → norm → ReLU → optional 3×3×3 max-pool
(stride 2) → stages (first stride 1, each later one stride 2). With the defaults (stem stride 1×2×2, as in
Hara et al.'s 3D ResNets: the slice axis is usually the coarsest) the total stride is 16×32×32, so 240×480×480 →
15×15×15 tokens of 512 channels. :meth:`ResNet3D.grid_shape` computes the grid from these strides exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rrg3d.errors import ConfigError
from rrg3d.models.encoders.layers import Shape3, check_volume, to_3tuple
from rrg3d.models.registry import ENCODERS

BACKENDS = ("native", "monai")
NORMS = ("batch", "instance", "group")


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.GroupNorm(min(groups, channels), channels)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class BasicBlock3D(nn.Module):
    """Two 3×3×3 convolutions with a residual connection (1×1×1 conv + norm shortcut when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, c_out, groups)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), _norm(norm, c_out, groups)
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


@ENCODERS.register("resnet3d")
class ResNet3D(nn.Module):
    """3D ResNet with basic blocks; output ``[B, d, h, w, widths[-1]]``. Defaults: ResNet-18, 64…512 channels,
    7×7×7 stem of stride 1×2×2, max-pool, batch norm. The ``monai`` backend needs exactly 4 stages."""

    @dataclass
    class Config:
        in_channels: int = 1
        input_shape: tuple[int, int, int] = (240, 480, 480)  # reference (D, H, W); a CNN needs no resizing
        backend: str = "native"  # "native" | "monai"
        layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage: 10 → 1,1,1,1; 18 → 2,2,2,2; 34 → 3,4,6,3
        widths: tuple[int, ...] = (64, 128, 256, 512)  # channels per stage; out_dim = widths[-1]
        stem_kernel: tuple[int, int, int] = (7, 7, 7)
        stem_stride: tuple[int, int, int] = (1, 2, 2)
        stem_pool: bool = True  # 3×3×3 max-pool of stride 2 after the stem
        norm: str = "batch"  # "batch" | "instance" | "group"
        norm_groups: int = 32  # for norm: group (capped at the channel count)

        def __post_init__(self) -> None:
            self.input_shape = to_3tuple(self.input_shape, "input_shape")
            self.stem_kernel = to_3tuple(self.stem_kernel, "stem_kernel")
            self.stem_stride = to_3tuple(self.stem_stride, "stem_stride")
            self.layers, self.widths = tuple(self.layers), tuple(self.widths)
            if self.backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
            if self.norm not in NORMS:
                raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
            if not self.layers or len(self.layers) != len(self.widths):
                raise ValueError(f"layers {self.layers} and widths {self.widths} must be non-empty, equal length")
            if self.backend == "monai" and len(self.layers) != 4:
                raise ValueError(f"backend monai builds exactly 4 stages, got layers {self.layers}")
            if min(self.layers) < 1:
                raise ValueError(f"every stage needs at least one block, got layers {self.layers}")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_dim = config.widths[-1]
        self.gradient_checkpointing = False
        if config.backend == "monai":
            # Keep MONAI's layers under the same names as the native backend (its pooling and classifier are
            # dropped), so checkpoints load into either backend.
            net = self._build_monai(config)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.act)
            self.pool = net.maxpool if config.stem_pool else nn.Identity()
            self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        else:
            self.stem = nn.Sequential(
                nn.Conv3d(
                    config.in_channels,
                    config.widths[0],
                    config.stem_kernel,
                    stride=config.stem_stride,
                    padding=tuple(k // 2 for k in config.stem_kernel),
                    bias=False,
                ),
                _norm(config.norm, config.widths[0], config.norm_groups),
                nn.ReLU(inplace=True),
            )
            self.pool = nn.MaxPool3d(3, stride=2, padding=1) if config.stem_pool else nn.Identity()
            stages, c_in = [], config.widths[0]
            for i, (blocks, width) in enumerate(zip(config.layers, config.widths, strict=True)):
                stride = 1 if i == 0 else 2
                stage = [BasicBlock3D(c_in, width, stride, config.norm, config.norm_groups)]
                stage += [BasicBlock3D(width, width, 1, config.norm, config.norm_groups) for _ in range(blocks - 1)]
                stages.append(nn.Sequential(*stage))
                c_in = width
            self.stages = nn.ModuleList(stages)
            for m in self.modules():
                if isinstance(m, nn.Conv3d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _build_monai(config: Config) -> nn.Module:
        try:
            from monai.networks.nets.resnet import ResNet
        except ImportError as exc:
            raise ConfigError(
                "resnet3d backend 'monai' needs MONAI (pip install 'rrg3d[monai]'); use backend: native otherwise"
            ) from exc
        norm: str | tuple = config.norm
        if config.norm == "group":
            norm = ("group", {"num_groups": min(config.norm_groups, *config.widths)})
        elif config.norm == "instance":
            norm = ("instance", {"affine": True})
        net = ResNet(
            block="basic",
            layers=list(config.layers),
            block_inplanes=list(config.widths),
            spatial_dims=3,
            n_input_channels=config.in_channels,
            conv1_t_size=config.stem_kernel,
            conv1_t_stride=config.stem_stride,
            no_max_pool=not config.stem_pool,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
            norm=norm,
        )
        return net

    def grid_shape(self, input_shape: tuple[int, int, int]) -> Shape3:
        sizes = []
        for n, k, s in zip(input_shape, self.config.stem_kernel, self.config.stem_stride, strict=True):
            n = _conv_out(int(n), k, s, k // 2)
            if self.config.stem_pool:
                n = _conv_out(n, 3, 2, 1)
            for _ in self.config.layers[1:]:
                n = _conv_out(n, 3, 2, 1)
            sizes.append(n)
        return tuple(sizes)  # type: ignore[return-value]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = bool(enabled)

    def _blocks(self) -> Sequence[nn.Module]:
        return [block for stage in self.stages for block in stage]

    def _stem(self, x: Tensor) -> Tensor:
        return self.pool(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        check_volume(x, self.in_channels, "resnet3d")
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # The full-resolution stem activations are the largest: with checkpointing they are recomputed too.
        x = checkpoint(self._stem, x, use_reentrant=False) if use_checkpoint else self._stem(x)
        for block in self._blocks():
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return x.permute(0, 2, 3, 4, 1).contiguous()
