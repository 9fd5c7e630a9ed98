"""The Celery application: Redis (or in-process ``memory://``) broker, one task per job.

A message carries only the job id; everything else lives in the database and the
artifact store, so a message can be re-sent (reconciler) or redelivered (worker lost)
without harm — the claim in the database decides who runs the job. ``acks_late`` with
``task_reject_on_worker_lost`` puts a job's message back when its worker dies, and
``worker_prefetch_multiplier=1`` keeps one long CPU-bound repair from sitting behind
another in a busy worker's prefetch buffer.

``celery -A worker.celery_app worker -Q cpu`` uses the module-level :data:`app`
built from ``ONP_`` environment variables.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from kombu import Queue

from store import jobs
from store.db import Database
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_RUN = "onp.run_repair"
TASK_MAINTENANCE = "onp.maintenance"
QUEUES = ("cpu", "gpu")


def make_celery(settings: Settings) -> Celery:
    """A configured Celery app with the service's tasks registered on it."""
    app = Celery("onp", broker=settings.broker_url, set_as_current=False)
    transport: dict[str, Any] = {}
    if settings.is_embedded_broker:
        transport["polling_interval"] = 0.05
    else:
        # A message unacked this long is handed to another worker; it must outlive the longest job.
        transport["visibility_timeout"] = settings.job_time_limit + 600
        # Bounded waits: a down or half-open broker makes a publish fail fast (the job stays for the
        # reconciler) instead of hanging an API request; consumers reconnect on their own.
        transport["socket_connect_timeout"] = settings.broker_connect_timeout
        transport["socket_timeout"] = settings.broker_socket_timeout
        transport["socket_keepalive"] = True
        if settings.broker_key_prefix:
            transport["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_time_limit,
        task_time_limit=settings.job_time_limit + 60,
        task_ignore_result=True,
        result_backend=None,
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="cpu",
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_connect_timeout,
        broker_connection_max_retries=None,  # a worker outlives any broker outage and reconnects
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=100,  # bounds slow leaks from long-lived torch processes
        worker_send_task_events=False,
        enable_utc=True,
    )
    app.onp_settings = settings  # type: ignore[attr-defined]
    from . import tasks

    tasks.register(app)
    return app


def enqueue(app: Celery, db: Database, job_id: uuid.UUID, queue: str) -> bool:
    """Publish the job's task and record that it was sent; False (job stays for the reconciler) on failure."""

    try:
        app.send_task(TASK_RUN, args=[str(job_id)], queue=queue)
    except Exception as exc:  # broker down: the reconciler sends it later
        log.warning("could not enqueue job %s: %s", job_id, exc)
        return False
    with db.session() as s:
        jobs.mark_enqueued(s, job_id)
    return True


app = make_celery(get_settings())
