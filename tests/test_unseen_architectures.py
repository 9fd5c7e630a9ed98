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
from torch import nn

from bench.foreign_models import (ConvNeXtBlock, DenseBlocks, GroupNormNet, MobileBlock, PadShortcut, SqueezeExcite,
                                  TinyViT)
from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses import run_repair
from onp_core.models import ImageClassifier, ModelManifest, load_model, save_model
from onp_core.neurons import discover_neurons
from model_helpers import randomise_bn
from test_neurons import _masks_match, _prefix_reuse_matches


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
