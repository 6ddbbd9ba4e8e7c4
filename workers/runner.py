"""The job runner every op uses: claim, run, record.

A Celery task receives only a job id and calls `run(job_id, fn)`:

1. claim the Job by compare-and-set (queued, or running with a stale
   heartbeat, and attempts left): a second message for the same job, or one
   for a finished job, does nothing;
   a message the broker gave back after its worker died takes the job over
   at once if that worker was a process of this node that is gone, else
   comes back when the job's heartbeat goes stale;
2. call `fn(ctx)` with a `JobContext` (progress, cancellation, heartbeats,
   inputs from the blob store, stage checkpoints, a scratch directory named
   `job-<id>-<attempt>`, so the next attempt and the reaper find and remove
   what a killed attempt left);
3. record the outcome. A `RevisionOutput` becomes blobs + a Revision + the
   job's `succeeded` in ONE transaction that first re-checks the job is still
   ours, so a retried job never leaves two result revisions; a `Done` (or
   None) only finishes the job with a message (metrics-only ops).

Errors: user errors (AdapterError, ValidationError, OpError, NotFound) fail
the job with a one-line message; transient faults (database, Redis, storage)
put it back in the queue with backoff while attempts remain; anything else is
a bug: the job fails with a short message and the traceback goes to the log.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.db import InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from adapters_ops import opspecs
from adapters_ops.errors import AdapterError
from hub.registry import jobs, selectors, services, validation, webhooks
from hub.registry.models import Adapter, BaseModel, Blob, Job, Revision
from hub.registry.selectors import NotFound
from hub.registry.services import Forbidden
from hub.registry.validation import ValidationError
from hub.storage import blob_batch, copy_to_path, delete_unreferenced
from workers import knob

log = logging.getLogger("workers.runner")


# --- what ops raise and return ----------------------------------------------------------


class Cancelled(Exception):
    """The owner asked to cancel; raised at the op's next progress point."""


class LostClaim(Exception):
    """The job is no longer ours (the reaper gave it to another worker)."""


class OpError(Exception):
    """A user error found while running (bad input, nothing to retry)."""

    def __init__(self, detail: str, code: str = "op_failed"):
        super().__init__(detail)
        self.detail = detail
        self.code = code


USER_ERRORS = (OpError, AdapterError, ValidationError, NotFound, Forbidden)


