"""Pickles that execute code when unpickled: each one creates a marker file.

A test creates the payload with a fresh marker path, feeds it to a loader and then asserts
the marker does not exist — proof that nothing was unpickled with the unsafe unpickler.
"""
from __future__ import annotations

import io
import os
import pickle
import uuid
from pathlib import Path

import torch


class MarkerWriter:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fresh_marker(tmp_path: Path) -> Path:
    return tmp_path / f"PWNED_{uuid.uuid4().hex}"


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": MarkerWriter(marker)}, protocol=2)


def evil_torch_save(marker: Path, wrap_state_dict: bool = True) -> bytes:
    """A real ``torch.save`` zip whose ``data.pkl`` runs code; it also holds a genuine tensor."""
    buf = io.BytesIO()
    obj = {"conv.weight": torch.zeros(2), "evil": MarkerWriter(marker)} if wrap_state_dict else MarkerWriter(marker)
    torch.save(obj, buf)
    return buf.getvalue()
