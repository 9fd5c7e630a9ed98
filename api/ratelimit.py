"""Token-bucket rate limits: failed authentications per client IP, requests per API key.

Two buckets guard the API:

- ``authfail:<ip>`` — every failed authentication (wrong or revoked key) takes a token;
  while the bucket is empty *every* request from that address that carries a key is
  answered 429 before the key is even looked up, so guessing keys costs the guesser
  time, not the database. Missing keys do not count (that is a client bug, not a guess).
- ``key:<key hash>`` — every authenticated request takes a token, so one runaway or
  stolen key cannot starve the others.

A 429 carries ``Retry-After`` (whole seconds until a token is back). With a Redis broker
the buckets live in Redis (one atomic Lua script, Redis' own clock), shared by every API
process and host; otherwise, or while Redis cannot be reached, they live in this process
(per-process limits, never a reason to refuse service: the limiter fails open to memory).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from store.settings import Settings

log = logging.getLogger(__name__)

_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local need, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(v[1]) or burst
local ts = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed, retry = 0, 0
if tokens >= need then
  allowed = 1
  tokens = tokens - cost
else
  retry = (need - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 2)
return {allowed, tostring(retry)}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds, at least 1 when refused


class _MemoryBuckets:
    """Per-process buckets; bounded (least recently used evicted) so many addresses cannot grow memory."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def take(self, key: str, burst: float, rate: float, need: float, cost: float) -> tuple[bool, float]:
        now = time.monotonic()
        with self._lock:
            tokens, ts = self._buckets.pop(key, (burst, now))
            tokens = min(burst, tokens + max(0.0, now - ts) * rate)
            allowed = tokens >= need
            if allowed:
                tokens -= cost
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_entries:
                self._buckets.popitem(last=False)
        return allowed, 0.0 if allowed else (need - tokens) / rate


class RateLimiter:
    """``take(bucket, key, …)`` against Redis when the broker is Redis, else (or on Redis errors) memory."""

    def __init__(self, settings: Settings, redis_url: str | None = None, retry_redis_after: float = 10.0) -> None:
        self.settings = settings
        self.prefix = f"{settings.broker_key_prefix}onp:rl:"
        self.memory = _MemoryBuckets()
        self._redis: Any = None
        self._script: Any = None
        self._redis_down_until = 0.0
        self._retry_redis_after = retry_redis_after
        if redis_url and redis_url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
            self._script = self._redis.register_script(_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimiter":
        return cls(settings, None if settings.is_embedded_broker else settings.broker_url)

    def take(self, bucket: str, key: str, burst: int, per_second: float, need: float = 1.0,
             cost: float = 1.0) -> Verdict:
        """Allowed when the bucket holds ``need`` tokens; then ``cost`` tokens are taken. ``burst`` 0: unlimited."""
        if burst <= 0:
            return Verdict(True)
        name = f"{bucket}:{key}"
        allowed, retry = self._take(name, float(burst), per_second, need, cost)
        return Verdict(True) if allowed else Verdict(False, max(1, math.ceil(retry)))

    def _take(self, name: str, burst: float, rate: float, need: float, cost: float) -> tuple[bool, float]:
        if self._script is not None and time.monotonic() >= self._redis_down_until:
            import redis

            try:
                allowed, retry = self._script(keys=[self.prefix + name], args=[burst, rate, need, cost])
                return bool(int(allowed)), float(retry)
            except redis.RedisError as exc:
                log.warning("rate limiter: Redis unavailable (%s); using per-process buckets for %.0f s",
                            exc, self._retry_redis_after)
                self._redis_down_until = time.monotonic() + self._retry_redis_after
        return self.memory.take(name, burst, rate, need, cost)

    # The two policies of the API -------------------------------------------------------------

    def auth_blocked(self, client: str) -> Verdict:
        """Before looking a key up: refused while this address has used up its failed attempts."""
        s = self.settings
        return self.take("authfail", client, s.auth_failures_burst, s.auth_failures_per_minute / 60.0, 1.0, 0.0)

    def auth_failed(self, client: str) -> None:
        s = self.settings
        self.take("authfail", client, s.auth_failures_burst, s.auth_failures_per_minute / 60.0, 0.0, 1.0)

    def key_request(self, key_id: str) -> Verdict:
        s = self.settings
        return self.take("key", key_id, s.key_requests_burst, s.key_requests_per_second)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
