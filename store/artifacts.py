"""Artifact storage: a small protocol and a content-addressed local folder.

Blobs are keyed by their sha256, so identical uploads are stored once and every read
can be verified. Writes go to a temporary file in the same folder, are fsynced and
then atomically renamed, so a crash never leaves a half-written blob under a valid
name. Shared storage (NFS, S3 via a mounted gateway, …) plugs in by implementing
:class:`ArtifactStore`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

CHUNK = 1 << 20


class ArtifactCorrupt(RuntimeError):
    """A stored blob no longer matches its checksum."""


@runtime_checkable
class ArtifactStore(Protocol):
    def put(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenated chunks; returns (sha256 hex, size)."""

    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a local file (may move or copy it); returns (sha256 hex, size)."""

    def open(self, sha256: str) -> BinaryIO:
        """A readable binary stream of the blob."""

    def path(self, sha256: str) -> Path | None:
        """A local path of the blob when the store has one (lets servers use sendfile)."""

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None: ...


def sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class LocalArtifactStore:
    """``root/ab/abcdef…`` files named by their sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)

    def _blob(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def _commit(self, tmp: Path, sha256: str) -> None:
        dest = self._blob(sha256)
        dest.parent.mkdir(exist_ok=True)
        if dest.exists():  # same content already stored: keep the old file
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def put(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        fd, name = tempfile.mkstemp(dir=self._tmp)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            self._commit(tmp, digest)
            return digest, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, path: Path) -> tuple[str, int]:
        with open(path, "rb") as f:
            return self.put(iter(lambda: f.read(CHUNK), b""))

    def open(self, sha256: str) -> BinaryIO:
        return open(self._blob(sha256), "rb")

    def path(self, sha256: str) -> Path | None:
        p = self._blob(sha256)
        return p if p.exists() else None

    def exists(self, sha256: str) -> bool:
        return self._blob(sha256).exists()

    def delete(self, sha256: str) -> None:
        self._blob(sha256).unlink(missing_ok=True)

    def sweep_tmp(self, older_than: float = 3600.0) -> int:
        """Delete temp files a killed writer left in ``.tmp`` (never served: only renamed blobs are)."""
        import time

        cutoff, removed = time.time() - older_than, 0
        for entry in self._tmp.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def verify(self, sha256: str) -> None:
        """Raise :class:`ArtifactCorrupt` when the blob's content no longer matches its name."""
        actual, _ = sha256_file(self._blob(sha256))
        if actual != sha256:
            raise ArtifactCorrupt(f"artifact {sha256} is corrupt (content hashes to {actual})")


def materialize(store: ArtifactStore, sha256: str, dest: Path) -> Path:
    """Make the blob available at ``dest`` (a name with the right suffix for loaders).

    A local store is linked (no copy of a large checkpoint); other stores are streamed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = store.path(sha256)
    if local is not None:
        try:
            os.link(local, dest)
            return dest
        except OSError:
            pass
    with store.open(sha256) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
    return dest


def data_suffix(filename: str | None) -> str:
    """The suffix a reader needs to recognise an upload (``.tar.gz`` counts as one); ``.npz`` when unnamed."""
    name = (filename or "").lower()
    for double in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if name.endswith(double):
            return double
    return Path(name).suffix or ".npz"


def store_for(root: Path) -> ArtifactStore:
    """The configured store; only the local folder exists today."""
    return LocalArtifactStore(root)
