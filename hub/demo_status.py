"""The demo's state as `hubctl serve` last left it (HUB_HOME/demo-status.json):
serve writes it while it builds and seeds the demo zoo, the home page reads it,
so a failed demo build shows in the UI while the hub keeps serving. Absent on
hubs not started by serve. Stdlib only: serve writes it before Django is set up."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FILE = "demo-status.json"
STATES = ("building", "ready", "failed")


def write(home: Path, state: str, detail: str = "", log: list[str] | None = None, zoo: str = "") -> None:
    """`zoo`: the folder the demo was registered from (`hubctl demo path` prints it)."""
    assert state in STATES, state
    path = Path(home) / FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"state": state, "detail": detail, "log": list(log or [])[-20:], "zoo": zoo,
                               "at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    os.replace(tmp, path)  # readers never see half a file


def read(home: Path) -> dict | None:
    try:
        data = json.loads((Path(home) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("state") in STATES else None
