"""ResNet-18, written out: the standard ImageNet-sized benchmark model, random weights.

The layout and parameter names follow torchvision's ``resnet18`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``...), so a state_dict saved from
torchvision loads into it unchanged; torchship itself never downloads weights. Use it
to measure export and serving costs on a realistically heavy model (1.8 GFLOPs and 11.7M
parameters at 224x224), not to classify anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchship.store.manifest import InputSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNet18(nn.Module):
    """ResNet-18: a 7x7 stem, four stages of two :class:`BasicBlock` each, a linear head.

    ``width`` is the first stage's channel count (64 in the paper; stages double it),
    so tests and quick benchmarks can build a narrower copy. Any input of at least
    32x32 works thanks to the adaptive pooling; the reference size is 3x224x224.
    """

    def __init__(self, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.init_kwargs = {"num_classes": num_classes, "width": width}
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = [width, width * 2, width * 4, width * 8]
        self.layer1 = self._stage(width, stages[0], stride=1)
        self.layer2 = self._stage(stages[0], stages[1], stride=2)
        self.layer3 = self._stage(stages[1], stages[2], stride=2)
        self.layer4 = self._stage(stages[2], stages[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(stages[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_input_spec() -> InputSpec:
    """ImageNet preprocessing: RGB, shorter side to 256, centre crop 224, ImageNet stats."""
    return InputSpec(
        shape=[3, 224, 224],
        kind="image",
        color="RGB",
        size=(224, 224),
        fit="center_crop",
        invert="never",
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )
