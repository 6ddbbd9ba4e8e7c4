"""Job services: create, cancel, re-enqueue. The Job row is the truth; a Celery
message only carries the job's id and may be lost or delivered twice, which
the runner's compare-and-set claim makes harmless (workers/runner.py).

The web process enqueues by task name through the send-only queue client
(hub/queue.py) and never imports `workers`, an op module or torch; the op's
params are checked against its declaration (adapters_ops/opspecs.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from adapters_ops import opspecs
from hub import queue

from . import selectors, webhooks
from .models import Adapter, Job
from .services import Conflict, Forbidden, check_can_write
from .validation import ValidationError

log = logging.getLogger(__name__)

MARKER_PREFIX = "hub:job-sent:"


class JobFinished(Conflict):
    code = "job_finished"


# --- sending -----------------------------------------------------------------------------

def marker_key(job_id) -> str:
    return f"{MARKER_PREFIX}{job_id}"


def message_pending(job_id) -> bool:
    """Whether a message for this job was sent and not consumed yet (as far as
    the broker remembers: a restarted Redis forgets messages and markers alike)."""
    return bool(queue.broker_redis().exists(marker_key(job_id)))


def message_consumed(job_id) -> None:
    try:
        queue.broker_redis().delete(marker_key(job_id))
    except Exception:  # a stale marker only delays the reaper's re-send
        log.warning("could not clear the sent-marker of job %s", job_id, exc_info=True)


def enqueue(job: Job, countdown: float | None = None) -> bool:
    """Send the job's message. Failure is logged, not raised: the job stays
    queued and the reaper sends it again (see workers/reaper.py)."""
    spec = opspecs.OPS.get(job.op)
    if spec is None:
        log.error("job %s: op %r is not registered here; not sent", job.id, job.op)
        return False
    try:
        queue.send(spec.task_name, [str(job.id)], spec.queue, countdown)
        # After the send: a crash in between costs a harmless duplicate, never a lost job.
        ttl = int(queue.knob("JOB_SENT_MARKER_TTL", 24 * 3600))
        queue.broker_redis().set(marker_key(job.id), "1", ex=max(ttl, int(countdown or 0) + 60))
        return True
    except Exception:
        log.warning("job %s: could not send to the broker; the reaper will retry", job.id, exc_info=True)
        return False


def enqueue_on_commit(job: Job, countdown: float | None = None) -> None:
    transaction.on_commit(lambda: enqueue(job, countdown))


# --- services ------------------------------------------------------------------------------


def clean_params(op, params) -> tuple[opspecs.OpSpec, dict]:
    """The op's declaration and the request's params checked against it (ValidationError: a 400)."""
    try:
        spec = opspecs.get(op)
        return spec, spec.clean(params)
    except opspecs.ParamError as exc:
        field = "op" if exc.code == "unknown_op" else f"params.{exc.field}" if exc.field else "params"
        raise ValidationError(exc.code, exc.detail, field=field) from None


def job_create(*, user, op, params=None) -> Job:
    """Validate the request against the op's declaration, create the row, enqueue on commit."""
    if user is None or not user.is_authenticated:
        raise Forbidden("Sign in (a token) to start a job.")
    spec, cleaned = clean_params(op, params)
    adapter = None
    if spec.writes and cleaned.get(spec.writes):
        owner, name = cleaned[spec.writes].split("/", 1)
        adapter = selectors.adapter_get(user, owner, name)  # 404 when not visible
        check_can_write(user, adapter.owner)
        if cleaned.get("revision"):
            # Pin the revision now: a ref that moves later must not change the job.
            cleaned["revision"] = selectors.revision_resolve(adapter, cleaned["revision"]).sha
    # Inputs the op reads must be visible to the caller (404 otherwise) ...
    seeds_needed = spec.seeds_needed(cleaned)
    for key in spec.reads:
        value = cleaned.get(key)
        for repo in value if isinstance(value, list) else [value] if value else []:
            o, n = repo.split("/", 1)
            found = selectors.adapter_get(user, o, n)
            adapter = adapter or found
            if seeds_needed and found.seeds_id is None:
                raise ValidationError("no_seeds", f"{repo} has no seed examples, which this job learns from; "
                                      "upload them with `hubctl push --seeds` first.", field=f"params.{key}")
    # ... and a name the op will create must lie in a namespace the caller may write.
    if spec.creates and cleaned.get(spec.creates):
        check_can_write(user, cleaned[spec.creates].split("/", 1)[0])
    elif spec.creates and adapter is not None:  # the default name lies in the input's namespace
        check_can_write(user, adapter.owner)
    for key in spec.bases:  # base models the op targets must be registered (404 otherwise)
        if cleaned.get(key):
            selectors.base_model_get(cleaned[key])
    with transaction.atomic():
        job = Job.objects.create(
            op=spec.name, params=cleaned, owner=user, adapter=adapter,
            max_attempts=settings.JOB_MAX_ATTEMPTS, heartbeat_at=timezone.now(), message="Queued.",
        )
        enqueue_on_commit(job)
    return job


