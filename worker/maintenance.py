"""Reaper and reconciler: the periodic repairs that keep jobs from getting stuck.

- reaper: a ``running`` job whose heartbeat is older than ``stale_after_seconds`` lost
  its worker (killed, OOM, machine gone). It is requeued while attempts remain, else
  failed with the reason; one running longer than the time limit is failed.
- reconciler (outbox): a ``queued`` job that was never published (the API died
  between its commit and the publish, the broker was down, or the reaper requeued it)
  is published now.
"""
from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from celery import Celery

from store import jobs
from store.models import utcnow

from .context import ServiceContext

log = logging.getLogger(__name__)


def run_maintenance(ctx: ServiceContext, app: Celery) -> dict[str, Any]:
    from .celery_app import enqueue

    s = ctx.settings
    now = utcnow()
    with ctx.db.session() as sess:
        reaped = jobs.reap(sess, now - timedelta(seconds=s.stale_after_seconds), s.max_attempts,
                           timedelta(seconds=s.job_time_limit + 120))
    with ctx.db.session() as sess:
        pending = jobs.never_enqueued(sess, now - timedelta(seconds=s.enqueue_grace_seconds))
    sent = [str(job_id) for job_id, queue in pending if enqueue(app, ctx.db, job_id, queue)]
    for job_id, action in reaped:
        log.warning("reaper: job %s %s", job_id, action)
    if sent:
        log.info("reconciler: enqueued %s", ", ".join(sent))
    return {"reaped": [(str(j), a) for j, a in reaped], "enqueued": sent}


class MaintenanceThread(threading.Thread):
    """Runs :func:`run_maintenance` every ``maintenance_seconds`` until stopped."""

    def __init__(self, ctx: ServiceContext, app: Celery) -> None:
        super().__init__(name="onp-maintenance", daemon=True)
        self.ctx, self.app = ctx, app
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.ctx.settings.maintenance_seconds):
            try:
                run_maintenance(self.ctx, self.app)
            except Exception:  # the database may be briefly down; try again next period
                log.exception("maintenance failed")

    def stop(self) -> None:
        self._stop_event.set()
