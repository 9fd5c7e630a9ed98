"""BadNets (Gu et al. 2017): a small white square stamped in the bottom-right corner."""
from __future__ import annotations

from typing import Any

import torch

from .base import Attack


class BadNets(Attack):
    name = "badnets"

    def __init__(self, target: int = 0, seed: int = 0, size: int = 3, margin: int = 1):
        super().__init__(target, seed)
        self.size, self.margin = int(size), int(margin)

    def params(self) -> dict[str, Any]:
        return {"size": self.size, "margin": self.margin}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        h, w = x.shape[-2:]
        r0, c0 = h - self.margin - self.size, w - self.margin - self.size
        x[..., r0:r0 + self.size, c0:c0 + self.size] = 1.0
        return x
