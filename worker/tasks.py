"""Celery tasks: a thin shell over :func:`worker.pipeline.execute_job`, plus maintenance.

Tasks are registered per Celery app (``register``) rather than with a module-level
decorator, so the API, the embedded worker and tests can each build an app from their
own :class:`Settings` without sharing global state.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown

from .context import ServiceContext

log = logging.getLogger(__name__)
_lock = threading.Lock()


def get_context(app: Celery) -> ServiceContext:
    """The app's context, built on first use in each process (after any fork)."""
    ctx: ServiceContext | None = getattr(app, "_onp_context", None)
    if ctx is None:
        with _lock:
            ctx = getattr(app, "_onp_context", None)
            if ctx is None:
                settings = app.onp_settings  # type: ignore[attr-defined]
                if settings.torch_threads:
                    import torch

                    torch.set_num_threads(settings.torch_threads)
                ctx = ServiceContext.from_settings(settings)
                app._onp_context = ctx  # type: ignore[attr-defined]
    return ctx


def register(app: Celery) -> None:
    from .celery_app import TASK_MAINTENANCE, TASK_RUN

    @app.task(name=TASK_RUN, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)
    def run_repair_job(self: Task, job_id: str) -> str:
        from .pipeline import execute_job

        token = f"{self.request.hostname or 'worker'}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        return execute_job(get_context(self.app), uuid.UUID(job_id), token)

    @app.task(name=TASK_MAINTENANCE, bind=True, shared=False)
    def maintenance(self: Task) -> dict[str, Any]:
        from .maintenance import run_maintenance

        return run_maintenance(get_context(self.app), self.app)


@worker_ready.connect
def _start_maintenance(sender: Any = None, **_: Any) -> None:
    """Every worker runs the reaper/reconciler in a thread; their conditional updates make overlap harmless."""
    app = getattr(sender, "app", None)
    if app is None or not hasattr(app, "onp_settings"):
        return
    from .maintenance import MaintenanceThread

    thread = MaintenanceThread(get_context(app), app)
    thread.start()
    app._onp_maintenance = thread  # type: ignore[attr-defined]


@worker_shutdown.connect
def _stop_maintenance(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    thread = getattr(app, "_onp_maintenance", None)
    if thread is not None:
        thread.stop()
