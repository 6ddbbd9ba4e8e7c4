"""Rows of hubctl's tables for structured fields of REST answers (pure: data in,
cells out), so commands print tables instead of raw JSON."""

from __future__ import annotations

RETRANSFER_COLUMNS = ["adapter", "method", "state", "progress", "result", "why this method"]


def retransfer_rows(plan: list[dict]) -> list[list[str]]:
    """A base model's retransfer plan (`retransfer` of GET /api/v1/base-models/{slug}/):
    one row per adapter that moves to the successor."""
    rows = []
    for row in plan or []:
        progress = row.get("progress")
        result = row.get("result") or {}
        if result:
            done = f"{result.get('adapter', '')}@{(result.get('sha') or '')[:8]}"
        elif row.get("job"):
            done = f"job {str(row['job'])[:8]}"
        else:
            done = ""
        rows.append([
            row.get("adapter", ""), row.get("method", ""), row.get("state", ""),
            f"{100 * float(progress):.0f}%" if isinstance(progress, (int, float)) else "",
            done, row.get("reason", ""),
        ])
    return rows
