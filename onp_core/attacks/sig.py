"""SIG (Barni et al. 2019): clean-label attack with a horizontal sinusoidal signal.

Only target-class training images carry the signal and keep their labels, so the
model learns "sinusoid ⇒ target" without any mislabelled sample.
"""
from __future__ import annotations

from typing import Any

import math

import torch

from .base import Attack


class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, target: int = 0, seed: int = 0, delta: float = 20 / 255, frequency: int = 6):
        super().__init__(target, seed)
        self.delta, self.frequency = float(delta), int(frequency)

    def params(self) -> dict[str, Any]:
        return {"delta": self.delta, "frequency": self.frequency}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        cols = torch.arange(w, dtype=x.dtype)
        signal = self.delta * torch.sin(2 * math.pi * cols * self.frequency / w)
        return (x + signal.view(1, 1, 1, w)).clamp(0, 1)
