"""PreAct-ResNet18 in the CIFAR layout (He et al. 2016), the BackdoorBench reference model.

BatchNorm comes *before* each convolution here, which is what makes channel-level
defenses easy to get wrong: the BN that follows a conv belongs to the next block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """``width`` is the first stage's channel count (64 in the paper; the stages double it).

    A narrower copy (width 16, 1/16 of the compute) is what lets the CPU benchmark train
    a residual, PreAct-ordered subject at all on two cores.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        w = width
        self.in_planes = w
        self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(w, 2, 1)
        self.layer2 = self._make_layer(2 * w, 2, 2)
        self.layer3 = self._make_layer(4 * w, 2, 2)
        self.layer4 = self._make_layer(8 * w, 2, 2)
        self.bn = nn.BatchNorm2d(8 * w)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * w, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)
