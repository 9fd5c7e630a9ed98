"""Reaper and reconciler: the periodic repairs that keep jobs from getting stuck.

- reaper: a ``running`` job whose heartbeat is older than ``stale_after_seconds`` lost
  its worker (killed, OOM, machine gone). It is requeued while attempts remain, else
  failed with the reason; one running longer than the time limit is failed.
- reconciler (outbox): a ``queued`` job that was never published (the API died
  between its commit and the publish, the broker was down, or the reaper requeued it)
  is published now.
- lost messages: a ``queued`` job that *was* published can still lose its message
  (Redis restarted without persistence, was flushed, or evicted keys). The broker
  carries a sentinel key; when it has vanished the broker lost its data, and every
  published-but-queued job is sent again at once. As a backstop, a job still queued
  ``requeue_queued_after_seconds`` after its last publish is sent again. Duplicate
  messages are harmless: the claim is one conditional UPDATE, only one can win.
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


_EPOCH_KEY = "onp:broker-epoch"
_memory_epoch_seen: set[int] = set()


def broker_lost_messages(app: Celery) -> bool:
    """True when the broker has (or may have) lost its messages since the last check.

    Redis: a sentinel key is set with NX; finding it missing means Redis lost its data
    (restart without persistence, FLUSHALL, eviction) or this is the first check ever.
    ``memory://``: the queue lives in this process, so the first check of each process.
    Anything else, or a broker that cannot be asked right now: False (the age-based
    backstop still applies).
    """
    settings = app.onp_settings  # type: ignore[attr-defined]
    url: str = settings.broker_url
    if settings.is_embedded_broker:
        if id(app) in _memory_epoch_seen:
            return False
        _memory_epoch_seen.add(id(app))
        return True
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return False
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=settings.broker_connect_timeout,
                                      socket_timeout=settings.broker_socket_timeout)
        try:
            return bool(client.set(f"{settings.broker_key_prefix}{_EPOCH_KEY}", utcnow().isoformat(), nx=True))
        finally:
            client.close()
    except redis.RedisError as exc:
        log.warning("cannot check the broker's sentinel: %s", exc)
        return False


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
    lost = broker_lost_messages(app)
    with ctx.db.session() as sess:  # sent before this run's start: not the ones just sent above
        again = jobs.published_but_queued(
            sess, now if lost else now - timedelta(seconds=s.requeue_queued_after_seconds))
    resent = [str(job_id) for job_id, queue in again if enqueue(app, ctx.db, job_id, queue)]
    for job_id, action in reaped:
        log.warning("reaper: job %s %s", job_id, action)
    if sent:
        log.info("reconciler: enqueued %s", ", ".join(sent))
    if resent:
        log.warning("reconciler: re-sent %d queued job(s) whose message may be lost%s: %s", len(resent),
                    " (the broker lost its data)" if lost else "", ", ".join(resent))
    swept = 0
    sweep = getattr(ctx.store, "sweep_tmp", None)
    if sweep is not None:
        try:
            swept = sweep(older_than=3600.0)
        except OSError as exc:
            log.warning("could not sweep the artifact temp folder: %s", exc)
    return {"reaped": [(str(j), a) for j, a in reaped], "enqueued": sent, "resent": resent,
            "broker_lost": lost, "swept_tmp": swept}


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
