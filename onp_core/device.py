"""Pick the compute device: a GPU when one is present, else the CPU."""
from __future__ import annotations

import torch


def resolve_device(requested: str | None = "auto") -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA device was requested but none is available")
    return dev
