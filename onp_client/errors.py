"""Exceptions of the client: one class per thing a caller reacts to differently.

Every exception carries the server's ``detail`` (the API answers ``{"detail": str}``) and
the HTTP status, so a script can show the real reason instead of a bare status code.
The CLI maps each class to an exit code (``exit_code``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Job


class OnpError(Exception):
    """Base class: the server answered with an error, or could not be reached (``status`` None)."""

    exit_code = 5

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status

    def __str__(self) -> str:
        return f"{self.detail} (HTTP {self.status})" if self.status else self.detail


class ServerError(OnpError):
    """5xx answers, timeouts and network failures: retrying later may help."""

    exit_code = 5


class AuthError(OnpError):
    """401/403: the API key is missing, wrong or revoked."""

    exit_code = 3


class NotFound(OnpError):
    """404: no such job for this key (another user's job looks exactly like a missing one)."""

    exit_code = 4


class ValidationFailed(OnpError):
    """400/413/415/422: the server rejected the request or the upload; nothing was queued."""

    exit_code = 2


class Conflict(OnpError):
    """409: the job is not in a state for this (results before success, cancelling a finished job)."""

    exit_code = 1


class ChecksumMismatch(OnpError):
    """The downloaded bytes do not hash to the server's ``X-Checksum-SHA256``."""

    exit_code = 5


class JobFailed(OnpError):
    """The job ended ``failed`` or ``cancelled``; ``job`` is its final state."""

    exit_code = 1

    def __init__(self, job: Job) -> None:
        super().__init__(f"repair {job.id} {job.status}: {job.error or 'no reason given'}")
        self.job = job


class WaitTimeout(OnpError):
    """``wait`` gave up before the job finished (the job keeps running on the server)."""

    exit_code = 5


def error_for(status: int, detail: Any) -> OnpError:
    """The exception class for an HTTP error status."""
    text = detail if isinstance(detail, str) else str(detail)
    if status in (401, 403):
        return AuthError(text, status)
    if status == 404:
        return NotFound(text, status)
    if status == 409:
        return Conflict(text, status)
    if status in (400, 413, 415, 422):
        return ValidationFailed(text, status)
    if status >= 500 or status == 429:
        return ServerError(text, status)
    return OnpError(text, status)
