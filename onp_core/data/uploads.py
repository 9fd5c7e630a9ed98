"""Readers for user-uploaded clean data (.npz, image folders in .zip/.tar).

Uploads are untrusted: every reader bounds memory and time and raises
:class:`DataFormatError` with a reason a user can act on; no other exception type
escapes :func:`read_clean_data` for a malformed upload.

Formats (by extension, confirmed by the file's magic bytes):

- ``.npz`` — arrays ``x`` and ``y``; see :mod:`onp_core.data.npz` for dtypes and layouts;
- ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``/``.tbz2``, ``.tar.xz``/``.txz`` — one
  folder per class; see :mod:`onp_core.data.archives` for the layout rules (class order,
  wrapper and ``train``/``test`` split folders, which files are ignored).

The result is always uint8 NCHW. ``expected_shape`` (C, H, W) is the model's input: the
images must match it ("images are 28×28×1, the model expects 32×32×3"); archives are
converted to its channel count, ``.npz`` arrays are not.
"""
from __future__ import annotations

from pathlib import Path

from .archives import read_image_archive
from .dataset import ImageSet
from .limits import DataFormatError, UploadLimits
from .npz import read_npz

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def detect_data_format(path: Path) -> str:
    """``npz``, ``zip`` or ``tar``; the extension must agree with the file's first bytes."""
    name = path.name.lower()
    if name.endswith(".npz"):
        kind = "npz"
    elif name.endswith(".zip"):
        kind = "zip"
    elif name.endswith(_TAR_SUFFIXES):
        kind = "tar"
    else:
        raise DataFormatError(f"unsupported clean-data format {path.suffix or path.name!r}; "
                              "upload .npz, .zip, .tar or .tar.gz")
    with open(path, "rb") as f:
        head = f.read(512)
    if kind in ("npz", "zip"):
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")):
            raise DataFormatError(f"{path.name} is not a zip archive (a .{kind} file must be one)")
    else:
        compressed = head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))
        if not compressed and not (len(head) >= 262 and head[257:262] == b"ustar") and len(head) < 512:
            raise DataFormatError(f"{path.name} is not a tar archive")
    return kind


def read_clean_data(path: str | Path, limits: UploadLimits = UploadLimits(), num_classes: int | None = None,
                    expected_shape: tuple[int, int, int] | None = None, *, split: str | None = None) -> ImageSet:
    """Read an uploaded clean set into an :class:`ImageSet` (uint8 NCHW + int64 labels).

    ``num_classes``: labels/class folders must fit the model; ``expected_shape``: the model's
    (C, H, W); ``split``: which split folder of an archive to read (default ``train``).
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise DataFormatError(f"{path.name}: no such upload file")
        size = path.stat().st_size
    except OSError as exc:
        raise DataFormatError(f"cannot read the upload: {exc.strerror}") from None
    if size > limits.max_upload_bytes:
        raise DataFormatError(f"the upload is {size} bytes, over the limit of {limits.max_upload_bytes}")
    if size == 0:
        raise DataFormatError("the upload is empty")
    if expected_shape is not None:
        expected_shape = tuple(int(v) for v in expected_shape)  # type: ignore[assignment]
    kind = detect_data_format(path)
    try:
        if kind == "npz":
            if split is not None:
                raise DataFormatError("split= applies to image archives, not .npz")
            data = read_npz(path, limits, num_classes, expected_shape)
        else:
            data = read_image_archive(path, kind, limits, num_classes, expected_shape, split)
    except DataFormatError:
        raise
    except MemoryError:
        raise DataFormatError("the upload needs more memory than is available; upload fewer images") from None
    except RecursionError:
        raise DataFormatError("the upload is malformed (nesting too deep)") from None
    data.meta.setdefault("source", path.name)
    return data


__all__ = ["DataFormatError", "UploadLimits", "detect_data_format", "read_clean_data"]
