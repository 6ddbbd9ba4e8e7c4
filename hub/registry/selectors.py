"""Reads from the registry. Visibility comes from `Adapter.objects.visible_to`."""

from __future__ import annotations

import re

from .models import Adapter, BaseModel, Blob, Ref, Revision

HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")


class NotFound(Exception):
    """Absent or not visible to this user (the two are indistinguishable: 404)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def adapter_get(user, owner: str, name: str) -> Adapter:
    adapter = (
        Adapter.objects.visible_to(user).select_related("base_model").filter(owner=owner, name=name).first()
    )
    if adapter is None:
        raise NotFound("repo_not_found", f"Adapter {owner}/{name} does not exist or is not visible to you.")
    return adapter


def base_model_get(slug: str) -> BaseModel:
    base = BaseModel.objects.filter(slug=slug).select_related("successor").first()
    if base is None:
        raise NotFound("base_model_not_found", f"Base model '{slug}' is not registered.")
    return base


def revision_resolve(adapter: Adapter, rev: str | None = None) -> Revision:
    """A ref name (`main`, `compeft`, ...), a 40-hex commit id, or a unique prefix."""
    rev = rev or "main"
    ref = Ref.objects.filter(adapter=adapter, name=rev).select_related("revision").first()
    if ref is not None:
        return ref.revision
    if HEX_PREFIX.match(rev):
        found = list(adapter.revisions.filter(sha__startswith=rev)[:2])
        if len(found) == 1:
            return found[0]
    raise NotFound("revision_not_found", f"Revision '{rev}' does not exist for {adapter.repo_id}.")


def revision_files(revision: Revision) -> dict[str, Blob]:
    return {rf.path: rf.blob for rf in revision.files.select_related("blob")}


def refs_of(revision: Revision) -> list[str]:
    return list(revision.refs.values_list("name", flat=True))


def lineage(user, adapter: Adapter, depth: int = 20) -> dict:
    """The lineage DAG around an adapter: its revisions, their ancestors and
    descendants (across adapters), limited to what the user may see."""
    visible = set(Adapter.objects.visible_to(user).values_list("id", flat=True))
    start = list(adapter.revisions.all())
    seen: dict[int, Revision] = {r.id: r for r in start}
    frontier = list(start)
    edges: set[tuple[int, int]] = set()
    for _ in range(depth):
        nxt = []
        for rev in frontier:
            for p in rev.parents.select_related("adapter"):
                if p.adapter_id in visible:
                    edges.add((p.id, rev.id))
                    if p.id not in seen:
                        seen[p.id] = p
                        nxt.append(p)
            for c in rev.children.select_related("adapter"):
                if c.adapter_id in visible:
                    edges.add((rev.id, c.id))
                    if c.id not in seen:
                        seen[c.id] = c
                        nxt.append(c)
        if not nxt:
            break
        frontier = nxt
    revs = Revision.objects.filter(id__in=seen).select_related("adapter", "base_model", "job")
    nodes = [
        {
            "id": r.sha,
            "adapter": r.adapter.repo_id,
            "kind": r.kind,
            "base_model": r.base_model.slug,
            "created_at": r.created_at.isoformat(),
            "message": r.message,
            "metrics": r.metrics,
            "verdict": r.verdict,
            "job": str(r.job_id) if r.job_id else None,
            "refs": refs_of(r),
        }
        for r in revs
    ]
    sha = {r.id: r.sha for r in revs}
    return {
        "nodes": sorted(nodes, key=lambda n: n["created_at"]),
        "edges": sorted([{"parent": sha[a], "child": sha[b]} for a, b in edges if a in sha and b in sha],
                        key=lambda e: (e["parent"], e["child"])),
    }
