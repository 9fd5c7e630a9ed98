"""The zero-configuration mode of ``onp serve``: SQLite, a local folder and an in-process
Celery worker on the ``memory://`` transport — the same task code as a distributed deployment."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import Inputs, Server, submit, wait_for
from store.settings import Settings


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Server, str, Settings]:
    from api.app import create_app
    from store.db import database_for, upgrade
    from store.keys import create_key

    settings = Settings(data_dir=tmp_path_factory.mktemp("embedded") / "var", heartbeat_seconds=0.5,
                        progress_write_seconds=0.1, torch_threads=1)
    assert settings.is_sqlite and settings.is_embedded_broker and settings.should_run_embedded_worker
    upgrade(settings.resolved_database_url)
    db = database_for(settings)
    with db.session() as s:
        key = create_key(s, "local").key
    db.dispose()
    srv = Server(create_app(settings))
    yield srv, key, settings
    srv.stop()


def test_embedded_repair_and_cancel(embedded, inputs: Inputs, tmp_path: Path) -> None:
    from onp_core.models import load_model

    srv, key, settings = embedded
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        assert c.get("/readyz").json()["checks"]["broker"] == "ok"
        job = submit(c, inputs.model_pt, inputs.clean, {"method": "clp"},
                     manifest=inputs.model.with_name("manifest.json")).json()
        done = wait_for(c, job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=120)
        assert done["status"] == "succeeded", done["error"]
        path = tmp_path / "repaired.pt"
        path.write_bytes(c.get(done["links"]["model"]).content)
        from onp_core.models import ModelManifest

        assert load_model(path, ModelManifest.model_validate(inputs.manifest)).format == "pt"
        assert (settings.data_dir / "onp.sqlite3").exists()
        slow = submit(c, inputs.model, inputs.clean, {"method": "slow", "options": {"steps": 300, "delay": 0.1}})
        slow_id = slow.json()["id"]
        wait_for(c, slow_id, lambda j: j["phase"] == "waiting", timeout=60)
        assert c.post(f"/v1/repairs/{slow_id}/cancel").status_code == 202
        assert wait_for(c, slow_id, lambda j: j["status"] != "running", timeout=30)["status"] == "cancelled"
