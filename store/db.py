"""Engines and sessions, built from :class:`Settings`, plus programmatic migrations.

SQLite (embedded mode) is shared by the API's threads and the in-process worker, so
it gets WAL, a busy timeout and ``check_same_thread=False``; Postgres gets a
pre-pinged pool so a restarted database does not surface as a 500, plus a connect
timeout, a server-side statement timeout and a pool timeout so that an unreachable
or overloaded database makes a request fail in bounded time (the API answers 503)
instead of hanging.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from .settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"


def _ensure_sqlite_dir(url: str) -> None:
    """SQLite creates the file but not its folder (``./var`` on a first ``onp serve``)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, connect_timeout: float = 5.0, statement_timeout: float = 30.0,
                pool_timeout: float = 10.0) -> Engine:
    _ensure_sqlite_dir(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(round(connect_timeout)))  # libpq: whole seconds
        if statement_timeout > 0:
            connect_args["options"] = f"-c statement_timeout={int(statement_timeout * 1000)}"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=pool_timeout,
                         connect_args=connect_args)


class Database:
    """An engine + session factory; re-created after ``fork`` (Celery prefork children)."""

    def __init__(self, url: str, **engine_options: Any) -> None:
        self.url = url
        self._pid = os.getpid()
        self.engine = make_engine(url, **engine_options)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child must not share the parent's sockets
            self.engine.dispose(close=False)
            self._pid = os.getpid()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        self._check_fork()
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> None:
        self._check_fork()
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR.parent / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """``alembic upgrade`` without a shell: used by ``onp db upgrade``, start-up and tests."""
    from alembic import command

    _ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def database_for(settings: Settings) -> Database:
    return Database(settings.resolved_database_url, connect_timeout=settings.db_connect_timeout,
                    statement_timeout=settings.db_statement_timeout, pool_timeout=settings.db_pool_timeout)
