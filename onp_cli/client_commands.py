"""Client commands of ``onp`` (submit, status, wait, download, list, cancel, report, login, logout).

They talk to a running service over HTTP through :mod:`onp_client`; nothing here imports
torch or the service code, so they start fast and work from any machine. ``onp keys
create`` (server side, writes the database) is unrelated to ``onp login`` (client side,
writes ``~/.config/onp/config.toml``).

Exit codes: 0 ok · 1 job failed/cancelled (or not in a state for the request: 409) ·
2 usage or the server rejected the input (400/413/415/422) · 3 auth (401/403) ·
4 not found (404) · 5 server/network error or checksum mismatch.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

from onp_client import Client, Job, JobFailed, OnpError
from onp_client.config import config_path, read_config_file, resolve, write_config_file
from onp_core.cli import app

from .client_display import Watcher, job_table, jobs_table, metrics_summary, metrics_table

EXIT_CODES = ("Exit codes: 0 ok, 1 job failed/cancelled or not ready (409), 2 usage/invalid input, "
              "3 auth, 4 not found, 5 server/network error.")
PANEL = "Service client"
F = TypeVar("F", bound=Callable[..., Any])

ServerOpt = typer.Option(None, "--server", help="API URL [env ONP_SERVER, config file; default http://127.0.0.1:8000]")
KeyOpt = typer.Option(None, "--key", help="API key [env ONP_API_KEY, config file written by `onp login`]")
JsonOpt = typer.Option(False, "--json", help="machine-readable JSON on stdout")


def _console() -> Console:
    """stdout console; wide when piped so ids and tables are not wrapped mid-value."""
    c = Console()
    return c if c.is_terminal else Console(width=200)


def _err() -> Console:
    return Console(stderr=True)


def _fail(message: str, code: int) -> typer.Exit:
    _err().print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def handles_errors(fn: F) -> F:
    """Turn client exceptions into a one-line message and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except JobFailed as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except OnpError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except ValueError as exc:  # unreadable config file
            raise _fail(str(exc), 2) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def _client(server: str | None, key: str | None) -> Iterator[Client]:
    cfg = resolve(server, key)
    if not cfg.key:
        raise _fail("no API key: pass --key, set ONP_API_KEY or run `onp login`", 3)
    with Client(cfg.server, cfg.key) as client:
        yield client


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _show(job: Job, as_json: bool) -> None:
    if as_json:
        _print_json(job.raw)
        return
    out = _console()
    out.print(job_table(job))
    if job.metrics.before or job.metrics.after:
        out.print(metrics_table(job))
        out.print(metrics_summary(job), highlight=False)


def _parse_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--options") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--options")
    return value


def _wait(client: Client, job: Job, as_json: bool, output: str | None, poll: float,
          timeout: float | None) -> None:
    """Follow the job, then print the result table (or JSON) and download when asked; exit 1 unless it succeeded."""
    out = _console()
    try:
        if as_json:
            final = client.wait(job, poll=poll, timeout=timeout, raise_on_failure=False)
        else:
            with Watcher(out) as watcher:
                final = client.wait(job, poll=poll, timeout=timeout, on_update=watcher, raise_on_failure=False)
    except KeyboardInterrupt:
        raise _fail(f"stopped waiting; the repair goes on on the server (`onp wait {job.id}`)", 130) from None
    _show(final, as_json)
    if not final.succeeded:
        raise _fail(f"repair {final.id} {final.status}: {final.error or 'no reason given'}", 1)
    if output is not None:
        path = client.download(final, output)
        if not as_json:
            out.print(f"saved {path} (sha256 verified)", highlight=False)