def _transient_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OperationalError, InterfaceError, ConnectionError, TimeoutError, OSError]
    try:
        import redis.exceptions

        errs += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import kombu.exceptions

        errs.append(kombu.exceptions.OperationalError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import botocore.exceptions

        errs += [botocore.exceptions.BotoCoreError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


TRANSIENT_ERRORS = _transient_errors()


@dataclass
class NewAdapter:
    """An adapter an op creates (merge, transfer): made in the same transaction
    as its first revision, or reused when a retried or repeated job finds it."""

    owner: str
    name: str
    base: BaseModel
    visibility: str = "public"
    description: str = ""
    seeds: Blob | None = None
    tags: tuple[str, ...] = ()

    def get_or_create(self, user) -> Adapter:
        services.check_can_write(user, self.owner)
        adapter, created = Adapter.objects.get_or_create(
            owner=self.owner, name=self.name,
            defaults={"base_model": self.base, "visibility": self.visibility, "description": self.description,
                      "seeds": self.seeds, "created_by": user},
        )
        if not created and adapter.base_model_id != self.base.pk:
            raise OpError(f"{adapter.repo_id} exists on base {adapter.base_model.slug}, not {self.base.slug}; "
                          "choose another name.", "already_exists")
        if created and self.tags:
            services.set_tags(adapter, list(self.tags))
        return adapter


@dataclass
class RevisionOutput:
    """An op's result that becomes a new revision of `adapter`.

    `files`: path in the revision -> a local file, bytes, or a Blob already
    stored (files carried over unchanged). `parents` are the lineage edges.
    """

    adapter: Adapter | NewAdapter
    files: dict[str, Path | str | bytes | Blob]
    kind: str
    parents: list[Revision] = field(default_factory=list)
    message: str = ""
    params: dict | None = None  # default: the job's params
    metrics: dict | None = None
    ref: str | None = None  # default: the kind
    base: BaseModel | None = None  # default: the adapter's base
    done_message: str = ""
    # adapters_ops.verdict's dict for a derived revision. A failed one never
    # moves `main`: the revision is kept under its kind's ref instead.
    verdict: dict | None = None


@dataclass
class Done:
    """A metrics-only result: the job succeeds with `message`; no revision."""

    message: str = "Done."
    metrics: dict = field(default_factory=dict)


def one_line(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    text = " ".join(str(detail).split())
    return f"{code}: {text}" if code and isinstance(code, str) else text


# --- settings --------------------------------------------------------------------------------


def heartbeat_timeout() -> float:
    from django.conf import settings

    return float(settings.JOB_HEARTBEAT_TIMEOUT)


def heartbeat_interval() -> float:
    return max(0.2, min(10.0, heartbeat_timeout() / 4))


def progress_interval() -> float:
    return float(knob("JOB_PROGRESS_INTERVAL", 0.5))


def retry_countdown(attempt: int) -> float:
    base = float(knob("JOB_RETRY_BACKOFF", 10.0))
    cap = float(knob("JOB_RETRY_BACKOFF_MAX", 600.0))
    return min(cap, base * 2 ** max(0, attempt - 1)) * (1 + random.random() / 4)  # noqa: S311 (jitter)


# --- the context an op receives ------------------------------------------------------------


class JobContext:
    def __init__(self, job: Job, token: str, workdir: Path):
        self.job = job
        self.id = job.id
        self.params = dict(job.params)
        self.owner = job.owner
        self.adapter = job.adapter
        self.attempt = job.attempts
        self.token = token
        self.workdir = workdir
        self.log = logging.getLogger(f"workers.ops.{job.op}")
        self._fraction = 0.0
        self._message = ""
        self._last_write = 0.0
        self.cancel_seen = threading.Event()
        self.lost = threading.Event()

    # -- device: a gpu-queue job on a machine without CUDA runs on the CPU --
    @property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # -- progress and cancellation --
    def ours(self):
        return Job.objects.filter(pk=self.id, worker=self.token, status="running")

    def check(self) -> None:
        if self.lost.is_set():
            raise LostClaim(f"job {self.id} was taken over")
        if self.cancel_seen.is_set():
            raise Cancelled()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1, never backwards) and a short message. Writes
        the row at most every JOB_PROGRESS_INTERVAL s (and at 1.0); raises
        Cancelled if the owner asked to cancel."""
        self._fraction = max(self._fraction, min(1.0, max(0.0, float(fraction))))
        if message:
            self._message = message[:300]
        self.check()
        now = time.monotonic()
        if now - self._last_write < progress_interval() and self._fraction < 1.0:
            return
        self._last_write = now
        try:
            n = self.ours().filter(cancel_requested=False).update(
                progress=Greatest(F("progress"), Value(self._fraction)), message=self._message,
                heartbeat_at=timezone.now(),
            )
        except (OperationalError, InterfaceError):
            # Progress is informative: a busy database must not fail the job.
            log.warning("job %s: progress not recorded", self.id, exc_info=True)
            return
        if n == 0:
            self._why_not_ours()

    def _why_not_ours(self) -> None:
        row = Job.objects.filter(pk=self.id).values("status", "worker", "cancel_requested").first()
        if row and row["status"] == "running" and row["worker"] == self.token and row["cancel_requested"]:
            self.cancel_seen.set()
            raise Cancelled()
        self.lost.set()
        raise LostClaim(f"job {self.id} was taken over")

    def fence(self) -> None:
        """Inside a transaction: lock the row and make sure it is still ours and
        not cancelled. An UPDATE first (not a SELECT) so SQLite takes its write
        lock at once and PostgreSQL its row lock, like select_for_update."""
        if not self.ours().filter(cancel_requested=False).update(heartbeat_at=timezone.now()):
            self._why_not_ours()

    # -- inputs --
    def adapter_get(self, repo_id: str) -> Adapter:
        """An adapter named in the params, as the job's owner may see it."""
        owner, name = repo_id.split("/", 1)
        return selectors.adapter_get(self.owner, owner, name)

    def revision(self, adapter: Adapter, rev: str | None = None) -> Revision:
        return selectors.revision_resolve(adapter, rev)

    def materialize_revision(self, revision: Revision, dest: str | os.PathLike) -> Path:
        """Copy a revision's files from the blob store into `dest` (streamed)."""
        return self._materialize(selectors.revision_files(revision), dest)

    def materialize_base(self, base: BaseModel, dest: str | os.PathLike) -> Path:
        files = {f.path: f.blob for f in base.files.select_related("blob")}
        return self._materialize(files, dest)

    def _materialize(self, files: dict[str, Blob], dest) -> Path:
        dest = Path(dest).resolve()
        for path, blob in sorted(files.items()):
            target = (dest / path).resolve()
            if not target.is_relative_to(dest):  # paths were checked at upload; stay safe anyway
                raise OpError(f"{path} would leave the work directory", "bad_filename")
            copy_to_path(blob, target)
        return dest

    # -- stage checkpoints (resumable ops) --
    def save_checkpoint(self, stage: str, data: bytes | str | os.PathLike) -> str:
        """Store a stage's output as a blob and record it on the job; returns its sha256."""
        with blob_batch() as batch, transaction.atomic():
            self.fence()
            blob = batch.put_bytes(data) if isinstance(data, bytes) else batch.put_path(data)
            cps = dict(Job.objects.filter(pk=self.id).values_list("checkpoints", flat=True).get() or {})
            cps[stage] = blob.sha256
            Job.objects.filter(pk=self.id).update(checkpoints=cps)
        return blob.sha256

    def load_checkpoint(self, stage: str, dest: str | os.PathLike | None = None) -> Path | None:
        """The stage's stored output as a local file, or None if there is none."""
        cps = Job.objects.filter(pk=self.id).values_list("checkpoints", flat=True).get() or {}
        blob = Blob.objects.filter(sha256=cps.get(stage, "")).first()
        if blob is None:
            return None
        return copy_to_path(blob, dest or self.workdir / "checkpoints" / stage)


# --- heartbeats ------------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Keeps heartbeat_at fresh while the op computes, and notices a cancel
    request or a lost claim even between progress points."""

    def __init__(self, ctx: JobContext):
        super().__init__(name=f"heartbeat-{ctx.id}", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(heartbeat_interval()):
                try:
                    n = self.ctx.ours().update(heartbeat_at=timezone.now())
                    if n == 0:
                        self.ctx.lost.set()
                        return
                    if self.ctx.ours().filter(cancel_requested=True).exists():
                        self.ctx.cancel_seen.set()
                except Exception:  # keep beating; the next try may succeed
                    log.warning("job %s: heartbeat failed", self.ctx.id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def stop(self):
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)


# --- scratch directories ----------------------------------------------------------------------

UUID_RE = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SCRATCH_NAME = re.compile(rf"^job-(?P<job>{UUID_RE})-(?P<attempt>[0-9]+)$")


def scratch_root() -> Path:
    return Path(knob("JOB_WORK_DIR", "") or tempfile.gettempdir())


def scratch_dir(job_id, attempt: int) -> Path:
    return scratch_root() / f"job-{job_id}-{attempt}"


def scratch_dirs(job_id="*") -> list[tuple[Path, str, int]]:
    """(path, job id, attempt) of the scratch directories on this machine."""
    found = []
    for path in scratch_root().glob(f"job-{job_id}-*"):
        if match := SCRATCH_NAME.match(path.name):
            found.append((path, match["job"], int(match["attempt"])))
    return found


def sweep_scratch() -> int:
    """Remove this machine's scratch directories of finished jobs and of
    attempts that lost their job (a killed worker's, which no `finally` ran
    for); returns how many. Directories of jobs unknown to this database are
    left alone: the system temporary directory may be shared."""
    found = scratch_dirs()
    if not found:
        return 0
    jobs_here = Job.objects.filter(pk__in={job for _, job, _ in found})
    rows = {str(pk): (status, attempts) for pk, status, attempts in jobs_here.values_list("pk", "status", "attempts")}
    removed = 0
    for path, job, attempt in found:
        status, attempts = rows.get(job, ("", 0))
        if status in Job.FINISHED or attempt < attempts:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


# --- the run ----------------------------------------------------------------------------------


def claim(job_id, token: str, lost_worker: str = "") -> bool:
    """Compare-and-set: queued, or running with a stale heartbeat, or running
    under `lost_worker` (a token the caller found to name a dead process)."""
    now = timezone.now()
    cutoff = jobs.stale_cutoff(now)
    claimable = Q(status="queued") | Q(status="running", heartbeat_at__lt=cutoff)
    if lost_worker:
        claimable |= Q(status="running", worker=lost_worker)
    n = Job.objects.filter(claimable, pk=job_id, attempts__lt=F("max_attempts"), cancel_requested=False).update(
        status="running", attempts=F("attempts") + 1, heartbeat_at=now, worker=token, error="",
        started_at=Coalesce(F("started_at"), Value(now)), message="Started.",
    )
    return n == 1


def node_name(task=None) -> str:
    return getattr(getattr(task, "request", None), "hostname", None) or socket.gethostname()


def worker_token(task=None) -> str:
    return f"{node_name(task)}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def process_gone(token: str, task=None) -> bool:
    """Whether a worker token (node/pid/nonce) names a process of this node
    that has exited. Another node's process, or a live one, is not gone."""
    node, _, rest = token.partition("/")
    pid = rest.partition("/")[0]
    if node != node_name(task) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _claim_redelivered(job_id, token: str, task) -> bool:
    """A message the broker gave back because the worker running it died
    (acks_late + reject_on_worker_lost: at once, while the job's heartbeat is
    still fresh). Take the job over now if that worker was a process of this
    node that is gone; otherwise send the message again for when the
    heartbeat will be stale, instead of dropping it and leaving the job to the
    reaper's next pass. The resent message is not a redelivery, so a job
    whose worker is in fact alive costs one extra look, not a loop."""
    if task is None or not (task.request.delivery_info or {}).get("redelivered"):
        return False
    row = Job.objects.filter(pk=job_id, status="running").values_list("worker", "heartbeat_at").first()
    if row is None:
        return False
    lost_worker, heartbeat_at = row
    if process_gone(lost_worker, task) and claim(job_id, token, lost_worker=lost_worker):
        return True
    stale_in = (heartbeat_at - jobs.stale_cutoff()).total_seconds() if heartbeat_at else 0.0
    log.info("job %s: redelivered while its heartbeat is fresh; looking again in %.0f s", job_id, stale_in)
    raise task.retry(countdown=max(0.0, stale_in) + heartbeat_interval(), max_retries=None)


def run(job_id, fn: Callable[[JobContext], RevisionOutput | Done | None], task=None) -> str:
    """Run `fn` for the job if this call claims it. Returns the outcome
    ("skipped", "succeeded", "failed", "cancelled", "requeued", "lost")."""
    close_old_connections()
    jobs.message_consumed(job_id)
    token = worker_token(task)
    try:
        if not claim(job_id, token) and not _claim_redelivered(job_id, token, task):
            log.info("job %s: not claimable (finished, running elsewhere or out of attempts); skipped", job_id)
            return "skipped"
    except TRANSIENT_ERRORS as exc:
        if task is not None:  # the row is untouched: let Celery send the message again later
            raise task.retry(exc=exc, countdown=retry_countdown(task.request.retries + 1), max_retries=5) from exc
        raise
    job = Job.objects.select_related("owner", "adapter", "adapter__base_model").get(pk=job_id)
    for stale, _, _ in scratch_dirs(job.id):  # what a killed attempt left on this machine
        shutil.rmtree(stale, ignore_errors=True)
    workdir = scratch_dir(job.id, job.attempts)
    workdir.mkdir(mode=0o700, parents=True)
    ctx = JobContext(job, token, workdir)
    heartbeat = Heartbeat(ctx)
    heartbeat.start()
    log.info("job %s: %s attempt %d/%d on %s", job.id, job.op, job.attempts, job.max_attempts, token)
    outcome = "failed"
    try:
        try:
            result = fn(ctx)
            ctx.check()  # a cancel during the last stretch still wins
            outcome = _succeed(ctx, result)
        finally:
            heartbeat.stop()
    except Cancelled:
        outcome = _finish(ctx, "cancelled", message="Cancelled.")
    except LostClaim:
        log.warning("job %s: taken over by another worker; this attempt's work is dropped", job.id)
        outcome = "lost"
    except SoftTimeLimitExceeded:
        spec = opspecs.OPS.get(job.op)
        limit = f" of {spec.soft_time_limit} s" if spec else ""
        outcome = _finish(ctx, "failed", error=f"time_limit: the job ran past its time limit{limit}.")
    except USER_ERRORS as exc:
        outcome = _finish(ctx, "failed", error=one_line(exc))
    except TRANSIENT_ERRORS as exc:
        log.warning("job %s: transient fault", job.id, exc_info=True)
        outcome = _retry_or_fail(ctx, exc)
    except Exception as exc:
        log.exception("job %s: %s failed with an unexpected error", job.id, job.op)
        outcome = _finish(ctx, "failed", error=f"internal_error: {type(exc).__name__}: {one_line(exc)}"[:2000])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("job %s: %s", job.id, outcome)
    return outcome


def _succeed(ctx: JobContext, result) -> str:
    job = ctx.job
    if isinstance(result, RevisionOutput):
        spec = opspecs.OPS.get(job.op)
        if spec is not None and result.kind not in spec.produces:  # a bug in the op: its declaration is the truth
            raise RuntimeError(f"op {job.op} made a {result.kind!r} revision; it declares {spec.produces}")
        with blob_batch() as batch, transaction.atomic():
            ctx.fence()  # first statement: the row is locked and still ours
            blobs = {}
            for path, src in sorted(result.files.items()):
                path = validation.check_filename(path)
                if isinstance(src, Blob):
                    blobs[path] = src
                elif isinstance(src, bytes):
                    blobs[path] = batch.put_bytes(src)
                else:
                    blobs[path] = batch.put_path(src)
            adapter = result.adapter
            if isinstance(adapter, NewAdapter):
                adapter = adapter.get_or_create(job.owner)
            base = result.base or adapter.base_model
            ref, message = _verdict_ref(result)
            rev = services.revision_create(
                adapter=adapter, files=blobs, kind=result.kind, user=job.owner,
                message=result.message or f"{job.op} job {job.id}", summary=_summary(blobs, base),
                parents=result.parents, params=job.params if result.params is None else result.params,
                metrics=result.metrics, job=job, ref=ref, base=base,
            )
            if result.verdict is not None:
                rev.verdict = result.verdict
                rev.save(update_fields=["verdict"])
            message = message or f"Created {result.kind} revision {rev.sha[:12]}."
            ctx.ours().update(
                status="succeeded", progress=1.0, message=message[:300], result_revision=rev, error="",
                finished_at=timezone.now(),
            )
    else:
        done = result if isinstance(result, Done) else Done()
        with transaction.atomic():
            ctx.fence()
            ctx.ours().update(status="succeeded", progress=1.0, message=done.message[:300], error="",
                              finished_at=timezone.now())
    drop_checkpoints(job.id)
    webhooks.job_finished(job.id)
    return "succeeded"


def _verdict_ref(result: RevisionOutput) -> tuple[str | None, str]:
    """The ref the revision takes and the job's message, with the verdict's line:
    a failed verdict keeps `main` where it was (the revision goes under its kind)."""
    from adapters_ops.verdict import summary

    ref, message = result.ref, result.done_message
    if result.verdict is None:
        return ref, message
    line = f"Verdict: {summary(result.verdict)}."
    if result.verdict.get("status") == "failed" and (ref or result.kind) == "main":
        ref = result.kind
        line += f" main not moved (kept as ref '{ref}')."
    return ref, f"{message} {line}".strip() if message else line


def _summary(blobs: dict[str, Blob], base: BaseModel):
    """Revision metadata read back from the stored output, which also checks
    the op wrote a well-formed adapter for its base (None if not a PEFT folder)."""
    from hub.storage import open_blob

    cfg, weights = blobs.get(services.ADAPTER_CONFIG), blobs.get(services.ADAPTER_WEIGHTS)
    if cfg is None or weights is None:
        return None
    with open_blob(cfg) as f:
        config = validation.validate_peft_config(f.read())
    with open_blob(weights) as f:
        header = validation.read_safetensors_header(f, weights.size)
    return validation.check_lora_shapes(header, config, base.manifest)


def _finish(ctx: JobContext, status: str, error: str = "", message: str = "") -> str:
    if not message:
        message = "Failed: " + error.splitlines()[0][:280] if error else status.capitalize() + "."
    try:
        n = ctx.ours().update(status=status, error=error, message=message[:300], finished_at=timezone.now())
    except TRANSIENT_ERRORS:
        # The heartbeat has stopped: the reaper re-queues the job once it is stale.
        log.warning("job %s: could not record %s", ctx.id, status, exc_info=True)
        return "unrecorded"
    if not n:
        return "lost"
    drop_checkpoints(ctx.id)
    webhooks.job_finished(ctx.id)
    return status


def _retry_or_fail(ctx: JobContext, exc: BaseException) -> str:
    job = ctx.job
    if job.attempts >= job.max_attempts:
        return _finish(ctx, "failed", error=f"transient_error: gave up after {job.attempts} attempts: "
                       f"{type(exc).__name__}: {one_line(exc)}")
    countdown = retry_countdown(job.attempts)
    try:
        n = ctx.ours().update(
            status="queued", worker="", heartbeat_at=timezone.now(),
            message=f"Retrying in {countdown:.0f} s after a transient fault: {one_line(exc)}"[:300],
        )
    except TRANSIENT_ERRORS:
        log.warning("job %s: could not re-queue; the reaper will", job.id, exc_info=True)
        return "unrecorded"
    if n:
        jobs.enqueue(job, countdown=countdown)
        return "requeued"
    return "lost"


def drop_checkpoints(job_id) -> None:
    """A finished job's checkpoint blobs go, unless something else holds them."""
    try:
        cps = Job.objects.filter(pk=job_id).values_list("checkpoints", flat=True).first() or {}
        if not cps:
            return
        Job.objects.filter(pk=job_id).update(checkpoints={})
        # delete_unreferenced keeps those another unfinished job's checkpoints hold
        delete_unreferenced(list(Blob.objects.filter(sha256__in=set(cps.values()))))
    except Exception:  # never fail a finished job over its scratch data
        log.warning("job %s: checkpoint clean-up failed", job_id, exc_info=True)
