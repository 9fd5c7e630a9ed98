"""Alembic migrations on a real, empty Postgres database: upgrade, downgrade, upgrade again."""
from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from conftest import PG_ADMIN
from store.db import downgrade, upgrade
from store.models import Base

pytestmark = pytest.mark.integration

TABLES = {"users", "api_keys", "artifacts", "jobs", "job_events"}


@pytest.fixture()
def empty_db() -> Iterator[str]:
    name = f"onp_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    assert _tables(empty_db) == set()
    upgrade(empty_db)
    assert _tables(empty_db) == TABLES
    engine = create_engine(empty_db)
    try:
        with engine.connect() as conn:  # the migration matches the models exactly
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
    downgrade(empty_db)
    assert _tables(empty_db) == set()
    upgrade(empty_db)
    assert _tables(empty_db) == TABLES
