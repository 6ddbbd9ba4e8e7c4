"""`hubctl push|pull|adapters|revisions|lineage`: uploading adapter folders,
downloading revisions (resumable, checked; `--compressed` decodes ComPEFT
here), and the registry's lists and lineage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hub.cli import progress, verdicts
from hub.cli.client import (
    API,
    Client,
    UserError,
    adapter_path,
    repo_id,
    slug,
)
from hub.cli.files import TRANSFER_TIMEOUT, pull_files, push_files
from hub.cli.output import (
    dump_json,
    fmt_metrics,
    human_size,
    listing,
    note,
    out,
    short_time,
    table,
)

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


COMPEFT_FILE = "adapter_model.compeft.safetensors"  # adapters_ops.compeft.FILE_NAME


def local_files(folder: Path) -> list[Path]:
    """The regular files at the top of a folder, hidden ones excepted (PEFT and HF folders are flat)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    skipped = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if skipped:
        note(f"note: sub-folders are not uploaded: {', '.join(skipped)}")
    return files


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
    # Each file goes up on its own (several at once, those the hub has skipped), then one commit names them all.
    paths = [p.name for p in files]
    sources = [declared_config if declared_config and p.name == ADAPTER_CONFIG else p for p in files]
    if args.card:
        paths.append("README.md")
        sources.append(card)
    if seeds:
        sources.append(seeds)
    with Client() as c:
        # Ask first: nothing should travel for a push the server will refuse.
        if exists(c, adapter_path(args.name) + "/"):
            raise UserError(f"{owner}/{name} already exists on {c.url}. Push under a new name, or delete it first.")
        c.get(f"{API}/base-models/{args.base}/")  # unknown base: the server's message, before the upload
        c.get(f"{API}/me")  # no token or a bad one: the server's message, before the upload
        shas, states = push_files(c, sources, f"push {owner}/{name}")
        data["files"] = [{"path": p, "sha256": sha} for p, sha in zip(paths, shas, strict=False)]
        if seeds:
            data["seeds"] = shas[-1]
        try:
            adapter = c.json("POST", f"{API}/adapters/", json=data, timeout=TRANSFER_TIMEOUT)
        except UserError as exc:
            if "already exists" in exc.message:
                raise UserError(f"{owner}/{name} already exists. Push under a new name, or delete it first.") from None
            raise
    note_present(states)
    sha = (adapter.get("refs") or {}).get("main", "")
    out(f"Pushed {adapter['id']} on {adapter['base_model']}: revision {sha} (main), "
        f"r={adapter.get('r')}, {human_size(adapter.get('size'))}.")
    return 0


def note_present(states: list[str]) -> None:
    present = states.count("present")
    if present:
        note(f"{present} of {len(states)} files were on the hub already (staged earlier or stored): not sent again.")


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
    table(["sha", "kind", "refs", "base", "r", "size", "created", "parents", "verdict", "metrics"],
          [[r["sha"][:12], r["kind"], ",".join(r.get("refs") or []), r.get("base_model"), r.get("r"),
            human_size(r.get("size")), short_time(r.get("created_at")),
            " ".join(f"{p['adapter']}@{p['sha'][:8]}" for p in r.get("parents") or []),
            verdicts.short(r.get("verdict")), fmt_metrics(r.get("metrics"))]
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
        verdict = f" verdict {verdicts.short(n['verdict'])}" if n.get("verdict") else ""
        text = f"{n['adapter']}@{n['id'][:8]} {n['kind']}{refs} on {n['base_model']}{verdict}{metrics}"
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
