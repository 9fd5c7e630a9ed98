"""Networks the model registry does not know, for testing and benchmarking `.pt2` uploads.

A user's model is rarely one of the registry's seven: these are the structures BackdoorBench's
model zoo and common practice add (dense concatenation, squeeze-and-excitation gates, GroupNorm,
the CIFAR ResNet's zero-padding shortcut, a vision transformer, ConvNeXt and MobileNetV3 blocks).
They are defined here, outside ``onp_core``, so the engine only ever meets them as exported
programs — the way the service does. Widths are parameters: the tests use tiny ones, ``bench.foreign``
trains wider ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DenseBlocks(nn.Module):
    """DenseNet-style: each block's output is concatenated to its input."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.b1, self.b2 = _conv_bn(in_channels, width), _conv_bn(width, width), _conv_bn(2 * width, width)
        self.bn, self.fc = nn.BatchNorm2d(3 * width), nn.Linear(3 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 2)
        x = torch.cat([x, self.b1(x)], 1)
        x = torch.cat([x, self.b2(x)], 1)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A channel gate: sigmoid(1×1 convs on the pooled map) multiplies the feature map."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        self.squeeze, self.excite = nn.Conv2d(width, width // 4, 1), nn.Conv2d(width // 4, width, 1)
        self.body, self.fc = _conv_bn(width, 2 * width, stride=2), nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.body(x).mean((2, 3)))


class GroupNormNet(nn.Module):
    """No BatchNorm: GroupNorm after each conv, SiLU."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width),
                                 nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PadShortcut(nn.Module):
    """The CIFAR ResNet's option-A shortcut: subsample and zero-pad channels instead of a 1×1 conv."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.pad = width // 2
        self.stem = _conv_bn(in_channels, width)
        self.conv1, self.bn1 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width)
        self.conv2, self.bn2 = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.fc(F.relu(h + shortcut).mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, PyTorch's pre-norm transformer encoder, mean-pooled tokens."""

    def __init__(self, in_channels: int = 3, image: int = 32, patch: int = 8, dim: int = 32, depth: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.encoder(tokens)).mean(1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7×7, then LayerNorm and two linears on the channels-last map, a layer scale."""

    def __init__(self, in_channels: int = 3, dim: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(in_channels, dim, 4, 4), nn.LayerNorm(dim)
        self.dw, self.norm = nn.Conv2d(dim, dim, 7, padding=3, groups=dim), nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return self.head((x + h.permute(0, 3, 1, 2)).mean((2, 3)))


class MobileBlock(nn.Module):
    """MobileNetV3's inverted residual: expand, depthwise, hard-sigmoid SE gate, project; hardswish."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        wide = 4 * width
        self.stem = nn.Sequential(*conv_bn(in_channels, width, 3), nn.Hardswish())
        self.expand = nn.Sequential(*conv_bn(width, wide, 1), nn.Hardswish(), *conv_bn(wide, wide, 3, groups=wide),
                                    nn.Hardswish())
        self.se1, self.se2 = nn.Conv2d(wide, width, 1), nn.Conv2d(width, wide, 1)
        self.project = nn.Sequential(*conv_bn(wide, width, 1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.expand(x)
        h = h * F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head((x + self.project(h)).mean((2, 3)))
