"""Image-folder clean-data uploads inside ``.zip`` and ``.tar`` (``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``).

Layout (documented for users)
-----------------------------
- One folder per class holding that class's images: ``cat/0001.png``, ``dog/0002.jpg``…
- Class index: if every class folder name is a decimal number, the number *is* the class
  index (``0/``, ``1/``, ``7/``; classes may be missing, e.g. a partial clean set). Otherwise
  classes are numbered in sorted folder-name order and the names become ``class_names``; then,
  when the model's ``num_classes`` is known, the number of folders must equal it (a missing
  folder would silently shift every later label).
- Optional wrapper folders above the class folders (``mydata/cat/…``) are stripped.
- Split folders: if the folders above the classes are named ``train``/``test``/``val``/
  ``valid``/``validation`` (the CIFAR-10 zip layout ``train/<class>/…``, ``test/<class>/…``), one
  split is read: the one asked for (``split=``), else ``train`` if present, else the only one
  there; the choice is recorded in ``ImageSet.meta['split']``. ``train`` is the default because
  the clean set for repair should come from the training distribution and the held-out split is
  left for evaluation.
- Ignored: ``__MACOSX/``, hidden files (``.DS_Store``, ``._x``), ``Thumbs.db``/``desktop.ini``,
  and text files (``.txt .md .csv .json .yaml .yml``) outside class folders. Any other
  non-image file is an error, as is an image outside a class folder or nested deeper.
- Images: PNG, JPEG, BMP, GIF (first frame), TIFF, WebP, PPM/PGM. All images must have the
  same width and height (no resizing). Channels: the model's expected channel count when known
  (RGB→L uses PIL's luma conversion; L→RGB replicates), else 1 if every image is greyscale and
  3 otherwise. Alpha is dropped. 16-bit/float images are refused.

Safety
------
Nothing is ever extracted to disk; members are read into memory one at a time. Before reading:
member count (zip: from the end-of-central-directory record, before the directory is
parsed), names (no absolute paths, drive letters, backslashes or ``..``), member types (tar:
regular files and directories only — symlinks, hard links, devices, FIFOs and sparse files
are refused), encryption, and declared sizes/compression ratios. While reading, decompressed
bytes are counted and capped per member and for the whole archive, so lying headers cannot
help. Image headers are parsed before decoding and width/height checked against
``max_side``; PIL's decompression-bomb warning is turned into an error. A wall-clock deadline
bounds the whole read.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import re
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .dataset import ImageSet
from .limits import DataFormatError, Deadline, UploadLimits, check_expected_shape

_MIB = 1 << 20
_MAX_DIR_ENTRY_BYTES = 46 + 512 + 64  # central-directory record + generous name + extra field
IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF",
                    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pnm": "PPM"}
PIL_FORMATS = sorted(set(IMAGE_EXTENSIONS.values()))
TEXT_EXTENSIONS = {".txt", ".md", ".csv", ".json", ".yaml", ".yml"}
JUNK_NAMES = {"thumbs.db", "desktop.ini"}
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
GREY_MODES = {"1", "L", "LA", "La"}
ACCEPTED_MODES = GREY_MODES | {"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_DRIVE = re.compile(r"^[A-Za-z]:")


# --------------------------------------------------------------------------- member names


def safe_member_name(name: str) -> str:
    """The member's normalised relative path; refuses absolute paths and traversal."""
    if not name or "\x00" in name:
        raise DataFormatError(f"archive entry with an empty or NUL-containing name: {name!r}")
    if "\\" in name:
        raise DataFormatError(f"archive entry {name!r} uses backslashes; use '/' as the path separator")
    if name.startswith("/") or _DRIVE.match(name):
        raise DataFormatError(f"archive entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise DataFormatError(f"archive entry {name!r} tries to escape the archive (path traversal '..')")
    return "/".join(parts)


def _is_junk(path: str) -> bool:
    parts = path.split("/")
    return (parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)
            or parts[-1].lower() in JUNK_NAMES)


# --------------------------------------------------------------------------- bounded readers


class _CountingReader(io.RawIOBase):
    """Wraps a decompressed stream; raises once more than ``limit`` bytes came out of it."""

    def __init__(self, raw, limit: int, what: str):
        self.raw, self.limit, self.what, self.count = raw, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        self.count += len(data)
        if self.count > self.limit:
            raise DataFormatError(f"{self.what} decompresses to more than {self.limit} bytes (zip bomb?)")
        b[: len(data)] = data
        return len(data)


