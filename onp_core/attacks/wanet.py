"""WaNet (Nguyen & Tran 2021): an imperceptible, fixed smooth warp of the image.

A random k×k flow field, upsampled and scaled by ``s``, warps triggered images. In
training, "noise mode" also warps some images with the trigger field plus random
jitter while keeping their true labels, so the network learns the exact warp and
not mere warping.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Attack


class WaNet(Attack):
    name = "wanet"

    def __init__(self, target: int = 0, seed: int = 0, k: int = 4, s: float = 0.5, cross_ratio: float = 2.0,
                 grid_rescale: float = 1.0):
        super().__init__(target, seed)
        self.k, self.s, self.cross_ratio, self.grid_rescale = int(k), float(s), float(cross_ratio), float(grid_rescale)
        self._grid: torch.Tensor | None = None
        self.noise_fraction = 0.0  # set by the trainer from the poison rate

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "s": self.s, "cross_ratio": self.cross_ratio}

    def grid(self, h: int, w: int) -> torch.Tensor:
        if self._grid is None or self._grid.shape[1:3] != (h, w):
            g = torch.Generator().manual_seed(20_000 + self.seed)
            ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
            ins = ins / ins.abs().mean()
            noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack((xs, ys), 2)[None]
            grid = identity + self.s * noise / h
            self._grid = torch.clamp(grid * self.grid_rescale, -1, 1)
        return self._grid

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid(*x.shape[-2:]).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True)

    def training_noise(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(len(x) * self.noise_fraction)
        if n == 0:
            return x, y
        h, w = x.shape[-2:]
        grid = self.grid(h, w).expand(n, -1, -1, -1)
        jitter = (torch.rand(n, h, w, 2) * 2 - 1) / h
        x = x.clone()
        x[:n] = F.grid_sample(x[:n], torch.clamp(grid + jitter, -1, 1), align_corners=True)
        return x, y
