"""Large and oversized uploads against a separate API process whose RSS is sampled every 20 ms:
memory does not grow with the upload size (bodies are streamed to disk part by part), and an oversized
part is cut off as soon as it crosses its limit — before the rest of the body is even read."""
from __future__ import annotations

import secrets
import select
import socket
import time
from pathlib import Path

import pytest

from onp_service_fixtures import make_settings
from relutil import ApiProcess, RssSampler, make_key

MiB = 1 << 20


@pytest.fixture(scope="module")
def api(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    own = make_settings(settings.database_url, root, f"onprel-{secrets.token_hex(3)}:",
                        max_data_bytes=1024 * MiB, max_model_bytes=32 * MiB)
    proc = ApiProcess(own, root / "api.log")
    key = make_key(own, "streamer")
    # warm-up: the first submission imports the validation stack (torch, readers) — a one-off, not per-byte cost
    _stream(proc.url, key, "data", 4 * MiB)
    yield proc, key
    proc.stop()


def _stream(url: str, key: str, field: str, total: int, chunk: int = MiB) -> tuple[int, bytes]:
    """POST a multipart body whose one file part is ``total`` zero bytes, chunked (no Content-Length), over a raw
    socket; stops sending as soon as the server answers. Returns (bytes of the part sent, the reply)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    boundary = "b" + secrets.token_hex(8)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"big.npz\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    sock.sendall((f"POST /v1/repairs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  ).encode())

    def send_chunk(data: bytes) -> None:
        sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    send_chunk(head)
    sent, block = 0, b"\0" * chunk
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop uploading
            send_chunk(block[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)
        else:
            send_chunk(f"\r\n--{boundary}--\r\n".encode())
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    sock.settimeout(60)
    try:
        while not reply.endswith(b"}") and (part := sock.recv(65536)):
            reply += part
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return sent, reply


def test_large_upload_streams_to_disk_with_flat_memory(api) -> None:
    """64 MiB, then 512 MiB, accepted by the streaming parser (limit 1 GiB) and refused by validation (no model):
    the API's peak RSS is the same for both — it does not grow with the upload size."""
    proc, key = api
    growth = {}
    for size in (64, 512):
        base = proc.rss()
        sampler = RssSampler(proc.pid)
        sampler.start()
        t0 = time.monotonic()
        sent, reply = _stream(proc.url, key, "data", size * MiB)
        samples = sampler.stop()
        assert sent == size * MiB
        assert reply.startswith(b"HTTP/1.1 422") and b"a non-empty 'model' file is required" in reply, reply[:300]
        assert time.monotonic() - t0 < 120
        growth[size] = max(samples) - base
    assert growth[512] < 32 * MiB, f"API RSS grew by {growth[512] / MiB:.0f} MiB while receiving 512 MiB"
    assert growth[512] - growth[64] < 16 * MiB, {k: v / MiB for k, v in growth.items()}


def test_oversized_part_is_cut_off_while_streaming(api) -> None:
    """A 2 GiB model part against a 32 MiB limit: 413 once the limit is crossed; the client never gets to send
    most of the body, and the server's memory does not move."""
    proc, key = api
    base = proc.rss()
    sampler = RssSampler(proc.pid)
    sampler.start()
    sent, reply = _stream(proc.url, key, "model", 2048 * MiB)
    samples = sampler.stop()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"field 'model' exceeds the limit of 32.0 MiB" in reply
    assert sent < 128 * MiB, f"the client could send {sent / MiB:.0f} MiB before the 413"
    assert max(samples) - base < 48 * MiB
    from relutil import rss_bytes

    assert rss_bytes(proc.pid) - base < 48 * MiB
