"""Postgres faults: a private cluster crashed (``pg_ctl stop -m immediate``) and restarted while the API
serves requests and a job runs; and a database that accepts TCP but never answers.

The API must answer 503 with a reason (never hang, never a bare 500), recover by itself once the database
is back, and lose no accepted job.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import Counter

import httpx
import pytest

from onp_service_fixtures import Server, make_settings, submit, wait_for
from relutil import PrivatePostgres, SilentServer, client, make_key, wait_until

SLOW = {"method": "slow", "options": {"steps": 50, "delay": 0.1}}


@pytest.fixture(scope="module")
def private_pg():
    pg = PrivatePostgres()
    from store.db import upgrade

    upgrade(pg.url)
    yield pg
    pg.destroy()


def test_postgres_restart_while_serving(private_pg, redis_ok, spawn_worker, inputs, tmp_path):
    settings = make_settings(private_pg.url, tmp_path, f"onprel-{secrets.token_hex(3)}:",
                             artifact_dir=tmp_path / "artifacts", db_connect_timeout=2, db_pool_timeout=3,
                             stale_after_seconds=6)
    key = make_key(settings, "alice")
    from api.app import create_app

    server = Server(create_app(settings))
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    slowest = [0.0]
    try:
        spawn_worker(settings)
        with client(server.url, key) as c:
            job = submit(c, inputs.model, inputs.clean, SLOW).json()
            wait_for(c, job["id"], lambda j: j["status"] == "running" and j["phase"] == "waiting", 60)

            def poll() -> None:  # a client polling status and listing jobs through the whole outage
                with client(server.url, key, timeout=30) as pc:
                    while not stop.is_set():
                        for path in (f"/v1/repairs/{job['id']}", "/v1/repairs?limit=5"):
                            t0 = time.monotonic()
                            try:
                                r = pc.get(path)
                            except httpx.HTTPError as exc:
                                bad.append(f"{path}: {exc!r}")
                                continue
                            slowest[0] = max(slowest[0], time.monotonic() - t0)
                            statuses[r.status_code] += 1
                            if r.status_code not in (200, 503):
                                bad.append(f"{path}: {r.status_code} {r.text[:200]}")
                            elif r.status_code == 503 and "database unavailable" not in r.json()["detail"]:
                                bad.append(f"{path}: 503 without a reason: {r.text[:200]}")
                        time.sleep(0.05)

            pollers = [threading.Thread(target=poll, daemon=True) for _ in range(3)]
            for t in pollers:
                t.start()
            time.sleep(0.5)
            private_pg.stop("immediate")  # a crash: every connection is cut
            t0 = time.monotonic()
            r = c.get(f"/v1/repairs/{job['id']}")
            assert r.status_code == 503, r.text
            assert "database unavailable" in r.json()["detail"] and r.headers["Retry-After"]
            assert time.monotonic() - t0 < 10
            down = submit(c, inputs.model, inputs.clean, SLOW)
            assert down.status_code == 503 and "database unavailable" in down.json()["detail"], down.text
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")
            assert c.get("/healthz").status_code == 200
            time.sleep(2)
            private_pg.start()
            wait_until(lambda: c.get(f"/v1/repairs/{job['id']}").status_code == 200, 20, "the API to recover")
            stop.set()
            for t in pollers:
                t.join(30)
            assert c.get("/readyz").status_code == 200
            done = wait_for(c, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 120)
            assert done["status"] == "succeeded", done  # the accepted job survived the outage
            again = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 1, "delay": 0}})
            assert again.status_code == 202, again.text
        assert not bad, bad[:5]
        assert statuses[503] > 0 and statuses[200] > 0, statuses
        assert slowest[0] < 15, f"a request took {slowest[0]:.1f}s during the outage"
    finally:
        stop.set()
        server.stop()


def test_hung_database_answers_503_in_bounded_time(redis_ok, tmp_path):
    """A database that accepts the TCP connection and never answers: connect_timeout bounds the wait."""
    silent = SilentServer()
    settings = make_settings(f"postgresql+psycopg://postgres@127.0.0.1:{silent.port}/x", tmp_path, "onprel-x:",
                             artifact_dir=tmp_path / "a", db_connect_timeout=2)
    from api.app import create_app

    server = Server(create_app(settings))
    try:
        for path in ("/v1/repairs", "/readyz"):
            t0 = time.monotonic()
            r = httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer onp_x_y"}, timeout=60)
            elapsed = time.monotonic() - t0
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert elapsed < 12, f"{path} took {elapsed:.1f}s against a hung database"
            body = r.json()
            assert "database" in (body.get("detail") or body.get("reason") or ""), body
    finally:
        server.stop()
        silent.close()
