"""Helpers that give untrained test models non-trivial state.

A freshly built network has BN running statistics 0/1, unit BN weights and zero
biases: a test of masking, pruning or a save/load round trip would pass on it even if
it dropped those tensors. Randomising them makes such losses change the outputs.
"""
from __future__ import annotations

import torch
from torch import nn


def save_linear_pt2(path) -> None:
    """A one-linear-layer classifier exported as a ``.pt2``: no conv, BN or hidden unit to prune anywhere."""
    from onp_core.models import ImageClassifier, ModelManifest, save_model

    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    save_model(ImageClassifier(net, ModelManifest(arch="exported", num_classes=10, input_shape=(3, 32, 32))),
               path, "pt2")


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running statistics and random 1-d weights/biases (BN affine, linear biases), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()
