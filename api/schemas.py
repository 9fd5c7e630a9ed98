"""Request options and response bodies of the v1 API (they define the OpenAPI schema)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RepairOptions(BaseModel):
    """The ``options`` form field (a JSON string)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("onp", description="defense: onp, anp, rnp, clp or fp")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed for every random choice of the repair")
    device: Literal["cpu", "gpu"] = Field("cpu", description="worker pool to run on (queue cpu or gpu)")
    target: int | None = Field(None, ge=0, description="backdoor target class, to report ASR on the triggered set")
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific options")


class MetricValues(BaseModel):
    acc: float | None = Field(None, description="accuracy on the uploaded clean data")
    asr: float | None = Field(None, description="attack success rate on the triggered set (needs triggered + target)")
    ra: float | None = Field(None, description="robust accuracy: true labels recovered on the triggered set")


class JobMetrics(BaseModel):
    before: MetricValues | None = None
    after: MetricValues | None = None
    der: float | None = Field(None, description="defense effectiveness rating in [0, 1] (needs ASR)")
    num_pruned: int | None = None
    seconds: float | None = Field(None, description="seconds the defense itself ran")
    warnings: list[str] = Field(default_factory=list, description="what the numbers above can hide, e.g. a class "
                                "whose clean accuracy the repair cut to under half (per-class numbers: the report)")


class JobLinks(BaseModel):
    self: str
    model: str
    report: str
    plot: str
    events: str
    cancel: str


class JobOut(BaseModel):
    """A repair job as every endpoint returns it."""

    id: uuid.UUID
    status: JobStatus
    method: str
    progress: float = Field(ge=0, le=1)
    phase: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    options: dict[str, Any]
    model_format: Literal["safetensors", "pt", "pt2"]
    metrics: JobMetrics
    attempts: int
    cancel_requested: bool
    links: JobLinks


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last page")


class EventOut(BaseModel):
    id: int
    at: datetime
    phase: str
    message: str
    data: dict[str, Any] | None


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int | None = Field(None, description="pass as ?after= to get only newer events")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    reason: str | None = None


class ErrorOut(BaseModel):
    detail: str
