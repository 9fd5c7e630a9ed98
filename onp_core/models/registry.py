"""Architecture registry and the one input convention every model follows.

Every classifier the engine handles is an :class:`ImageClassifier`: it takes float32
NCHW images in [0, 1] and applies the manifest's normalisation itself, so data
readers, attacks and defenses never have to know how a model was trained.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .cnn_fc import ConvFC
from .manifest import ModelManifest
from .mobilenet import MobileNetV2
from .preact_resnet import PreActResNet18
from .resnet import ResNet18
from .small_cnn import SmallCNN
from .vgg import VGG

ArchBuilder = Callable[[int, int], nn.Module]

ARCHITECTURES: dict[str, ArchBuilder] = {
    "small_cnn": lambda n, c: SmallCNN(n, c),
    "cnn_fc": lambda n, c: ConvFC(n, c),
    "preact_resnet18": lambda n, c: PreActResNet18(n, c),
    "preact_resnet18_w16": lambda n, c: PreActResNet18(n, c, width=16),
    "resnet18": lambda n, c: ResNet18(n, c),
    "vgg16_bn": lambda n, c: VGG("vgg16_bn", n, c),
    "vgg19_bn": lambda n, c: VGG("vgg19_bn", n, c),
    "mobilenet_v2": lambda n, c: MobileNetV2(n, c),
}


class UnknownArchitecture(ValueError):
    """The manifest names an architecture the registry does not have."""


class ImageClassifier(nn.Module):
    """Wraps a backbone ``net`` with the manifest's input normalisation.

    The mean/std buffers are non-persistent so that ``net.state_dict()`` is exactly
    the upload's state dict and the repaired model saves back in the same layout.
    """

    def __init__(self, net: nn.Module, manifest: ModelManifest):
        super().__init__()
        self.net = net
        self.manifest = manifest
        c = manifest.input_shape[0]
        mean = torch.tensor(manifest.mean if manifest.mean else [0.0] * c).view(1, c, 1, 1)
        std = torch.tensor(manifest.std if manifest.std else [1.0] * c).view(1, c, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.normalize = manifest.mean is not None

    @property
    def exported(self) -> bool:
        """True when ``net`` is an unlifted ``torch.export`` program (fixed eval-mode graph)."""
        return self.manifest.arch == "exported"

    def train(self, mode: bool = True) -> "ImageClassifier":
        # Exported programs refuse .train()/.eval(): their graph is frozen in eval
        # mode (BN uses running statistics), which is what repair needs anyway.
        self.training = mode
        if not self.exported:
            self.net.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x)


def build_backbone(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise UnknownArchitecture(
            f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))} "
            "(upload a torch.export .pt2 program for other architectures)"
        ) from None
    return builder(num_classes, in_channels)


def build_model(manifest: ModelManifest) -> ImageClassifier:
    """A freshly initialised classifier for the manifest's architecture and shapes."""
    net = build_backbone(manifest.arch, manifest.num_classes, manifest.input_shape[0])
    return ImageClassifier(net, manifest)