def _read_capped(f, limit: int, what: str) -> bytes:
    """Read a file object fully, but never more than ``limit`` bytes."""
    chunks, total = [], 0
    while True:
        chunk = f.read(min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise DataFormatError(f"{what} is larger than {limit} bytes once decompressed (zip bomb?)")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Member:
    path: str  # normalised relative path
    is_dir: bool
    data: bytes | None = None  # only for files we read


def _zip_directory_size(f) -> tuple[int, int] | None:
    """(entries, central-directory bytes) from the end record, read before ``ZipFile`` parses the directory.

    ``ZipFile`` parses the whole directory regardless of the declared count, so both are
    bounded: a lying count cannot hide millions of entries in a huge directory.
    """
    try:
        rec = zipfile._EndRecData(f)  # noqa: SLF001 - the stdlib has no public accessor
    except Exception:
        return None
    if not rec:
        return None
    return int(rec[zipfile._ECD_ENTRIES_TOTAL]), int(rec[zipfile._ECD_SIZE])  # noqa: SLF001


def iter_zip(path: Path, limits: UploadLimits, deadline: Deadline, wanted) -> Iterator[Member]:
    """Yield members of a zip; file data is read (bounded) only when ``wanted(path)`` is true."""
    with open(path, "rb") as f:
        directory = _zip_directory_size(f)
        if directory is None:
            raise DataFormatError("not a valid zip archive (no end-of-central-directory record)")
        declared, cd_bytes = directory
        if declared > limits.max_members:
            raise DataFormatError(f"the archive has {declared} entries, over the limit of {limits.max_members}")
        if cd_bytes > limits.max_members * _MAX_DIR_ENTRY_BYTES:
            raise DataFormatError(f"the archive's directory is {cd_bytes} bytes: more entries than the limit of "
                                  f"{limits.max_members} (or absurdly long names)")
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            raise DataFormatError(f"not a valid zip archive: {exc}") from None
        with zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise DataFormatError(f"the archive has {len(infos)} entries, over the limit of {limits.max_members}")
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise DataFormatError("the archive has duplicate entry names")
            declared_total = 0
            checked: list[tuple[zipfile.ZipInfo, str]] = []
            for info in infos:
                rel = safe_member_name(info.filename)
                if info.is_dir():
                    checked.append((info, rel))
                    continue
                mode = (info.external_attr >> 16) & 0o170000
                if mode and mode not in (0o100000,):  # unix file type bits: only regular files
                    raise DataFormatError(f"archive entry {info.filename!r} is not a regular file "
                                          "(symlinks and special files are refused)")
                if info.flag_bits & 0x1:
                    raise DataFormatError(f"archive entry {info.filename!r} is encrypted; upload an unencrypted zip")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                              zipfile.ZIP_LZMA):
                    raise DataFormatError(f"archive entry {info.filename!r} uses unsupported compression "
                                          f"method {info.compress_type}")
                if rel and wanted(rel):
                    if info.file_size > limits.max_member_bytes:
                        raise DataFormatError(f"archive entry {info.filename!r} declares {info.file_size} bytes, "
                                              f"over the per-file limit of {limits.max_member_bytes}")
                    ratio = info.file_size / max(info.compress_size, 1)
                    if info.file_size > _MIB and ratio > limits.max_compression_ratio:
                        raise DataFormatError(f"archive entry {info.filename!r} declares a compression ratio of "
                                              f"{ratio:.0f}:1, over the limit of "
                                              f"{limits.max_compression_ratio:g}:1 (zip bomb?)")
                    declared_total += info.file_size
                checked.append((info, rel))
            if declared_total > limits.max_archive_bytes:
                raise DataFormatError(f"the archive declares {declared_total} uncompressed bytes, over the limit "
                                      f"of {limits.max_archive_bytes} (zip bomb?)")
            total = 0
            for info, rel in checked:
                deadline.check()
                if not rel:
                    continue
                if info.is_dir():
                    yield Member(rel, True)
                    continue
                if not wanted(rel):
                    yield Member(rel, False)
                    continue
                try:
                    with zf.open(info) as mf:
                        # never trust the header: cap what the decompressor actually yields
                        data = _read_capped(mf, info.file_size, f"archive entry {info.filename!r}")
                        if mf.read(1):
                            raise DataFormatError(f"archive entry {info.filename!r} holds more data than "
                                                  "its header declares")
                except DataFormatError:
                    raise
                except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
                        RuntimeError, zlib_error(), lzma.LZMAError) as exc:
                    raise DataFormatError(f"archive entry {info.filename!r} is corrupt: {exc}") from None
                total += len(data)
                if total > limits.max_archive_bytes:
                    raise DataFormatError(f"the archive decompresses to more than {limits.max_archive_bytes} bytes")
                yield Member(rel, False, data)


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _open_decompressed(path: Path, raw):
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def iter_tar(path: Path, limits: UploadLimits, deadline: Deadline, wanted) -> Iterator[Member]:
    """Stream a (possibly compressed) tar once, front to back; nothing is extracted."""
    with open(path, "rb") as raw:
        stream = _CountingReader(_open_decompressed(path, raw), limits.max_archive_bytes, "the archive")
        buffered = io.BufferedReader(stream, buffer_size=1 << 16)
        try:
            tf = tarfile.open(fileobj=buffered, mode="r|")
        except DataFormatError:
            raise
        except (tarfile.TarError, OSError, EOFError, zlib_error(), lzma.LZMAError, ValueError) as exc:
            raise DataFormatError(f"not a valid tar archive: {exc}") from None
        count, total = 0, 0
        seen: set[str] = set()
        try:
            with tf:
                for info in tf:
                    deadline.check()
                    count += 1
                    if count > limits.max_members:
                        raise DataFormatError(f"the archive has more than {limits.max_members} entries")
                    rel = safe_member_name(info.name)
                    if info.issym() or info.islnk():
                        link = "symbolic" if info.issym() else "hard"
                        raise DataFormatError(f"archive entry {info.name!r} is a {link}"
                                              f" link (to {info.linkname!r}); links are refused")
                    if info.isdir():
                        if rel:
                            yield Member(rel, True)
                        continue
                    if not info.isreg() or info.issparse():
                        kind = ("device" if info.ischr() or info.isblk() else "FIFO" if info.isfifo()
                                else "sparse file" if info.issparse() else "special entry")
                        raise DataFormatError(f"archive entry {info.name!r} is a {kind}; "
                                              "only regular files are allowed")
                    if rel in seen:
                        raise DataFormatError(f"the archive has duplicate entry {info.name!r}")
                    seen.add(rel)
                    if not rel or not wanted(rel):
                        yield Member(rel, False)
                        continue
                    if info.size > limits.max_member_bytes:
                        raise DataFormatError(f"archive entry {info.name!r} is {info.size} bytes, over the per-file "
                                              f"limit of {limits.max_member_bytes}")
                    f = tf.extractfile(info)
                    data = _read_capped(f, limits.max_member_bytes, f"archive entry {info.name!r}") if f else b""
                    if len(data) != info.size:
                        raise DataFormatError(f"archive entry {info.name!r} is truncated")
                    total += len(data)
                    yield Member(rel, False, data)
        except DataFormatError:
            raise
        except (tarfile.TarError, OSError, EOFError, zlib_error(), lzma.LZMAError, ValueError) as exc:
            raise DataFormatError(f"the tar archive is corrupt or truncated: {exc}") from None


