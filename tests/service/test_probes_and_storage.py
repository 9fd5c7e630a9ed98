"""Probes, the artifact store and the compose file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, make_settings
from store.artifacts import LocalArtifactStore, materialize

pytestmark = pytest.mark.integration


def test_healthz_and_readyz(server, alice: httpx.Client) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok", "checks": {}, "reason": None}
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "artifacts": "ok"}


def test_readyz_reports_unreachable_dependencies(tmp_path: Path) -> None:
    import asyncio

    from api.app import create_app

    broken = make_settings("postgresql+psycopg://postgres@127.0.0.1:1/nope", tmp_path, "x:",
                           broker_url="redis://127.0.0.1:1/0")
    app = create_app(broken, start_worker=False)

    async def probe() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/readyz")

    r = asyncio.run(probe())
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("unreachable") and body["checks"]["broker"].startswith("unreachable")
    assert "database" in body["reason"] and "broker" in body["reason"]


def test_openapi_is_clean(alice: httpx.Client) -> None:
    spec = alice.get("/openapi.json").json()
    post = spec["paths"]["/v1/repairs"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")
    job = spec["components"]["schemas"]["JobOut"]["properties"]
    assert {"id", "status", "method", "progress", "phase", "metrics", "links"} <= set(job)
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert op.get("tags"), path


def test_artifact_store_is_content_addressed(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "a")
    blob = b"weights" * 1000
    sha, size = store.put([blob[:10], blob[10:]])
    assert sha == hashlib.sha256(blob).hexdigest() and size == len(blob)
    assert store.put([blob]) == (sha, size)  # stored once
    assert store.exists(sha) and store.open(sha).read() == blob
    store.verify(sha)
    assert list((tmp_path / "a" / ".tmp").iterdir()) == []  # no temp files left behind
    out = materialize(store, sha, tmp_path / "x" / "model.safetensors")
    assert out.read_bytes() == blob
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(ValueError):
        store.open("../../etc/passwd")


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)

    def chunks():
        yield b"partial"
        raise OSError("disk gone")

    with pytest.raises(OSError):
        store.put(chunks())
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert [p for p in tmp_path.iterdir() if p.name != ".tmp"] == []


def test_compose_file() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "api", "worker", "worker-gpu"} <= set(services)
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["ONP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["ONP_BROKER_URL"].startswith("redis://")
        assert "ONP_ARTIFACT_DIR" in env
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "gpu" in " ".join(services["worker-gpu"]["command"])
    assert "cpu" in " ".join(services["worker"]["command"])
    assert "profiles" not in services["worker"]
    # api and workers share the artifact volume, and wait for healthy dependencies
    for name in ("api", "worker", "worker-gpu"):
        assert any(str(v).startswith("artifacts:") for v in services[name]["volumes"])
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (REPO / "Dockerfile").exists()
