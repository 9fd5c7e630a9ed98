"""Blended (Chen et al. 2017): a fixed full-image pattern mixed in at opacity alpha.

The pattern is seeded uniform noise (the original used a photo; any fixed image
works the same way and needs no download).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Attack


class Blended(Attack):
    name = "blended"

    def __init__(self, target: int = 0, seed: int = 0, alpha: float = 0.2):
        super().__init__(target, seed)
        self.alpha = float(alpha)
        self._pattern: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def pattern(self, shape: torch.Size) -> torch.Tensor:
        c, h, w = shape[-3:]
        if self._pattern is None or self._pattern.shape != (c, h, w):
            g = torch.Generator().manual_seed(10_000 + self.seed)
            self._pattern = torch.rand(c, h, w, generator=g)
        return self._pattern

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern(x.shape)
