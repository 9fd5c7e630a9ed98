"""A small VGG-style CNN with BatchNorm: the CPU test subject.

Small enough to train to useful accuracy in minutes on two CPU cores, yet built
from the same conv→BN→ReLU blocks as the large networks, so every defense sees
the same kind of neurons it meets in ResNets and VGGs.
"""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three stages of two conv blocks each, max-pooling between, global average pool."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_block(in_channels, w1), *_block(w1, w1), nn.MaxPool2d(2),
            *_block(w1, w2), *_block(w2, w2), nn.MaxPool2d(2),
            *_block(w2, w3), *_block(w3, w3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
