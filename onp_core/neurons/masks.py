"""Apply channel masks to weights.

Zeroing (or scaling) channel c of every parameter in a neuron layer is exactly the
same as multiplying that channel's activation by the mask value: BN output is
γ·x̂ + β, a conv's is W∗x + b, both linear in (γ, β) or (W, b). So a mask applied to
the weights gives a repaired model with the original architecture and shapes.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .discover import NeuronLayer, NeuronMap


def _shape_for(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (param.ndim - 1))).to(param.dtype).to(param.device)


@torch.no_grad()
def apply_masks(model: nn.Module, neurons: NeuronMap, masks: Mapping[int, torch.Tensor]) -> None:
    """Multiply, in place, each layer's parameters by its channel mask (1 keep, 0 prune)."""
    params = dict(model.named_parameters())
    for li, mask in masks.items():
        for name in neurons.layers[li].params:
            p = params[name]
            p.mul_(_shape_for(mask, p))


def prune(model: nn.Module, neurons: NeuronMap, pruned: Mapping[int, list[int]]) -> None:
    """Zero the listed channels (layer index -> channel indices) in place."""
    masks = {}
    for li, channels in pruned.items():
        m = torch.ones(neurons.layers[li].size)
        m[list(channels)] = 0
        masks[li] = m
    apply_masks(model, neurons, masks)


@contextmanager
def masked(model: nn.Module, neurons: NeuronMap, masks: Mapping[int, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily apply masks (restoring the original weights afterwards)."""
    params = dict(model.named_parameters())
    names = [n for li in masks for n in neurons.layers[li].params]
    saved = {n: params[n].detach().clone() for n in names}
    try:
        apply_masks(model, neurons, masks)
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def layer_params(model: nn.Module, layer: NeuronLayer) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    return [params[n] for n in layer.params]


def pruned_channels(masks: Mapping[int, torch.Tensor]) -> dict[int, list[int]]:
    return {li: torch.nonzero(m == 0).flatten().tolist() for li, m in masks.items() if bool((m == 0).any())}
