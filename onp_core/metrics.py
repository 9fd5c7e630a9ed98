"""ACC, ASR, RA and DER — the numbers every defense is judged by.

DER (defense effectiveness rating, BackdoorBench) = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2,
where ΔASR = ASR_before − ASR_after and ΔACC = ACC_before − ACC_after; 1 is perfect.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data.dataset import ImageSet


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000, device: str | torch.device = "cpu") -> torch.Tensor:
    """Predicted labels for uint8 (or [0,1] float) NCHW images, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        out.append(model(x).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _accuracy_of(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


def accuracy(model: nn.Module, data: ImageSet, device: str | torch.device = "cpu") -> float:
    """Fraction of ``data`` classified correctly (clean accuracy, or RA on a triggered set)."""
    if len(data) == 0:
        return float("nan")
    return _accuracy_of(predict(model, data.images, device=device), data.labels)


def _recall_of(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    out: list[float | None] = []
    for k in range(num_classes):
        mine = labels == k
        out.append(float((pred[mine] == k).float().mean()) if bool(mine.any()) else None)
    return out


def class_recall(model: nn.Module, data: ImageSet, num_classes: int,
                 device: str | torch.device = "cpu") -> list[float | None]:
    """Per-class accuracy on ``data`` (None for a class with no images).

    Overall accuracy hides a repair that erased one class: on a 10-class set, losing most of
    one class costs only a few points (docs/ONP.md §1m), so the service reports every class.
    """
    return _recall_of(predict(model, data.images, device=device), data.labels, num_classes)


def erased_classes(before: list[float | None], after: list[float | None], min_drop: float = 0.2) -> list[int]:
    """Classes whose recall fell by at least ``min_drop`` and to under half of what it was."""
    return [k for k, (b, a) in enumerate(zip(before, after))
            if b is not None and a is not None and b - a >= min_drop and a < b / 2]


def erased_class_warnings(before: list[float | None], after: list[float | None]) -> list[str]:
    """One line per class :func:`erased_classes` finds, for a report or a job's metrics."""
    return [f"class {k}'s clean accuracy fell from {100 * before[k]:.0f}% to {100 * after[k]:.0f}%: "  # type: ignore[operator]
            "the repair may have removed the class rather than a backdoor" for k in erased_classes(before, after)]


def attack_success_rate(model: nn.Module, triggered: ImageSet, target: int, device: str | torch.device = "cpu") -> float:
    """Fraction of triggered non-target-class images classified as ``target``."""
    keep = triggered.labels != target
    if not bool(keep.any()):
        return float("nan")
    pred = predict(model, triggered.images[keep], device=device)
    return float((pred == target).float().mean())


@dataclass
class Metrics:
    acc: float
    asr: float | None = None
    ra: float | None = None
    class_recall: list[float | None] | None = None  # per-class accuracy on the clean set, when asked for

    def as_dict(self) -> dict[str, float | None]:
        """The headline numbers (ACC, ASR, RA); per-class accuracy is reported on its own."""
        return {"acc": self.acc, "asr": self.asr, "ra": self.ra}


def evaluate(model: nn.Module, clean: ImageSet, triggered: ImageSet | None = None, target: int | None = None,
             device: str | torch.device = "cpu", num_classes: int | None = None) -> Metrics:
    """ACC on ``clean``; ASR and RA too when a triggered set and its target are given; per-class
    accuracy too when ``num_classes`` is given, from the same predictions (one pass over ``clean``)."""
    pred = predict(model, clean.images, device=device)
    acc = _accuracy_of(pred, clean.labels)
    recall = _recall_of(pred, clean.labels, num_classes) if num_classes is not None else None
    if triggered is None or target is None:
        return Metrics(acc, class_recall=recall)
    return Metrics(acc, attack_success_rate(model, triggered, target, device), accuracy(model, triggered, device),
                   recall)


def der(before: Metrics, after: Metrics) -> float | None:
    """Defense effectiveness rating in [0, 1]; None when ASR is unknown."""
    if before.asr is None or after.asr is None:
        return None
    d_asr = max(0.0, before.asr - after.asr)
    d_acc = max(0.0, before.acc - after.acc)
    return (d_asr - d_acc + 1) / 2
