"""Everything the ONP search computes once per model and reuses for every reward.

The clean data are pre-stacked float tensors, the model is traced once into a
:class:`MaskedNet` so any candidate mask is evaluated with one forward pass and no
weight copies, and the per-layer sizes are flattened into one global neuron index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...data.dataset import ImageSet
from ...models import ImageClassifier
from ...neurons import NeuronMap, discover_neurons
from ...neurons.probe import MaskedNet


@dataclass
class Batch:
    x: torch.Tensor  # float [0,1] on device
    y: torch.Tensor

    @classmethod
    def from_set(cls, data: ImageSet, device: torch.device) -> "Batch":
        """Channels-last images: measured 20% faster convolutions on this project's 2-core CPU."""
        x = data.float().to(device)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return cls(x, data.labels.to(device))


class ModelContext:
    """A model, its neuron map and its masked probe, on one device."""

    def __init__(self, model: ImageClassifier, device: torch.device, neurons: NeuronMap | None = None):
        self.model = model.to(device).eval()
        self.device = device
        self.neurons = neurons or discover_neurons(self.model, model.manifest.input_shape)
        self.net = MaskedNet(self.neurons).to(device).eval()
        self.sizes = [layer.size for layer in self.neurons.layers]
        self.offsets = torch.tensor([0] + self.sizes).cumsum(0).tolist()
        self.total = self.offsets[-1]

    def split_flat(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat [total] keep-mask → per-layer masks."""
        return [flat[self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.sizes))]

    def split_flat_batched(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample flat keep-masks [B, total] → per-layer [B, C] masks (one mask per image)."""
        return [flat[:, self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.sizes))]

    @torch.no_grad()
    def logits(self, flat_mask: torch.Tensor | None, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        self.net.set_masks(None if flat_mask is None else self.split_flat(flat_mask.to(self.device)))
        try:
            return torch.cat([self.net(x[i:i + chunk]) for i in range(0, len(x), chunk)])
        finally:
            self.net.set_masks(None)

    def accuracy(self, flat_mask: torch.Tensor | None, batch: Batch) -> float:
        return float((self.logits(flat_mask, batch.x).argmax(1) == batch.y).float().mean())

    def loss(self, flat_mask: torch.Tensor | None, batch: Batch) -> float:
        return float(F.cross_entropy(self.logits(flat_mask, batch.x), batch.y))
