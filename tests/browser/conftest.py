"""Browser tests: the dashboard in headless Debian Chromium driven by Playwright, against the real stack.

The stack fixtures come from ``tests/service/conftest.py`` (loaded by path, as in tests/client).
Chromium is the system one (``/usr/bin/chromium``); Playwright's own browser downloads are never used.
Screenshots go to ``test-artifacts/browser/`` (gitignored) for a person to look at.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("ONP_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


def _service_fixtures() -> ModuleType:
    name = "onp_service_fixtures"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "service" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


svc = _service_fixtures()
pg_url, redis_ok, settings, start_worker = svc.pg_url, svc.redis_ok, svc.settings, svc.start_worker
worker, server, keys, inputs, alice = svc.worker, svc.server, svc.keys, svc.inputs, svc.alice


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = None
    if not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ONP_TEST_CHROMIUM)"
    elif importlib.util.find_spec("playwright") is None:
        reason = "playwright is not installed (pip install -e '.[test]')"
    for item in items:
        if "tests/browser" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.timeout(300))
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh persistent Chromium context (its own user-data-dir), downloads accepted."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS, accept_downloads=True,
            viewport={"width": 1280, "height": 900}, downloads_path=str(tmp_path / "downloads"))
        ctx.set_default_timeout(30_000)
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
