"""Liveness and readiness probes."""
from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


def _checks(request: Request) -> dict[str, str]:
    """Each dependency reports 'ok' or why not; each check is bounded to a few seconds."""
    ctx, app = request.app.state.ctx, request.app.state.celery
    checks: dict[str, str] = {}
    try:
        ctx.db.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if ctx.settings.is_embedded_broker:
        embedded = getattr(request.app.state, "embedded_worker", None)
        checks["broker"] = "ok" if embedded is None or embedded.alive else "embedded worker is not running"
    else:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        root = ctx.settings.resolved_artifact_dir
        fd, name = tempfile.mkstemp(dir=root, prefix=".ready-")
        os.close(fd)
        os.unlink(name)
        checks["artifacts"] = "ok"
    except OSError as exc:
        checks["artifacts"] = f"not writable: {exc}"
    return checks


@router.get("/readyz", response_model=Health, summary="Database, broker and artifact store are reachable",
            responses={503: {"model": Health}})
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(_checks, request)
    failed = {k: v for k, v in checks.items() if v != "ok"}
    if failed:
        reason = "; ".join(f"{k}: {v}" for k, v in failed.items())
        return JSONResponse(Health(status="unavailable", checks=checks, reason=reason).model_dump(), status_code=503)
    return JSONResponse(Health(status="ok", checks=checks).model_dump())
