"""CIFAR-10 from the JPEG zip in ``shared/data`` (train/<class>/*.jpg, test/<class>/*.jpg).

Decoding 60k JPEGs takes tens of seconds, so the decoded uint8 arrays are cached as
``.pt`` tensors (our own files, loaded with ``weights_only=True``).
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cache import cache_dir
from .dataset import ImageSet

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def default_zip_path() -> Path:
    """``$ONP_CIFAR10_ZIP``, else ``shared/data/cifar10-jpeg.zip`` beside the repository."""
    env = os.environ.get("ONP_CIFAR10_ZIP")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data" / "cifar10-jpeg.zip"


def _decode(zip_path: Path, split: str) -> ImageSet:
    images, labels = [], []
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))
        for name in names:
            cls = name.split("/")[1]
            with Image.open(io.BytesIO(zf.read(name))) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(CLASSES.index(cls))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels), list(CLASSES), {"dataset": "cifar10", "split": split})


def load_cifar10(split: str = "train", zip_path: str | Path | None = None) -> ImageSet:
    """The whole ``train`` (50k) or ``test`` (10k) split, decoded once and cached."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    zip_path = Path(zip_path) if zip_path else default_zip_path()
    if not zip_path.exists():
        raise FileNotFoundError(f"CIFAR-10 zip not found at {zip_path} (set ONP_CIFAR10_ZIP)")
    cached = cache_dir() / f"cifar10-{split}.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=True)
        return ImageSet(blob["x"], blob["y"], list(CLASSES), {"dataset": "cifar10", "split": split})
    data = _decode(zip_path, split)
    # a private temp name: two processes decoding at once (two workers, two bench jobs)
    # must not rename each other's half-written file
    fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix=cached.name, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        torch.save({"x": data.images, "y": data.labels}, tmp)
        tmp.replace(cached)
    finally:
        tmp.unlink(missing_ok=True)
    return data
