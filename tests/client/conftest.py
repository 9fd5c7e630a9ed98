"""Client tests run against the same real stack as the service tests (uvicorn API + Celery worker
process on Postgres/Redis): the service fixtures are loaded from ``tests/service/conftest.py`` by path
and re-exported here, so nothing about the stack is duplicated or mocked.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest


def load_service_fixtures() -> ModuleType:
    """``tests/service/conftest.py`` as module ``onp_service_fixtures`` (imported once per session)."""
    name = "onp_service_fixtures"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "service" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


svc = load_service_fixtures()
pg_url, redis_ok, settings, start_worker = svc.pg_url, svc.redis_ok, svc.settings, svc.start_worker
worker, server, keys, inputs, alice, bob = svc.worker, svc.server, svc.keys, svc.inputs, svc.alice, svc.bob


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/client" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.timeout(240))


@pytest.fixture(autouse=True)
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the developer's ~/.config/onp or environment credentials."""
    path = tmp_path / "onp-config.toml"
    monkeypatch.setenv("ONP_CONFIG", str(path))
    for name in ("ONP_SERVER", "ONP_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONP_DATA_DIR", str(tmp_path / "no-embedded-key"))
    return path
