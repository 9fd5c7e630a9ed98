"""Pick the compute device: a GPU when one is present, else the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_LIMIT = 256 << 20
_heap_tuned: bool | None = None


def keep_large_buffers_on_the_heap() -> bool:
    """Let glibc reuse freed tensor buffers up to 256 MiB instead of returning them to the kernel.

    glibc serves an allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with
    fresh pages from the kernel and unmaps it on free, so a loop that allocates the same 20–70 MB
    activations every step page-faults and zeroes them every step: 12.5 M minor faults in one ONP
    repair of the CIFAR-10 small CNN, 0.4 M with the buffers kept (peak RSS 1.10 → 1.30 GB). The mask
    family's 100 synthesis steps took 15.2–15.6 s against 10.6–11.0 s (2 threads; docs/ONP.md, Speed).
    Process-wide and applied once, like flush-to-zero in :func:`resolve_device`; skipped where the
    user set glibc's own ``MALLOC_*_THRESHOLD_`` variables, and a no-op without glibc. Returns
    whether the thresholds are set.
    """
    global _heap_tuned
    if _heap_tuned is None:
        _heap_tuned = False
        if not any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
            try:
                mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc (macOS, Windows)
                return False
            _heap_tuned = (mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT) == 1
                           and mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT) == 1)
    return _heap_tuned


def resolve_device(requested: str | None = "auto") -> torch.device:
    """The device to run on; also turns on flush-to-zero for CPU float math and keeps tensor buffers on the heap.

    Denormal floats (tiny values that appear in pruned or unlearned networks, and in
    mask optimisation) make x86 CPU kernels 10× slower; flushing them to zero costs
    no accuracy that matters here, so every training and repair entry point sets it.
    The heap setting (:func:`keep_large_buffers_on_the_heap`) saves the page faults of
    reallocating the same activations every step.
    """
    torch.set_flush_denormal(True)
    keep_large_buffers_on_the_heap()
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA device was requested but none is available")
    return dev


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 kernels beat float32 here: a GPU with bf16, or a CPU with native bf16 (AVX512-BF16/AMX).

    Without native support oneDNN emulates bf16 and it is slower than float32, so
    ``precision="auto"`` only switches where it pays (measured on this project's
    AVX512-BF16 CPU: a 528-image forward of the small CNN 0.57 s → 0.31 s).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve a ``precision`` option (auto, fp32, bf16) for ``device``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; one of auto, fp32, bf16")
    return precision == "bf16" or (precision == "auto" and bf16_is_fast(device))
