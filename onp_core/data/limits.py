"""Limits and the error type shared by the clean-data upload readers.

Public names are re-exported by :mod:`onp_core.data.uploads`; they live here so the
format readers (:mod:`.npz`, :mod:`.archives`) can import them without a cycle.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


class DataFormatError(ValueError):
    """The clean-data upload is malformed; the message says precisely why."""


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one clean-data upload may cost. Every check happens before the work it bounds."""

    max_images: int = 100_000
    max_side: int = 512  # largest image width or height (checked from the header, before decoding)
    max_total_bytes: int = 2 << 30  # decoded pixel bytes across all images (and npz array bytes)
    max_members: int = 200_000  # archive entries, directories included
    max_upload_bytes: int = 2 << 30  # the uploaded file itself, before anything is parsed
    max_member_bytes: int = 32 << 20  # one decompressed archive member (one image file)
    max_archive_bytes: int = 4 << 30  # all decompressed archive bytes (tar headers and skipped files included)
    max_compression_ratio: float = 200.0  # per zip member, for members over 1 MiB decompressed
    max_seconds: float = 300.0  # wall-clock budget for reading one upload

    def deadline(self) -> "Deadline":
        return Deadline(self.max_seconds)


class Deadline:
    """Raises :class:`DataFormatError` once the time budget of one upload is spent."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise DataFormatError(f"reading the upload took longer than the limit of {self.seconds:g} s; "
                                  "upload fewer or smaller images")


def shape_text(c: int, h: int, w: int) -> str:
    """``28×28×1`` (height × width × channels), the way users describe image sizes."""
    return f"{h}×{w}×{c}"


def check_expected_shape(shape: tuple[int, int, int], expected: tuple[int, int, int] | None) -> None:
    if expected is None:
        return
    if tuple(shape) != tuple(expected):
        raise DataFormatError(f"images are {shape_text(*shape)}, the model expects {shape_text(*expected)}")
