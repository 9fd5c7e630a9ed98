"""Pick the compute device: a GPU when one is present, else the CPU."""
from __future__ import annotations

import torch


def resolve_device(requested: str | None = "auto") -> torch.device:
    """The device to run on; also turns on flush-to-zero for CPU float math.

    Denormal floats (tiny values that appear in pruned or unlearned networks, and in
    mask optimisation) make x86 CPU kernels 10× slower; flushing them to zero costs
    no accuracy that matters here, so every training and repair entry point sets it.
    """
    torch.set_flush_denormal(True)
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA device was requested but none is available")
    return dev
