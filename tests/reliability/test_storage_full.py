"""Disk full: a real size-limited tmpfs as the artifact store (or the upload spool folder), filled up.

Uploads get 507 with the reason and store nothing; a worker that cannot save the repaired model fails the
job with the reason; no partial blob is left under a servable name.
"""
from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from onp_service_fixtures import PG_ADMIN, Server, make_settings, submit, wait_for
from relutil import client, create_database, fill, make_key, tmpfs, umount


@pytest.fixture(scope="module")
def db_url(redis_ok):
    """Own database: these tests use their own artifact folders, and every worker sharing a database must
    share its artifact store (other tests' workers would otherwise pick these jobs up, or the reverse)."""
    url, drop = create_database(PG_ADMIN)
    yield url
    drop()


@pytest.fixture()
def small_disk(tmp_path: Path):
    mounted: list[Path] = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        if not tmpfs(path, size):
            pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        umount(path)


def _counts(settings) -> tuple[int, int]:
    from store.db import database_for
    from store.models import Artifact, Job

    db = database_for(settings)
    try:
        with db.session() as s:
            return (int(s.scalar(select(func.count()).select_from(Job)) or 0),
                    int(s.scalar(select(func.count()).select_from(Artifact)) or 0))
    finally:
        db.dispose()


def _blobs(root: Path) -> list[Path]:
    return [p for p in root.glob("??/*") if p.is_file()]


def test_upload_to_a_full_artifact_store_is_507(db_url, inputs, small_disk, tmp_path) -> None:
    disk = small_disk("artifacts", "4m")
    own = make_settings(db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:", artifact_dir=disk)
    key = make_key(own, "alice")
    from api.app import create_app

    server = Server(create_app(own))
    try:
        fill(disk, leave=64 << 10)
        before = _counts(own)
        with client(server.url, key) as c:
            r = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 1, "delay": 0}})
        assert r.status_code == 507, r.text
        assert "insufficient storage" in r.json()["detail"] and r.headers.get("retry-after")
        assert _counts(own) == before  # no job, no artifact row
        assert _blobs(disk) == [] and list((disk / ".tmp").iterdir()) == []  # nothing half-written
    finally:
        server.stop()


def test_upload_spool_folder_full_is_507(db_url, inputs, small_disk, monkeypatch, tmp_path) -> None:
    """The streaming parser's temp folder fills up mid-upload: 507, not 400 'malformed body', not 500."""
    own = make_settings(db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:", artifact_dir=tmp_path / "artifacts")
    key = make_key(own, "alice")
    from api.app import create_app

    server = Server(create_app(own))
    try:
        spool = small_disk("spool", "256k")
        monkeypatch.setattr(tempfile, "tempdir", str(spool))
        before = _counts(own)
        with client(server.url, key) as c:
            r = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 1, "delay": 0}})
        assert r.status_code == 507, r.text
        assert "insufficient storage" in r.json()["detail"]
        assert _counts(own) == before
        assert list(spool.iterdir()) == []  # the partial spool files were removed
    finally:
        server.stop()


def test_worker_cannot_save_result_fails_with_reason(db_url, inputs, small_disk, spawn_worker, tmp_path) -> None:
    disk = small_disk("artifacts", "8m")
    own = make_settings(db_url, tmp_path, f"onprel-{secrets.token_hex(3)}:", artifact_dir=disk)
    key = make_key(own, "alice")
    from api.app import create_app

    server = Server(create_app(own))
    try:
        spawn_worker(own)
        with client(server.url, key) as c:
            job = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 40, "delay": 0.1}})
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            wait_for(c, job_id, lambda j: j["status"] == "running" and j["phase"] == "waiting", 60)
            inputs_blobs = set(_blobs(disk))
            fill(disk, leave=0)  # the disk fills up while the repair runs
            done = wait_for(c, job_id, lambda j: j["status"] in ("succeeded", "failed"), 90)
            assert done["status"] == "failed", done
            assert "out of storage space while saving" in done["error"], done["error"]
            assert c.get(f"/v1/repairs/{job_id}/model").status_code == 409
        assert set(_blobs(disk)) == inputs_blobs  # no new (let alone partial) blob
        assert list((disk / ".tmp").iterdir()) == []
        from store.artifacts import LocalArtifactStore

        store = LocalArtifactStore(disk)
        for blob in inputs_blobs:
            store.verify(blob.name)
    finally:
        server.stop()
