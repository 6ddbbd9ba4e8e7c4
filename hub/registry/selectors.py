"""Reads from the registry. Visibility comes from `Adapter.objects.visible_to`."""

from __future__ import annotations

import difflib
import re

from django.db.models import Q

from hub.errors import HubError

from .models import Adapter, BaseModel, Blob, Ref, Revision

HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")


class NotFound(HubError):
    """Absent or not visible to this user (the two are indistinguishable: 404)."""

    status = 404

    def __init__(self, code: str, detail: str):
        super().__init__(detail, code=code)


def adapter_get(user, owner: str, name: str) -> Adapter:
    adapter = (
        Adapter.objects.visible_to(user).select_related("base_model").filter(owner=owner, name=name).first()
    )
    if adapter is None:
        raise NotFound("repo_not_found", f"Adapter {owner}/{name} does not exist or is not visible to you.")
    return adapter


# The adapter lists' sort keys (REST `sort`, the UI's sort menu).
ADAPTER_SORTS = {"updated": "-updated_at", "created": "-created_at", "downloads": "-downloads", "size": "-size",
                 "name": "name"}


def adapter_search(user, *, q: str = "", base_model: str = "", tag: str = "", kind: str = "", owner: str = "",
                   dtype: str = "", target_module: str = "", r: int | None = None, max_r: int | None = None,
                   sort: str = "updated"):
    """The adapters `user` may see that match every given filter, sorted: the one
    search of the REST list and the UI's home page (blank filters are ignored)."""
    qs = Adapter.objects.visible_to(user).select_related("base_model").prefetch_related("tags")
    if q:
        qs = qs.filter(Q(name__icontains=q) | Q(owner__icontains=q) | Q(description__icontains=q))
    if base_model:
        qs = qs.filter(base_model__slug=base_model)
    if owner:
        qs = qs.filter(owner=owner)
    if tag:
        qs = qs.filter(tags__name=tag.strip().lower())
    if kind:
        qs = qs.filter(revisions__kind=kind).distinct()
    if dtype:
        qs = qs.filter(dtype=dtype.upper())
    if target_module:
        qs = qs.filter(target_modules__icontains=f'"{target_module}"')
    if r is not None:
        qs = qs.filter(r=r)
    if max_r is not None:
        qs = qs.filter(r__lte=max_r)
    return qs.order_by(ADAPTER_SORTS[sort], "id")


def base_model_get(slug: str) -> BaseModel:
    base = BaseModel.objects.filter(slug=slug).select_related("successor").first()
    if base is None:
        raise NotFound("base_model_not_found", unknown_base_detail(slug))
    return base


def unknown_base_detail(slug: str, limit: int = 20) -> str:
    """Why `slug` was refused, with the registered slugs and the closest ones:
    `llama3.0` is a typo of `tiny-llama-3.0` far more often than a new model."""
    slugs = list(BaseModel.objects.order_by("slug").values_list("slug", flat=True))
    if not slugs:
        return f"Base model '{slug}' is not registered; no base model is registered yet."
    close = difflib.get_close_matches(slug, slugs, n=3, cutoff=0.6)
    shown = ", ".join(slugs[:limit]) + (f" and {len(slugs) - limit} more" if len(slugs) > limit else "")
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"Base model '{slug}' is not registered. Registered: {shown}.{hint}"


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
    """The lineage DAG around an adapter: its revisions, their ancestors (walking
    up only), their descendants (walking down only) with each descendant's
    other inputs (a merge's other parent), across adapters, limited to what the
    user may see. The other parent's own children are not this adapter's
    family and stay out."""
    visible = set(Adapter.objects.visible_to(user).values_list("id", flat=True))
    start = list(adapter.revisions.all())
    seen: dict[int, Revision] = {r.id: r for r in start}
    edges: set[tuple[int, int]] = set()
    for direction in ("parents", "children"):
        frontier = list(start)
        walked = {r.id for r in start}  # per direction: a node reached going up may also lie below another revision
        for _ in range(depth):
            nxt = []
            for rev in frontier:
                for other in getattr(rev, direction).select_related("adapter"):
                    if other.adapter_id not in visible:
                        continue
                    edges.add((other.id, rev.id) if direction == "parents" else (rev.id, other.id))
                    seen.setdefault(other.id, other)
                    if other.id not in walked:
                        walked.add(other.id)
                        nxt.append(other)
            if not nxt:
                break
            frontier = nxt
        if direction == "children":  # a descendant's other inputs (a merge's other parent), not their relatives
            for rev in [seen[i] for i in walked - {r.id for r in start}]:
                for other in rev.parents.select_related("adapter"):
                    if other.adapter_id in visible:
                        edges.add((other.id, rev.id))
                        seen.setdefault(other.id, other)
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
