"""How `hubctl` prints: results on stdout, notes and progress on stderr, lists as
tables (or JSON with --json), metrics as short text."""

from __future__ import annotations

import json
import sys

from hub.cli import progress


def out(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def dump_json(data) -> None:
    out(json.dumps(data, indent=2, sort_keys=True, default=str))


def human_size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def short_time(value) -> str:
    return (value or "")[:16].replace("T", " ")


def table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    from rich.table import Table

    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    progress.out_console().print(t)


def listing(items: list[dict], as_json: bool, empty: str, columns: list[str], row) -> int:
    """A list command's output: the items as JSON with --json, else a table (one `row(item)`
    per item), or `empty` as a note when there are none."""
    if as_json:
        dump_json(items)
    elif not items:
        note(empty)
    else:
        table(columns, [row(i) for i in items])
    return 0


def last_line(text) -> str:
    """The last non-empty line: a job's error ends with the exception's message."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def fmt_metric(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt_metric(v)}" for k, v in value.items()) + "}"
    return str(value)


def fmt_metrics(metrics: dict | None) -> str:
    """Scalar metrics as k=v; nested ones (score curves and the like) are left to --json."""
    return ", ".join(f"{k}={fmt_metric(v)}" for k, v in (metrics or {}).items() if not isinstance(v, (dict, list)))
