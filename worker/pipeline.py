"""One repair job from claim to finish; the Celery task and the embedded worker both call it.

The job's heartbeat is written by a small thread (not by the defense's progress
callback), so a long phase without callbacks — loading, evaluating — never looks like
a dead worker; the same thread reads ``cancel_requested`` so the callback can stop the
repair by raising :class:`RepairCancelled` without a database round trip per step.
"""
from __future__ import annotations

import errno
import json
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from store import jobs
from store.artifacts import data_suffix, materialize
from store.models import Artifact, Job, utcnow

from .context import ServiceContext
from .report import SUFFIX, json_safe, plot_png

log = logging.getLogger(__name__)

# Share of overall progress before and after the defense itself runs.
P_LOADED, P_EVALUATED, P_REPAIRED, P_SAVED = 0.03, 0.08, 0.9, 0.97


def _db_unavailable(exc: BaseException) -> bool:
    """The database could not be reached (restart, network): not the job's fault, so never a failed job."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class LostOwnership(Exception):
    """The job was reaped or finished by someone else while this worker ran it."""


class JobTimeout(Exception):
    """The job ran past ``job_time_limit`` (checked in-process; also works in the solo/embedded pool)."""


class Heartbeat(threading.Thread):
    def __init__(self, ctx: ServiceContext, job_id: uuid.UUID, token: str) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.ctx, self.job_id, self.token = ctx, job_id, token
        self.cancelled = False
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.ctx.settings.heartbeat_seconds):
            try:
                with self.ctx.db.session() as s:
                    state = jobs.heartbeat(s, self.job_id, self.token)
            except Exception:  # a database blip must not kill the job; the next beat retries
                log.exception("heartbeat failed for %s", self.job_id)
                continue
            if state is None:
                self.lost = True
            elif state:
                self.cancelled = True

    def stop(self) -> None:
        self._stop_event.set()


class Tracker:
    """Turns defense callbacks into throttled progress writes and phase events."""

    def __init__(self, ctx: ServiceContext, job_id: uuid.UUID, token: str, beat: Heartbeat) -> None:
        self.ctx, self.job_id, self.token, self.beat = ctx, job_id, token, beat
        self.deadline = time.monotonic() + ctx.settings.job_time_limit
        self.phase_name = ""
        self._last_write = 0.0
        self._last_event = 0.0

    def check(self) -> None:
        if self.beat.cancelled:
            from onp_core.defenses import RepairCancelled

            raise RepairCancelled("cancelled by request")
        if self.beat.lost:
            raise LostOwnership()
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"time limit of {self.ctx.settings.job_time_limit} s exceeded")

    def set(self, progress: float, phase: str, message: str = "", data: dict[str, Any] | None = None,
            force: bool = False, **values: Any) -> None:
        """Write progress/phase (throttled unless ``force`` or the phase changed) and an event on phase changes."""
        self.check()
        now = time.monotonic()
        changed = phase != self.phase_name
        if not (force or changed or now - self._last_write >= self.ctx.settings.progress_write_seconds):
            return
        try:
            with self.ctx.db.session() as s:
                if not jobs.set_progress(s, self.job_id, self.token, progress, phase, **values):
                    self.beat.lost = True
                    raise LostOwnership()
                if changed or message or now - self._last_event >= 5.0:
                    jobs.add_event(s, self.job_id, phase, message or (f"{phase}" if changed else ""), data)
                    self._last_event = now
        except Exception as exc:
            if not _db_unavailable(exc):
                raise
            # Progress is advisory: keep repairing through a database blip. If the outage outlasts
            # stale_after_seconds the reaper requeues the job and this worker's final write is refused.
            log.warning("job %s: progress not written (database unavailable: %s)", self.job_id, exc)
            return
        self._last_write, self.phase_name = now, phase

    def callback(self, step: int, total: int, info: dict[str, Any]) -> None:
        """The defense's ``progress(step, total, info)``."""
        frac = step / total if total else 0.0
        data = {k: v for k, v in json_safe(info).items() if k != "phase"}
        self.set(P_EVALUATED + (P_REPAIRED - P_EVALUATED) * frac, str(info.get("phase", "repair")),
                 data={"step": step, "total": total, **data})


@dataclass
class Inputs:
    job: Job
    model: Artifact
    data: Artifact
    triggered: Artifact | None


