"""Redis faults: restarted (non-persistent, so every queued message vanishes) while jobs are queued and
one runs; down while a job is submitted; hung (accepts TCP, never answers) while a job is submitted.

Each test runs its own ``redis-server`` (never the shared one) and its own database.
"""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
import pytest

from onp_service_fixtures import PG_ADMIN, Server, make_settings, submit, wait_for
from relutil import PrivateRedis, SilentServer, client, create_database, job_row, make_key, wait_until

SLOW_LONG = {"method": "slow", "options": {"steps": 60, "delay": 0.1}}
SLOW_SHORT = {"method": "slow", "options": {"steps": 3, "delay": 0.05}}


@pytest.fixture(scope="module")
def db_url():
    url, drop = create_database(PG_ADMIN)
    yield url
    drop()


@pytest.fixture()
def private_redis(tmp_path: Path):
    r = PrivateRedis(tmp_path / "redis")
    yield r
    r.kill()


def test_redis_restart_with_queued_and_running_jobs(db_url, private_redis, spawn_worker, inputs, tmp_path):
    """Kill Redis (no persistence) while one job runs and three wait in its queue, restart it empty:
    the running job still finishes, the reconciler notices the broker lost its data (sentinel key gone)
    and re-sends the queued jobs; a job submitted while Redis is down is accepted (outbox) and runs later."""
    settings = make_settings(db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:", broker_url=private_redis.url,
                             artifact_dir=tmp_path / "artifacts", broker_connect_timeout=1.0)
    key = make_key(settings, "alice")
    server = Server(__import__("api.app", fromlist=["create_app"]).create_app(settings))
    try:
        spawn_worker(settings)
        with client(server.url, key) as c:
            running = submit(c, inputs.model, inputs.clean, SLOW_LONG).json()
            wait_for(c, running["id"], lambda j: j["status"] == "running" and j["phase"] == "waiting", 60)
            queued = [submit(c, inputs.model, inputs.clean, SLOW_SHORT).json() for _ in range(3)]
            assert all(job_row(settings, j["id"]).enqueued_at is not None for j in queued)
            r = private_redis.client()
            assert r.llen(f"{settings.broker_key_prefix}cpu") >= 3  # (+ harmless duplicates from the reconciler)

            private_redis.kill()  # every message is gone
            t0 = time.monotonic()
            during = submit(c, inputs.model, inputs.clean, SLOW_SHORT)  # broker down: accepted, not sent
            assert during.status_code == 202, during.text
            assert time.monotonic() - t0 < 15, "a submission hung on the dead broker"
            during_id = during.json()["id"]
            assert job_row(settings, during_id).enqueued_at is None
            ready = httpx.get(f"{server.url}/readyz", timeout=15)
            assert ready.status_code == 503 and "broker" in ready.json()["reason"]
            assert c.get(f"/v1/repairs/{running['id']}").status_code == 200  # reads never need the broker

            private_redis.start()  # empty: no queue, no sentinel
            ids = [running["id"], during_id, *(j["id"] for j in queued)]
            done = {i: wait_for(c, i, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 120)
                    for i in ids}
        assert {i: j["status"] for i, j in done.items()} == {i: "succeeded" for i in ids}, done
        assert all(j["attempts"] >= 1 for j in done.values())
        assert httpx.get(f"{server.url}/readyz", timeout=15).status_code == 200
    finally:
        server.stop()


def test_hung_broker_does_not_hang_submissions(db_url, inputs, tmp_path):
    """A broker that accepts TCP but never answers: the publish gives up after its connect timeout and
    retries, the job is still accepted (202, outbox) and the readiness probe says why."""
    silent = SilentServer()
    settings = make_settings(db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:",
                             broker_url=f"redis://127.0.0.1:{silent.port}/0", artifact_dir=tmp_path / "a",
                             broker_connect_timeout=1.0, broker_socket_timeout=1.0)
    key = make_key(settings, "alice")
    from api.app import create_app

    server = Server(create_app(settings))
    try:
        with client(server.url, key, timeout=60) as c:
            t0 = time.monotonic()
            r = submit(c, inputs.model, inputs.clean, SLOW_SHORT)
            elapsed = time.monotonic() - t0
            assert r.status_code == 202, r.text
            assert elapsed < 20, f"submission took {elapsed:.1f}s against a hung broker"
            assert job_row(settings, r.json()["id"]).enqueued_at is None  # left for the reconciler
            t0 = time.monotonic()
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "broker: unreachable" in ready.json()["reason"]
            assert time.monotonic() - t0 < 20
    finally:
        server.stop()
        silent.close()


@pytest.fixture()
def own_db_url():
    url, drop = create_database(PG_ADMIN)
    yield url
    drop()


def test_reconciler_resends_published_jobs_after_sentinel_loss_or_age(own_db_url, private_redis, inputs, tmp_path):
    """The maintenance pass in isolation (no worker): a job whose message vanished is sent again when the
    broker's sentinel is gone, and, as a backstop, when it has been queued too long since its last publish."""
    from datetime import timedelta

    from store.db import database_for
    from store.models import Job, utcnow
    from worker.celery_app import make_celery
    from worker.context import ServiceContext
    from worker.maintenance import run_maintenance

    settings = make_settings(own_db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:", broker_url=private_redis.url,
                             artifact_dir=tmp_path / "a", requeue_queued_after_seconds=60)
    key = make_key(settings, "alice")
    from api.app import create_app

    server = Server(create_app(settings))
    queue_key = f"{settings.broker_key_prefix}cpu"
    try:
        with client(server.url, key) as c:
            job = submit(c, inputs.model, inputs.clean, SLOW_SHORT).json()
        r = private_redis.client()
        assert r.llen(queue_key) == 1
        app = make_celery(settings)
        ctx = ServiceContext.from_settings(settings)
        first = run_maintenance(ctx, app)  # first pass ever: no sentinel yet, so it re-sends (harmless)
        assert first["broker_lost"] is True and first["resent"] == [job["id"]]
        assert run_maintenance(ctx, app)["resent"] == []  # sentinel present, job recently sent: nothing
        r.flushall()  # the broker loses its data
        out = run_maintenance(ctx, app)
        assert out["broker_lost"] is True and out["resent"] == [job["id"]] and r.llen(queue_key) == 1
        # backstop: sentinel intact, but the job has waited longer than requeue_queued_after_seconds
        r.delete(queue_key)
        db = database_for(settings)
        with db.session() as s:
            s.get(Job, __import__("uuid").UUID(job["id"])).enqueued_at = utcnow() - timedelta(seconds=120)
        out = run_maintenance(ctx, app)
        assert out["broker_lost"] is False and out["resent"] == [job["id"]] and r.llen(queue_key) == 1
        assert job_row(settings, job["id"]).enqueued_at > utcnow() - timedelta(seconds=30)
        db.dispose()
        ctx.db.dispose()
    finally:
        server.stop()
