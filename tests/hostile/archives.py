"""Builders for (hostile) clean-data archives, made in memory / ``tmp_path`` at test time."""
from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(pixels_chw: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """uint8 C×H×W → image bytes (PNG is lossless)."""
    arr = pixels_chw[0] if pixels_chw.shape[0] == 1 else pixels_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, fmt, **kw)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes | None], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """``None`` values become directory entries."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            if data is None:
                z.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            else:
                z.writestr(name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def special_tarinfo(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR (with a valid CRC) claims ``width``×``height`` pixels."""
    data = bytearray(encode(np.zeros((1, 8, 8), np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def zip_with_encrypted_flag(path: Path, name: str, data: bytes) -> Path:
    """A zip whose entry has the 'encrypted' general-purpose flag set (local + central headers)."""
    write_zip(path, {name: data}, zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = raw.index(sig)
        flags = struct.unpack_from("<H", raw, pos + off)[0] | 0x1
        struct.pack_into("<H", raw, pos + off, flags)
    path.write_bytes(bytes(raw))
    return path


def zip_with_lying_size(path: Path, name: str, data: bytes, declared: int) -> Path:
    """A stored zip entry whose headers claim ``declared`` uncompressed bytes (fewer than it holds)."""
    write_zip(path, {name: data}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    lpos = raw.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, lpos + 22, declared)
    cpos = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, cpos + 24, declared)
    path.write_bytes(bytes(raw))
    return path


def zip_symlink(path: Path, name: str, target: str) -> Path:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(info, target)
    return path
