"""Progress display for `hubctl`: byte bars for uploads and downloads, a bar
for one job, a live table for many. Everything goes to stderr, so stdout
keeps only what a script would read (ids, tables, JSON). Without a terminal
the bars stay silent and jobs report each change of status on one line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

FINISHED = ("succeeded", "failed", "cancelled")
POLL_SECONDS = float(os.environ.get("HUBCTL_POLL_SECONDS", "0.5"))


def out_console() -> Console:
    # Wide when piped, so tables do not wrap names in logs and tests.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


def err_console() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=False)


class TransferBar:
    """A byte progress bar (a context manager) shared by several files."""

    def __init__(self, total: int, description: str):
        console = err_console()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, disable=not console.is_terminal, transient=False,
        )
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, n: int):
        self.progress.advance(self.task, n)

    def describe(self, text: str):
        self.progress.update(self.task, description=text)


def _job_line(job: dict) -> str:
    pct = f"{100 * float(job.get('progress') or 0):.0f}%"
    msg = job.get("message") or ""
    return f"job {job['id']} ({job.get('op')}): {job.get('status')} {pct} {msg}".rstrip()


def watch_job(fetch: Callable[[], dict], first: dict | None = None) -> dict:
    """Poll a job until it finishes, with a bar on a terminal; return its last state."""
    console = err_console()
    job = first or fetch()
    if not console.is_terminal:
        last = None
        while True:
            line = (job.get("status"), round(float(job.get("progress") or 0), 2), job.get("message"))
            if line != last:
                console.print(_job_line(job), highlight=False, markup=False)
                last = line
            if job.get("status") in FINISHED:
                return job
            time.sleep(POLL_SECONDS)
            job = fetch()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"), console=console,
    )
    with progress:
        task = progress.add_task(f"{job.get('op')} {str(job['id'])[:8]}", total=1.0, message="")
        while True:
            progress.update(
                task, completed=float(job.get("progress") or 0),
                message=f"[{job.get('status')}] {job.get('message') or ''}",
            )
            if job.get("status") in FINISHED:
                return job
            time.sleep(POLL_SECONDS)
            job = fetch()


def watch_jobs_table(rows: list[dict], refresh: Callable[[dict], None], render_row: Callable[[dict], list[str]],
                     columns: list[str], title: str = "") -> list[dict]:
    """Refresh every unfinished row until all are finished, showing a live table.

    `refresh(row)` updates a row in place (row["job"] holds the job's state).
    """

    def table() -> Table:
        t = Table(title=title or None)
        for c in columns:
            t.add_column(c)
        for row in rows:
            t.add_row(*render_row(row))
        return t

    def pending():
        return [r for r in rows if r.get("job") and r["job"].get("status") not in FINISHED]

    console = err_console()
    if not console.is_terminal:
        while pending():
            time.sleep(POLL_SECONDS)
            for row in pending():
                refresh(row)
        out_console().print(table())
        return rows
    with Live(table(), console=console, refresh_per_second=4) as live:
        while pending():
            time.sleep(POLL_SECONDS)
            for row in pending():
                refresh(row)
            live.update(table())
    return rows