def _load_inputs(ctx: ServiceContext, job: Job) -> Inputs:
    with ctx.db.session() as s:
        trig = s.get(Artifact, job.triggered_artifact_id) if job.triggered_artifact_id else None
        return Inputs(job, s.get(Artifact, job.model_artifact_id), s.get(Artifact, job.data_artifact_id), trig)


def _metrics_dict(m: Any) -> dict[str, float | None]:
    return json_safe(m.as_dict())


def execute_job(ctx: ServiceContext, job_id: uuid.UUID, token: str) -> str:
    """Claim and run ``job_id``; returns the outcome ('succeeded', 'failed', 'cancelled', or why it did not run)."""
    settings = ctx.settings

    def claim() -> jobs.Claim:
        with ctx.db.session() as s:
            stale_before = utcnow() - timedelta(seconds=settings.stale_after_seconds)
            return jobs.claim(s, job_id, token, settings.max_attempts, stale_before)

    c = _with_db_retry(claim, f"job {job_id}: claim")
    if not c.claimed:
        log.info("job %s not run: %s", job_id, c.reason)
        return c.reason
    assert c.job is not None
    beat = Heartbeat(ctx, job_id, token)
    beat.start()
    tracker = Tracker(ctx, job_id, token, beat)
    outcome, error, values = "failed", None, {}
    try:
        with tempfile.TemporaryDirectory(prefix="onp-job-") as tmp:
            values = _run(ctx, _load_inputs(ctx, c.job), Path(tmp), tracker)
        outcome = "succeeded"
    except LostOwnership:
        log.warning("job %s: lost ownership (reaped or finished elsewhere); abandoning", job_id)
        return "lost"
    except Exception as exc:
        if _db_unavailable(exc):  # not the job's fault: leave it running; the reaper requeues it
            log.warning("job %s: database unavailable (%s); leaving it to the reaper", job_id, exc)
            return "db-unavailable"
        from celery.exceptions import SoftTimeLimitExceeded
        from onp_core.defenses import RepairCancelled

        if isinstance(exc, RepairCancelled):
            outcome, error = "cancelled", "cancelled by request"
        elif isinstance(exc, (SoftTimeLimitExceeded, JobTimeout)):
            error = f"time limit of {settings.job_time_limit} s exceeded"
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("job %s failed: out of disk space: %s", job_id, exc)
            error = (f"out of storage space while {tracker.phase_name or 'starting'}: {exc.strerror} "
                     f"({exc.filename or 'artifact store'}); nothing was saved")
        else:
            log.exception("job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
    finally:
        beat.stop()
    _finish_with_retry(ctx, job_id, token, outcome, error, values)
    return outcome


def _finish_with_retry(ctx: ServiceContext, job_id: uuid.UUID, token: str, outcome: str, error: str | None,
                       values: dict[str, Any], budget: float = 30.0) -> None:
    """Record the outcome, riding out a short database outage (a finished repair is worth keeping).

    Past the budget the exception propagates and the job stays ``running`` for the reaper, which
    requeues it; this worker's token is then stale, so a late write can never overwrite the rerun.
    """
    def finish() -> None:
        with ctx.db.session() as s:
            jobs.finish(s, job_id, token, outcome, error=error, **values)

    _with_db_retry(finish, f"job {job_id}: record {outcome}", budget)


def _with_db_retry(fn: Any, what: str, budget: float = 30.0) -> Any:
    """``fn()``, retried with backoff while the database is unreachable, for at most ``budget`` seconds."""
    deadline = time.monotonic() + budget
    delay = 0.25
    while True:
        try:
            return fn()
        except Exception as exc:
            if not _db_unavailable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.2g s", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 4.0)


def _run(ctx: ServiceContext, inputs: Inputs, tmp: Path, tracker: Tracker) -> dict[str, Any]:
    """Load, measure, repair, measure again, save; returns the job columns to set on success."""
    import torch

    from onp_core.data.uploads import UploadLimits, read_clean_data
    from onp_core.defenses import run_repair
    from onp_core.metrics import der, erased_class_warnings, evaluate
    from onp_core.models import ModelManifest, load_model, save_model

    job = inputs.job
    tracker.set(0.01, "loading", f"loading {job.model_format} model and data", force=True)
    manifest = ModelManifest.model_validate(job.manifest)
    loaded = load_model(materialize(ctx.store, inputs.model.sha256, tmp / "in" / f"model{SUFFIX[job.model_format]}"),
                        manifest)

    def images(art: Artifact, name: str) -> Any:
        path = materialize(ctx.store, art.sha256, tmp / "in" / f"{name}{data_suffix(art.filename)}")
        return read_clean_data(path, UploadLimits(), num_classes=manifest.num_classes)

    clean = images(inputs.data, "clean")
    triggered = images(inputs.triggered, "triggered") if inputs.triggered is not None else None

    device_kind = job.options.get("device", "cpu")
    if device_kind == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("the job asked for a GPU but this worker has none (route gpu jobs to a GPU worker)")
    device = "cuda" if device_kind == "gpu" else "cpu"
    model = loaded.model.to(device)

    tracker.set(P_LOADED, "evaluating", "measuring the model before repair", force=True)
    target = job.target
    before = evaluate(model, clean, triggered, target, device, num_classes=manifest.num_classes)
    tracker.set(P_EVALUATED, "repairing", f"running {job.method}", data={"before": _metrics_dict(before)}, force=True,
                metrics={"before": _metrics_dict(before)})  # visible while the repair runs

    options = {**job.options.get("options", {}), "seed": job.options.get("seed", 0), "device": device}
    result = run_repair(model, clean, job.method, options, progress=tracker.callback)

    tracker.set(P_REPAIRED, "evaluating", "measuring the repaired model", force=True)
    repaired = result.model.to(device).eval()
    after = evaluate(repaired, clean, triggered, target, device, num_classes=manifest.num_classes)
    metrics = {
        "before": _metrics_dict(before),
        "after": _metrics_dict(after),
        "der": json_safe(der(before, after)),
        "num_pruned": result.num_pruned,
        "seconds": round(float(result.seconds), 3),
        "warnings": erased_class_warnings(before.class_recall or [], after.class_recall or []),
    }

    tracker.set(P_SAVED, "saving", "writing the repaired model and report", force=True)
    out_path = save_model(repaired.cpu(), tmp / "out" / f"repaired{SUFFIX[job.model_format]}", job.model_format)
    report = json_safe({
        "job_id": str(job.id),
        "method": job.method,
        "options": job.options,
        "model_format": job.model_format,
        "manifest": job.manifest,
        "target": target,
        "attempt": job.attempts,
        "inputs": {"model_sha256": inputs.model.sha256, "data_sha256": inputs.data.sha256,
                   "triggered_sha256": inputs.triggered.sha256 if inputs.triggered else None,
                   "clean_images": len(clean), "triggered_images": len(triggered) if triggered else None},
        "metrics": metrics,
        "heldout_clean_acc": {"before": result.clean_acc_before, "after": result.clean_acc_after},
        "class_recall": {"before": before.class_recall, "after": after.class_recall},
        "pruned": result.pruned,
        "num_pruned": result.num_pruned,
        "seconds": result.seconds,
        "trace": result.trace,
        "details": result.details,
        "finished_at": utcnow().isoformat(),
    })
    png = plot_png(report["trace"] or [], metrics, f"{job.method} repair of {manifest.arch}")
    with ctx.db.session() as s:
        model_art = _put_file(ctx, s, out_path, "repaired_model", f"repaired-{job.id}{SUFFIX[job.model_format]}")
        report_art = _put_bytes(ctx, s, json.dumps(report, indent=2).encode(), "report", "report.json",
                                "application/json")
        plot_art = _put_bytes(ctx, s, png, "plot", "plot.png", "image/png")
    return {"metrics": metrics, "output_model_artifact_id": model_art.id, "report_artifact_id": report_art.id,
            "plot_artifact_id": plot_art.id}


def _put_file(ctx: ServiceContext, s: Any, path: Path, kind: str, filename: str) -> Artifact:
    sha, size = ctx.store.put_file(path)
    art = Artifact(sha256=sha, size=size, kind=kind, filename=filename)
    s.add(art)
    s.flush()
    return art


def _put_bytes(ctx: ServiceContext, s: Any, blob: bytes, kind: str, filename: str, media_type: str) -> Artifact:
    sha, size = ctx.store.put([blob])
    art = Artifact(sha256=sha, size=size, kind=kind, filename=filename, media_type=media_type)
    s.add(art)
    s.flush()
    return art
