"""One settings object for the API, the workers and the CLI (environment prefix ``ONP_``).

With no configuration at all the service runs *embedded*: a SQLite file and a local
artifact folder under ``./var`` and an in-process Celery worker on the ``memory://``
transport. Setting ``ONP_DATABASE_URL`` and ``ONP_BROKER_URL`` (Postgres + Redis) is
all it takes to run the API and any number of workers on separate machines.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1 << 20


class Settings(BaseSettings):
    """Every knob of the service; each field maps to ``ONP_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="ONP_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("var"), description="root for the default SQLite file and artifact folder")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite file under data_dir")
    broker_url: str = Field("memory://", description="Celery broker; memory:// means embedded (one process)")
    broker_key_prefix: str = Field("", description="prefix for every broker key (isolates deployments sharing Redis)")
    artifact_dir: Path | None = Field(None, description="content-addressed artifact folder; default data_dir/artifacts")

    max_model_bytes: int = Field(512 * MB, ge=1, description="largest accepted model upload")
    max_data_bytes: int = Field(512 * MB, ge=1, description="largest accepted clean/triggered data upload")
    max_field_bytes: int = Field(64 * 1024, ge=1, description="largest accepted manifest/options field")

    # 4 h: the limit frees a worker from a runaway job (liveness is the heartbeat's job), so it must let the
    # slowest supported case finish: a full-width PreAct-ResNet18 on a 2-core CPU worker is an estimated
    # 50-60 min of ONP (docs/ONP.md, known gaps); 1 h failed it at the finish line.
    job_time_limit: int = Field(14400, ge=1, description="seconds a repair may run before it is failed")
    max_attempts: int = Field(3, ge=1, description="claims of one job (worker crashes) before it is failed")
    heartbeat_seconds: float = Field(5.0, gt=0, description="how often a running job proves it is alive")
    stale_after_seconds: float = Field(60.0, gt=0, description="heartbeat age after which a running job is reaped")
    enqueue_grace_seconds: float = Field(10.0, ge=0,
                                         description="age of a never-enqueued job before the reconciler sends it")
    maintenance_seconds: float = Field(10.0, gt=0, description="period of the reaper/reconciler in each worker")
    progress_write_seconds: float = Field(0.5, ge=0, description="minimum gap between progress writes to the DB")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in workers (None: torch default)")
    requeue_queued_after_seconds: float = Field(
        1800.0, gt=0, description="age of a published but still queued job before the reconciler sends it again "
                                  "(its message may have been lost; duplicates are harmless: the claim is atomic)")

    db_connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for a database connection")
    db_statement_timeout: float = Field(30.0, ge=0, description="server-side limit per SQL statement (0: none)")
    db_pool_timeout: float = Field(10.0, gt=0, description="seconds to wait for a free pooled connection")
    broker_connect_timeout: float = Field(3.0, gt=0, description="seconds to wait for a broker connection")
    broker_socket_timeout: float = Field(10.0, gt=0, description="seconds a broker read/write may block")

    auth_failures_burst: int = Field(20, ge=0, description="failed authentications per client IP before 429 "
                                                           "(token bucket; 0 disables)")
    auth_failures_per_minute: float = Field(6.0, gt=0, description="refill rate of the failed-auth bucket")
    key_requests_burst: int = Field(300, ge=0, description="requests per API key before 429 (0 disables)")
    key_requests_per_second: float = Field(50.0, gt=0, description="refill rate of the per-key bucket")

    auto_migrate: bool | None = Field(None, description="run migrations at start-up; default only for SQLite")
    embedded_worker: bool | None = Field(None, description="run a worker thread in the API; default for memory://")
    bootstrap_key: bool = Field(True, description="create and print a first API key when none exists (onp serve)")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'onp.sqlite3').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url.startswith("memory://")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @property
    def should_run_embedded_worker(self) -> bool:
        return self.is_embedded_broker if self.embedded_worker is None else self.embedded_worker


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings read once from the environment (tests build their own ``Settings``)."""
    return Settings()
