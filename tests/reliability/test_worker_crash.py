"""Workers SIGKILLed mid-repair, and writers SIGKILLed mid-artifact.

tests/service already proves one kill → requeue → success. Here: a job whose worker dies on every
attempt ends ``failed`` with the reason after ``max_attempts`` (never stuck ``running``); a process killed
while writing a blob leaves nothing under a servable name; and the model endpoint, polled throughout a
job that survives a kill, only ever answers 409 or the complete file with its checksum.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx

import pytest

from onp_service_fixtures import PG_ADMIN, REPO, Server, make_settings, submit, wait_for
from relutil import client, create_database, job_row, make_key, wait_until


@pytest.fixture(scope="module")
def db_url(redis_ok):
    """Own database, so no other test's worker (whose reconciler sends any queued job) can run these jobs."""
    url, drop = create_database(PG_ADMIN)
    yield url
    drop()


def _own_settings(db_url: str, tmp_path: Path, **kw):
    return make_settings(db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:", artifact_dir=tmp_path / "artifacts",
                         **kw)


def test_worker_killed_on_every_attempt_fails_with_reason(db_url, inputs, spawn_worker, tmp_path) -> None:
    own = _own_settings(db_url, tmp_path, max_attempts=2, stale_after_seconds=2)
    key = make_key(own, f"alice-{secrets.token_hex(3)}")
    from api.app import create_app

    server = Server(create_app(own))
    try:
        with client(server.url, key) as c:
            job = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 300, "delay": 0.1}})
            job_id = job.json()["id"]
            for attempt in (1, 2):
                w = spawn_worker(own)
                wait_for(c, job_id, lambda j, a=attempt: j["status"] == "running" and j["attempts"] == a
                         and j["phase"] == "waiting", 60)
                w.kill()
            # no worker left alive: run the reaper pass exactly as a worker's maintenance thread would
            from worker.celery_app import make_celery
            from worker.context import ServiceContext
            from worker.maintenance import run_maintenance

            ctx = ServiceContext.from_settings(own)
            wait_until(lambda: ("failed" in dict(run_maintenance(ctx, make_celery(own))["reaped"]).values()
                                or job_row(own, job_id).status != "running"), 30, "the reaper")
            ctx.db.dispose()
            done = c.get(f"/v1/repairs/{job_id}").json()
        assert done["status"] == "failed" and done["attempts"] == 2, done
        assert "worker lost during attempt 2 of 2" in done["error"], done["error"]
        assert done["finished_at"] is not None
    finally:
        server.stop()


WRITER = r"""
import sys, time
from store.artifacts import LocalArtifactStore
store = LocalArtifactStore(sys.argv[1])
def chunks():
    for i in range(10_000):
        yield bytes([i % 256]) * (1 << 16)
        if i == 20:
            print("writing", flush=True)
        time.sleep(0.001)
store.put(chunks())
print("finished", flush=True)
"""


def test_writer_killed_mid_artifact_leaves_nothing_servable(tmp_path: Path) -> None:
    from store.artifacts import LocalArtifactStore

    root = tmp_path / "store"
    LocalArtifactStore(root)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    blobs = [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    assert blobs == []  # no half-written blob under a valid (sha256) name, so nothing can serve it
    partial = list((root / ".tmp").iterdir())
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the torso is only in the temp folder
    store = LocalArtifactStore(root)
    assert store.sweep_tmp(older_than=3600) == 0  # young temp files are left alone (a writer may be alive)
    assert store.sweep_tmp(older_than=0) == 1 and list((root / ".tmp").iterdir()) == []


def test_model_download_is_never_partial_across_a_worker_kill(db_url, inputs, spawn_worker, tmp_path) -> None:
    """Poll /model as fast as possible while a job runs, loses its worker, is requeued and finishes:
    every answer is a 409 or the whole file matching its X-Checksum-SHA256 and Content-Length."""
    own = _own_settings(db_url, tmp_path, stale_after_seconds=2)
    key = make_key(own, f"alice-{secrets.token_hex(3)}")
    from api.app import create_app

    server = Server(create_app(own))
    seen: dict[int, int] = {}
    problems: list[str] = []
    stop = threading.Event()
    try:
        with client(server.url, key) as c:
            job_id = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 30, "delay": 0.1}}
                            ).json()["id"]

            def poll() -> None:
                with client(server.url, key) as pc:
                    while not stop.is_set():
                        r = pc.get(f"/v1/repairs/{job_id}/model")
                        seen[r.status_code] = seen.get(r.status_code, 0) + 1
                        if r.status_code == 200:
                            body = r.content
                            if (hashlib.sha256(body).hexdigest() != r.headers["x-checksum-sha256"]
                                    or len(body) != int(r.headers["content-length"])):
                                problems.append(f"partial or corrupt download: {len(body)} bytes")
                        elif r.status_code != 409:
                            problems.append(f"{r.status_code}: {r.text[:200]}")
                        time.sleep(0.01)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            first = spawn_worker(own)
            wait_for(c, job_id, lambda j: j["status"] == "running" and j["phase"] == "waiting", 60)
            first.kill()
            spawn_worker(own)
            done = wait_for(c, job_id, lambda j: j["status"] in ("succeeded", "failed"), 90)
            time.sleep(0.5)
            stop.set()
            poller.join(10)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        assert not problems, problems[:3]
        assert seen.get(409, 0) > 0 and seen.get(200, 0) > 0, seen
        # every blob in the store still matches its name
        from store.artifacts import LocalArtifactStore

        store = LocalArtifactStore(own.resolved_artifact_dir)
        for blob in own.resolved_artifact_dir.glob("??/*"):
            store.verify(blob.name)
    finally:
        stop.set()
        server.stop()
