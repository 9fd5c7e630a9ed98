"""``Client``: typed methods over the v1 REST API (httpx, synchronous).

Design choices, each for a reason a user would hit:
- Transient failures (connection errors, 429, 502-504) are retried with backoff, honouring
  ``Retry-After``; submissions are safe to retry because every ``submit`` sends an
  ``Idempotency-Key`` (the server then returns the first job instead of creating a second).
- Downloads stream to a temporary file next to the target, are hashed while written, and are
  renamed into place only when the hash equals the server's ``X-Checksum-SHA256``.
- Every error becomes an exception from :mod:`onp_client.errors` carrying the server's ``detail``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from .config import resolve
from .errors import ChecksumMismatch, JobFailed, OnpError, ServerError, WaitTimeout, error_for
from .models import Event, Job, JobPage, RepairResult

__version__ = "0.1.0"

PathLike = str | os.PathLike[str]
FileArg = PathLike | IO[bytes]
RETRY_STATUS = (429, 502, 503, 504)
SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "pt2": ".pt2"}


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else str(job)


def _detail(r: httpx.Response) -> str:
    """The server's ``detail``, also for FastAPI's list-shaped validation errors and non-JSON answers."""
    try:
        body = r.json()
    except ValueError:
        return (r.text.strip()[:500] or r.reason_phrase or f"HTTP {r.status_code}")
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
                         for d in detail)
    return str(detail) if detail is not None else f"HTTP {r.status_code}"


def _retry_after(r: httpx.Response | None, attempt: int) -> float:
    if r is not None:
        try:
            return min(30.0, max(0.0, float(r.headers.get("Retry-After", ""))))
        except ValueError:
            pass
    return min(8.0, 0.5 * 2 ** attempt)


def _filename(r: httpx.Response, fallback: str) -> str:
    match = re.search(r'filename="?([^";]+)"?', r.headers.get("content-disposition", ""))
    name = Path(match.group(1)).name if match else ""
    return name if name not in ("", ".", "..") else fallback


class Client:
    """A connection to one onp-repair server with one API key.

    ``server`` and ``key`` default to ``ONP_SERVER`` / ``ONP_API_KEY`` / the ``onp login`` config file.
    """

    def __init__(self, server: str | None = None, key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3, transport: httpx.BaseTransport | None = None) -> None:
        cfg = resolve(server, key)
        self.server, self.key, self.retries = cfg.server, cfg.key, retries
        headers = {"User-Agent": f"onp-client/{__version__}"}
        if cfg.key:
            headers["Authorization"] = f"Bearer {cfg.key}"
        self._http = httpx.Client(base_url=cfg.server, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, files: Mapping[str, Any] | None = None, stream: bool = False,
                 **kw: Any) -> httpx.Response:
        """One request with retries; raises the matching :class:`OnpError` for error answers."""
        last: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            for value in (files or {}).values():  # rewind uploads for a retry
                handle = value[1] if isinstance(value, tuple) else value
                if hasattr(handle, "seek"):
                    handle.seek(0)
            try:
                req = self._http.build_request(method, path, files=files, **kw)
                r = self._http.send(req, stream=stream)
            except httpx.TransportError as exc:
                if attempt < self.retries:
                    time.sleep(_retry_after(None, attempt))
                    continue
                raise ServerError(f"cannot reach {self.server}: {exc or type(exc).__name__}") from exc
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                r.close()
                last = r
                time.sleep(_retry_after(r, attempt))
                continue
            if r.status_code >= 400:
                if stream:
                    r.read()
                r.close()
                raise error_for(r.status_code, _detail(r))
            return r
        assert last is not None  # pragma: no cover - the loop always returns or raises
        raise error_for(last.status_code, _detail(last))

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # ------------------------------------------------------------ jobs

    def submit(self, model: FileArg, data: FileArg, *, method: str = "onp", options: Mapping[str, Any] | None = None,
               manifest: FileArg | Mapping[str, Any] | None = None, triggered: FileArg | None = None,
               target: int | None = None, seed: int = 0, device: str = "cpu",
               idempotency_key: str | None = None) -> Job:
        """Upload ``model`` and clean ``data`` and queue a repair; the server validates everything first.

        ``options`` are the method's own options (e.g. ``{"u": 3.0}`` for clp); ``triggered`` + ``target``
        add ASR/RA/DER to the metrics.
        """
        envelope = {"method": method, "seed": seed, "device": device, "options": dict(options or {})}
        opened: list[IO[bytes]] = []

        def part(value: FileArg) -> tuple[str, IO[bytes]]:
            if hasattr(value, "read"):
                return Path(getattr(value, "name", "upload")).name, value  # type: ignore[return-value]
            handle = open(value, "rb")  # noqa: SIM115 - closed below
            opened.append(handle)
            return Path(value).name, handle  # type: ignore[arg-type]

        try:
            files: dict[str, Any] = {"model": part(model), "data": part(data),
                                     "options": (None, json.dumps(envelope))}
            if manifest is not None:
                files["manifest"] = (None, json.dumps(dict(manifest))) if isinstance(manifest, Mapping) \
                    else part(manifest)
            if triggered is not None:
                files["triggered"] = part(triggered)
            if target is not None:
                files["target"] = (None, str(int(target)))
            headers = {"Idempotency-Key": idempotency_key or f"onp-client-{uuid.uuid4()}"}
            return Job.from_json(self._json("POST", "/v1/repairs", files=files, headers=headers))
        finally:
            for handle in opened:
                handle.close()

    def repair(self, model: FileArg, data: FileArg, **submit_kw: Any) -> Repair:
        """Submit a repair and return a handle whose ``wait()`` downloads the result."""
        return Repair(self, self.submit(model, data, **submit_kw), model)

    def get(self, job: Job | str) -> Job:
        return Job.from_json(self._json("GET", f"/v1/repairs/{_job_id(job)}"))

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        """One page of your jobs, newest first; pass ``next_cursor`` back for the next page."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        body = self._json("GET", "/v1/repairs", params=params)
        return JobPage([Job.from_json(j) for j in body["items"]], body.get("next_cursor"))

    def iter_jobs(self, status: str | None = None, page_size: int = 100) -> Iterator[Job]:
        cursor: str | None = None
        while True:
            page = self.list(status, page_size, cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job: Job | str) -> Job:
        """Cancel a queued job at once or ask a running one to stop; a finished job raises ``Conflict``."""
        return Job.from_json(self._json("POST", f"/v1/repairs/{_job_id(job)}/cancel"))

    def events(self, job: Job | str, after: int = 0) -> tuple[list[Event], int]:
        """Events newer than ``after`` and the ``after`` to pass next time."""
        body = self._json("GET", f"/v1/repairs/{_job_id(job)}/events", params={"after": after})
        return [Event.from_json(e) for e in body["items"]], int(body.get("next_after") or after)

    def wait(self, job: Job | str, *, poll: float = 1.0, timeout: float | None = None,
             on_update: Callable[[Job], None] | None = None, raise_on_failure: bool = True) -> Job:
        """Poll until the job finishes; ``JobFailed`` for failed/cancelled unless ``raise_on_failure`` is off."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job_id = _job_id(job)
        while True:
            current = self.get(job_id)
            if on_update is not None:
                on_update(current)
            if current.done:
                if raise_on_failure and not current.succeeded:
                    raise JobFailed(current)
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"repair {job_id} still {current.status} after {timeout:g}s")
            time.sleep(poll)

    # ------------------------------------------------------------ results

    def download(self, job: Job | str, path: PathLike | None = None) -> Path:
        """Save the repaired model to ``path`` (a file, or a folder for the server's file name); checksum-verified."""
        job_id = _job_id(job)
        r = self._request("GET", f"/v1/repairs/{job_id}/model", stream=True)
        try:
            target = Path(path) if path is not None else Path.cwd()
            if str(path).endswith(("/", os.sep)):  # "out/" names a folder even before it exists
                target.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                target = target / _filename(r, f"repaired-{job_id}")
            target.parent.mkdir(parents=True, exist_ok=True)
            expected = r.headers.get("x-checksum-sha256", "").lower()
            digest = hashlib.sha256()
            fd, tmp = tempfile.mkstemp(prefix=".onp-download-", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
                if expected and digest.hexdigest() != expected:
                    raise ChecksumMismatch(f"download of {job_id} is corrupt: sha256 {digest.hexdigest()} "
                                           f"!= server's {expected}")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except httpx.TransportError as exc:
            raise ServerError(f"download of {job_id} interrupted: {exc}") from exc
        finally:
            r.close()
        return target

    def report(self, job: Job | str) -> dict[str, Any]:
        """The JSON report: metrics, pruned neurons per layer, the search trace and method details."""
        return self._json("GET", f"/v1/repairs/{_job_id(job)}/report")

    def report_html(self, job: Job | str) -> str:
        """The self-contained HTML report (plots inlined as SVG)."""
        return self._request("GET", f"/v1/repairs/{_job_id(job)}/report.html").text

    def plot_png(self, job: Job | str) -> bytes:
        return self._request("GET", f"/v1/repairs/{_job_id(job)}/report/plot.png").content

    def whoami(self) -> None:
        """Check that the server answers and accepts the key (``AuthError`` otherwise)."""
        self.list(limit=1)


class Repair:
    """A submitted repair: ``wait()`` blocks until it finishes and downloads the repaired model."""

    def __init__(self, client: Client, job: Job, model: FileArg | None = None) -> None:
        self.client, self.job = client, job
        self._model = Path(model) if isinstance(model, (str, os.PathLike)) else None

    @property
    def id(self) -> str:
        return self.job.id

    def default_output(self) -> Path:
        """``<model stem>.repaired<suffix>`` next to the uploaded model, else in the current folder."""
        suffix = SUFFIX.get(self.job.model_format, "")
        if self._model is not None:
            return self._model.with_name(f"{self._model.name.removesuffix(suffix)}.repaired{suffix}")
        return Path.cwd() / f"repaired-{self.job.id}{suffix}"

    def wait(self, output: PathLike | None = None, *, timeout: float | None = None, poll: float = 1.0,
             on_update: Callable[[Job], None] | None = None) -> RepairResult:
        """Wait, download (checksum-verified) and return metrics + model path; ``JobFailed`` if it did not succeed."""
        self.job = self.client.wait(self.job, poll=poll, timeout=timeout, on_update=on_update)
        path = self.client.download(self.job, output if output is not None else self.default_output())
        return RepairResult(self.job, self.job.metrics, path)

    def cancel(self) -> Job:
        self.job = self.client.cancel(self.job)
        return self.job


__all__ = ["Client", "OnpError", "Repair"]
