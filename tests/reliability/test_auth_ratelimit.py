"""API keys (missing, wrong, malformed, revoked through the real CLI), other users' jobs (404, never 403),
and brute-force / per-key rate limiting (429 + Retry-After), Redis-backed and shared between API
processes, falling back to per-process buckets when Redis is unreachable."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from onp_service_fixtures import REPO, make_settings, settings_env, submit
from relutil import client, make_key


def test_missing_wrong_malformed_keys(server) -> None:
    base = f"{server.url}/v1/repairs"
    r = httpx.get(base)
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    for bad in (f"onp_deadbeef_{secrets.token_urlsafe(32)}", "not-even-a-key", "onp_", "x" * 5000):
        r = httpx.get(base, headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key", (bad[:20], r.text)
    assert httpx.get(base, headers={"X-API-Key": "wrong"}).status_code == 401


def test_revoked_key_is_refused(server, settings) -> None:
    key = make_key(settings, f"carol-{secrets.token_hex(3)}")
    with client(server.url, key) as c:
        assert c.get("/v1/repairs").status_code == 200
        prefix = key.split("_")[1]
        env = settings_env(settings)
        out = subprocess.run([sys.executable, "-m", "onp_cli.main", "keys", "revoke", prefix], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        r = c.get("/v1/repairs")
        assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"


def test_other_users_job_is_404_everywhere(alice, bob, inputs) -> None:
    job = submit(alice, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 1, "delay": 0}}).json()
    jid = job["id"]
    for method, path in (("GET", f"/v1/repairs/{jid}"), ("POST", f"/v1/repairs/{jid}/cancel"),
                         ("GET", f"/v1/repairs/{jid}/model"), ("GET", f"/v1/repairs/{jid}/report"),
                         ("GET", f"/v1/repairs/{jid}/report/plot.png"), ("GET", f"/v1/repairs/{jid}/events")):
        r = bob.request(method, path)
        assert r.status_code == 404 and r.json()["detail"] == f"no repair {jid}", (path, r.status_code, r.text)
    assert jid not in {j["id"] for j in bob.get("/v1/repairs?limit=100").json()["items"]}
    assert alice.get(f"/v1/repairs/{jid}").status_code == 200


# ------------------------------------------------------------------------------------------ rate limiting

def _app(pg_url: str, tmp_path, prefix: str, **kw: Any):
    from api.app import create_app

    return create_app(make_settings(pg_url, tmp_path, prefix, **kw), start_worker=False)


async def _get(app, key: str, path: str = "/v1/repairs", ip: str = "10.0.0.1") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(ip, 4242))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path, headers={"Authorization": f"Bearer {key}"})


def _run(coro):
    return asyncio.run(coro)


def test_failed_auth_is_rate_limited_per_ip_and_shared_between_processes(pg_url, redis_ok, tmp_path) -> None:
    prefix = f"onprel-{secrets.token_hex(3)}:"
    kw = dict(auth_failures_burst=5, auth_failures_per_minute=60.0)
    app1, app2 = _app(pg_url, tmp_path, prefix, **kw), _app(pg_url, tmp_path, prefix, **kw)  # two API processes
    good = make_key(make_settings(pg_url, tmp_path, prefix), f"dave-{secrets.token_hex(3)}")
    wrong = [f"onp_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}" for _ in range(8)]
    codes = [_run(_get(app1 if i % 2 else app2, k)).status_code for i, k in enumerate(wrong[:5])]
    assert codes == [401] * 5
    blocked = _run(_get(app1, wrong[5]))
    assert blocked.status_code == 429 and "too many failed authentication attempts" in blocked.json()["detail"]
    assert 1 <= int(blocked.headers["retry-after"]) <= 2
    # while blocked, even a valid key from that address is refused (the key is not even looked up) …
    assert _run(_get(app2, good)).status_code == 429
    # … but another address is unaffected
    assert _run(_get(app2, good, ip="10.0.0.2")).status_code == 200
    time.sleep(int(blocked.headers["retry-after"]) + 0.2)
    assert _run(_get(app1, good)).status_code == 200  # a token came back


def test_per_key_request_rate_limit(pg_url, redis_ok, tmp_path) -> None:
    prefix = f"onprel-{secrets.token_hex(3)}:"
    app = _app(pg_url, tmp_path, prefix, key_requests_burst=5, key_requests_per_second=1.0)
    settings = make_settings(pg_url, tmp_path, prefix)
    k1, k2 = make_key(settings, f"erin-{secrets.token_hex(3)}"), make_key(settings, f"fred-{secrets.token_hex(3)}")
    codes = [_run(_get(app, k1)).status_code for _ in range(5)]
    assert codes == [200] * 5
    r = _run(_get(app, k1))
    assert r.status_code == 429 and r.json()["detail"].startswith("rate limit of this API key exceeded")
    assert int(r.headers["retry-after"]) == 1
    assert _run(_get(app, k2)).status_code == 200  # other keys are unaffected
    time.sleep(1.1)
    assert _run(_get(app, k1)).status_code == 200


def test_rate_limit_falls_back_to_memory_when_redis_is_down(pg_url, tmp_path) -> None:
    """The limiter never makes Redis a dependency of authentication: with Redis unreachable it keeps
    limiting per process (and the API keeps answering)."""
    app = _app(pg_url, tmp_path, "onprel-down:", broker_url="redis://127.0.0.1:1/0", auth_failures_burst=3)
    wrong = f"onp_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    codes = [_run(_get(app, wrong)).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