def transfer_all(*, user, source: str, params: dict) -> tuple[list[Job], list[dict]]:
    """One transfer job per adapter on the base `source` that `user` may write (`hubctl
    transfer --from A --to B`, one request). `params` are the transfer op's but `adapter`
    and `name`. Returns the jobs and, per adapter the op's checks refused, its error."""
    if not isinstance(params, dict) or {"adapter", "name"} & set(params):
        raise ValidationError("invalid_params", "params are the transfer op's, without adapter and name (each "
                              "adapter keeps its own name).", field="params")
    base = selectors.base_model_get(source)  # 404, with the registered slugs
    # the shared params, checked once: a mistake there is one 400, not one refusal per adapter
    clean_params("transfer", {**params, "adapter": "owner/name"})
    selectors.base_model_get(params.get("target"))
    jobs, refused = [], []
    with transaction.atomic():  # all jobs or none (each is sent once this commits)
        for adapter in Adapter.objects.writable_by(user).filter(base_model=base).order_by("owner", "name"):
            try:
                jobs.append(job_create(user=user, op="transfer", params={**params, "adapter": adapter.repo_id}))
            except (ValidationError, Forbidden, Conflict) as exc:  # this adapter's own problem (no seeds, ...)
                refused.append({"adapter": adapter.repo_id, "error": exc.code, "detail": exc.detail})
    return jobs, refused


def job_cancel(*, job: Job) -> Job:
    """Queued: cancelled at once. Running: flagged; the runner stops at its next
    progress point. Finished: 409 (cancelling a cancelled job is a no-op)."""
    now = timezone.now()
    for _ in range(5):  # the status may move between the two updates: try again
        if Job.objects.filter(pk=job.pk, status="queued").update(
            status="cancelled", cancel_requested=True, finished_at=now, message="Cancelled before it started.",
        ):
            transaction.on_commit(lambda: webhooks.job_finished(job.pk))
            break
        if Job.objects.filter(pk=job.pk, status="running").update(cancel_requested=True, message="Cancelling…"):
            break
        job.refresh_from_db()
        if job.status == "cancelled":
            break
        if job.status in Job.FINISHED:
            raise JobFinished(f"Job {job.id} has already {job.status}; it cannot be cancelled.")
    job.refresh_from_db()
    return job


def job_requeue(*, job_id, reason: str, countdown: float | None = None, stale_before=None) -> bool:
    """Put a running job back in the queue (its worker died or hit a transient
    fault), if it may still be attempted. Compare-and-set: of several reapers
    only one wins. With `stale_before`, only if its heartbeat is older."""
    q = Q(pk=job_id, status="running", attempts__lt=F("max_attempts"), cancel_requested=False)
    if stale_before is not None:
        q &= Q(heartbeat_at__lt=stale_before) | Q(heartbeat_at__isnull=True)
    with transaction.atomic():
        n = Job.objects.filter(q).update(
            status="queued", worker="", heartbeat_at=timezone.now(), message=reason[:300],
        )
        if n:
            enqueue_on_commit(Job.objects.get(pk=job_id), countdown)
    return bool(n)


def job_resend(*, job_id, sent_before) -> bool:
    """Send a queued job's message again when it may have been lost. Safe even
    if it was not: the runner claims a job once, a second message does nothing."""
    with transaction.atomic():
        last_sent = Q(heartbeat_at__lt=sent_before) | Q(heartbeat_at__isnull=True, created_at__lt=sent_before)
        n = Job.objects.filter(last_sent, pk=job_id, status="queued").update(heartbeat_at=timezone.now())
        if n:
            enqueue_on_commit(Job.objects.get(pk=job_id))
    return bool(n)


def stale_cutoff(now=None):
    return (now or timezone.now()) - timedelta(seconds=float(settings.JOB_HEARTBEAT_TIMEOUT))
