"""Service commands of ``onp``: serve, worker, keys, db.

Registered on the engine's typer app when ``onp_cli.main`` imports this module.
Heavy imports (FastAPI, Celery, SQLAlchemy) happen inside the commands, so the
engine commands stay quick to start.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from onp_core.cli import app, console

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")


def _bootstrap_key(settings: object) -> None:
    """First start with no keys: create one for user 'local', print it once and keep it in data_dir/api-key."""
    from store.db import database_for
    from store.keys import create_key, has_active_keys

    db = database_for(settings)  # type: ignore[arg-type]
    try:
        with db.session() as s:
            if has_active_keys(s):
                return
            new = create_key(s, "local", "bootstrap")
        path = Path(settings.data_dir) / "api-key"  # type: ignore[attr-defined]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new.key + "\n")
        console.print(f"[bold]created API key for user 'local'[/bold] (also in {path}):\n  {new.key}")
    finally:
        db.dispose()


def _database() -> object:
    """The configured database, migrated first when auto-migration applies (the embedded SQLite file)."""
    from store.db import database_for, upgrade
    from store.settings import get_settings

    settings = get_settings()
    if settings.should_auto_migrate:
        upgrade(settings.resolved_database_url)
    return database_for(settings)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes (needs an external broker when > 1)"),
    log_level: str = typer.Option("info"),
) -> None:
    """Run the REST API. With no configuration: SQLite + local artifacts + an in-process worker."""
    import uvicorn

    from store.db import upgrade
    from store.settings import get_settings

    settings = get_settings()
    if settings.is_embedded_broker and workers > 1:
        raise typer.BadParameter("the embedded broker lives in one process: set ONP_BROKER_URL for --workers > 1")
    if settings.should_auto_migrate:
        upgrade(settings.resolved_database_url)
    if settings.bootstrap_key:
        _bootstrap_key(settings)
    mode = "embedded (SQLite/local folder/in-process worker)" if settings.is_embedded_broker else "distributed"
    console.print(f"onp-repair API on http://{host}:{port}  ({mode})  database: {settings.resolved_database_url}",
                  markup=False)
    if workers > 1:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level=log_level)
    else:
        from api.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


@app.command()
def worker(
    queues: str = typer.Option("cpu", help="comma-separated queues: cpu, gpu"),
    concurrency: int = typer.Option(1, min=1, help="jobs run at once (each a process)"),
    pool: str = typer.Option("prefork", help="prefork (time limits, crash isolation) or solo"),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Run a Celery worker for the given queues against ONP_DATABASE_URL and ONP_BROKER_URL."""
    from store.settings import get_settings

    settings = get_settings()
    if settings.is_embedded_broker:
        raise typer.BadParameter("ONP_BROKER_URL is not set: a separate worker needs Redis (onp serve runs its own)")
    from worker.celery_app import app as celery_app

    celery_app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--loglevel", loglevel])


@keys_app.command("create")
def keys_create(user: str = typer.Option(..., help="user name (created if new)"),
                name: str = typer.Option("", help="label for the key")) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from store.keys import create_key

    with _database().session() as s:  # type: ignore[attr-defined]
        new = create_key(s, user, name)
    console.print(new.key)


@keys_app.command("list")
def keys_list(user: Optional[str] = typer.Option(None, help="only this user's keys")) -> None:
    """List keys (prefix, user, name, created, last used, revoked)."""
    from store.keys import list_keys

    table = Table()
    for col in ("prefix", "user", "name", "created", "last used", "revoked"):
        table.add_column(col)
    fmt = lambda t: t.strftime("%Y-%m-%d %H:%M") if t else "—"  # noqa: E731
    with _database().session() as s:  # type: ignore[attr-defined]
        for key, owner in list_keys(s, user):
            table.add_row(key.prefix, owner.name, key.name, fmt(key.created_at), fmt(key.last_used_at),
                          fmt(key.revoked_at))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: str = typer.Argument(..., help="the key's prefix (the 8 hex characters after onp_)")) -> None:
    """Revoke a key at once; requests with it get 401."""
    from store.keys import revoke_key

    with _database().session() as s:  # type: ignore[attr-defined]
        if not revoke_key(s, prefix.removeprefix("onp_").split("_")[0]):
            console.print(f"no active key with prefix {prefix!r}")
            raise typer.Exit(1)
    console.print(f"revoked {prefix}")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head")) -> None:
    """Apply migrations to ONP_DATABASE_URL (run once per release, before the API starts)."""
    from store.db import upgrade
    from store.settings import get_settings

    upgrade(get_settings().resolved_database_url, revision)
    console.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="target revision, e.g. base")) -> None:
    """Revert migrations (destroys data of dropped tables)."""
    from store.db import downgrade
    from store.settings import get_settings

    downgrade(get_settings().resolved_database_url, revision)
    console.print(f"database at {revision}")
