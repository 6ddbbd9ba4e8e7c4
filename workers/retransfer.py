"""Scheduled retransfer: when a deprecated base model's date has passed, move
every adapter on it to its successor (method `auto`: diff transfer when the
bases line up and it passes the quality gate, else Trans-LoRA).

The sweep runs on beat. It is idempotent: an adapter that already has a
transfer job towards the successor (queued, running or succeeded) or a
revision there is skipped, so running it again does nothing more. At most
RETRANSFER_MAX_ACTIVE of its jobs run at once; the next sweeps top up.
"""

from __future__ import annotations

import logging

from django.db.models import Q
from django.utils import timezone

from hub.registry import plans
from hub.registry.jobs import job_create
from hub.registry.models import Adapter, BaseModel, Job
from workers import knob
from workers.app import app

log = logging.getLogger(__name__)


def due_bases(now=None):
    now = now or timezone.now()
    return BaseModel.objects.filter(status="deprecated", successor__isnull=False).filter(
        Q(deprecate_at__isnull=True) | Q(deprecate_at__lte=now)).select_related("successor")


def _transfer_jobs(base: BaseModel):
    target = base.successor.slug
    return [j for j in Job.objects.filter(op="transfer", adapter__base_model=base).select_related("result_revision")
            if (j.params or {}).get("target") == target]


def sweep(now=None) -> dict:
    """Enqueue what is missing; returns {base slug: {"enqueued": n, "skipped": n, "waiting": n, "rejected": n}}.

    `rejected`: adapters whose transfer succeeded but whose result failed its quality verdict
    (adapters_ops.verdict): not moved, and not retried either (the same job would fail the same
    way); the owner was told by an `adapter.move_failed` webhook and sees "verdict failed" in
    the base's retransfer plan."""
    limit = int(knob("RETRANSFER_MAX_ACTIVE", 4))
    summary = {}
    for base in due_bases(now):
        jobs = _transfer_jobs(base)
        busy = {j.adapter_id for j in jobs if j.status in ("queued", "running", "succeeded")}
        active = sum(1 for j in jobs if j.status in ("queued", "running"))
        moved = set(plans.moves(base))
        rejected = {j.adapter_id for j in jobs if j.status == "succeeded" and j.adapter_id not in moved
                    and (getattr(j.result_revision, "verdict", None) or {}).get("status") == "failed"}
        counts = {"enqueued": 0, "skipped": 0, "waiting": 0, "rejected": 0}
        for adapter in Adapter.objects.filter(base_model=base).order_by("created_at", "id"):
            if adapter.id in rejected:
                counts["rejected"] += 1
                continue
            if adapter.id in busy or adapter.id in moved:
                counts["skipped"] += 1
                continue
            if active >= limit:
                counts["waiting"] += 1
                continue
            if adapter.created_by is None:
                log.warning("retransfer: %s has no owner account to run its job; skipped", adapter.repo_id)
                counts["skipped"] += 1
                continue
            job_create(user=adapter.created_by, op="transfer",
                       params={"adapter": adapter.repo_id, "target": base.successor.slug, "method": "auto"})
            active += 1
            counts["enqueued"] += 1
        summary[base.slug] = counts
        log.info("retransfer %s -> %s: %s", base.slug, base.successor.slug, counts)
        if counts["rejected"]:
            log.warning("retransfer %s -> %s: %d transfer(s) failed their quality verdict; not moved",
                        base.slug, base.successor.slug, counts["rejected"])
    return summary


@app.task(name="workers.retransfer.sweep")
def sweep_task() -> dict:
    return sweep()
