"""`hubctl`: the command line of the adapter hub, an HTTP client of /api/v1/.

Exit codes: 0 ok, 1 user error (bad input, a refused request, a failed job),
2 server error or server unreachable. Failures print one line on stderr.
See docs/cli.md for every command with an example.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import platform
import shutil
import sys
from contextlib import ExitStack
from datetime import UTC, date, datetime, time
from pathlib import Path, PurePosixPath

import httpx

from hub.cli import diff, progress, webhook
from hub.cli.client import (
    API,
    Client,
    CliError,
    ServerError,
    UserError,
    adapter_path,
    file_path,
    hub_url,
    repo_id,
    slug,
    store_token,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPEFT_FILE = "adapter_model.compeft.safetensors"  # adapters_ops.compeft.FILE_NAME
# Uploads and downloads may take long; only connecting must be quick.
TRANSFER_TIMEOUT = httpx.Timeout(connect=10.0, read=1800.0, write=600.0, pool=10.0)


# --- small helpers --------------------------------------------------------------------------


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


def local_files(folder: Path) -> list[Path]:
    """The regular files at the top of a folder, hidden ones excepted (PEFT and HF folders are flat)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    skipped = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if skipped:
        note(f"note: sub-folders are not uploaded: {', '.join(skipped)}")
    return files


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


def csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} takes comma-separated numbers, got {text!r}.") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def safe_relpath(path: str) -> PurePosixPath:
    """A file path from the server, refused if it could escape the target folder."""
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts) or "\\" in path:
        raise ServerError(f"The hub listed an unsafe file path: {path!r}.")
    return p


# --- account ----------------------------------------------------------------------------------


def cmd_login(args) -> int:
    token = args.token
    if not token:
        if sys.stdin.isatty():
            token = getpass.getpass(f"API token for {hub_url()}: ")
        else:
            token = sys.stdin.readline()
    token = (token or "").strip()
    if not token:
        raise UserError("No token given. Pass --token, or type it at the prompt (`python manage.py hubtoken USER`).")
    with Client(token=token) as c:
        me = c.get(f"{API}/me")
        if args.expires:  # store a new token of that lifetime, minted with the one given
            new = c.post(f"{API}/tokens/", {"name": f"hubctl login ({platform.node() or 'host'})"[:64],
                                            "expires": args.expires})
            token = new["token"]
    path = store_token(token)
    out(f"Logged in to {c.url} as {me['username']}. Token stored in {path}.")
    if args.expires:
        out(f"The stored token expires at {new['expires_at']}; the token you gave stays valid until you revoke it.")
    if os.environ.get("HUB_TOKEN") and os.environ["HUB_TOKEN"] != token:
        note("note: HUB_TOKEN is set in the environment and takes precedence over the stored token.")
    return 0


def cmd_whoami(args) -> int:
    with Client() as c:
        me = c.get(f"{API}/me")
    if args.json:
        dump_json(me)
        return 0
    orgs = ", ".join(me.get("orgs") or []) or "-"
    out(f"{me['username']} on {c.url} (orgs: {orgs}{'; staff' if me.get('is_staff') else ''})")
    return 0


# --- base models --------------------------------------------------------------------------------


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
    with Client() as c, ExitStack() as stack:
        bar = stack.enter_context(progress.TransferBar(total, f"base {name}"))
        parts = [("files", (p.name, stack.enter_context(progress.ProgressFile(p, bar)), "application/octet-stream"))
                 for p in files]
        base = c.json("POST", f"{API}/base-models/", data=data, files=parts, timeout=TRANSFER_TIMEOUT)
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
    # Keys this version of hubctl does not know (a retransfer plan, say) are shown as they come.
    extra = {k: v for k, v in base.items() if k not in BASE_SHOWN + ("manifest", "files", "config")}
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


# --- adapters: push, pull, lists ---------------------------------------------------------------------


def exists(c: Client, path: str) -> bool:
    try:
        c.get(path)
        return True
    except UserError:
        return False


