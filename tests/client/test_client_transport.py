"""Client behaviour that a healthy server never shows: corrupt downloads and transient 503s.

These use httpx's in-memory transport because a real server cannot be made to corrupt a body
or to fail exactly once; everything else is tested against the real stack.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from onp_client import ChecksumMismatch, Client, ServerError


def test_corrupt_download_is_rejected_and_not_left_behind(tmp_path: Path) -> None:
    body = b"model bytes"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body + b"!", headers={"X-Checksum-SHA256": hashlib.sha256(body).hexdigest()})

    with Client("http://onp.test", "k", transport=httpx.MockTransport(handler)) as c, \
            pytest.raises(ChecksumMismatch):
        c.download("abc", tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_retries_503_with_retry_after_then_succeeds() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Idempotency-Key", ""))
        if len(calls) == 1:
            return httpx.Response(503, json={"detail": "overloaded"}, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    with Client("http://onp.test", "k", transport=httpx.MockTransport(handler)) as c:
        assert c.list().items == []
    assert len(calls) == 2


def test_gives_up_with_the_detail(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "database unavailable"}, headers={"Retry-After": "0"})

    with Client("http://onp.test", "k", retries=1, transport=httpx.MockTransport(handler)) as c, \
            pytest.raises(ServerError, match="database unavailable") as err:
        c.get("abc")
    assert err.value.exit_code == 5


def test_submit_retry_reuses_one_idempotency_key_and_rewinds_files(tmp_path: Path) -> None:
    model, data = tmp_path / "m.safetensors", tmp_path / "d.npz"
    model.write_bytes(b"M" * 100)
    data.write_bytes(b"D" * 100)
    seen: list[tuple[str, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["Idempotency-Key"], len(request.read())))
        if len(seen) == 1:
            return httpx.Response(502, text="bad gateway", headers={"Retry-After": "0"})
        job = {"id": "j1", "status": "queued", "method": "clp", "progress": 0, "phase": "queued",
               "created_at": "2026-01-01T00:00:00Z", "options": {}, "model_format": "safetensors", "metrics": {},
               "attempts": 0, "cancel_requested": False, "links": {}}
        return httpx.Response(202, content=json.dumps(job))

    with Client("http://onp.test", "k", transport=httpx.MockTransport(handler)) as c:
        assert c.submit(model, data, method="clp").id == "j1"
    assert seen[0] == seen[1] and seen[0][1] > 200  # same key, full body both times
