"""Where decoded data sets and trained subjects are cached between runs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ONP_CACHE_DIR`` or ``~/.cache/onp``; created on first use."""
    path = Path(os.environ.get("ONP_CACHE_DIR", Path.home() / ".cache" / "onp"))
    path.mkdir(parents=True, exist_ok=True)
    return path
