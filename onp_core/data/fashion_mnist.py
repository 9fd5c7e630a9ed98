"""Fashion-MNIST from IDX files (Debian package ``dataset-fashion-mnist``)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageSet

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX data is supported")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for cand in (directory / f"{stem}.gz", directory / stem):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{stem}(.gz) not found in {directory} (apt-get install dataset-fashion-mnist)")


def load_fashion_mnist(split: str = "train", directory: str | Path | None = None) -> ImageSet:
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    directory = Path(directory or os.environ.get("ONP_FMNIST_DIR", DEFAULT_DIR))
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    images = torch.from_numpy(x.copy()).unsqueeze(1)
    return ImageSet(images, torch.from_numpy(y.astype(np.int64)), list(CLASSES),
                    {"dataset": "fashion_mnist", "split": split})
