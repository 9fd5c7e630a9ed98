"""The API process SIGKILLed between committing a job and publishing it (outbox), and duplicate
submissions racing with one ``Idempotency-Key``."""
from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from onp_service_fixtures import wait_for
from relutil import ApiProcess, client, job_row


def _jobs_with_key(settings, idem: str) -> list:
    from store.db import database_for
    from store.models import Job

    db = database_for(settings)
    try:
        with db.session() as s:
            return list(s.scalars(select(Job).where(Job.idempotency_key == idem)))
    finally:
        db.dispose()


def test_api_killed_between_commit_and_publish(settings, keys, inputs, worker, tmp_path: Path) -> None:
    idem = f"outbox-{uuid.uuid4()}"
    dying = ApiProcess(settings, tmp_path / "api-dying.log", {"ONP_TEST_DIE_BEFORE_ENQUEUE": "1"})
    try:
        with client(dying.url, keys.alice) as c, pytest.raises(httpx.TransportError):
            c.post("/v1/repairs", headers={"Idempotency-Key": idem}, files={
                "model": (inputs.model.name, inputs.model.read_bytes()),
                "data": (inputs.clean.name, inputs.clean.read_bytes()),
                "options": (None, json.dumps({"method": "slow", "options": {"steps": 2, "delay": 0}}))})
        dying.proc.wait(10)
        assert dying.proc.returncode == -9  # SIGKILL: no cleanup ran
    finally:
        dying.stop()
    [job] = _jobs_with_key(settings, idem)  # the row was committed, the task never published
    assert job.status == "queued" and job.enqueued_at is None

    api = ApiProcess(settings, tmp_path / "api.log")  # the API comes back; the worker's reconciler sends the job
    try:
        with client(api.url, keys.alice) as c:
            done = wait_for(c, str(job.id), lambda j: j["status"] in ("succeeded", "failed"), 90)
            assert done["status"] == "succeeded", done
            assert job_row(settings, job.id).enqueued_at is not None
            # the client, which saw its connection drop, retries with the same key: the same job, not a new one
            r = c.post("/v1/repairs", headers={"Idempotency-Key": idem}, files={
                "model": (inputs.model.name, inputs.model.read_bytes()),
                "data": (inputs.clean.name, inputs.clean.read_bytes())})
            assert r.status_code == 200 and r.json()["id"] == str(job.id)
    finally:
        api.stop()
    assert len(_jobs_with_key(settings, idem)) == 1


def test_concurrent_duplicates_with_one_idempotency_key(server, keys, inputs, settings) -> None:
    """Eight identical submissions at once: one 202, seven 200, one job."""
    idem = f"race-{uuid.uuid4()}"
    files = {"model": (inputs.model.name, inputs.model.read_bytes()),
             "data": (inputs.clean.name, inputs.clean.read_bytes()),
             "options": (None, json.dumps({"method": "slow", "options": {"steps": 1, "delay": 0}}))}
    barrier = threading.Barrier(8)
    results: list[httpx.Response] = []

    def one() -> None:
        with client(server.url, keys.alice, timeout=120) as c:
            barrier.wait()
            results.append(c.post("/v1/repairs", headers={"Idempotency-Key": idem}, files=files))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8
    codes = sorted(r.status_code for r in results)
    assert codes.count(202) == 1 and codes.count(200) == 7, [(r.status_code, r.text[:200]) for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert len(_jobs_with_key(settings, idem)) == 1
    # the same key from another user is another job (keys are scoped per user)
    with client(server.url, keys.bob) as c:
        other = c.post("/v1/repairs", headers={"Idempotency-Key": idem}, files=files)
    assert other.status_code == 202 and other.json()["id"] != results[0].json()["id"]
