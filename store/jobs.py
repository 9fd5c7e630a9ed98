"""Job state transitions as single conditional UPDATEs.

Every transition names the state it expects (``WHERE status = …``), so concurrent
actors — two deliveries of one task, the reaper, a cancel request, a worker that was
presumed dead — cannot both win: the loser sees ``rowcount == 0`` and backs off. A
claim token (``jobs.worker``) is set per attempt so that a worker which lost its
job (reaped, then claimed again elsewhere) can no longer write to it.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from .models import TERMINAL_STATUSES, Job, JobEvent, utcnow


def add_event(s: Session, job_id: uuid.UUID, phase: str, message: str = "", data: dict[str, Any] | None = None) -> None:
    s.add(JobEvent(job_id=job_id, phase=phase, message=message, data=data))


def _update(s: Session, job_id: uuid.UUID, *where: Any, **values: Any) -> bool:
    result = s.execute(update(Job).where(Job.id == job_id, *where).values(**values)
                       .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined]


@dataclass
class Claim:
    claimed: bool
    reason: str  # 'claimed', 'missing', 'finished', 'busy', 'cancelled', 'exhausted'
    job: Job | None = None


def claim(s: Session, job_id: uuid.UUID, token: str, max_attempts: int, stale_before: datetime) -> Claim:
    """queued → running (or take over a running job whose heartbeat is stale), attempts + 1."""
    now = utcnow()
    ok = _update(
        s, job_id,
        Job.attempts < max_attempts, Job.cancel_requested.is_(False),
        or_(Job.status == "queued", and_(Job.status == "running", Job.heartbeat_at < stale_before)),
        status="running", attempts=Job.attempts + 1, started_at=now, heartbeat_at=now, worker=token,
        progress=0.0, phase="starting", error=None,
    )
    job = s.get(Job, job_id, populate_existing=True)
    if job is None:
        return Claim(False, "missing")
    if ok:
        add_event(s, job_id, "starting", f"attempt {job.attempts} on {token}")
        return Claim(True, "claimed", job)
    if job.status in TERMINAL_STATUSES:
        return Claim(False, "finished", job)
    if job.cancel_requested:
        finish(s, job_id, None, "cancelled", error="cancelled before it started")
        return Claim(False, "cancelled", job)
    if job.attempts >= max_attempts:
        finish(s, job_id, None, "failed", error=f"gave up after {job.attempts} attempts (worker lost each time)")
        return Claim(False, "exhausted", job)
    return Claim(False, "busy", job)


def heartbeat(s: Session, job_id: uuid.UUID, token: str) -> bool | None:
    """Refresh the heartbeat; returns cancel_requested, or None when this worker no longer owns the job."""
    if not _update(s, job_id, Job.status == "running", Job.worker == token, heartbeat_at=utcnow()):
        return None
    return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_progress(s: Session, job_id: uuid.UUID, token: str, progress: float, phase: str, **values: Any) -> bool:
    """Progress of the owning worker (``values``: other columns, e.g. metrics known so far)."""
    return _update(s, job_id, Job.status == "running", Job.worker == token,
                   progress=min(1.0, max(0.0, progress)), phase=phase[:64], heartbeat_at=utcnow(), **values)


def finish(s: Session, job_id: uuid.UUID, token: str | None, status: str, error: str | None = None,
           **values: Any) -> bool:
    """running (owned by ``token``) or queued → a terminal status; False when someone else finished it."""
    assert status in TERMINAL_STATUSES
    where = [Job.status == "running", Job.worker == token] if token else [Job.status.in_(("queued", "running"))]
    extra = {"progress": 1.0} if status == "succeeded" else {}
    ok = _update(s, job_id, *where, status=status, error=error[:4000] if error else None, finished_at=utcnow(),
                 phase=status, **extra, **values)
    if ok:
        add_event(s, job_id, status, error or status)
    return ok


def request_cancel(s: Session, job_id: uuid.UUID) -> str:
    """Cancel a queued job at once; flag a running one for its worker. Returns the resulting status."""
    if _update(s, job_id, Job.status == "queued", status="cancelled", cancel_requested=True, finished_at=utcnow(),
               phase="cancelled", error="cancelled before it started"):
        add_event(s, job_id, "cancelled", "cancelled while queued")
        return "cancelled"
    if _update(s, job_id, Job.status == "running", cancel_requested=True):
        add_event(s, job_id, "cancelling", "cancel requested")
        return "running"
    status = s.scalar(select(Job.status).where(Job.id == job_id))
    return status or "missing"


def mark_enqueued(s: Session, job_id: uuid.UUID) -> None:
    """Record that the task was published.

    Not conditional on ``status == "queued"``: a free worker can claim the job between the
    publish and this update (seen in CI: the job ran and succeeded with ``enqueued_at``
    never set). So: a queued job's stamp is (re)written, as before, and a job already
    claimed gets it only if still NULL. A requeue resets it to NULL; a first publish's update
    could land after that only if delayed beyond the reaper's stale window, and then
    ``published_but_queued`` still re-sends the job once it stays unclaimed.
    """
    _update(s, job_id, or_(Job.status == "queued", Job.enqueued_at.is_(None)), enqueued_at=utcnow())


def never_enqueued(s: Session, created_before: datetime, limit: int = 100) -> list[tuple[uuid.UUID, str]]:
    """Queued jobs whose task was never sent (the API died between commit and publish, or the reaper requeued)."""
    rows = s.execute(select(Job.id, Job.queue).where(Job.status == "queued", Job.enqueued_at.is_(None),
                                                      Job.created_at < created_before)
                     .order_by(Job.created_at).limit(limit)).all()
    return [(r[0], r[1]) for r in rows]


def published_but_queued(s: Session, enqueued_before: datetime | None, limit: int = 500
                         ) -> list[tuple[uuid.UUID, str]]:
    """Queued jobs whose task *was* sent (before ``enqueued_before``; None: any time) but never claimed.

    Their message may be gone (a broker restarted without persistence, flushed, or evicted keys): the
    reconciler sends them again. A duplicate delivery is harmless: only one claim can win.
    """
    where = [Job.status == "queued", Job.enqueued_at.is_not(None)]
    if enqueued_before is not None:
        where.append(Job.enqueued_at < enqueued_before)
    rows = s.execute(select(Job.id, Job.queue).where(*where).order_by(Job.created_at).limit(limit)).all()
    return [(r[0], r[1]) for r in rows]


def reap(s: Session, stale_before: datetime, max_attempts: int, time_limit: timedelta) -> list[tuple[uuid.UUID, str]]:
    """Running jobs whose worker stopped beating: requeue (attempts left) or fail; fail jobs past the time limit."""
    now = utcnow()
    actions: list[tuple[uuid.UUID, str]] = []
    overdue = s.scalars(select(Job.id).where(Job.status == "running", Job.started_at < now - time_limit)).all()
    for job_id in overdue:
        if finish(s, job_id, None, "failed", error=f"time limit of {int(time_limit.total_seconds())} s exceeded"):
            actions.append((job_id, "failed"))
    stale = s.execute(select(Job.id, Job.attempts)
                      .where(Job.status == "running", Job.heartbeat_at < stale_before)).all()
    for job_id, attempts in stale:
        fresh = [Job.status == "running", Job.heartbeat_at < stale_before]
        if attempts < max_attempts and _update(s, job_id, *fresh, status="queued", enqueued_at=None, worker=None,
                                               phase="requeued"):
            add_event(s, job_id, "requeued", f"worker stopped responding during attempt {attempts}; requeued")
            actions.append((job_id, "requeued"))
        elif attempts >= max_attempts and _update(
                s, job_id, *fresh, status="failed", finished_at=now, phase="failed",
                error=f"worker lost during attempt {attempts} of {max_attempts}; giving up"):
            add_event(s, job_id, "failed", "worker lost; no attempts left")
            actions.append((job_id, "failed"))
    return actions