# --------------------------------------------------------------------------- images


def decode_image(data: bytes, name: str, limits: UploadLimits) -> Image.Image:
    """Open, check the header, then decode; every failure is a :class:`DataFormatError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            w, h = im.size
            if w < 1 or h < 1:
                raise DataFormatError(f"image {name!r} has an empty size {w}×{h}")
            if w > limits.max_side or h > limits.max_side:
                raise DataFormatError(f"image {name!r} is {w}×{h} pixels, over the limit of {limits.max_side} per side")
            if im.mode not in ACCEPTED_MODES:
                raise DataFormatError(f"image {name!r} has mode {im.mode!r} (16-bit or float); "
                                      "use 8-bit greyscale or RGB images")
            im.load()
            return im
    except DataFormatError:
        raise
    except UnidentifiedImageError:
        raise DataFormatError(f"file {name!r} is not a readable image ({', '.join(PIL_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataFormatError(f"image {name!r} is too large (PIL decompression-bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError,
            ZeroDivisionError, OverflowError) as exc:
        raise DataFormatError(f"image {name!r} is corrupt or truncated: {exc}") from None


def _to_array(im: Image.Image, channels: int, name: str) -> np.ndarray:
    try:
        mode = "L" if channels == 1 else "RGB"
        if im.mode == "P" and channels == 3:
            im = im.convert("RGBA")
        arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"image {name!r} cannot be converted to {mode}: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# --------------------------------------------------------------------------- layout


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _resolve_layout(files: list[str], dirs: set[str], split: str | None) -> tuple[str, str | None, list[str]]:
    """(class-folder root, chosen split or None, class folder names) for the images' paths."""
    if not files:
        raise DataFormatError("the archive contains no images")
    # every folder that contains an image
    parents = {posixpath.dirname(p) for p in files}
    if "" in parents:
        loose = next(p for p in files if "/" not in p)
        raise DataFormatError(f"image {loose!r} is not inside a class folder; "
                              "put each class's images in its own folder")
    prefix = ""
    while True:
        tops = {p[len(prefix):].split("/")[0] for p in parents}
        # strip a wrapper folder only while everything is below it and it is not itself a class folder
        if len(tops) == 1 and all("/" in p[len(prefix):] for p in parents):
            top = next(iter(tops))
            if top.lower() in SPLIT_NAMES and all(p[len(prefix):].count("/") == 1 for p in parents):
                break
            prefix += top + "/"
            continue
        break
    tops = {p[len(prefix):].split("/")[0] for p in parents}
    chosen: str | None = None
    split_dirs = {t for t in tops if t.lower() in SPLIT_NAMES}
    deeper = any("/" in p[len(prefix):] for p in parents)
    if split_dirs and deeper and split_dirs == tops:
        by_lower = {t.lower(): t for t in split_dirs}
        if split is not None:
            if split.lower() not in by_lower:
                raise DataFormatError(f"split {split!r} is not in the archive; it has {sorted(split_dirs)}")
            chosen = by_lower[split.lower()]
        elif "train" in by_lower:
            chosen = by_lower["train"]
        elif len(split_dirs) == 1:
            chosen = next(iter(split_dirs))
        else:
            raise DataFormatError(f"the archive has splits {sorted(split_dirs)}; choose one")
        prefix += chosen + "/"
    elif split is not None:
        raise DataFormatError(f"split {split!r} was asked for but the archive has no split folders")
    root_parents = [p[len(prefix):] for p in parents if p.startswith(prefix)]
    nested = [p for p in root_parents if "/" in p]
    if nested:
        raise DataFormatError(f"folder {prefix + nested[0]!r} is nested inside a class folder; "
                              "images must sit directly in one folder per class")
    classes = sorted(set(root_parents))
    # explicitly listed but empty class folders
    for d in dirs:
        if d.startswith(prefix) and d != prefix.rstrip("/"):
            rest = d[len(prefix):]
            if rest and "/" not in rest and rest not in classes and not _is_junk(d):
                raise DataFormatError(f"class folder {d!r} contains no images")
    return prefix, chosen, classes