def cmd_push(args) -> int:
    owner, name = repo_id(args.name)
    folder = Path(args.dir).expanduser()
    files = local_files(folder)
    names = {p.name for p in files}
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if n not in names]
    if missing:
        raise UserError(f"{folder} is not a PEFT adapter folder: {' and '.join(missing)} missing.")
    card = Path(args.card).expanduser() if args.card else (folder / "README.md" if "README.md" in names else None)
    description = card.read_text(encoding="utf-8") if card else ""
    if args.card:  # the card is the model card: it replaces the folder's README.md
        files = [p for p in files if p.name != "README.md"]
    seeds = Path(args.seeds).expanduser() if args.seeds else None
    if seeds is not None and not seeds.is_file():
        raise UserError(f"--seeds: {seeds} is not a file.")
    declared_config = qalora_declared_config(folder / ADAPTER_CONFIG, args.qalora_group_size)
    data = {"name": f"{owner}/{name}", "base_model": slug(args.base), "visibility": "private" if args.private else "public",
            "tags": args.tags or "", "description": description}
    with Client() as c:
        # Ask first: the server reads the whole body before it can refuse.
        if exists(c, adapter_path(args.name) + "/"):
            raise UserError(f"{owner}/{name} already exists on {c.url}. Push under a new name, or delete it first.")
        c.get(f"{API}/base-models/{args.base}/")  # unknown base: the server's message, before the upload
        total = sum(p.stat().st_size for p in files if not (declared_config and p.name == ADAPTER_CONFIG))
        total += card.stat().st_size if args.card else 0
        total += seeds.stat().st_size if seeds else 0
        with ExitStack() as stack:
            bar = stack.enter_context(progress.TransferBar(total, f"push {owner}/{name}"))
            parts = [("files", (p.name, declared_config if declared_config and p.name == ADAPTER_CONFIG
                                else stack.enter_context(progress.ProgressFile(p, bar)), "application/octet-stream"))
                     for p in files]
            if args.card:
                parts.append(("files", ("README.md", stack.enter_context(progress.ProgressFile(card, bar)), "text/markdown")))
            if seeds:
                parts.append(("seeds", (seeds.name, stack.enter_context(progress.ProgressFile(seeds, bar)),
                                        "application/jsonl")))
            try:
                adapter = c.json("POST", f"{API}/adapters/", data=data, files=parts, timeout=TRANSFER_TIMEOUT)
            except UserError as exc:
                if "already exists" in exc.message:
                    raise UserError(f"{owner}/{name} already exists. Push under a new name, or delete it first.") from None
                raise
    sha = (adapter.get("refs") or {}).get("main", "")
    out(f"Pushed {adapter['id']} on {adapter['base_model']}: revision {sha} (main), "
        f"r={adapter.get('r')}, {human_size(adapter.get('size'))}.")
    return 0


def qalora_declared_config(config_path: Path, group_size: int | None) -> bytes | None:
    """adapter_config.json declaring a QA-LoRA trained with the qa-lora repository: its config is a plain
    LoRA's, and its lora_A has in/G columns pooled by a mean over each group (docs/qalora.md). None: as is."""
    if group_size is None:
        return None
    if group_size < 1:
        raise UserError(f"--qalora-group-size must be a positive whole number, not {group_size}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object.")
    if config.get("use_qalora") is True:
        raise UserError(f"{config_path} already declares PEFT's QA-LoRA (use_qalora: true, "
                        f"qalora_group_size {config.get('qalora_group_size')}); push it without --qalora-group-size.")
    config.update(qalora_group_size=group_size, qalora_pooling="mean", use_qalora=False)
    return json.dumps(config, indent=2).encode()


def find_revision(c: Client, repo: str, rev: str) -> dict:
    """A revision of an adapter by ref name, full sha or unique sha prefix, with its file list."""
    adapter = c.get(adapter_path(repo) + "/")
    refs = adapter.get("refs") or {}
    target = refs.get(rev)
    found = []
    for r in c.paginate(adapter_path(repo) + "/revisions/"):
        if r["sha"] == target or (target is None and len(rev) >= 7 and r["sha"].startswith(rev)):
            found.append(r)
            if target is not None:
                break
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UserError(f"Revision prefix '{rev}' is ambiguous for {repo}; give more characters.")
    known = ", ".join(sorted(refs)) or "none"
    raise UserError(f"Revision '{rev}' does not exist for {repo} (refs: {known}).")


