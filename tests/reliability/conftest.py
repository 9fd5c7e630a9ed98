"""Fixtures for the reliability suite: the service fixtures (real API, real Celery workers, shared
Postgres/Redis isolated by a random database and key prefix), plus private Redis servers and
Postgres clusters that tests may kill and restart freely (never the shared ones).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_SERVICE = Path(__file__).resolve().parents[1] / "service"
sys.path.insert(0, str(Path(__file__).parent))
if "onp_service_fixtures" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("onp_service_fixtures", _SERVICE / "conftest.py")
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["onp_service_fixtures"] = _module
    _spec.loader.exec_module(_module)

from onp_service_fixtures import (alice, bob, inputs, keys, pg_url, redis_ok, server, settings,  # noqa: E402,F401
                                  start_worker, worker)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)
            if not any(m.name == "timeout" for m in item.iter_markers()):
                item.add_marker(pytest.mark.timeout(240))
