"""The classic backdoor-paper network: two conv layers without BatchNorm, a hidden fully-connected layer.

BadNets' MNIST net and many trojan benchmarks since use this shape. It is here because its
neurons differ from the small CNN's in both ways a pruning defense can get wrong: conv
channels with no BN to zero (the filter and bias are the neuron), and hidden linear units
between the features and the classifier, where a backdoor can live too.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvFC(nn.Module):
    """conv(32)–ReLU–pool, conv(64)–ReLU–pool, a 4×4 average pool (any input size), fc(hidden)–ReLU, fc(classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 16, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc(self.features(x))))
