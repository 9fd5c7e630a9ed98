"""Typed views of the API's JSON (jobs, metrics, pages); ``raw`` keeps the full document.

Plain dataclasses instead of pydantic models so that a newer server adding fields never
breaks an older client: unknown keys are simply ignored (and still available in ``raw``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass(frozen=True)
class MetricValues:
    """ACC on the clean upload; ASR/RA on the triggered set (None without one)."""

    acc: float | None = None
    asr: float | None = None
    ra: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> MetricValues | None:
        if data is None:
            return None
        return cls(acc=data.get("acc"), asr=data.get("asr"), ra=data.get("ra"))


@dataclass(frozen=True)
class Metrics:
    before: MetricValues | None = None
    after: MetricValues | None = None
    der: float | None = None
    num_pruned: int | None = None
    seconds: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Metrics:
        data = data or {}
        return cls(before=MetricValues.from_json(data.get("before")), after=MetricValues.from_json(data.get("after")),
                   der=data.get("der"), num_pruned=data.get("num_pruned"), seconds=data.get("seconds"))


@dataclass(frozen=True)
class Job:
    """A repair job as the server last reported it (call ``Client.get`` for a fresh one)."""

    id: str
    status: str
    method: str
    progress: float
    phase: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    options: dict[str, Any]
    model_format: str
    metrics: Metrics
    attempts: int
    cancel_requested: bool
    links: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(id=str(data["id"]), status=data["status"], method=data.get("method", ""),
                   progress=float(data.get("progress") or 0.0), phase=data.get("phase", ""),
                   created_at=_time(data.get("created_at")), started_at=_time(data.get("started_at")),
                   finished_at=_time(data.get("finished_at")), error=data.get("error"),
                   options=data.get("options") or {}, model_format=data.get("model_format", ""),
                   metrics=Metrics.from_json(data.get("metrics")), attempts=int(data.get("attempts") or 0),
                   cancel_requested=bool(data.get("cancel_requested")), links=data.get("links") or {}, raw=data)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass(frozen=True)
class JobPage:
    items: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime | None
    phase: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(id=int(data["id"]), at=_time(data.get("at")), phase=data.get("phase", ""),
                   message=data.get("message", ""), data=data.get("data"))


@dataclass(frozen=True)
class RepairResult:
    """What ``Repair.wait`` returns: the finished job, its metrics and where the repaired model was saved."""

    job: Job
    metrics: Metrics
    model_path: Path
