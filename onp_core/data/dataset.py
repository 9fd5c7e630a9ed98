"""The in-memory image set every reader returns and every consumer takes.

Clean sets for repair are small (hundreds to a few thousand images), and even the
training sets used to make test subjects fit in memory as uint8, so one pre-stacked
tensor beats a per-item Dataset: batches are slices, and defenses can run a forward
pass over the whole set without a DataLoader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """uint8 images NCHW + int64 labels (+ optional class names).

    ``float()`` gives the model input convention: float32 in [0, 1].
    """

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    class_names: list[str] | None = None
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError("labels must be 1-D with one label per image")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def float(self) -> torch.Tensor:
        return self.images.float().div_(255.0)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.class_names, dict(self.meta))


def balanced_subset(data: ImageSet, n: int, seed: int = 0, exclude: torch.Tensor | None = None) -> ImageSet:
    """``n`` images with (as near as possible) equal counts per class, chosen by ``seed``.

    This is how a 1% clean set (500 CIFAR-10 images) is drawn: every class is
    represented, so a defense's accuracy signal is not dominated by a few classes.
    """
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(data.labels)
    pool = torch.ones(len(data), dtype=torch.bool)
    if exclude is not None:
        pool[exclude] = False
    per_class = [torch.nonzero((data.labels == c) & pool).flatten() for c in classes]
    base, extra = divmod(n, len(classes))
    chosen = []
    for i, idx in enumerate(per_class):
        k = min(len(idx), base + (1 if i < extra else 0))
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    index = torch.cat(chosen)
    index = index[torch.randperm(len(index), generator=g)]
    return data.subset(index)


def split(data: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Stratified split into (first, second) with ``fraction`` of each class in the second."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(data.labels):
        idx = torch.nonzero(data.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        second.append(idx[:k])
        first.append(idx[k:])
    return data.subset(torch.cat(first)), data.subset(torch.cat(second))
