"""``/v1/repairs``: submit, inspect, list, cancel and download repairs.

Jobs are always looked up together with their owner, so another user's job id is
indistinguishable from a missing one (404), never a 403 that would confirm it exists.
"""
from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store import jobs as job_store
from store.models import Artifact, Job, JobEvent
from worker.celery_app import enqueue
from worker.context import ServiceContext

from .deps import Caller, get_caller, get_celery, get_ctx
from .schemas import ErrorOut, EventOut, EventPage, JobLinks, JobMetrics, JobOut, JobPage, JobStatus
from .uploads import Form, parse_form
from .validation import ValidRepair, validate_repair

router = APIRouter(prefix="/v1/repairs", tags=["repairs"],
                   responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}})

MEDIA = {"safetensors": "application/octet-stream", "pt": "application/octet-stream",
         "pt2": "application/octet-stream"}

_MULTIPART_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["model", "data"],
            "properties": {
                "model": {"type": "string", "format": "binary",
                          "description": ".safetensors (manifest embedded or given), .pt state_dict, or .pt2"},
                "data": {"type": "string", "format": "binary", "description": "clean images: .npz (x, y) or archive"},
                "manifest": {"type": "string", "description": "model manifest JSON (file or text)"},
                "options": {"type": "string", "description": "JSON: {method, seed, device: cpu|gpu, target, options}"},
                "triggered": {"type": "string", "format": "binary", "description": "triggered test set (.npz)"},
                "target": {"type": "integer", "description": "backdoor target class (for ASR)"},
            },
        }}},
    }
}


def job_out(job: Job) -> JobOut:
    base = f"/v1/repairs/{job.id}"
    links = JobLinks(self=base, model=f"{base}/model", report=f"{base}/report", plot=f"{base}/report/plot.png",
                     events=f"{base}/events", cancel=f"{base}/cancel")
    return JobOut.model_validate({
        "id": job.id, "status": job.status, "method": job.method, "progress": job.progress, "phase": job.phase,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "error": job.error, "options": job.options, "model_format": job.model_format,
        "metrics": JobMetrics.model_validate(job.metrics or {}), "attempts": job.attempts,
        "cancel_requested": job.cancel_requested, "links": links,
    })


def _owned_job(s: Session, caller: Caller, job_id: uuid.UUID) -> Job:
    job = s.scalar(select(Job).where(Job.id == job_id, Job.owner_id == caller.user_id))
    if job is None:
        raise HTTPException(404, f"no repair {job_id}")
    return job


def _by_idempotency_key(ctx: ServiceContext, caller: Caller, key: str) -> JobOut | None:
    with ctx.db.session() as s:
        job = s.scalar(select(Job).where(Job.owner_id == caller.user_id, Job.idempotency_key == key))
        return job_out(job) if job else None


def _create_job(ctx: ServiceContext, caller: Caller, form: Form, idempotency_key: str | None) -> tuple[JobOut, bool]:
    """Validate, store the inputs, insert the job (outbox: enqueued_at stays NULL until the publish succeeds)."""
    valid: ValidRepair = validate_repair(form)

    def put(part: Any, kind: str) -> Artifact:
        sha, size = ctx.store.put_file(part.path)
        return Artifact(sha256=sha, size=size, kind=kind, filename=(part.filename or part.path.name)[-255:])

    arts = {"model": put(valid.model, "model"), "data": put(valid.data, "data")}
    if valid.triggered is not None:
        arts["triggered"] = put(valid.triggered, "triggered")
    opts = valid.options
    try:
        with ctx.db.session() as s:
            s.add_all(arts.values())
            s.flush()
            job = Job(owner_id=caller.user_id, method=opts.method, options=opts.model_dump(),
                      queue=opts.device, model_format=valid.model_format, manifest=valid.manifest,
                      target=opts.target, model_artifact_id=arts["model"].id, data_artifact_id=arts["data"].id,
                      triggered_artifact_id=arts["triggered"].id if "triggered" in arts else None,
                      idempotency_key=idempotency_key, status="queued", phase="queued", progress=0.0,
                      attempts=0, cancel_requested=False)
            s.add(job)
            s.flush()
            job_store.add_event(s, job.id, "queued", f"{opts.method} on {opts.device}")
            out = job_out(job)
    except IntegrityError:
        if idempotency_key:  # a concurrent request with the same key won the race
            existing = _by_idempotency_key(ctx, caller, idempotency_key)
            if existing is not None:
                return existing, False
        raise
    return out, True


