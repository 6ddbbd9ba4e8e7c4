"""The retransfer plan of a deprecated base model: which adapters move to the
successor, by which method, and how far their transfer jobs have come.

A read of the registry, shared by the base model page, the REST API and
`hubctl base show`. Visibility: adapters come from
`Adapter.objects.visible_to(user)`, jobs from `Job.objects.visible_to(user)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Q

from adapters_ops import lineup, opspecs
from hub.registry.models import Adapter, BaseModel, Job, Revision

# The kinds a transfer makes (its declaration): a revision of one of them on the successor is a move.
TRANSFER_KINDS = opspecs.OPS["transfer"].produces


@dataclass
class PlanRow:
    adapter: Adapter
    method: str  # "diff" (same shapes: re-apply the delta) or "translora" (shapes differ)
    reason: str
    jobs: list[Job] = field(default_factory=list)  # the user's transfer jobs towards the successor
    done: Revision | None = None  # a revision of it (or derived from it) on the successor

    @property
    def state(self) -> str:
        if self.done is not None:
            return "transferred"
        if any(j.status in ("queued", "running") for j in self.jobs):
            return "in progress"
        if any(j.status == "failed" for j in self.jobs):
            return "failed"
        if any(j.status == "succeeded" and _verdict_failed(j.result_revision) for j in self.jobs):
            return "verdict failed"  # the result exists but did not take `main`: not moved
        return "planned"

    @property
    def active_job(self) -> Job | None:
        return next((j for j in self.jobs if j.status in ("queued", "running")), None)


def _verdict_failed(rev: Revision | None) -> bool:
    return rev is not None and (rev.verdict or {}).get("status") == "failed"


def moves(base: BaseModel, adapter_ids=None, user=None, audience: Adapter | None = None) -> dict[int, Revision]:
    """The one rule for "already moved to the successor": adapter id -> the first
    transfer or Trans-LoRA revision on `base`'s successor made from it (its
    parent, or a revision of the adapter itself) that did not fail its verdict.
    Used by the plan, the scheduled sweep and the HF card's `new_version`; with
    `user`, only moves whose result that user may see; with `audience`, only
    results everyone who sees that adapter sees (public, or private to its owner)."""
    if base.successor_id is None:
        return {}
    derived = (
        Revision.objects.filter(base_model_id=base.successor_id, kind__in=TRANSFER_KINDS)
        .exclude(verdict__status="failed")  # a result that failed its verdict is not a move
        .prefetch_related("parents").order_by("created_at", "id")
    )
    if user is not None:
        derived = derived.filter(adapter__in=Adapter.objects.visible_to(user))
    if audience is not None:
        same = Q(adapter__visibility="public")
        if audience.visibility == "private":
            same |= Q(adapter__owner=audience.owner)
        derived = derived.filter(same)
    if adapter_ids is not None:
        ids = set(adapter_ids)
        derived = derived.filter(Q(parents__adapter_id__in=ids) | Q(adapter_id__in=ids)).distinct()
    done: dict[int, Revision] = {}
    for rev in derived:
        for a in {p.adapter_id for p in rev.parents.all()} | {rev.adapter_id}:
            if adapter_ids is None or a in ids:
                done.setdefault(a, rev)
    return done


def planned_method(adapter: Adapter, base: BaseModel, successor: BaseModel) -> tuple[str, str]:
    """("diff" | "translora", why): diff when every weight the adapter's target modules
    adapt lines up on the successor (adapters_ops.lineup, the rule the transfer itself
    applies to the adapter's tensors); anything else needs Trans-LoRA."""
    keys = lineup.module_weights(base.manifest, list(adapter.target_modules or []))
    if not keys:
        return "translora", "its target modules are not found in the base's manifest"
    _, mm = lineup.first_mismatch(base.manifest, successor.manifest, keys)
    if mm is not None and mm.target_shape is None:
        return "translora", f"{mm.tensor} is missing from {successor.slug}"
    if mm is not None:
        return "translora", f"{mm.tensor} changes shape {list(mm.source_shape)} → {list(mm.target_shape)}"
    mods = ", ".join(adapter.target_modules)
    return "diff", f"same shapes for {mods} ({len(keys)} weight{'s' if len(keys) != 1 else ''})"


def retransfer_plan(user, base: BaseModel) -> list[PlanRow]:
    """One row per adapter on `base` that the user may see; empty without a successor."""
    successor = base.successor
    if successor is None:
        return []
    adapters = list(
        Adapter.objects.visible_to(user).filter(base_model=base).order_by("owner", "name")
    )
    ids = [a.id for a in adapters]
    jobs: dict[int, list[Job]] = {}
    for job in (Job.objects.visible_to(user).filter(op="transfer", adapter_id__in=ids)
                .select_related("result_revision").order_by("-created_at")):
        if (job.params or {}).get("target") == successor.slug:
            jobs.setdefault(job.adapter_id, []).append(job)
    done = moves(base, ids, user=user)  # where the result is visible to the user
    rows = []
    for a in adapters:
        method, reason = planned_method(a, base, successor)
        rows.append(PlanRow(adapter=a, method=method, reason=reason, jobs=jobs.get(a.id, []), done=done.get(a.id)))
    return rows


def plan_as_dict(rows: list[PlanRow]) -> list[dict]:
    return [
        {
            "adapter": r.adapter.repo_id, "method": r.method, "reason": r.reason, "state": r.state,
            "job": str(r.active_job.id) if r.active_job else (str(r.jobs[0].id) if r.jobs else None),
            "progress": r.active_job.progress if r.active_job else None,
            "result": {"adapter": r.done.adapter.repo_id, "sha": r.done.sha,
                       "metrics": r.done.metrics, "verdict": r.done.verdict} if r.done else None,
        }
        for r in rows
    ]