def _class_index(classes: list[str], num_classes: int | None) -> tuple[dict[str, int], list[str] | None]:
    if all(c.isdecimal() and c.isascii() for c in classes):
        index = {c: int(c) for c in classes}
        if len(set(index.values())) != len(index):
            raise DataFormatError(f"numeric class folders name the same class twice: {classes}")
        if num_classes is not None and max(index.values()) >= num_classes:
            bad = max(index, key=index.get)
            raise DataFormatError(f"class folder {bad!r} is out of range: the model has {num_classes} classes "
                                  f"(0..{num_classes - 1})")
        return index, None
    if num_classes is not None and len(classes) != num_classes:
        raise DataFormatError(f"the archive has {len(classes)} class folders ({', '.join(classes[:12])}"
                              f"{'…' if len(classes) > 12 else ''}) but the model has {num_classes} classes; "
                              f"name folders by class index (0..{num_classes - 1}) to upload only some classes")
    return {c: i for i, c in enumerate(classes)}, classes


def _members(path: Path, kind: str, limits: UploadLimits, deadline: Deadline, wanted) -> Iterator[Member]:
    return iter_zip(path, limits, deadline, wanted) if kind == "zip" else iter_tar(path, limits, deadline, wanted)


def read_image_archive(path: Path, kind: str, limits: UploadLimits, num_classes: int | None = None,
                       expected_shape: tuple[int, int, int] | None = None, split: str | None = None) -> ImageSet:
    """Read a ``zip`` or ``tar`` (``kind``) of class folders into an :class:`ImageSet`.

    Two passes: the first reads names and types only (so layout errors come before any
    decoding and unused splits are never decoded), the second reads and decodes the chosen
    images one at a time.
    """
    deadline = limits.deadline()
    # ---- pass 1: names only
    images_all: list[str] = []
    others: list[str] = []
    dirs: set[str] = set()
    for m in _members(path, kind, limits, deadline, lambda rel: False):
        if m.is_dir:
            dirs.add(m.path)
        elif not _is_junk(m.path):
            (images_all if _ext(m.path) in IMAGE_EXTENSIONS else others).append(m.path)
    for p in others:
        if _ext(p) not in TEXT_EXTENSIONS:
            raise DataFormatError(f"file {p!r} has an unsupported type {_ext(p) or '(no extension)'!r}; "
                                  f"images must be {', '.join(sorted(IMAGE_EXTENSIONS))}")
    prefix, chosen, classes = _resolve_layout(images_all, dirs, split)
    for p in others:
        if p.startswith(prefix) and "/" in p[len(prefix):]:
            raise DataFormatError(f"file {p!r} inside a class folder is not an image; "
                                  f"images must be {', '.join(sorted(IMAGE_EXTENSIONS))}")
    selected = {p for p in images_all if p.startswith(prefix)}
    if len(selected) > limits.max_images:
        raise DataFormatError(f"the archive holds {len(selected)} images, over the limit of {limits.max_images}")
    index, class_names = _class_index(classes, num_classes)

    # ---- pass 2: decode the selected images, one member in memory at a time
    channels = expected_shape[0] if expected_shape is not None else None
    decoded: dict[str, np.ndarray] = {}
    native_grey = True
    size: tuple[int, int] | None = None
    first_name = ""
    pixel_bytes = 0
    for m in _members(path, kind, limits, deadline, lambda rel: rel in selected):
        if m.is_dir or m.path not in selected:
            continue
        assert m.data is not None
        with decode_image(m.data, m.path, limits) as im:
            grey = im.mode in GREY_MODES or (im.mode == "P" and _palette_is_grey(im))
            if size is None:
                size, first_name = im.size, m.path
                if expected_shape is not None and (size[1], size[0]) != tuple(expected_shape[1:]):
                    check_expected_shape((1 if grey else 3, size[1], size[0]), expected_shape)
            elif im.size != size:
                raise DataFormatError(f"images differ in size: {first_name!r} is {size[0]}×{size[1]} but "
                                      f"{m.path!r} is {im.size[0]}×{im.size[1]}; all images must have the same size")
            native_grey &= grey
            want = channels if channels is not None else (1 if grey else 3)
            pixel_bytes += want * size[0] * size[1]
            if pixel_bytes > limits.max_total_bytes:
                raise DataFormatError(f"decoded images exceed the limit of {limits.max_total_bytes} bytes")
            decoded[m.path] = _to_array(im, want, m.path)
    if len(decoded) != len(selected):
        raise DataFormatError("the archive changed while it was read")  # the file on disk was replaced
    if channels is None:
        channels = 1 if native_grey else 3
    images, labels = [], []
    for p in sorted(decoded):
        px = decoded.pop(p)
        if px.shape[0] != channels:  # a greyscale image among colour ones: replicate
            px = np.repeat(px, channels, axis=0)
        images.append(px)
        labels.append(index[p[len(prefix):].split("/")[0]])
    x = torch.from_numpy(np.stack(images))
    del images
    check_expected_shape((int(x.shape[1]), int(x.shape[2]), int(x.shape[3])), expected_shape)
    meta: dict[str, object] = {"format": kind, "class_folders": classes}
    if chosen is not None:
        meta["split"] = chosen
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), class_names, meta)


def _palette_is_grey(im: Image.Image) -> bool:
    try:
        pal = im.getpalette() or []
    except ValueError:
        return False
    rgb = np.asarray(pal[: (len(pal) // 3) * 3], dtype=np.int32).reshape(-1, 3)
    return bool(rgb.size) and bool((rgb == rgb[:, :1]).all())


__all__ = ["IMAGE_EXTENSIONS", "iter_tar", "iter_zip", "read_image_archive", "safe_member_name"]
