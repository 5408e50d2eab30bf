"""The in-project CNN: a narrow ResNet for 32-96 px cue-conflict images.

Paper: Islam et al., "Shape or Texture: Understanding Discriminative Features in CNNs", ICLR 2021, arXiv 2101.11604.
The paper measures shape / texture dimensionality of ImageNet ResNets per stage and over training epochs; the
per-epoch checkpoints were never released, so the "training dynamics" study is reproduced here on a small ResNet
trained on the project's own cue-conflict data.

The network is torchvision's ResNet recipe (He et al. 2016, torchvision's ``BasicBlock``, v1.5 stride placement) with
torchvision's attribute names (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``), so that

- the official stage map applies unchanged: stage "1" = after ``maxpool``, "2".."5" = after ``layer1``..``layer4``
  (``shapebias.encoders.STAGE_MAPS["resnet"]``);
- with ``widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem="imagenet", num_classes=1000`` the state dict has
  exactly torchvision ``resnet18``'s keys and shapes (a torchvision checkpoint loads strictly).

Departure from torchvision: the default ``stem="small"`` replaces the 7x7 stride-2 convolution by a 3x3 stride-1 one
(CIFAR-style), keeping the 3x3 stride-2 max-pool, so a 64 px image reaches layer4 at 4x4 instead of 2x2.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

__all__ = ["PRESETS", "STEMS", "SmallResNet", "small_resnet"]

STEMS = ("small", "imagenet")


def _four_positive(name: str, value: Sequence[int]) -> tuple[int, int, int, int]:
    """``value`` as 4 positive ints (one per stage), else ValueError naming it."""
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    ok = len(values) == 4 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    if not ok or any(v <= 0 for v in values):
        raise ValueError(f"SmallResNet: {name} must be 4 positive integers (one per stage), got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


class SmallResNet(nn.Module):
    """A narrow ResNet of ``BasicBlock`` s (torchvision layout and names).

    Args:
        num_classes: size of the classifier ``fc``.
        widths: channels of ``layer1..layer4`` (the stem outputs ``widths[0]`` channels, as torchvision's 64).
        blocks: ``BasicBlock`` s per layer.
        in_channels: image channels.
        stem: ``"small"`` = conv3x3 stride 1 + BN + ReLU + maxpool(3, 2, 1) (32-96 px images);
            ``"imagenet"`` = torchvision's conv7x7 stride 2 + BN + ReLU + maxpool(3, 2, 1).

    Stage resolutions for an ``S`` px input, ``small`` stem: S/2, S/2, S/4, S/8, S/16 (stages "1".."5");
    ``imagenet`` stem: S/4, S/4, S/8, S/16, S/32 (as torchvision).
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1, 1),
        in_channels: int = 3,
        stem: str = "small",
    ) -> None:
        super().__init__()
        widths = _four_positive("widths", widths)
        blocks = _four_positive("blocks", blocks)
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"SmallResNet: num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"SmallResNet: in_channels must be a positive integer, got {in_channels!r}")
        if stem not in STEMS:
            raise ValueError(f"SmallResNet: unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        self.widths, self.blocks, self.stem = widths, blocks, stem
        self.num_classes = num_classes
        self.num_features = widths[-1]

        # stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # residual layers (torchvision _make_layer: stride 2 from layer2 on, 1x1 conv + BN shortcut on change)
        self._inplanes = widths[0]
        self.layer1 = self._make_layer(widths[0], blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], blocks[3], stride=2)

        # head
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)

        self.init_weights()

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self._inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self._inplanes, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        """torchvision's ResNet init: Kaiming-normal (fan_out, ReLU) convolutions, BN weight 1 / bias 0; ``fc`` keeps
        PyTorch's default Linear init (as torchvision)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"SmallResNet: expected images (B, {self.conv1.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stage "1"  (B, w0, S/2, S/2) for the small stem
        x = self.layer1(x)  # stage "2"  (B, w0, ...)
        x = self.layer2(x)  # stage "3"  (B, w1, ...)
        x = self.layer3(x)  # stage "4"  (B, w2, ...)
        x = self.layer4(x)  # stage "5"  (B, w3, ...)
        x = torch.flatten(self.avgpool(x), 1)  # (B, w3)
        return self.fc(x)  # (B, num_classes)


# ------------------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(widths=(8, 8, 16, 16)),  # tests
    "toy": dict(widths=(16, 32, 64, 128)),  # trains on the cue-conflict data on 2 CPU cores
    "resnet18_width": dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),  # ResNet18's widths and depth
}


def small_resnet(preset: str = "toy", **overrides: Any) -> SmallResNet:
    """A :class:`SmallResNet` from a preset (``tiny``, ``toy``, ``resnet18_width``), any argument overridable."""
    if preset not in PRESETS:
        raise ValueError(f"small_resnet: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return SmallResNet(**{**PRESETS[preset], **overrides})