@router.post("", status_code=202, response_model=JobOut, summary="Submit a repair", openapi_extra=_MULTIPART_SCHEMA,
             responses={200: {"model": JobOut, "description": "an earlier job with the same Idempotency-Key"},
                        413: {"model": ErrorOut}, 415: {"model": ErrorOut}, 422: {"model": ErrorOut}})
async def create_repair(
    request: Request,
    response: Response,
    caller: Annotated[Caller, Depends(get_caller)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Upload a model and clean data; everything is validated before the job is queued (202 + Location)."""
    ctx: ServiceContext = get_ctx(request)
    if idempotency_key:
        existing = await run_in_threadpool(_by_idempotency_key, ctx, caller, idempotency_key)
        if existing is not None:
            response.status_code = 200
            response.headers["Location"] = existing.links.self
            return existing
    s = ctx.settings
    limits = {"model": s.max_model_bytes, "data": s.max_data_bytes, "triggered": s.max_data_bytes,
              "manifest": s.max_field_bytes, "options": s.max_field_bytes, "target": 64}
    tmp = Path(tempfile.mkdtemp(prefix="onp-upload-"))
    try:
        form = await parse_form(request, limits, tmp)
        out, created = await run_in_threadpool(_create_job, ctx, caller, form, idempotency_key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if created:
        await run_in_threadpool(enqueue, get_celery(request), ctx.db, out.id, out.options["device"])
    else:
        response.status_code = 200
    response.headers["Location"] = out.links.self
    return out


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError, binascii.Error):  # any crafted cursor is a 422, never a 500
        raise HTTPException(422, "invalid cursor") from None


@router.get("", response_model=JobPage, summary="List your repairs (newest first)")
def list_repairs(
    caller: Annotated[Caller, Depends(get_caller)],
    ctx: Annotated[ServiceContext, Depends(get_ctx)],
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    q = select(Job).where(Job.owner_id == caller.user_id)
    if status:
        q = q.where(Job.status == status)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with ctx.db.session() as s:
        rows = list(s.scalars(q))
    page = rows[:limit]
    return JobPage(items=[job_out(j) for j in page],
                   next_cursor=_encode_cursor(page[-1]) if len(rows) > limit else None)


@router.get("/{job_id}", response_model=JobOut, summary="Status, progress and metrics of a repair")
def get_repair(job_id: uuid.UUID, caller: Annotated[Caller, Depends(get_caller)],
               ctx: Annotated[ServiceContext, Depends(get_ctx)]) -> JobOut:
    with ctx.db.session() as s:
        return job_out(_owned_job(s, caller, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202, summary="Cancel a repair",
             responses={200: {"model": JobOut, "description": "already cancelled"}, 409: {"model": ErrorOut}})
def cancel_repair(job_id: uuid.UUID, response: Response, caller: Annotated[Caller, Depends(get_caller)],
                  ctx: Annotated[ServiceContext, Depends(get_ctx)]) -> JobOut:
    """A queued job is cancelled at once (200); a running one stops at its next progress step (202)."""
    with ctx.db.session() as s:
        _owned_job(s, caller, job_id)
        outcome = job_store.request_cancel(s, job_id)
    if outcome in ("succeeded", "failed"):
        raise HTTPException(409, f"repair {job_id} already {outcome}")
    if outcome == "cancelled":
        response.status_code = 200
    with ctx.db.session() as s:
        return job_out(_owned_job(s, caller, job_id))


def _artifact_for(ctx: ServiceContext, caller: Caller, job_id: uuid.UUID, column: str) -> tuple[Job, Artifact]:
    with ctx.db.session() as s:
        job = _owned_job(s, caller, job_id)
        art_id = getattr(job, column)
        if job.status != "succeeded" or art_id is None:
            raise HTTPException(409, f"repair {job_id} is {job.status}; results exist once it has succeeded")
        art = s.get(Artifact, art_id)
        assert art is not None
        return job, art


def _send(ctx: ServiceContext, art: Artifact, request: Request, media_type: str, filename: str | None) -> Response:
    digest = base64.b64encode(bytes.fromhex(art.sha256)).decode()
    headers = {"ETag": f'"{art.sha256}"', "X-Checksum-SHA256": art.sha256, "Digest": f"sha-256={digest}",
               "Repr-Digest": f"sha-256=:{digest}:", "Cache-Control": "private, max-age=31536000, immutable"}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if request.headers.get("if-none-match", "").strip() in (f'"{art.sha256}"', art.sha256, "*"):
        return Response(status_code=304, headers=headers)
    local = ctx.store.path(art.sha256)
    if local is not None:
        return FileResponse(local, media_type=media_type, headers=headers)

    def chunks() -> Any:
        with ctx.store.open(art.sha256) as f:
            while chunk := f.read(1 << 20):
                yield chunk

    headers["Content-Length"] = str(art.size)
    return StreamingResponse(chunks(), media_type=media_type, headers=headers)


@router.get("/{job_id}/model", summary="Download the repaired model (same format as the upload)",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}},
                                                 304: {"description": "If-None-Match matched"},
                                                 409: {"model": ErrorOut}})
def download_model(job_id: uuid.UUID, request: Request, caller: Annotated[Caller, Depends(get_caller)],
                   ctx: Annotated[ServiceContext, Depends(get_ctx)]) -> Response:
    job, art = _artifact_for(ctx, caller, job_id, "output_model_artifact_id")
    return _send(ctx, art, request, MEDIA[job.model_format], art.filename)


@router.get("/{job_id}/report", summary="The repair report (JSON)", response_model=dict[str, Any],
            responses={409: {"model": ErrorOut}})
def get_report(job_id: uuid.UUID, request: Request, caller: Annotated[Caller, Depends(get_caller)],
               ctx: Annotated[ServiceContext, Depends(get_ctx)]) -> Response:
    _, art = _artifact_for(ctx, caller, job_id, "report_artifact_id")
    return _send(ctx, art, request, "application/json", None)


@router.get("/{job_id}/report/plot.png", summary="Plot of the trace and before/after ACC/ASR",
            response_class=Response, responses={200: {"content": {"image/png": {}}}, 409: {"model": ErrorOut}})
def get_plot(job_id: uuid.UUID, request: Request, caller: Annotated[Caller, Depends(get_caller)],
             ctx: Annotated[ServiceContext, Depends(get_ctx)]) -> Response:
    _, art = _artifact_for(ctx, caller, job_id, "plot_artifact_id")
    return _send(ctx, art, request, "image/png", None)


@router.get("/{job_id}/events", response_model=EventPage, summary="The job's event log (poll with ?after=)")
def get_events(job_id: uuid.UUID, caller: Annotated[Caller, Depends(get_caller)],
               ctx: Annotated[ServiceContext, Depends(get_ctx)],
               after: Annotated[int, Query(ge=0, description="only events with a larger id")] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> EventPage:
    with ctx.db.session() as s:
        _owned_job(s, caller, job_id)
        rows = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                              .order_by(JobEvent.id).limit(limit)))
        items = [EventOut(id=e.id, at=e.at, phase=e.phase, message=e.message, data=e.data) for e in rows]
    return EventPage(items=items, next_after=items[-1].id if items else after)
