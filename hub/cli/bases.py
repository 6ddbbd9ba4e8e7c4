"""`hubctl base add|list|show|deprecate`: the base models and their retransfer plans."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from pathlib import Path

from hub.cli import tables
from hub.cli.adapters import local_files, note_present
from hub.cli.client import (
    API,
    Client,
    UserError,
    slug,
)
from hub.cli.files import TRANSFER_TIMEOUT, push_files
from hub.cli.output import (
    dump_json,
    human_size,
    note,
    out,
    short_time,
    table,
)


def parse_when(text: str) -> str:
    """An ISO date or date-time (UTC when no zone is given) -> ISO 8601."""
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), time(0, 0), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise UserError(f"--at takes a date like 2025-07-01 or 2025-07-01T12:00:00Z, got {text!r}.") from None
    return moment.isoformat()


def guess_family_version(s: str) -> tuple[str, str]:
    """`tiny-llama-3.1` -> ("tiny-llama", "3.1"): the last dash part when it looks like a version."""
    head, _, tail = s.rpartition("-")
    if head and tail and tail[0].isdigit():
        return head, tail
    return s, ""


def cmd_base_add(args) -> int:
    name = slug(args.slug)
    weights = args.weights
    if weights.startswith("file://"):
        weights = weights[len("file://"):]
    elif "://" in weights:
        raise UserError("--weights takes a local folder (or a file:// URI); upload other URIs' files from a copy.")
    files = local_files(Path(weights).expanduser())
    if not any(p.suffix == ".safetensors" for p in files):
        raise UserError(f"{weights} has no .safetensors file: a base model needs its weights in safetensors.")
    family, version = guess_family_version(name)
    data = {"slug": name, "family": args.family if args.family is not None else family,
            "version": args.version if args.version is not None else version, "description": args.description or ""}
    total = sum(p.stat().st_size for p in files)
    with Client() as c:
        me = c.get(f"{API}/me")  # no token or a bad one: the server's message, before the upload
        if not me.get("is_staff"):
            raise UserError("Only staff may register base models.")
        try:
            c.get(f"{API}/base-models/{name}/")
        except UserError:
            pass  # not registered yet: the usual case
        else:
            raise UserError(f"Base model '{name}' is already registered.")
        shas, states = push_files(c, files, f"base {name}")
        data["files"] = [{"path": p.name, "sha256": sha} for p, sha in zip(files, shas, strict=True)]
        base = c.json("POST", f"{API}/base-models/", json=data, timeout=TRANSFER_TIMEOUT)
    note_present(states)
    out(f"Registered base model {base['slug']}: {len(base.get('files') or files)} files, {human_size(total)}, "
        f"{len(base.get('manifest') or {})} tensors, sha {base.get('sha', '')[:12]}.")
    return 0


def cmd_base_list(args) -> int:
    with Client() as c:
        bases = list(c.paginate(f"{API}/base-models/", status=args.status, family=args.family))
    if args.json:
        dump_json(bases)
        return 0
    if not bases:
        note("No base models registered.")
        return 0
    table(["slug", "family", "version", "status", "successor", "deprecate_at", "adapters"],
          [[b["slug"], b.get("family"), b.get("version"), b.get("status"), b.get("successor") or "",
            short_time(b.get("deprecate_at")), b.get("adapters")] for b in bases])
    return 0


BASE_SHOWN = ("slug", "family", "version", "status", "successor", "deprecate_at", "weights_uri", "sha",
              "architectures", "adapters", "created_at", "description")


def cmd_base_show(args) -> int:
    with Client() as c:
        base = c.get(f"{API}/base-models/{slug(args.slug)}/")
    if args.json:
        dump_json(base)
        return 0
    for key in BASE_SHOWN:
        if key in base and base[key] not in (None, "", []):
            value = ", ".join(base[key]) if isinstance(base[key], list) else base[key]
            out(f"{key + ':':14} {value}")
    manifest = base.get("manifest") or {}
    if manifest:
        params = 0
        for entry in manifest.values():
            n = 1
            for d in entry.get("shape", []):
                n *= d
            params += n
        out(f"{'manifest:':14} {len(manifest)} tensors, {params:,} parameters")
    files = base.get("files") or []
    if files:
        table(["path", "size", "sha256"], [[f["path"], human_size(f["size"]), f["sha256"][:16]] for f in files])
    plan = base.get("retransfer")
    if plan:
        table(tables.RETRANSFER_COLUMNS, tables.retransfer_rows(plan), title=f"retransfer to {base.get('successor')}")
    # Keys this version of hubctl does not know are shown as they come.
    extra = {k: v for k, v in base.items() if k not in BASE_SHOWN + ("manifest", "files", "config", "retransfer")}
    for key, value in extra.items():
        text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
        out(f"{key}:\n{text}" if "\n" in str(text) else f"{key + ':':14} {text}")
    return 0


def cmd_base_deprecate(args) -> int:
    body = {"successor": slug(args.successor) if args.successor else None}
    if args.at:
        body["at"] = parse_when(args.at)
    with Client() as c:
        base = c.post(f"{API}/base-models/{slug(args.slug)}/deprecate", body)
    succ = f" in favour of {base['successor']}" if base.get("successor") else ""
    out(f"{base['slug']} is {base.get('status')}{succ} (deprecate_at {short_time(base.get('deprecate_at'))}).")
    return 0