def download_file(c: Client, repo: str, sha: str, entry: dict, dest: Path, bar: progress.TransferBar) -> str:
    """Download one file of a revision to dest, resuming a partial `.incomplete`
    with a Range request and checking the sha256 against the listing and the ETag."""
    rel = safe_relpath(entry["path"])
    final = dest.joinpath(*rel.parts)
    final.parent.mkdir(parents=True, exist_ok=True)
    expected, size = entry["sha256"], int(entry["size"])
    if final.is_file() and final.stat().st_size == size and sha256_file(final) == expected:
        bar.advance(size)
        return "present"
    part = final.with_name(final.name + ".incomplete")
    url = f"{adapter_path(repo)}/files/{file_path(entry['path'])}"
    for _attempt in range(2):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        h = hashlib.sha256()
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        etag = ""
        if have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with c.stream("GET", url, params={"revision": sha}, headers=headers, timeout=TRANSFER_TIMEOUT) as r:
                etag = r.headers.get("etag", "").removeprefix("W/").strip('"')
                if r.status_code == 416:  # the partial file is not a prefix any more: start over
                    part.unlink(missing_ok=True)
                    continue
                if r.status_code != 206 and have:  # the server sent the whole file
                    h, have = hashlib.sha256(), 0
                bar.advance(have)
                with open(part, "ab" if have else "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        h.update(chunk)
                        bar.advance(len(chunk))
        else:
            bar.advance(have)
        digest = h.hexdigest()
        if etag and etag != expected:
            raise ServerError(f"{entry['path']}: the hub's ETag {etag[:12]} differs from the listed sha256 {expected[:12]}.")
        if digest == expected:
            os.replace(part, final)
            return "downloaded"
        part.unlink(missing_ok=True)  # a damaged partial: one more try from zero
        bar.advance(-size)
    raise ServerError(f"{entry['path']}: sha256 mismatch after download (expected {expected[:12]}).")


def pull_files(c: Client, repo: str, rev: dict, dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    files = rev.get("files") or []
    total = sum(int(f["size"]) for f in files)
    with progress.TransferBar(total, f"pull {repo}@{rev['sha'][:8]}") as bar:
        return [download_file(c, repo, rev["sha"], f, dest, bar) for f in files]


def cmd_pull(args) -> int:
    repo_id(args.repo)
    dest = Path(args.output).expanduser()
    if args.compressed:
        return pull_compressed(args, dest)
    with Client() as c:
        rev = find_revision(c, args.repo, args.revision or "main")
        states = pull_files(c, args.repo, rev, dest)
    kept = states.count("present")
    extra = f" ({kept} already present)" if kept else ""
    out(f"Pulled {len(states)} files of {args.repo}@{rev['sha'][:12]} ({rev['kind']}) into {dest}{extra}.")
    return 0


def pull_compressed(args, dest: Path) -> int:
    try:  # the tensor library (torch) is only needed to decode, on the client
        from adapters_ops import compeft
    except ImportError as exc:
        raise UserError(f"--compressed decodes on this machine and needs the tensor library (adapters_ops.compeft, "
                        f"torch): {exc}.") from None
    with Client() as c:
        rev = find_revision(c, args.repo, args.revision or "compeft")
        paths = [f["path"] for f in rev.get("files") or []]
        compact = getattr(compeft, "FILE_NAME", COMPEFT_FILE)
        if compact not in paths:
            raise UserError(f"Revision {rev['sha'][:12]} ({rev['kind']}) of {args.repo} has no {compact}. "
                            f"Run `hubctl compress {args.repo} --wait` first.")
        staging = dest / f".hubctl-compressed-{rev['sha'][:12]}"
        pull_files(c, args.repo, rev, staging)
    try:
        adapter = compeft.load(staging / compact).decompress()
        adapter.save(dest)
    except compeft.AdapterError as exc:
        raise UserError(f"Could not decode {compact}: {exc}") from None
    for p in paths:  # the model card and other side files, as they are
        if p != compact and not (dest / p).exists() and (staging / p).is_file():
            shutil.copyfile(staging / p, dest / p)
    shutil.rmtree(staging, ignore_errors=True)
    out(f"Pulled {args.repo}@{rev['sha'][:12]} ({rev['kind']}, {human_size(rev.get('size'))} compressed) "
        f"and decoded it into {dest}.")
    return 0


def cmd_adapters(args) -> int:
    with Client() as c:
        items = list(c.paginate(f"{API}/adapters/", base_model=args.base, q=args.q, tag=args.tag, owner=args.owner,
                                kind=args.kind))
    return listing(items, args.json, "No adapters match.",
                   ["adapter", "base", "r", "size", "tags", "refs", "downloads", "updated"],
                   lambda a: [a["id"], a.get("base_model"), a.get("r"), human_size(a.get("size")),
                              ",".join(a.get("tags") or []), ",".join(sorted(a.get("refs") or {})), a.get("downloads"),
                              short_time(a.get("updated_at"))])


def cmd_revisions(args) -> int:
    with Client() as c:
        revs = list(c.paginate(adapter_path(args.repo) + "/revisions/"))
    if args.json:
        dump_json(revs)
        return 0
    table(["sha", "kind", "refs", "base", "r", "size", "created", "parents", "metrics"],
          [[r["sha"][:12], r["kind"], ",".join(r.get("refs") or []), r.get("base_model"), r.get("r"),
            human_size(r.get("size")), short_time(r.get("created_at")),
            " ".join(f"{p['adapter']}@{p['sha'][:8]}" for p in r.get("parents") or []), fmt_metrics(r.get("metrics"))]
           for r in revs])
    return 0


def cmd_lineage(args) -> int:
    from rich.tree import Tree

    with Client() as c:
        graph = c.get(adapter_path(args.repo) + "/lineage")
    if args.json:
        dump_json(graph)
        return 0
    nodes = {n["id"]: n for n in graph.get("nodes", [])}
    children: dict[str, list[str]] = {}
    has_parent = set()
    for e in graph.get("edges", []):
        children.setdefault(e["parent"], []).append(e["child"])
        has_parent.add(e["child"])

    def label(n: dict) -> str:
        refs = f" [{', '.join(n['refs'])}]" if n.get("refs") else ""
        metrics = f"  {fmt_metrics(n.get('metrics'))}" if n.get("metrics") else ""
        style = "bold" if n["adapter"] == args.repo else ""
        text = f"{n['adapter']}@{n['id'][:8]} {n['kind']}{refs} on {n['base_model']}{metrics}"
        return f"[{style}]{escape(text)}[/{style}]" if style else escape(text)

    shown: set[str] = set()

    def add(tree, sha):
        n = nodes[sha]
        if sha in shown:  # a merge has several parents: draw it once, point to it after
            tree.add(f"{escape(n['adapter'])}@{sha[:8]} (see above)")
            return
        shown.add(sha)
        branch = tree.add(label(n))
        for child in children.get(sha, []):
            if child in nodes:
                add(branch, child)

    root = Tree(f"lineage of {escape(args.repo)}: {len(nodes)} revisions, {len(graph.get('edges', []))} edges")
    for sha, _n in nodes.items():
        if sha not in has_parent:
            add(root, sha)
    progress.out_console().print(root)
    return 0


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# --- jobs ----------------------------------------------------------------------------------------


def job_path(job_id: str) -> str:
    return f"{API}/jobs/{job_id}/"


def finish(job: dict) -> int:
    """Report a finished job: 0 when it succeeded, a user error otherwise."""
    status = job.get("status")
    if status == "succeeded":
        res = job.get("result")
        where = f": {res['adapter']}@{res['sha'][:12]} ({res['kind']})" if res else ""
        out(f"Job {job['id']} ({job.get('op')}) succeeded{where}.")
        return 0
    if status == "cancelled":
        raise UserError(f"Job {job['id']} ({job.get('op')}) was cancelled.")
    error = last_line(job.get("error") or job.get("message")) or "no error text"
    raise UserError(f"Job {job['id']} ({job.get('op')}) failed: {error}")


def watch(c: Client, job: dict) -> int:
    final = progress.watch_job(lambda: c.get(job_path(job["id"])), first=job)
    return finish(final)


def cmd_jobs(args) -> int:
    words = args.args
    with Client() as c:
        if words and words[0] == "cancel":
            if len(words) != 2:
                raise UserError("Usage: hubctl jobs cancel ID")
            job = c.post(f"{API}/jobs/{words[1]}/cancel")
            status = (job or {}).get("status", "cancel requested")
            out(f"Job {words[1]}: {status}.")
            return 0
        if len(words) > 1:
            raise UserError("Usage: hubctl jobs [ID] [--watch] | hubctl jobs cancel ID")
        if words:
            job = c.get(job_path(words[0]))
            if args.watch:
                return watch(c, job)
            if args.json:
                dump_json(job)
                return 0
            for key in ("id", "op", "status", "progress", "message", "attempts", "adapter", "owner", "created_at",
                        "started_at", "finished_at", "error"):
                if job.get(key) not in (None, ""):
                    out(f"{key + ':':12} {job[key]}")
            out(f"{'params:':12} {json.dumps(job.get('params') or {})}")
            if job.get("result"):
                r = job["result"]
                out(f"{'result:':12} {r['adapter']}@{r['sha']} ({r['kind']})")
            return 0
        if args.watch:
            raise UserError("--watch needs a job id: hubctl jobs ID --watch")
        jobs = list(c.paginate(f"{API}/jobs/", status=args.status, op=args.op))
    return listing(jobs, args.json, "No jobs.", ["id", "op", "status", "progress", "adapter", "message", "created"],
                   lambda j: [j["id"], j.get("op"), j.get("status"), f"{100 * float(j.get('progress') or 0):.0f}%",
                              j.get("adapter") or "", last_line(j.get("error") or j.get("message")),
                              short_time(j.get("created_at"))])


def submit(op: str, params: dict, wait: bool) -> int:
    params = {k: v for k, v in params.items() if v is not None}
    with Client() as c:
        job = c.post(f"{API}/jobs/", {"op": op, "params": params})
        if wait:
            return watch(c, job)
    out(job["id"])
    note(f"Submitted {op} job {job['id']}. Follow it with: hubctl jobs {job['id']} --watch")
    return 0


def cmd_compress(args) -> int:
    repo_id(args.repo)
    return submit("compress", {"adapter": args.repo, "revision": args.revision, "density": args.density,
                               "scope": args.scope, "magnitude_bits": args.magnitude_bits,
                               "factorization": args.factorization}, args.wait)


def cmd_merge(args) -> int:
    for a in args.adapters:
        repo_id(a)
    repo_id(args.name)
    if len(args.adapters) < 2:
        raise UserError("merge takes at least two adapters.")
    weights = csv_floats(args.weights, "--weights") if args.weights else None
    if weights is not None and len(weights) != len(args.adapters):
        raise UserError(f"--weights has {len(weights)} numbers for {len(args.adapters)} adapters.")
    if (args.energy is not None or args.max_rank is not None) and args.rank != "auto":
        raise UserError("--energy and --max-rank go with --rank auto.")
    return submit("merge", {"adapters": args.adapters, "weights": weights, "method": args.method,
                            "density": args.density, "rank": args.rank, "energy": args.energy,
                            "max_rank": args.max_rank, "seed": args.seed, "name": args.name,
                            "steps": args.steps, "synthetic": args.synthetic}, args.wait)


def merge_rank(text: str) -> int | str:
    """--rank: a positive integer, auto or full."""
    if text in ("auto", "full"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, auto or full, got {text!r}")
    return value


def cmd_quantize(args) -> int:
    repo_id(args.repo)
    return submit("quantize", {"adapter": args.repo, "bits": args.bits, "group_size": args.group_size,
                               "qalora_finetune_steps": args.qalora_finetune_steps}, args.wait)


def split_metrics(metrics: dict | None) -> tuple[str, str]:
    """(before, after) from a transfer revision's metrics.

    The transfer op's own names first (adapters_ops.transfer's verification:
    source_with_adapter, target_base, target_with_transferred, recovered, maybe
    nested under "metrics"), then any key that says before/source or after/target."""
    flat = dict(metrics or {})
    if isinstance(flat.get("metrics"), dict):
        flat = {**flat.pop("metrics"), **flat}
    if "source_with_adapter" in flat or "target_with_transferred" in flat:
        before = fmt_metric(flat.get("source_with_adapter", ""))
        after = fmt_metric(flat.get("target_with_transferred", ""))
        if "target_base" in flat:
            after += f" (bare {fmt_metric(flat['target_base'])})"
        if isinstance(flat.get("recovered"), (int, float)):
            after += f", recovered {fmt_metric(flat['recovered'])}"
        return before, after
    before, after, rest = [], [], []
    for k, v in flat.items():
        lk = k.lower()
        if isinstance(v, (dict, list)):
            continue
        if "before" in lk or "source" in lk or "baseline" in lk:
            before.append(f"{k}={fmt_metric(v)}")
        elif "after" in lk or "target" in lk:
            after.append(f"{k}={fmt_metric(v)}")
        else:
            rest.append(f"{k}={fmt_metric(v)}")
    if not after:
        after = rest[:2]
    return ", ".join(before), ", ".join(after)


def cmd_transfer(args) -> int:
    source, target = slug(args.source), slug(args.target)
    common = {"target": target, "method": args.method, "finetune_steps": args.finetune_steps}
    if args.adapter:
        repo_id(args.adapter)
        return submit("transfer", {"adapter": args.adapter, **common, "name": args.name}, args.wait)
    if args.name:
        raise UserError("--name names one new adapter: use it with --adapter.")
    with Client() as c:
        me = c.get(f"{API}/me")
        owners = {me["username"], *(me.get("orgs") or [])}
        adapters = [a["id"] for a in c.paginate(f"{API}/adapters/", base_model=source) if a["owner"] in owners]
        if not adapters:
            raise UserError(f"No adapter on {source} that {me['username']} may write.")
        rows = []
        for repo in adapters:
            try:
                job = c.post(f"{API}/jobs/", {"op": "transfer", "params": {
                    "adapter": repo, **{k: v for k, v in common.items() if v is not None}}})
                rows.append({"adapter": repo, "job": job})
            except UserError as exc:
                rows.append({"adapter": repo, "job": None, "refused": exc.message})
        if all(r["job"] is None for r in rows):
            raise UserError(f"The hub refused every transfer: {rows[0]['refused']}")
        note(f"Submitted {sum(1 for r in rows if r['job'])} transfer jobs from {source} to {target}.")

        revisions: dict[str, dict] = {}

        def refresh(row):
            row["job"] = c.get(job_path(row["job"]["id"]))
            res = row["job"].get("result")
            if res and res["sha"] not in revisions:
                for r in c.paginate(adapter_path(res["adapter"]) + "/revisions/"):
                    revisions[r["sha"]] = r

        def render(row):
            job = row["job"]
            if job is None:
                return [row["adapter"], "", "refused", "", "", row["refused"]]
            res = job.get("result") or {}
            before, after = split_metrics((revisions.get(res.get("sha")) or {}).get("metrics"))
            method = (job.get("params") or {}).get("method") or args.method or "auto"
            status = job.get("status", "")
            if status == "failed":
                after = last_line(job.get("error"))
            return [row["adapter"], method, status, f"{100 * float(job.get('progress') or 0):.0f}%", before, after]

        for row in rows:
            if row["job"] is not None:
                refresh(row)
        progress.watch_jobs_table(rows, refresh, render, ["adapter", "method", "status", "progress", "before", "after"],
                                  title=f"transfer {source} -> {target}")
    failed = [r for r in rows if r["job"] is None or r["job"].get("status") != "succeeded"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} transfers did not succeed: "
                        + ", ".join(r["adapter"] for r in failed))
    out(f"All {len(rows)} transfers from {source} to {target} succeeded.")
    return 0


def cmd_serve(args) -> int:
    from hub.cli import serve

    return serve.serve(args)


# --- the parser ------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors: exit 1, not argparse's 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    p = Parser(prog="hubctl", description="Command line of the adapter hub (HUB_URL, HUB_TOKEN; see docs/cli.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    as_json = Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON")

    s = sub.add_parser("serve", help="run the hub with its workers on embedded defaults")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--no-demo", action="store_true", help="do not build and register the demo zoo")
    s.add_argument("--demo", choices=("tiny", "real"), default="tiny",
                   help="real: also the SmolLM2-135M lane (bases 1.0 and 1.1, four LoRAs; built once, ~45 min)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Celery worker concurrency (0: start no worker and no beat)")
    s.add_argument("--web-workers", type=int, default=2, metavar="N", help="gunicorn processes (8 threads each)")
    s.add_argument("--redis-port", type=int, default=6390, help="port of the embedded Redis (no REDIS_URL set)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("login", help="store an API token (verified with the hub)")
    s.add_argument("--token", help="the token (default: read from stdin or a prompt)")
    s.add_argument("--expires", metavar="LIFETIME",
                   help="store a new token that expires after LIFETIME (30d, 12h, 90m) instead of the one given")
    s.set_defaults(func=cmd_login)
    s = sub.add_parser("whoami", help="who the token belongs to", parents=[as_json])
    s.set_defaults(func=cmd_whoami)

    base = sub.add_parser("base", help="base models: add, list, show, deprecate")
    bsub = base.add_subparsers(dest="base_command", metavar="ACTION", parser_class=Parser, required=True)
    s = bsub.add_parser("add", help="register a base model from its HF-layout folder (staff)")
    s.add_argument("slug")
    s.add_argument("--weights", required=True, metavar="DIR", help="folder with config.json and *.safetensors")
    s.add_argument("--family")
    s.add_argument("--version")
    s.add_argument("--description")
    s.set_defaults(func=cmd_base_add)
    s = bsub.add_parser("list", help="list base models", parents=[as_json])
    s.add_argument("--status", choices=["active", "deprecated", "retired"])
    s.add_argument("--family")
    s.set_defaults(func=cmd_base_list)
    s = bsub.add_parser("show", help="one base model", parents=[as_json])
    s.add_argument("slug")
    s.set_defaults(func=cmd_base_show)
    s = bsub.add_parser("deprecate", help="deprecate a base model in favour of a successor (staff)")
    s.add_argument("slug")
    s.add_argument("--successor", required=True)
    s.add_argument("--at", help="when (ISO date or date-time, UTC); default now")
    s.set_defaults(func=cmd_base_deprecate)

    s = sub.add_parser("push", help="upload a PEFT adapter folder as owner/name")
    s.add_argument("dir")
    s.add_argument("--base", required=True, help="base model slug")
    s.add_argument("--name", required=True, help="owner/name")
    s.add_argument("--private", action="store_true")
    s.add_argument("--seeds", metavar="FILE", help="JSONL of {prompt, completion} seed examples")
    s.add_argument("--tags", help="comma-separated tags")
    s.add_argument("--card", metavar="README.md", help="model card (markdown); default: the folder's README.md")
    s.add_argument("--qalora-group-size", type=int, metavar="G",
                   help="the adapter is a QA-LoRA trained with the qa-lora repository (lora_A has in/G columns, "
                        "group mean pooling): declare it in the uploaded adapter_config.json")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("pull", help="download an adapter revision into a folder")
    s.add_argument("repo", metavar="owner/name")
    s.add_argument("--revision", help="ref name or commit (default main; compeft with --compressed)")
    s.add_argument("--compressed", action="store_true", help="download the ComPEFT file and decode it here")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("adapters", help="list adapters", parents=[as_json])
    s.add_argument("--base")
    s.add_argument("--q")
    s.add_argument("--tag")
    s.add_argument("--owner")
    s.add_argument("--kind", help="only adapters with a revision of this kind")
    s.set_defaults(func=cmd_adapters)
    s = sub.add_parser("revisions", help="revisions of an adapter", parents=[as_json])
    s.add_argument("repo", metavar="owner/name")
    s.set_defaults(func=cmd_revisions)
    s = sub.add_parser("lineage", help="lineage tree of an adapter", parents=[as_json])
    s.add_argument("repo", metavar="owner/name")
    s.set_defaults(func=cmd_lineage)

    s = sub.add_parser("jobs", help="list jobs, show or watch one, or `jobs cancel ID`", parents=[as_json])
    s.add_argument("args", nargs="*", metavar="ID | cancel ID")
    s.add_argument("--watch", action="store_true", help="follow the job until it finishes")
    s.add_argument("--status", help="filter the list by status")
    s.add_argument("--op", help="filter the list by op")
    s.set_defaults(func=cmd_jobs)

    def wait_flags(s):
        s.add_argument("--wait", "--watch", dest="wait", action="store_true", help="follow the job until it finishes")

    s = sub.add_parser("compress", help="ComPEFT-compress an adapter (a job)")
    s.add_argument("repo", metavar="owner/name")
    s.add_argument("--density", type=float, help="fraction of entries kept (server default 0.1)")
    s.add_argument("--scope", choices=["global", "tensor"])
    s.add_argument("--magnitude-bits", type=int, choices=range(5), metavar="{0..4}",
                   help="2^M magnitudes per tensor instead of one (server default 0: the paper's rule)")
    s.add_argument("--factorization", choices=["as_is", "balanced"],
                   help="balanced: rewrite each LoRA pair from the SVD of its product first (server default as_is)")
    s.add_argument("--revision")
    wait_flags(s)
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("merge", help="merge adapters into a new one (a job)")
    s.add_argument("adapters", nargs="+", metavar="owner/name")
    s.add_argument("--method", required=True,
                   help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (and *_svd), or distill: "
                        "one adapter taught by every input from its seed examples")
    s.add_argument("--weights", help="comma-separated, one per adapter")
    s.add_argument("--density", type=float)
    s.add_argument("--rank", type=merge_rank, metavar="R|auto|full",
                   help="output rank: an integer; full: the exact merged update (rank min(out, in) for ties, dare_*, "
                        "magnitude_prune); auto: per module the smallest rank keeping --energy of it. Default: the "
                        "sum of the input ranks (max for svd and *_svd), exact for cat/linear but lossy for the "
                        "dense methods (the revision's min/mean_captured_energy say how much)")
    s.add_argument("--energy", type=float, help="with --rank auto: fraction of each module's energy to keep, "
                                                "in (0, 1] (server default 0.99)")
    s.add_argument("--max-rank", type=int, help="with --rank auto: the largest rank accepted (default: no cap)")
    s.add_argument("--seed", type=int)
    s.add_argument("--steps", type=int, help="distill: training steps (default 1000 per adapter)")
    s.add_argument("--synthetic", type=int, help="distill: synthetic task inputs per adapter (default 1024)")
    s.add_argument("--name", required=True, help="owner/name of the merged adapter")
    wait_flags(s)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("transfer", help="move adapters from one base model to another (jobs)")
    s.add_argument("--from", dest="source", required=True, metavar="BASE")
    s.add_argument("--to", dest="target", required=True, metavar="BASE")
    s.add_argument("--adapter", metavar="owner/name", help="one adapter (default: every one you may write)")
    s.add_argument("--method", choices=["diff", "translora", "auto"])
    s.add_argument("--finetune-steps", type=int)
    s.add_argument("--name", metavar="owner/name", help="name of the new adapter (with --adapter)")
    wait_flags(s)
    s.set_defaults(func=cmd_transfer)

    s = sub.add_parser("quantize", help="quantize an adapter for a quantized base (a job)")
    s.add_argument("repo", metavar="owner/name")
    s.add_argument("--bits", type=int, default=4)
    s.add_argument("--group-size", type=int, default=64)
    s.add_argument("--qalora-finetune-steps", type=int)
    wait_flags(s)
    s.set_defaults(func=cmd_quantize)

    diff.add_parsers(sub)
    webhook.add_parsers(sub, as_json)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (1)
        return exc.code if isinstance(exc.code, int) else 1
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"hubctl: error: {exc.message}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hubctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hubctl ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # a local file problem (a missing folder, a full disk)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"hubctl: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
