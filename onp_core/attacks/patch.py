"""BadNets (Gu et al. 2017): a small square stamped at a fixed place.

The default is the classic white square in the bottom-right corner. ``pattern`` and
``position`` make other patch triggers for held-out checks (a defense tuned on the
white corner square should not depend on either): a black-and-white checkerboard, or a
seeded random grey/colour patch, in any corner or the centre.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Attack

PATTERNS = ("white", "checker", "random")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


class BadNets(Attack):
    name = "badnets"

    def __init__(self, target: int = 0, seed: int = 0, size: int = 3, margin: int = 1, pattern: str = "white",
                 position: str = "bottom-right"):
        super().__init__(target, seed)
        if pattern not in PATTERNS:
            raise ValueError(f"unknown patch pattern {pattern!r}; one of {PATTERNS}")
        if position not in POSITIONS:
            raise ValueError(f"unknown patch position {position!r}; one of {POSITIONS}")
        self.size, self.margin, self.pattern, self.position = int(size), int(margin), pattern, position

    def params(self) -> dict[str, Any]:
        return {"size": self.size, "margin": self.margin, "pattern": self.pattern, "position": self.position}

    def _corner(self, h: int, w: int) -> tuple[int, int]:
        far_r, far_c = h - self.margin - self.size, w - self.margin - self.size
        if self.position == "center":
            return (h - self.size) // 2, (w - self.size) // 2
        row = self.margin if self.position.startswith("top") else far_r
        col = self.margin if self.position.endswith("left") else far_c
        return row, col

    def _patch(self, channels: int) -> torch.Tensor:
        s = self.size
        if self.pattern == "white":
            return torch.ones(channels, s, s)
        if self.pattern == "checker":
            grid = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2
            return grid.float().expand(channels, s, s)
        g = torch.Generator().manual_seed(20_000 + self.seed)
        return torch.rand(channels, s, s, generator=g)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        r0, c0 = self._corner(*x.shape[-2:])
        x[..., r0:r0 + self.size, c0:c0 + self.size] = self._patch(x.shape[-3]).to(x)
        return x
