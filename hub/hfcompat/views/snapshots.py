"""Snapshots: one revision's files, for adapters and base models alike, with the
generated model card of an adapter that has no README.md."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from hub.registry import plans, selectors, services
from hub.registry.models import Adapter, BaseModel, Blob, Revision
from hub.storage import open_blob

from .. import card
from .errors import HfError, repo_not_found

README = "README.md"
ADAPTER_CONFIG = services.ADAPTER_CONFIG


# --- snapshots: one revision's files, for adapters and base models alike -----------------


@dataclass
class Entry:
    path: str
    size: int
    sha256: str
    blob: Blob | None = None  # stored file
    content: bytes | None = None  # generated file (the model card)


@dataclass
class Snapshot:
    repo_id: str
    sha: str
    files: dict[str, Entry]
    adapter: Adapter | None = None
    base: BaseModel | None = None
    revision: Revision | None = None
    card_data: dict | None = None
    created_at: object = None
    refs: list[str] = field(default_factory=list)


def repo_get(user, repo_id: str) -> Adapter | BaseModel:
    """The adapter (`owner/name`, visible to `user`) or base model (`slug`)."""
    try:
        if "/" in repo_id:
            owner, name = repo_id.split("/", 1)
            return selectors.adapter_get(user, owner, name)
        return selectors.base_model_get(repo_id)
    except selectors.NotFound:
        raise repo_not_found(repo_id) from None


def _base_sha(base: BaseModel) -> str:
    if base.sha:
        return base.sha
    return services.files_commit_sha([(f.path, f.blob_id) for f in base.files.all()])


def _same_audience(this: Adapter, other: Adapter) -> bool:
    """May a card of `this` name `other`? Only if everyone who sees `this` sees `other`."""
    return other.visibility == "public" or (this.visibility == "private" and other.owner == this.owner)


def successor_of(adapter: Adapter) -> str | None:
    """The adapter carried over to the successor of this adapter's base, when
    there is one the card may name (plans.moves: the one rule for a move)."""
    move = plans.moves(adapter.base_model, [adapter.id], audience=adapter).get(adapter.id)
    return move.adapter.repo_id if move is not None and move.adapter_id != adapter.id else None


def adapter_card(adapter: Adapter, revision: Revision) -> tuple[dict, bytes]:
    """The generated README.md of a revision: (front-matter dict, bytes)."""
    merged_from: list[str] = []
    if revision.kind == "merge":
        for parent in revision.parents.select_related("adapter").order_by("id"):
            rid = parent.adapter.repo_id
            if rid not in merged_from and _same_audience(adapter, parent.adapter):
                merged_from.append(rid)
    slug = revision.base_model.slug
    data = card.card_data(
        slug=slug, kind=revision.kind, tags=sorted(adapter.tags.values_list("name", flat=True)),
        merged_from=merged_from, new_version=successor_of(adapter), verdict=revision.verdict,
    )
    facts = [
        ("commit", f"`{revision.sha}`"),
        ("kind", revision.kind),
        ("base model", f"`{slug}`"),
        ("rank (r)", revision.r if revision.r is not None else "-"),
        ("lora_alpha", revision.lora_alpha if revision.lora_alpha is not None else "-"),
        ("target modules", ", ".join(f"`{m}`" for m in revision.target_modules) or "-"),
        ("dtype", revision.dtype or "-"),
        ("size", f"{revision.size} bytes"),
    ]
    facts += card.metric_facts(revision.kind, revision.metrics)  # e.g. a merge's kept energy
    facts += card.verdict_facts(revision.verdict)  # what the op did to the skill
    text = card.render_card(
        data, title=adapter.repo_id, description=adapter.description, facts=facts,
        usage=card.usage_snippet(adapter.repo_id, slug),
    )
    return data, text.encode()


def _read_small(blob: Blob) -> bytes | None:
    if blob.size > card.MAX_CARD_BYTES:
        return None
    with open_blob(blob) as f:
        return f.read()


def _stored_card_data(blob: Blob) -> dict | None:
    raw = _read_small(blob)
    if raw is None:
        return None
    try:
        data, _ = card.parse_card(raw.decode("utf-8", "replace"))
    except card.CardError:
        return None
    return data or None


def snapshot(user, repo_id: str, rev: str | None, *, with_card: bool = False) -> Snapshot:
    """Resolve repo + revision into the file listing clients see (README.md included)."""
    target = repo_get(user, repo_id)
    rev = rev or "main"
    if isinstance(target, BaseModel):
        sha = _base_sha(target)
        if not (rev == "main" or (selectors.HEX_PREFIX.match(rev) and sha.startswith(rev))):
            raise HfError(404, f"Revision '{rev}' does not exist for {repo_id}.", "RevisionNotFound")
        files = {
            f.path: Entry(f.path, f.blob.size, f.blob.sha256, blob=f.blob)
            for f in target.files.select_related("blob")
        }
        snap = Snapshot(repo_id, sha, files, base=target, created_at=target.created_at, refs=["main"])
        if with_card and README in files:
            snap.card_data = _stored_card_data(files[README].blob)
        return snap
    revision = selectors.revision_resolve(target, rev)
    files = {p: Entry(p, b.size, b.sha256, blob=b) for p, b in selectors.revision_files(revision).items()}
    snap = Snapshot(repo_id, revision.sha, files, adapter=target, revision=revision,
                    created_at=revision.created_at, refs=selectors.refs_of(revision))
    if README in files:
        if with_card:
            snap.card_data = _stored_card_data(files[README].blob)
    else:
        data, content = adapter_card(target, revision)
        files[README] = Entry(README, len(content), hashlib.sha256(content).hexdigest(), content=content)
        snap.card_data = data
    return snap

