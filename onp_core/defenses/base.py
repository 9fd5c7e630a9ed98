"""One interface for every defense: ``repair(model, clean, config, progress) -> RepairResult``.

ONP and the baselines are interchangeable behind it, so the service, the CLI and the
benchmark treat them alike. A defense receives only the model and clean data; it
never sees an attack, a trigger or poisoned data.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.dataset import ImageSet, split
from ..metrics import accuracy
from ..models import ImageClassifier

ProgressCallback = Callable[[int, int, dict[str, Any]], None]
"""``progress(step, total, info)``; ``info['phase']`` names the current phase. It may
raise :class:`RepairCancelled` to stop the search (the service's cancel button)."""


class RepairCancelled(Exception):
    """Raised from a progress callback to stop a running repair."""


class DefenseConfig(BaseModel):
    """Options shared by every defense; each method subclasses it with its own."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seed for every random choice (splits, masks, agents)")
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    val_fraction: float = Field(0.2, ge=0.05, le=0.5, description="held-out share of the clean data for selection")


@dataclass
class RepairResult:
    """What a defense returns: the repaired model and how it got there."""

    model: ImageClassifier
    method: str
    pruned: dict[str, list[int]]  # neuron layer name -> pruned channel indices
    clean_acc_before: float  # on the held-out clean split
    clean_acc_after: float
    seconds: float
    trace: list[dict[str, Any]] = field(default_factory=list)  # per step: reward/loss/acc… for plots
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())


class Defense(Protocol):
    name: str
    config_class: type[DefenseConfig]

    def __call__(self, model: ImageClassifier, clean: ImageSet, config: DefenseConfig,
                 progress: ProgressCallback | None = None) -> RepairResult: ...


def clean_splits(clean: ImageSet, config: DefenseConfig) -> tuple[ImageSet, ImageSet]:
    """(search split, held-out split): the held-out part is only for choosing/reporting."""
    return split(clean, config.val_fraction, seed=config.seed)


def working_copy(model: ImageClassifier) -> ImageClassifier:
    """Defenses never modify the caller's model."""
    return copy.deepcopy(model).eval()


def report(progress: ProgressCallback | None, step: int, total: int, phase: str, **info: Any) -> None:
    if progress is not None:
        progress(step, total, {"phase": phase, **info})


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def held_out_accuracy(model: ImageClassifier, data: ImageSet, device: torch.device | str = "cpu") -> float:
    return accuracy(model, data, device)
