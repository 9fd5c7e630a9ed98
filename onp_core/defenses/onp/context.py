"""Everything the ONP search computes once per model and reuses for every reward.

The clean data are pre-stacked float tensors, the model is traced once into a
:class:`MaskedNet` so any candidate mask is evaluated with one forward pass and no
weight copies, and the per-layer sizes are flattened into one global neuron index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """A model, its neuron map and its masked probe, on one device.

    ``bf16`` runs the forwards that only rank or compare — rewards and the flip guard's
    references, leave-one-out effects, trigger scores — under bfloat16 autocast: they are
    most of the search's time (CIFAR-10 small CNN: 65.7 → 43.0 s per repair). The trigger
    synthesis, the re-attack, parameters and reported accuracies stay float32: bf16
    synthesis found the same suspects but moved a clean model's weak natural trigger
    enough to change what was pruned (4 runs: −3.7 points on average against −2.4,
    docs/ONP.md, Speed).
    """

    def __init__(self, model: ImageClassifier, device: torch.device, neurons: NeuronMap | None = None,
                 bf16: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.bf16 = bf16
        self.neurons = neurons or discover_neurons(self.model, model.manifest.input_shape)
        self.net = MaskedNet(self.neurons).to(device).eval()
        self.sizes = [layer.size for layer in self.neurons.layers]
        self.offsets = torch.tensor([0] + self.sizes).cumsum(0).tolist()
        self.total = self.offsets[-1]

    def images_per_forward(self, at_32px: int) -> int:
        """A forward's image count, ``at_32px`` for inputs up to 32×32 and scaled down by the image area
        beyond (a 224×224 forward holds ~49× a 32×32 one's activations), at least 1."""
        h, w = self.model.manifest.input_shape[-2:]
        return max(1, min(at_32px, at_32px * 32 * 32 // (h * w)))

    def split_flat(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat [total] keep-mask → per-layer masks."""
        return [flat[self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.sizes))]

    def fast(self, exact: bool = False) -> torch.autocast:
        """The precision for forwards that only rank or count (see the class docstring); float32 when ``exact``."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not exact)

    @torch.no_grad()
    def logits(self, flat_mask: torch.Tensor | None, x: torch.Tensor, chunk: int | None = None,
               exact: bool = False) -> torch.Tensor:
        """Float32 logits under a flat keep-mask, at the ranking precision unless ``exact`` (reported numbers)."""
        chunk = chunk or self.images_per_forward(1024)
        self.net.set_masks(None if flat_mask is None else self.split_flat(flat_mask.to(self.device)))
        try:
            with self.fast(exact):
                return torch.cat([self.net(x[i:i + chunk]) for i in range(0, len(x), chunk)]).float()
        finally:
            self.net.set_masks(None)

    def prefix_cache(self, x: torch.Tensor) -> "PrefixCache":
        return PrefixCache(self, x)

    def accuracy(self, flat_mask: torch.Tensor | None, batch: Batch) -> float:
        """Reported accuracy, in float32."""
        return float((self.logits(flat_mask, batch.x, exact=True).argmax(1) == batch.y).float().mean())


class PrefixCache:
    """Logits of one fixed input under many candidate masks, reusing the unmasked prefix.

    A candidate leaves every layer before its first pruned one untouched, so those layers'
    outputs for this input are computed once per cut and only the rest of the network is
    re-run. Measured on the ONP search (CIFAR-10 small CNN): the first pruned layer of the
    rewarded candidates is spread over all six layers, and replaying a repair's 242 rewards
    took 5.2 s instead of 9.1 s (docs/ONP.md, Speed). The input is cut into chunks of
    ``ctx.logits``'s size, each run through head and tail as a batch of its own (so nothing
    assumes where a boundary value keeps its batch dimension). The cache is only valid while
    the weights do not change: build a new one after pruning.
    """

    def __init__(self, ctx: ModelContext, x: torch.Tensor, max_bytes: int = 1 << 30, chunk: int | None = None):
        self.ctx, self.x, self.max_bytes = ctx, x, max_bytes
        self.chunk = chunk or ctx.images_per_forward(1024)
        self.saved: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.bytes = 0

    @torch.no_grad()
    def logits(self, flat_mask: torch.Tensor | None) -> torch.Tensor:
        """Same values as ``ctx.logits(flat_mask, x)`` (ranking precision)."""
        ctx = self.ctx
        masks = None if flat_mask is None else ctx.split_flat(flat_mask.to(ctx.device))
        first = None if masks is None else ctx.net.first_masked_layer(masks)
        if first is None or len(self.x) == 0:
            return ctx.logits(flat_mask, self.x, chunk=self.chunk)
        net = ctx.net
        with ctx.fast():
            if first not in self.saved:
                if self.bytes >= self.max_bytes:  # a wide network: memory before speed
                    return ctx.logits(flat_mask, self.x, chunk=self.chunk)
                net.set_masks(None)
                head = net.head(first)
                self.saved[first] = [tuple(head(self.x[i:i + self.chunk])) for i in range(0, len(self.x), self.chunk)]
                # the boundary may hold sizes (a transformer's reshapes read the batch size) besides tensors
                self.bytes += sum(t.numel() * t.element_size() for part in self.saved[first] for t in part
                                  if isinstance(t, torch.Tensor))
            net.set_masks(masks)
            try:
                tail = net.tail(first)
                out = torch.cat([tail(*part) for part in self.saved[first]])
            finally:
                net.set_masks(None)
        return out.float()
