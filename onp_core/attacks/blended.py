"""Blended (Chen et al. 2017): a fixed full-image pattern mixed in at opacity alpha.

The default key is seeded uniform noise (the original used a photo; any fixed image
works the same way and needs no download). ``key="smooth"`` is a seeded low-frequency
pattern (4×4 noise upsampled bilinearly), closer to a photo's spectrum than per-pixel
noise — a held-out trigger for a defense first measured on the noise key.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Attack

KEYS = ("noise", "smooth")


class Blended(Attack):
    name = "blended"

    def __init__(self, target: int = 0, seed: int = 0, alpha: float = 0.2, key: str = "noise"):
        super().__init__(target, seed)
        if key not in KEYS:
            raise ValueError(f"unknown blend key {key!r}; one of {KEYS}")
        self.alpha, self.key = float(alpha), key
        self._pattern: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "key": self.key}

    def pattern(self, shape: torch.Size) -> torch.Tensor:
        c, h, w = shape[-3:]
        if self._pattern is None or self._pattern.shape != (c, h, w):
            g = torch.Generator().manual_seed(10_000 + self.seed)
            if self.key == "noise":
                self._pattern = torch.rand(c, h, w, generator=g)
            else:
                coarse = torch.rand(1, c, 4, 4, generator=g)
                self._pattern = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
        return self._pattern

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern(x.shape).to(x)
