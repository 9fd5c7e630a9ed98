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

from onp_service_fixtures import (alice, bob, keys, pg_url, redis_ok, server, settings,  # noqa: E402,F401
                                  start_worker, worker)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    """What a user uploads: a small_cnn (untrained: faults and hostile inputs do not need a backdoored model,
    and training one would cost minutes) and 200 real CIFAR-10 test images."""
    import torch

    from onp_core.data import balanced_subset, load_dataset
    from onp_core.models import ModelManifest, build_model, save_model
    from onp_service_fixtures import Inputs, write_npz

    root = tmp_path_factory.mktemp("inputs")
    test = load_dataset("cifar10", "test")
    clean = balanced_subset(test.subset(torch.arange(0, len(test), 2)), 200, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelManifest(arch="small_cnn", num_classes=10, input_shape=(3, 32, 32)))
    path = save_model(model, root / "st" / "model.safetensors")
    pt = save_model(model, root / "pt" / "model.pt", "pt")
    return Inputs(path, pt, model.manifest.model_dump(mode="json"), write_npz(root / "clean.npz", clean.images,
                  clean.labels), None, None, None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)
            if not any(m.name == "timeout" for m in item.iter_markers()):
                item.add_marker(pytest.mark.timeout(240))


@pytest.fixture()
def spawn_worker(tmp_path_factory: pytest.TempPathFactory):
    """Like ``start_worker``, but the workers die with the test: a worker left running would keep serving (and
    reconciling) jobs of later tests that share its database."""
    from onp_service_fixtures import Worker

    started: list[Worker] = []

    def start(settings, **kw):
        w = Worker(settings, tmp_path_factory.mktemp("worker") / "worker.log", **kw)
        started.append(w)
        w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()
