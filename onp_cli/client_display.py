"""Rendering of jobs for the client commands: rich tables for people, line logs for pipes.

Kept apart from the command definitions so that the commands read as the flow
(submit → wait → download) and the formatting can change without touching them.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from onp_client import Job, MetricValues

STATUS_STYLE = {"queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def status_text(job: Job) -> str:
    style = STATUS_STYLE.get(job.status, "white")
    return f"[{style}]{job.status}[/{style}]"


def metrics_table(job: Job) -> Table:
    """Before/after ACC, ASR and RA (the summary line is ``metrics_summary``)."""
    m = job.metrics
    table = Table()
    for col in ("", "ACC", "ASR", "RA"):
        table.add_column(col, justify="right" if col else "left")
    rows: list[tuple[str, MetricValues | None]] = [("before", m.before), ("after", m.after)]
    for name, values in rows:
        v = values or MetricValues()
        table.add_row(name, pct(v.acc), pct(v.asr), pct(v.ra))
    return table


def metrics_summary(job: Job) -> str:
    """DER, neurons pruned and repair time on one line (DER needs a triggered set + target)."""
    m = job.metrics
    bits = [f"{job.method} repair", f"DER {pct(m.der)}"]
    if m.num_pruned is not None:
        bits.append(f"{m.num_pruned} neurons pruned")
    if m.seconds is not None:
        bits.append(f"{m.seconds:.1f}s")
    if m.before is not None and m.before.asr is None:
        bits.append("ASR needs --triggered and --target")
    return "  ·  ".join(bits)


def job_table(job: Job) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("id", job.id)
    table.add_row("status", status_text(job) + (" (cancel requested)" if job.cancel_requested and not job.done else ""))
    table.add_row("method", f"{job.method} on {job.options.get('device', 'cpu')}  ({job.model_format})")
    table.add_row("progress", f"{100 * job.progress:.0f}%  {job.phase}")
    table.add_row("created", when(job.created_at))
    table.add_row("started", when(job.started_at))
    table.add_row("finished", when(job.finished_at))
    if job.attempts > 1:
        table.add_row("attempts", str(job.attempts))
    if job.error:
        table.add_row("error", f"[red]{job.error}[/red]")
    return table


def jobs_table(jobs: list[Job]) -> Table:
    table = Table()
    for col in ("id", "status", "method", "progress", "phase", "created", "ACC after", "ASR after"):
        table.add_column(col, no_wrap=col == "id")
    for j in jobs:
        after = j.metrics.after or MetricValues()
        table.add_row(j.id, status_text(j), j.method, f"{100 * j.progress:.0f}%", j.phase, when(j.created_at),
                      pct(after.acc), pct(after.asr))
    return table


def eta_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Remaining time from the average rate since the job started (None until there is progress)."""
    if job.started_at is None or job.progress <= 0.02 or job.done:
        return None
    elapsed = ((now or datetime.now(timezone.utc)) - job.started_at).total_seconds()
    return max(0.0, elapsed * (1 - job.progress) / job.progress)


class Watcher:
    """``on_update`` for ``Client.wait``: a live bar on a terminal, one line per phase or 10% otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self._last: tuple[str, str, int] | None = None
        self._t0 = time.monotonic()

    def __enter__(self) -> Watcher:
        if self.live:
            self.progress = Progress(TextColumn("[bold]{task.fields[status]}"), TextColumn("{task.description}"),
                                     BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("queued", total=100, status="queued")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def __call__(self, job: Job) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=100 * job.progress, description=job.phase,
                                 status=status_text(job))
            return
        key = (job.status, job.phase, int(10 * job.progress))
        if key == self._last:
            return
        self._last = key
        eta = eta_seconds(job)
        eta_text = f"  ETA {eta:.0f}s" if eta is not None else ""
        self.console.print(f"[{100 * job.progress:3.0f}%] {job.status:<9} {job.phase}{eta_text}", highlight=False,
                           markup=False)
