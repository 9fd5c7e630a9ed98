"""Request dependencies: the service context and the authenticated user."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from celery import Celery
from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from store.keys import authenticate, hash_key
from worker.context import ServiceContext

from .ratelimit import RateLimiter

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, as an alternative header")


@dataclass
class Caller:
    user_id: uuid.UUID
    name: str


def get_ctx(request: Request) -> ServiceContext:
    return request.app.state.ctx


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_caller(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
    header_key: str | None = Depends(_api_key),
) -> Caller:
    """401 unless an active API key is given; every job lookup is then scoped to this user."""
    key = bearer.credentials if bearer else header_key
    if not key:
        raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})
    limiter: RateLimiter | None = getattr(request.app.state, "ratelimiter", None)
    client = request.client.host if request.client else "unknown"
    if limiter is not None:
        verdict = limiter.auth_blocked(client)
        if not verdict.allowed:
            raise HTTPException(429, f"too many failed authentication attempts from {client}; "
                                     f"retry in {verdict.retry_after} s",
                                headers={"Retry-After": str(verdict.retry_after)})
    with get_ctx(request).db.session() as s:
        user = authenticate(s, key)
        if user is None:
            if limiter is not None:
                limiter.auth_failed(client)
            raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        caller = Caller(user.id, user.name)
    if limiter is not None:
        verdict = limiter.key_request(hash_key(key)[:32])
        if not verdict.allowed:
            raise HTTPException(429, f"rate limit of this API key exceeded; retry in {verdict.retry_after} s",
                                headers={"Retry-After": str(verdict.retry_after)})
    return caller
