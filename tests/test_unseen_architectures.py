"""Architectures the registry does not know, uploaded as ``.pt2``: every defense must run on them.

Users upload what they trained: dense (concatenating) blocks, squeeze-and-excitation gates,
GroupNorm, the CIFAR ResNet's zero-padding shortcut, a small vision transformer, ConvNeXt's and MobileNetV3's
blocks (BackdoorBench's model zoo has DenseNet, EfficientNet, MobileNetV3, ViT and ConvNeXt). Before session 17
the transformer crashed every mask-based defense (its token layers keep units in the last dim,
attention's projections keep the batch in dim 1). These tests pin down, per architecture, which
layers are neurons, that masks on weights equal masks on activations, that the ONP search's prefix
reuse is exact, and that each method repairs the program and writes a ``.pt2`` that loads back.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses import run_repair
from onp_core.models import ImageClassifier, ModelManifest, load_model, save_model
from onp_core.neurons import discover_neurons
from model_helpers import randomise_bn
from test_neurons import _masks_match, _prefix_reuse_matches


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DenseBlocks(nn.Module):
    """DenseNet-style: each block's output is concatenated to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.b2 = _conv_bn(3, 8), _conv_bn(8, 8), _conv_bn(16, 8)
        self.bn, self.fc = nn.BatchNorm2d(24), nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.b1(x)], 1)
        x = torch.cat([x, self.b2(x)], 1)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A channel gate: sigmoid(1×1 convs on the pooled map) multiplies the feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.squeeze, self.excite = _conv_bn(3, 16), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.body, self.fc = _conv_bn(16, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.body(x).mean((2, 3)))


class GroupNormNet(nn.Module):
    """No BatchNorm: GroupNorm after each conv, SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PadShortcut(nn.Module):
    """The CIFAR ResNet's option-A shortcut: subsample and zero-pad channels instead of a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        return self.fc(F.relu(h + shortcut).mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, one transformer encoder layer (PyTorch's), mean-pooled tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, 32) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.encoder(tokens)).mean(1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7×7, then LayerNorm and two linears on the channels-last map, a layer scale."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, dim, 4, 4), nn.LayerNorm(dim)
        self.dw, self.norm = nn.Conv2d(dim, dim, 7, padding=3, groups=dim), nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return self.head((x + h.permute(0, 3, 1, 2)).mean((2, 3)))


class MobileBlock(nn.Module):
    """MobileNetV3's inverted residual: expand, depthwise, hard-sigmoid SE gate, project; hardswish."""

    def __init__(self) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        self.stem = nn.Sequential(*conv_bn(3, 16, 3), nn.Hardswish())
        self.expand = nn.Sequential(*conv_bn(16, 64, 1), nn.Hardswish(), *conv_bn(64, 64, 3, groups=64), nn.Hardswish())
        self.se1, self.se2 = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)
        self.project = nn.Sequential(*conv_bn(64, 16, 1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.expand(x)
        h = h * F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head((x + self.project(h)).mean((2, 3)))


# the neuron layers each must have: (last part of the name, kind, size)
EXPECTED = {
    DenseBlocks: [("1", "bn", 8), ("1", "bn", 8), ("1", "bn", 8), ("bn", "bn", 24)],
    SqueezeExcite: [("1", "bn", 16), ("squeeze", "conv", 4), ("excite", "conv", 16), ("1", "bn", 32)],
    GroupNormNet: [("0", "conv", 16), ("4", "conv", 32)],
    PadShortcut: [("1", "bn", 8), ("bn1", "bn", 16), ("bn2", "bn", 16)],
    # attention's in/out projections run on [tokens, batch, C]: not per-sample units, so left alone
    TinyViT: [("patch", "conv", 32), ("linear1", "linear", 64), ("linear2", "linear", 32)],
    ConvNeXtBlock: [("stem", "conv", 32), ("dw", "conv", 32), ("pw1", "linear", 128), ("pw2", "linear", 32)],
    MobileBlock: [("1", "bn", 16), ("1", "bn", 64), ("4", "bn", 64), ("se1", "conv", 16), ("se2", "conv", 64),
                  ("1", "bn", 16)],
}
QUICK_OPTIONS = {"onp": {"iterations": 2, "episodes": 2, "synth_steps": 20, "effect_neurons": 8, "imitation_steps": 5,
                         "anomaly_low": -100.0, "anomaly_high": -99.0},
                 "anp": {"iterations": 3, "batch_size": 16}, "clp": {},
                 "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1, "batch_size": 32},
                 "fp": {"finetune_epochs": 1, "batch_size": 32}}


def _upload(cls: type[nn.Module], tmp_path) -> nn.Module:
    torch.manual_seed(0)
    net = randomise_bn(cls().eval())
    path = tmp_path / f"{cls.__name__}.pt2"
    save_model(ImageClassifier(net, ModelManifest(arch="exported", num_classes=10, input_shape=(3, 32, 32))),
               path, "pt2")
    return load_model(path).model


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_neurons_masks_and_prefix_reuse(cls: type[nn.Module], tmp_path) -> None:
    model = _upload(cls, tmp_path)
    neurons = discover_neurons(model, (3, 32, 32))
    assert [(layer.name.rsplit(".", 1)[-1], layer.kind, layer.size) for layer in neurons.layers] == EXPECTED[cls]
    _masks_match(model, neurons)
    _prefix_reuse_matches(model, (3, 32, 32))


def test_token_units_are_masked_in_their_last_dim(tmp_path) -> None:
    """A linear layer over tokens ([B, T, C]) holds its units in the last dim; the probe's taps give [B, C, T]."""
    from onp_core.neurons.probe import MaskedNet

    neurons = discover_neurons(_upload(TinyViT, tmp_path), (3, 32, 32))
    assert [layer.channel_last for layer in neurons.layers] == [False, True, True]
    _, taps = MaskedNet(neurons).forward_with_activations(torch.rand(3, 3, 32, 32))
    assert [tuple(t.shape) for t in taps] == [(3, 32, 4, 4), (3, 64, 16), (3, 32, 16)]


@pytest.mark.parametrize("method", sorted(QUICK_OPTIONS))
@pytest.mark.parametrize("cls", [DenseBlocks, TinyViT], ids=lambda c: c.__name__)
def test_every_method_repairs_the_program_and_writes_a_pt2(cls: type[nn.Module], method: str, tmp_path) -> None:
    model = _upload(cls, tmp_path)
    clean = balanced_subset(load_dataset("cifar10", "test"), 120, seed=3)
    result = run_repair(model, clean, method, QUICK_OPTIONS[method])
    assert 0.0 <= result.clean_acc_after <= 1.0
    save_model(result.model, tmp_path / "repaired.pt2", "pt2")
    again = load_model(tmp_path / "repaired.pt2").model
    x = clean.float()[:8]
    with torch.no_grad():
        assert torch.allclose(again(x), result.model(x), atol=1e-5)
