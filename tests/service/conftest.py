"""Fixtures for the service tests: a throw-away Postgres database, an isolated Redis key
prefix, a real uvicorn server in a thread and real Celery worker subprocesses.

Nothing is mocked. Isolation from other people's runs on the same Postgres/Redis comes
from a random database name (``onp_test_<hex>``) and a random broker key prefix.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # slow_defense, for the API's validation in this process
import slow_defense  # noqa: E402,F401  (registers the test-only method "slow")

from store.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("ONP_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ONP_TEST_REDIS", "redis://127.0.0.1:6379/0")
# Same spec as tests/conftest.py's cifar_badnets_subject: used only when already cached (never trained here).


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/service" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.timeout(180))


# ---------------------------------------------------------------- infrastructure

@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh Postgres database for this session, dropped afterwards."""
    name = f"onp_test_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN}: {exc}")
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_ok() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


def make_settings(pg_url: str, root: Path, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=root, database_url=pg_url, broker_url=REDIS_URL, broker_key_prefix=prefix,
        artifact_dir=root / "artifacts", max_model_bytes=4 << 20, max_data_bytes=4 << 20,
        heartbeat_seconds=0.5, stale_after_seconds=4, maintenance_seconds=1, enqueue_grace_seconds=1,
        progress_write_seconds=0.1, job_time_limit=120, max_attempts=3, torch_threads=1,
        auto_migrate=False, embedded_worker=False,
    )
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``ONP_*`` environment that reproduces ``settings`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONP_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"ONP_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    if "ONP_CACHE_DIR" in os.environ:
        env["ONP_CACHE_DIR"] = os.environ["ONP_CACHE_DIR"]
    return env


@pytest.fixture(scope="session")
def settings(pg_url: str, redis_ok: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from store.db import upgrade

    s = make_settings(pg_url, tmp_path_factory.mktemp("service"), f"onptest-{secrets.token_hex(4)}:")
    upgrade(s.resolved_database_url)
    return s


class Worker:
    """``celery -A worker.celery_app worker`` as a subprocess in its own process group."""

    def __init__(self, settings: Settings, log: Path, queues: str = "cpu", pool: str = "prefork") -> None:
        self.log = log
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "-P", pool,
               "-c", "1", "-n", f"test-{secrets.token_hex(3)}@%h", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "-I", "slow_defense", "--loglevel", "INFO"]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=settings_env(settings), stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if b" ready." in self.log.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group: the worker gets no chance to clean up (a crashed machine)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(settings: Settings, **kw: Any) -> Worker:
        w = Worker(settings, tmp_path_factory.mktemp("worker") / "worker.log", **kw)
        started.append(w)
        w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def worker(settings: Settings, start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(settings)


class Server:
    """A real uvicorn server on 127.0.0.1 in a thread (signal handlers are skipped off the main thread)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[Server]:
    from api.app import create_app

    srv = Server(create_app(settings))
    yield srv
    srv.stop()


@dataclass
class Keys:
    alice: str
    bob: str


@pytest.fixture(scope="session")
def keys(settings: Settings) -> Keys:
    from store.db import database_for
    from store.keys import create_key

    db = database_for(settings)
    with db.session() as s:
        alice = create_key(s, "alice", "tests").key
        bob = create_key(s, "bob", "tests").key
    db.dispose()
    return Keys(alice, bob)


@pytest.fixture(scope="session")
def alice(server: Server, keys: Keys) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys.alice}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def bob(server: Server, keys: Keys) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.bob}, timeout=60) as c:
        yield c


# ---------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """Files a user would upload, plus what the test needs to check the results."""

    model: Path  # .safetensors with the manifest embedded
    model_pt: Path  # the same weights as a state_dict .pt
    manifest: dict[str, Any]
    clean: Path  # .npz of real CIFAR-10 images
    eval_set: Any  # ImageSet of real CIFAR-10 test images (disjoint from clean)
    triggered: Path | None
    target: int | None


def write_npz(path: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    np.savez(path, x=images.numpy(), y=labels.numpy())
    return path


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory, cifar_badnets_subject) -> Inputs:
    """The session's real backdoored CIFAR-10 subject (trained once per run, see tests/conftest.py)."""
    from onp_core.data import balanced_subset, load_dataset
    from onp_core.models import save_model

    root = tmp_path_factory.mktemp("inputs")
    test = load_dataset("cifar10", "test")
    # the test split is stored class by class: even indices for the clean upload,
    # odd ones for evaluation, so both are disjoint and cover every class
    upload_half, eval_half = test.subset(torch.arange(0, len(test), 2)), test.subset(torch.arange(1, len(test), 2))
    clean = balanced_subset(upload_half, 200, seed=0)
    eval_set = balanced_subset(eval_half, 500, seed=1)
    subject = cifar_badnets_subject
    model = subject.model
    trig = subject.attack.triggered_test_set(balanced_subset(upload_half, 200, seed=2))
    triggered, target = write_npz(root / "triggered.npz", trig.images, trig.labels), subject.attack.target
    path = save_model(model, root / "st" / "model.safetensors")
    pt = save_model(model, root / "pt" / "model.pt", "pt")
    return Inputs(path, pt, model.manifest.model_dump(mode="json"), write_npz(root / "clean.npz", clean.images,
                  clean.labels), eval_set, triggered, target)


def wait_for(client: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 90
             ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/repairs/{job_id}").raise_for_status().json()
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not reach the expected state in {timeout}s: {job}")
        time.sleep(0.2)


def submit(client: httpx.Client, model: Path, data: Path, options: dict[str, Any] | None = None,
           **extra: Any) -> httpx.Response:
    import json

    files: dict[str, Any] = {"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())}
    for name, value in extra.items():
        files[name] = (value.name, value.read_bytes()) if isinstance(value, Path) else (None, str(value))
    if options is not None:
        files["options"] = (None, json.dumps(options))
    return client.post("/v1/repairs", files=files)


def job_count(settings: Settings) -> int:
    from sqlalchemy import func, select

    from store.db import database_for
    from store.models import Job

    db = database_for(settings)
    try:
        with db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job)) or 0)
    finally:
        db.dispose()


def new_id() -> str:
    return str(uuid.uuid4())
