"""``.npz`` clean-data uploads: arrays ``x`` (images) and ``y`` (labels).

Accepted (documented for users):

- ``x``: ``N×H×W`` (greyscale), ``N×H×W×C`` (NHWC) or ``N×C×H×W`` (NCHW) with ``C`` 1 or 3.
  When both layouts fit (``H`` or ``W`` is 1 or 3 as well) the model's expected shape decides;
  without one the upload is refused as ambiguous.
- dtype ``uint8``; other integer dtypes if every value is in 0..255; float dtypes if every value
  is finite and in [0, 1] — they are scaled by 255 and rounded to uint8 (the model's input
  convention is float in [0, 1], so this loses at most half a grey level). Floats above 1 are
  refused rather than guessed at (they are usually 0..255 floats or normalised data).
- ``y``: integer dtype, shape ``N`` (or ``N×1``), values ``>= 0`` (and ``< num_classes`` when known).

Safety: the archive is inspected with :mod:`zipfile` before any array is read: members must be
``x.npy`` and ``y.npy`` only, no encryption, declared sizes and compression ratios within
limits; each ``.npy`` header is parsed first (dtype and shape, no pickled object arrays —
``allow_pickle=False``) and the declared array size must equal the member's size, so the
array read is bounded by bytes we have already accounted for.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageSet
from .limits import DataFormatError, UploadLimits, check_expected_shape, shape_text

_MIB = 1 << 20


def _read_npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: UploadLimits) -> np.ndarray:
    name = info.filename
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataFormatError(f"{name}: unsupported .npy format version {version}")
        except DataFormatError:
            raise
        except Exception as exc:  # numpy raises ValueError/SyntaxError/... for a malformed header
            raise DataFormatError(f"{name} is not a valid .npy array: {exc}") from None
        if dtype.hasobject or dtype.kind in "OVSUaMm":
            raise DataFormatError(f"{name} has dtype {dtype}; only numeric arrays are accepted "
                                  "(object/string/structured arrays are refused)")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        nbytes = count * dtype.itemsize
        if nbytes > limits.max_total_bytes:
            raise DataFormatError(f"{name} declares {nbytes} bytes ({shape}), over the limit of "
                                  f"{limits.max_total_bytes} bytes")
        header_len = f.tell()
        if header_len + nbytes != info.file_size:
            raise DataFormatError(f"{name} is truncated or padded: its header declares shape {shape} "
                                  f"({nbytes} data bytes) but the member holds {info.file_size - header_len}")
        data = bytearray(nbytes)  # writable, so torch.from_numpy can share it without a copy
        view, got = memoryview(data), 0
        try:
            while got < nbytes:
                k = f.readinto(view[got:got + (8 << 20)])
                if not k:
                    break
                got += k
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise DataFormatError(f"{name} is corrupt: {exc}") from None
        if got != nbytes:
            raise DataFormatError(f"{name} is truncated")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    if fortran:
        return arr.reshape(shape[::-1]).transpose()
    return arr.reshape(shape)


def _open_members(path: Path, limits: UploadLimits) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataFormatError(f"not a valid .npz file (it must be a zip of .npy arrays): {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > 16:
            raise DataFormatError(f"the .npz holds {len(infos)} arrays; expected just x and y")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise DataFormatError("the .npz has duplicate member names")
        allowed = {"x.npy", "y.npy"}
        unexpected = sorted(set(names) - allowed)
        if unexpected:
            raise DataFormatError(f"unexpected arrays in the .npz: {unexpected}; it must hold exactly 'x' and 'y'")
        missing = sorted(a.removesuffix(".npy") for a in allowed - set(names))
        if missing:
            raise DataFormatError(f"the .npz lacks array(s) {missing}; it must hold 'x' (images) and 'y' (labels)")
        total = 0
        for info in infos:
            if info.flag_bits & 0x1:
                raise DataFormatError(f"{info.filename} is encrypted; upload an unencrypted .npz")
            total += info.file_size
            if info.file_size > _MIB and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
                raise DataFormatError(f"{info.filename} declares a compression ratio of "
                                      f"{info.file_size / max(info.compress_size, 1):.0f}:1, over the limit of "
                                      f"{limits.max_compression_ratio:g}:1 (zip bomb?)")
        if total > limits.max_total_bytes + 4096:
            raise DataFormatError(f"the .npz declares {total} uncompressed bytes, over the limit of "
                                  f"{limits.max_total_bytes}")
        return {i.filename.removesuffix(".npy"): _read_npy_member(zf, i, limits) for i in infos}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_ or x.dtype.kind == "c":
        raise DataFormatError(f"x has dtype {x.dtype}; images must be uint8 (0..255) or float in [0, 1]")
    if x.dtype.kind in "iu":
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataFormatError(f"x has dtype {x.dtype} with values in {lo}..{hi}; integer images must be in 0..255")
        return x.astype(np.uint8)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise DataFormatError("x contains NaN or infinite values")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise DataFormatError(f"x is float with values in [{lo:g}, {hi:g}]; float images must be in [0, 1] "
                                  "(store 0..255 pixel values as uint8)")
        return np.rint(x.astype(np.float32) * 255.0).astype(np.uint8)
    raise DataFormatError(f"x has unsupported dtype {x.dtype}")


def _to_nchw(x: np.ndarray, expected_shape: tuple[int, int, int] | None) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise DataFormatError(f"x must be N×H×W, N×H×W×C or N×C×H×W; got {x.ndim} dimensions {tuple(x.shape)}")
    nchw_ok = x.shape[1] in (1, 3)
    nhwc_ok = x.shape[3] in (1, 3)
    if nchw_ok and nhwc_ok:
        if expected_shape is not None:
            c, h, w = expected_shape
            if tuple(x.shape[1:]) == (c, h, w):
                return x
            if tuple(x.shape[1:]) == (h, w, c):
                return x.transpose(0, 3, 1, 2)
        raise DataFormatError(f"x has ambiguous shape {tuple(x.shape)}: both N×C×H×W and N×H×W×C fit")
    if nchw_ok:
        return x
    if nhwc_ok:
        return x.transpose(0, 3, 1, 2)
    raise DataFormatError(f"x has shape {tuple(x.shape)}: images need 1 (greyscale) or 3 (RGB) channels, "
                          "as N×H×W, N×H×W×C or N×C×H×W")


def _labels(y: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataFormatError(f"y must be a 1-D array of class indices; got shape {tuple(y.shape)}"
                              + (" (one-hot labels are not accepted)" if y.ndim == 2 else ""))
    if y.dtype.kind not in "iu":
        raise DataFormatError(f"y has dtype {y.dtype}; labels must be integers")
    if len(y) != n:
        raise DataFormatError(f"x has {n} images but y has {len(y)} labels")
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataFormatError(f"labels must be >= 0; found {lo}")
        if num_classes is not None and hi >= num_classes:
            raise DataFormatError(f"label {hi} is out of range: the model has {num_classes} classes "
                                  f"(0..{num_classes - 1})")
        if hi >= 100_000:
            raise DataFormatError(f"label {hi} is implausibly large")
    return y.astype(np.int64)


def read_npz(path: Path, limits: UploadLimits, num_classes: int | None = None,
             expected_shape: tuple[int, int, int] | None = None) -> ImageSet:
    arrays = _open_members(path, limits)
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataFormatError("the .npz holds no images (x is empty)")
    if x.shape[0] > limits.max_images:
        raise DataFormatError(f"the .npz holds {x.shape[0]} images, over the limit of {limits.max_images}")
    x = _to_nchw(x, expected_shape)
    _, c, h, w = x.shape
    if max(h, w) > limits.max_side:
        raise DataFormatError(f"images are {w}×{h} pixels, over the limit of {limits.max_side} per side")
    if min(h, w) < 1:
        raise DataFormatError(f"images have an empty side: {shape_text(c, h, w)}")
    labels = _labels(y, x.shape[0], num_classes)
    check_expected_shape((int(c), int(h), int(w)), expected_shape)
    x = _to_uint8(x)
    images = torch.from_numpy(np.ascontiguousarray(x))
    return ImageSet(images, torch.from_numpy(np.ascontiguousarray(labels)), None, {"format": "npz"})
