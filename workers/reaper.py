"""The reaper, run by Celery beat every JOB_REAPER_INTERVAL seconds.

- A running job whose heartbeat is older than JOB_HEARTBEAT_TIMEOUT lost its
  worker (killed, machine gone): it goes back to the queue while attempts
  remain, else it fails ("worker lost N times"); if its owner had asked to
  cancel, it is cancelled.
- A queued job whose message may have been lost (e.g. Redis restarted without
  persistence) is sent again: queued for more than JOB_REQUEUE_AFTER seconds
  since its last send, and no sent-marker in the broker's Redis. Sending twice
  is harmless: the runner claims a job by compare-and-set, once.

Every change is a compare-and-set UPDATE, so two reapers never double a job.

Each pass also removes the scratch directories, on the machine it runs on, of
finished jobs and of attempts that lost their job (a killed worker's). Blob
files without a row are collected daily (`gc_blobs_task`).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from adapters_ops import opspecs
from hub.registry import jobs, webhooks
from hub.registry.models import Job
from workers import knob
from workers.app import app
from workers.webhooks import resend_lost

log = logging.getLogger("workers.reaper")


def reap(now=None) -> dict[str, int]:
    now = now or timezone.now()
    cutoff = jobs.stale_cutoff(now)
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    stale = Q(status="running") & (Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True))
    for pk, attempts, max_attempts, cancel in Job.objects.filter(stale).values_list(
        "pk", "attempts", "max_attempts", "cancel_requested"
    ):
        if cancel:
            if _close(pk, cutoff, status="cancelled", message="Cancelled (its worker had stopped)."):
                counts["cancelled"] += 1
        elif attempts < max_attempts:
            if jobs.job_requeue(job_id=pk, stale_before=cutoff,
                                reason=f"Worker lost during attempt {attempts}; queued again."):
                counts["requeued"] += 1
        else:
            timeout = float(settings.JOB_HEARTBEAT_TIMEOUT)
            error = (f"worker_lost: the worker running this job was lost {attempts} times "
                     f"(no heartbeat for {timeout:g} s); giving up.")
            if _close(pk, cutoff, status="failed", error=error, message=f"Failed: worker lost {attempts} times."):
                counts["failed"] += 1

    sent_before = now - timedelta(seconds=float(knob("JOB_REQUEUE_AFTER", 60.0)))
    waiting = Q(status="queued") & (
        Q(heartbeat_at__lt=sent_before) | Q(heartbeat_at__isnull=True, created_at__lt=sent_before)
    )
    for pk, op in Job.objects.filter(waiting).order_by("created_at").values_list("pk", "op")[:1000]:
        if op not in opspecs.OPS:
            Job.objects.filter(pk=pk, status="queued").update(
                status="failed", error=f"unknown_op: no worker knows the op {op!r}.", finished_at=now,
                message=f"Failed: unknown op {op!r}.",
            )
            webhooks.job_finished(pk)
            counts["failed"] += 1
            continue
        if jobs.message_pending(pk):
            continue  # its message is still in the broker, just behind others
        if jobs.job_resend(job_id=pk, sent_before=sent_before):
            counts["resent"] += 1
    counts["webhooks_resent"] = resend_lost(now)
    if any(counts.values()):
        log.warning("reaper: %s", counts)
    return counts


def _close(pk, cutoff, *, status: str, message: str, error: str = "") -> bool:
    from workers.runner import drop_checkpoints

    n = Job.objects.filter(Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True), pk=pk, status="running").update(
        status=status, error=error, message=message, finished_at=timezone.now(),
    )
    if n:
        drop_checkpoints(pk)
        webhooks.job_finished(pk)
    return bool(n)


@app.task(name="workers.reaper.reap", ignore_result=True)
def reap_task() -> dict[str, int]:
    from workers.runner import sweep_scratch

    counts = reap()
    removed = sweep_scratch()
    if removed:
        log.warning("reaper: removed %d leftover scratch directories", removed)
    return {**counts, "scratch_removed": removed}


@app.task(name="workers.reaper.gc_blobs", ignore_result=True)
def gc_blobs_task() -> int:
    """`manage.py gc_blobs` on a schedule: blob files without a row, and staged uploads no commit named, older than BLOB_GC_GRACE seconds."""
    from hub.storage import GC_GRACE_SECONDS, collect_garbage

    removed = collect_garbage(float(knob("BLOB_GC_GRACE", GC_GRACE_SECONDS)))
    if removed:
        log.warning("gc_blobs: deleted %d blob files without a row", len(removed))
    return len(removed)
