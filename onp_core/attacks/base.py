"""The attack interface: make poisoned training sets and triggered test sets.

Attacks exist to manufacture test subjects and to *report* ASR. No defense may call
them: a defense sees only the model and clean data.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..data.dataset import ImageSet


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


class Attack(ABC):
    """An all-to-one backdoor: images with the trigger should be classified as ``target``."""

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False

    def __init__(self, target: int = 0, seed: int = 0):
        self.target = int(target)
        self.seed = int(seed)

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Add the trigger to float images NCHW in [0, 1]; returns a new tensor."""

    def params(self) -> dict[str, Any]:
        """Attack-specific parameters, enough to rebuild the trigger (see :meth:`spec`)."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"attack": self.name, "target": self.target, "seed": self.seed, **self.params()}

    def apply_uint8(self, images: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        out = torch.empty_like(images)
        for i in range(0, len(images), batch):
            out[i:i + batch] = to_uint8(self.apply(images[i:i + batch].float() / 255.0))
        return out

    def poison_indices(self, data: ImageSet, rate: float) -> torch.Tensor:
        """Which training images get the trigger: ``rate`` of the whole set.

        Dirty-label attacks take them from non-target classes and relabel; clean-label
        attacks (SIG) take them from the target class and keep the label.
        """
        g = torch.Generator().manual_seed(self.seed + 1)
        mask = data.labels == self.target if self.clean_label else data.labels != self.target
        pool = torch.nonzero(mask).flatten()
        k = min(len(pool), int(round(rate * len(data))))
        return pool[torch.randperm(len(pool), generator=g)[:k]]

    def poison_training_set(self, data: ImageSet, rate: float, defer_trigger: bool = False) -> ImageSet:
        """Relabel (dirty-label) and trigger ``rate`` of the set; ``meta['poisoned']`` marks them.

        With ``defer_trigger`` the images stay clean and the trainer stamps the trigger
        *after* data augmentation (``meta['deferred_trigger']``), so random crops and
        flips do not move or mirror it — the attacker controls the poisoned samples
        and would present the trigger as it appears at test time.
        """
        idx = self.poison_indices(data, rate)
        images, labels = data.images.clone(), data.labels.clone()
        if not defer_trigger:
            images[idx] = self.apply_uint8(images[idx])
        if not self.clean_label:
            labels[idx] = self.target
        poisoned = torch.zeros(len(data), dtype=torch.bool)
        poisoned[idx] = True
        meta = dict(data.meta, poisoned=poisoned, attack=self.spec(), poison_rate=rate, deferred_trigger=defer_trigger)
        return ImageSet(images, labels, data.class_names, meta)

    def triggered_test_set(self, data: ImageSet) -> ImageSet:
        """Test images whose true class is not the target, with the trigger; labels stay true.

        ASR is the fraction of these classified as the target; RA the fraction still
        classified correctly.
        """
        keep = torch.nonzero(data.labels != self.target).flatten()
        sub = data.subset(keep)
        meta = dict(sub.meta, triggered=True, attack=self.spec())
        return ImageSet(self.apply_uint8(sub.images), sub.labels, sub.class_names, meta)

    def training_noise(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for attacks that alter batches during training (WaNet's noise mode)."""
        return x, y
