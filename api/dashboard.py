"""The web dashboard (``/``) and the HTML report (``/v1/repairs/{id}/report.html``).

The dashboard is server-rendered HTML shells plus one build-free script (``static/app.js``)
that talks to the same JSON API as every other client, with the API key the user typed kept in
``localStorage`` and sent as ``Authorization: Bearer``. So the dashboard needs no session or
cookie auth of its own, adds no second way in, and nothing is loaded from outside the server.
"""
from __future__ import annotations

import json
import re
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

import jinja2
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from worker.context import ServiceContext
from worker.report_html import render_html

from .deps import Caller, get_caller, get_ctx
from .repairs import _artifact_for
from .schemas import ErrorOut

HERE = Path(__file__).parent
STATIC = HERE / "static"
VERSION = "1"
METHODS = ("onp", "anp", "rnp", "clp", "fp")

# Pages run only our own script; report iframes are srcdoc/blob documents with inline styles and no scripts.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "frame-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

router = APIRouter()
_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                trim_blocks=True, lstrip_blocks=True)


def _page(name: str, **values: object) -> HTMLResponse:
    html = _templates.get_template(name).render(version=VERSION, methods=METHODS, **values)
    return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-store", "Referrer-Policy": "same-origin"})


@router.get("/", include_in_schema=False)
def index() -> HTMLResponse:
    return _page("index.html", title="Repairs")


@router.get("/login", include_in_schema=False)
def login() -> HTMLResponse:
    return _page("login.html", title="Sign in")


@router.get("/jobs/{job_id}", include_in_schema=False)
def job_page(job_id: uuid.UUID) -> HTMLResponse:
    return _page("job.html", title=f"Repair {job_id}", job_id=str(job_id))


@router.get("/jobs", include_in_schema=False)
def jobs_redirect() -> RedirectResponse:
    return RedirectResponse("/", status_code=307)


_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(css|js|svg)$")
_MEDIA = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8", "svg": "image/svg+xml"}


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    """A fixed set of files from api/static (no subfolders, so no path tricks)."""
    path = STATIC / name
    if not _STATIC_NAME.match(name) or not path.is_file():
        raise HTTPException(404, f"no static file {name}")
    return FileResponse(path, media_type=_MEDIA[name.rsplit(".", 1)[1]],
                        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})


class _HtmlCache:
    """Rendered reports by report sha256: rendering plots costs about a second, a report never changes."""

    def __init__(self, size: int = 32) -> None:
        self.size, self.items, self.lock = size, OrderedDict[str, str](), threading.Lock()
        self.render_lock = threading.Lock()  # matplotlib is not reliably thread-safe

    def get(self, sha256: str, make: object) -> str:
        with self.lock:
            if sha256 in self.items:
                self.items.move_to_end(sha256)
                return self.items[sha256]
        with self.render_lock:
            html = make()  # type: ignore[operator]
        with self.lock:
            self.items[sha256] = html
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return html


_cache = _HtmlCache()


@router.get("/v1/repairs/{job_id}/report.html", tags=["repairs"], response_class=HTMLResponse,
            summary="The repair report as one self-contained HTML page (inline SVG plots)",
            responses={200: {"content": {"text/html": {}}}, 401: {"model": ErrorOut}, 404: {"model": ErrorOut},
                       409: {"model": ErrorOut}})
def report_html(job_id: uuid.UUID, caller: Annotated[Caller, Depends(get_caller)],
                ctx: Annotated[ServiceContext, Depends(get_ctx)],
                download: Annotated[bool, Query(description="send as an attachment")] = False) -> Response:
    """Plots of ACC/ASR before and after, the search trace, accuracy vs neurons pruned, and a per-layer heat map."""
    job, art = _artifact_for(ctx, caller, job_id, "report_artifact_id")

    def make() -> str:
        with ctx.store.open(art.sha256) as f:
            return render_html(json.load(f), status=job.status)

    html = _cache.get(art.sha256, make)
    disposition = "attachment" if download else "inline"
    return HTMLResponse(html, headers={
        "Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'{disposition}; filename="report-{job_id}.html"',
        "Cache-Control": "private, max-age=3600"})
