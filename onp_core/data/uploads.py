"""Readers for user-uploaded clean data (.npz, image folders in .zip/.tar).

Uploads are untrusted: every reader bounds memory and time and raises
:class:`DataFormatError` with a reason a user can act on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageSet


class DataFormatError(ValueError):
    """The clean-data upload is malformed; the message says precisely why."""


@dataclass(frozen=True)
class UploadLimits:
    max_images: int = 100_000
    max_side: int = 512
    max_total_bytes: int = 2 << 30  # decoded size across all images
    max_members: int = 200_000  # archive entries


def read_clean_data(path: str | Path, limits: UploadLimits = UploadLimits(), num_classes: int | None = None) -> ImageSet:
    """Read an uploaded clean set; format by extension. (.npz only for now — extended in archives.)"""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise DataFormatError(f"unsupported clean-data format {path.suffix!r}")
    with np.load(path, allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    data = ImageSet(torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8))), torch.from_numpy(y.astype(np.int64)))
    if num_classes is not None and int(data.labels.max()) >= num_classes:
        raise DataFormatError("labels out of range")
    return data
