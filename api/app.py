"""FastAPI app factory: ``create_app(settings)`` wires the database, artifact store and Celery.

With the embedded broker (``memory://``) the app also runs the worker in a thread, so
``onp serve`` alone is a complete service.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from store.db import upgrade
from store.settings import Settings, get_settings
from worker.celery_app import make_celery
from worker.context import ServiceContext

from . import health, repairs
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

DESCRIPTION = """Repairs backdoored PyTorch image classifiers by pruning the neurons that carry the backdoor.

Submit a model and a small clean data set to `POST /v1/repairs`, poll `GET /v1/repairs/{id}`,
then download the repaired model from `GET /v1/repairs/{id}/model`.
Authenticate with `Authorization: Bearer <key>` (or `X-API-Key`)."""


def _include_dashboard(app: FastAPI) -> None:
    """The dashboard is optional and owned elsewhere: include it only when its module is present."""
    try:
        module = importlib.import_module("api.dashboard")
    except ModuleNotFoundError as exc:
        if exc.name != "api.dashboard":
            raise
        return
    router = getattr(module, "router", None)
    if router is not None:
        app.include_router(router)


def _unavailable(exc: BaseException) -> JSONResponse | None:
    """A dependency failure (database down, storage full) as 503/507 with its reason, instead of a bare 500."""
    import errno

    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)) or (
            isinstance(exc, DBAPIError) and exc.connection_invalidated):
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0][:200]
        log.warning("database unavailable: %s", first)
        return JSONResponse({"detail": f"database unavailable, retry later ({type(exc).__name__}: {first})"},
                            status_code=503, headers={"Retry-After": "5"})
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("artifact storage full: %s", exc)
        return JSONResponse({"detail": f"insufficient storage: {exc.strerror}; nothing was stored, retry later"},
                            status_code=507, headers={"Retry-After": "60"})
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EIO, errno.EACCES):
        log.error("artifact storage unavailable: %s", exc)
        return JSONResponse({"detail": f"artifact storage unavailable: {exc.strerror}; retry later"},
                            status_code=503, headers={"Retry-After": "30"})
    return None


def _install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        response = _unavailable(exc)
        if response is None:
            raise exc
        return response

    for exc_type in (DBAPIError, PoolTimeout, OSError):
        app.add_exception_handler(exc_type, handler)


def create_app(settings: Settings | None = None, *, start_worker: bool | None = None) -> FastAPI:
    """Build the app; ``start_worker`` overrides whether an embedded worker thread runs."""
    settings = settings or get_settings()
    ctx = ServiceContext.from_settings(settings)
    celery = make_celery(settings)
    celery._onp_context = ctx  # type: ignore[attr-defined]  # share one engine between API and embedded worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.should_auto_migrate:
            upgrade(settings.resolved_database_url)
        embedded = None
        if settings.should_run_embedded_worker if start_worker is None else start_worker:
            from worker.embedded import EmbeddedWorker

            embedded = EmbeddedWorker(celery)
            embedded.start()
            app.state.embedded_worker = embedded
        try:
            yield
        finally:
            if embedded is not None:
                embedded.stop()
            ctx.db.dispose()
            app.state.ratelimiter.close()

    app = FastAPI(title="onp-repair", version="1", description=DESCRIPTION, lifespan=lifespan,
                  openapi_tags=[{"name": "repairs", "description": "repair jobs"},
                                {"name": "health", "description": "probes"}])
    app.state.ctx = ctx
    app.state.celery = celery
    app.state.settings = settings
    app.state.embedded_worker = None
    app.state.ratelimiter = RateLimiter.from_settings(settings)
    _install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(repairs.router)
    _include_dashboard(app)
    return app