@app.command(rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def login(
    key: Optional[str] = typer.Option(None, "--key", help="API key (prompted when omitted)"),
    server: Optional[str] = typer.Option(None, "--server", help="API URL [default: current or http://127.0.0.1:8000]"),
    verify: bool = typer.Option(True, help="check the key against the server before saving"),
) -> None:
    """Save the server URL and API key in ~/.config/onp/config.toml (mode 0600) for the other commands."""
    server = (server or read_config_file().get("server") or resolve().server).rstrip("/")
    key = key or typer.prompt("API key", hide_input=True)
    if verify:
        with Client(server, key) as client:
            client.whoami()
    path = write_config_file(server, key)
    _console().print(f"logged in to {server}; saved to {path}", highlight=False)


@app.command(rich_help_panel=PANEL)
def logout() -> None:
    """Forget the saved API key (keeps the server URL)."""
    path = config_path()
    server = read_config_file().get("server")
    if path.exists():
        path.unlink()
    if server:
        write_config_file(server, "", path)
    _console().print(f"removed the key from {path}", highlight=False)


@app.command(rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def submit(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help=".safetensors, .pt state_dict or .pt2"),
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="clean images: .npz (x, y) or archive"),
    method: str = typer.Option("onp", help="onp, anp, rnp, clp or fp"),
    manifest: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="manifest.json (needed for .pt)"),
    options: Optional[str] = typer.Option(None, help="the method's options as JSON, e.g. '{\"u\": 3.0}'"),
    seed: int = typer.Option(0, min=0, help="seed of every random choice of the repair"),
    device: str = typer.Option("cpu", help="worker pool: cpu or gpu"),
    triggered: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                             help="triggered test set (.npz) to report ASR/RA/DER"),
    target: Optional[int] = typer.Option(None, min=0, help="backdoor target class (with --triggered)"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to the end and print before/after metrics"),
    output: Optional[str] = typer.Option(None, "-o", "--output",
                                          help="with --wait: save the repaired model here (file, or folder/)"),
    poll: float = typer.Option(1.0, min=0.05, help="seconds between status checks"),
    timeout: Optional[float] = typer.Option(None, help="with --wait: give up waiting after this many seconds"),
    server: Optional[str] = ServerOpt,
    key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Upload a model and clean data and queue a repair (prints the job id; --wait follows it)."""
    opts = _parse_options(options)
    if device not in ("cpu", "gpu"):
        raise typer.BadParameter("cpu or gpu", param_hint="--device")
    if output is not None and not wait:
        raise typer.BadParameter("only with --wait (or use `onp download`)", param_hint="--output")
    with _client(server, key) as client:
        job = client.submit(model, data, method=method, options=opts, manifest=manifest, triggered=triggered,
                            target=target, seed=seed, device=device)
        if not wait:
            if as_json:
                _print_json(job.raw)
            else:
                _console().print(f"submitted {job.id} ({job.method}, {job.status})\n"
                                 f"follow it with: onp wait {job.id}", highlight=False)
            return
        if not as_json:
            _console().print(f"submitted {job.id} ({job.method})", highlight=False)
        _wait(client, job, as_json, output, poll, timeout)


@app.command(rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def status(job_id: str = typer.Argument(..., help="job id"), server: Optional[str] = ServerOpt,
           key: Optional[str] = KeyOpt, as_json: bool = JsonOpt) -> None:
    """Show a job: status, phase, progress, timestamps, error and before/after metrics."""
    with _client(server, key) as client:
        _show(client.get(job_id), as_json)


@app.command("wait", rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def wait_cmd(
    job_id: str = typer.Argument(..., help="job id"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="save the repaired model here when done"),
    poll: float = typer.Option(1.0, min=0.05, help="seconds between status checks"),
    timeout: Optional[float] = typer.Option(None, help="give up waiting after this many seconds (exit 5)"),
    server: Optional[str] = ServerOpt,
    key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Follow a job with a live progress bar (phase, ETA) until it finishes; exit 1 unless it succeeded."""
    with _client(server, key) as client:
        _wait(client, client.get(job_id), as_json, output, poll, timeout)


@app.command(rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def download(
    job_id: str = typer.Argument(..., help="job id"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="file, or folder/ [default: ./<server's name>]"),
    server: Optional[str] = ServerOpt,
    key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Download the repaired model; the file is kept only if its SHA-256 matches the server's checksum."""
    with _client(server, key) as client:
        path = client.download(job_id, output)
    if as_json:
        _print_json({"id": job_id, "path": str(path)})
    else:
        _console().print(f"saved {path} (sha256 verified)", highlight=False)


@app.command("list", rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def list_cmd(
    status_: Optional[str] = typer.Option(None, "--status", help="queued, running, succeeded, failed or cancelled"),
    limit: int = typer.Option(20, min=1, max=100, help="jobs per page"),
    cursor: Optional[str] = typer.Option(None, help="next_cursor of a previous page"),
    server: Optional[str] = ServerOpt,
    key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List your jobs, newest first."""
    with _client(server, key) as client:
        page = client.list(status_, limit, cursor)
    if as_json:
        _print_json({"items": [j.raw for j in page.items], "next_cursor": page.next_cursor})
        return
    out = _console()
    out.print(jobs_table(page.items))
    if page.next_cursor:
        out.print(f"more: onp list --cursor {page.next_cursor}", highlight=False)


@app.command(rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def cancel(job_id: str = typer.Argument(..., help="job id"), server: Optional[str] = ServerOpt,
           key: Optional[str] = KeyOpt, as_json: bool = JsonOpt) -> None:
    """Cancel a job: a queued one at once, a running one at its next step; a finished one exits 1."""
    with _client(server, key) as client:
        job = client.cancel(job_id)
    if as_json:
        _print_json(job.raw)
    elif job.status == "cancelled":
        _console().print(f"cancelled {job.id}", highlight=False)
    else:
        _console().print(f"cancel requested for {job.id}; it stops at its next step", highlight=False)


@app.command(rich_help_panel=PANEL, epilog=EXIT_CODES)
@handles_errors
def report(
    job_id: str = typer.Argument(..., help="job id"),
    html: bool = typer.Option(False, "--html", help="the self-contained HTML report with plots instead of JSON"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write to this file [default: stdout]"),
    server: Optional[str] = ServerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """Fetch a finished job's report (JSON, or HTML with --html)."""
    with _client(server, key) as client:
        text = client.report_html(job_id) if html else json.dumps(client.report(job_id), indent=2)
    if output is None:
        print(text)
        return
    output.write_text(text)
    _err().print(f"saved {output}", highlight=False)
