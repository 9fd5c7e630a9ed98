"""The embedded worker: a real Celery worker (solo pool) in a thread of the API process.

``onp serve`` with no configuration uses the ``memory://`` transport, which only
exists inside one process, so the worker must live there too. Running Celery's own
``WorkController`` (the machinery ``celery.contrib.testing`` uses) keeps the exact
task code path of a distributed deployment: same task, same acks, same claim.
"""
from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.contrib.testing.worker import TestWorkController

from .celery_app import QUEUES
from .maintenance import MaintenanceThread
from .tasks import get_context

log = logging.getLogger(__name__)


class EmbeddedWorker:
    def __init__(self, app: Celery, queues: tuple[str, ...] = QUEUES) -> None:
        self.app = app
        self.queues = queues
        self._worker: TestWorkController | None = None
        self._thread: threading.Thread | None = None
        self._maintenance: MaintenanceThread | None = None

    def start(self, timeout: float = 30.0) -> None:
        # The solo pool traces tasks through the *current* app: make it this one (one embedded app per process).
        self.app.finalize()
        self.app.set_current()
        self.app.set_default()
        self._worker = TestWorkController(
            app=self.app, concurrency=1, pool="solo", queues=list(self.queues), hostname="embedded@localhost",
            loglevel="WARNING", ready_callback=None, without_heartbeat=True, without_mingle=True,
            without_gossip=True,
        )
        self._thread = threading.Thread(target=self._worker.start, name="onp-embedded-worker", daemon=True)
        self._thread.start()
        if not self._worker._on_started.wait(timeout):
            raise RuntimeError("embedded worker did not start")
        self._maintenance = MaintenanceThread(get_context(self.app), self.app)
        self._maintenance.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._maintenance is not None:
            self._maintenance.stop()
        if self._worker is not None:
            self._worker.stop(in_sighandler=False, exitcode=0)
        if self._thread is not None:
            self._thread.join(timeout)
