"""The runner in-process (no Celery): claim, outcomes, rollback, cancel,
checkpoints, heartbeats; and the `validate` op on a real PEFT adapter."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import OperationalError
from django.utils import timezone

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _fast(settings, broker):
    settings.JOB_HEARTBEAT_TIMEOUT = 1
    settings.JOB_PROGRESS_INTERVAL = 0
    settings.JOB_RETRY_BACKOFF = 0.1


def make_job(user, op="sleep", params=None, adapter=None, **fields):
    from hub.registry.models import Job

    return Job.objects.create(op=op, params=params or {}, owner=user, adapter=adapter, max_attempts=3, **fields)


def reload(job):
    job.refresh_from_db()
    return job


def done_fn(ctx):
    from workers.runner import Done

    ctx.progress(0.5, "half")
    return Done("All good.")


# --- claim ----------------------------------------------------------------------------------

STALE = timedelta(seconds=30)
CLAIM_CASES = [
    # (status, heartbeat age, attempts, cancel_requested, claimed)
    ("queued", None, 0, False, True),
    ("queued", None, 2, False, True),
    ("queued", None, 3, False, False),  # out of attempts
    ("running", STALE, 1, False, True),  # its worker died: taken over
    ("running", timedelta(0), 1, False, False),  # alive elsewhere
    ("running", STALE, 3, False, False),
    ("succeeded", None, 1, False, False),
    ("failed", None, 1, False, False),
    ("cancelled", None, 0, True, False),
]


@pytest.mark.parametrize("status,age,attempts,cancel,claimed", CLAIM_CASES)
def test_claim_is_compare_and_set(user, status, age, attempts, cancel, claimed):
    from workers import runner

    hb = timezone.now() - age if age is not None else None
    job = make_job(user, status=status, heartbeat_at=hb, attempts=attempts, cancel_requested=cancel,
                   worker="old/1/x" if status == "running" else "")
    calls = []
    outcome = runner.run(job.id, lambda ctx: calls.append(ctx.attempt) or done_fn(ctx))
    job = reload(job)
    if claimed:
        assert outcome == "succeeded" and calls == [attempts + 1]
        assert (job.status, job.attempts, job.progress, job.message) == ("succeeded", attempts + 1, 1.0, "All good.")
    else:
        assert outcome == "skipped" and calls == []
        assert (job.status, job.attempts) == (status, attempts)


def test_second_delivery_of_a_finished_job_does_nothing(user):
    from workers import runner

    job = make_job(user)
    assert runner.run(job.id, done_fn) == "succeeded"
    assert runner.run(job.id, done_fn) == "skipped"
    assert reload(job).attempts == 1


# --- outcomes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc,error", [
    ("user", "test_failure: bad input"),
    ("adapter", "incompatible_adapters: ranks differ"),
    ("validation", "shape_mismatch: q_proj is wrong"),
    ("bug", "internal_error: ZeroDivisionError: division by zero"),
    ("timeout", "time_limit: the job ran past its time limit of 150 s."),
])
def test_failures_record_one_line_errors(user, exc, error):
    from celery.exceptions import SoftTimeLimitExceeded

    from adapters_ops.errors import IncompatibleAdapters
    from hub.registry.validation import ValidationError
    from workers import runner

    def fn(ctx):
        ctx.progress(0.3)
        if exc == "user":
            raise runner.OpError("bad input", "test_failure")
        if exc == "adapter":
            raise IncompatibleAdapters("ranks\n differ")
        if exc == "validation":
            raise ValidationError("shape_mismatch", "q_proj is wrong")
        if exc == "timeout":
            raise SoftTimeLimitExceeded()
        return 1 / 0

    job = make_job(user)
    assert runner.run(job.id, fn) == "failed"
    job = reload(job)
    assert (job.status, job.error, job.attempts) == ("failed", error, 1)
    assert job.message == f"Failed: {error}"[:300] and job.finished_at is not None


def test_transient_fault_requeues_with_backoff_then_gives_up(user, broker):
    from hub.registry import jobs
    from workers import runner

    def fn(ctx):
        raise OperationalError("database is locked")

    job = make_job(user)
    assert runner.run(job.id, fn) == "requeued"
    job = reload(job)
    assert (job.status, job.attempts, job.worker) == ("queued", 1, "")
    assert job.message.startswith("Retrying in ") and "database is locked" in job.message
    assert jobs.message_pending(job.id)
    # The retry message is scheduled (countdown): Celery's ETA lives in the message headers.
    assert broker.llen("cpu") == 1
    assert runner.run(job.id, fn) == "requeued"
    assert runner.run(job.id, fn) == "failed"
    job = reload(job)
    assert job.attempts == 3
    assert job.error == "transient_error: gave up after 3 attempts: OperationalError: database is locked"


def test_cancel_is_seen_at_the_next_progress_point(user):
    from hub.registry.models import Job
    from workers import runner

    seen = []

    def fn(ctx):
        for i in range(10):
            ctx.progress(i / 10, f"step {i}")
            seen.append(i)
            if i == 3:
                Job.objects.filter(pk=ctx.id).update(cancel_requested=True)
        return runner.Done()

    job = make_job(user)
    assert runner.run(job.id, fn) == "cancelled"
    job = reload(job)
    assert seen == [0, 1, 2, 3] and job.status == "cancelled" and job.progress == pytest.approx(0.3)


def test_heartbeat_thread_beats_and_sees_cancel_without_progress(user):
    from hub.registry.models import Job
    from workers import runner

    beats = set()

    def fn(ctx):
        for _ in range(12):  # tensor work: no progress call for 1.2 s
            time.sleep(0.1)
            beats.add(Job.objects.get(pk=ctx.id).heartbeat_at)
        Job.objects.filter(pk=ctx.id).update(cancel_requested=True)
        time.sleep(0.6)  # > one heartbeat interval (0.25 s)
        assert ctx.cancel_seen.is_set()
        return runner.Done()

    job = make_job(user)
    assert runner.run(job.id, fn) == "cancelled"
    assert len(beats) >= 3


def test_lost_claim_drops_the_attempt(user, peft_adapter, orphans):
    from hub.registry.models import Job, Revision
    from workers import runner

    def fn(ctx):
        # Meanwhile the reaper judged us dead and another worker claimed the job.
        Job.objects.filter(pk=ctx.id).update(worker="other/2/y", attempts=2)
        return runner.RevisionOutput(adapter=peft_adapter, files={"x.txt": b"lost work"}, kind="merge")

    job = make_job(user, adapter=peft_adapter)
    assert runner.run(job.id, fn) == "lost"
    job = reload(job)
    assert (job.status, job.worker) == ("running", "other/2/y")
    assert Revision.objects.filter(job=job).count() == 0
    assert orphans() == {"unreferenced_rows": set(), "files_without_row": set()}


# --- revisions --------------------------------------------------------------------------------------


def test_revision_output_creates_one_revision_in_the_same_transaction(user, peft_adapter):
    from hub.registry import selectors
    from hub.registry.models import Revision
    from workers import runner

    main = selectors.revision_resolve(peft_adapter, "main")

    def fn(ctx):
        d = ctx.materialize_revision(main, ctx.workdir / "in")
        (d / "NOTE.md").write_text("derived\n")
        files = {p.name: p for p in d.iterdir()}
        return runner.RevisionOutput(adapter=peft_adapter, files=files, kind="merge", parents=[main],
                                     metrics={"score": 1.5}, message="test merge")

    job = make_job(user, op="touch", params={"adapter": "alice/lora"}, adapter=peft_adapter)
    assert runner.run(job.id, fn) == "succeeded"
    job = reload(job)
    rev = Revision.objects.get(job=job)
    assert job.result_revision_id == rev.id and job.message == f"Created merge revision {rev.sha[:12]}."
    assert (rev.kind, rev.message, rev.metrics, rev.params) == ("merge", "test merge", {"score": 1.5}, job.params)
    assert list(rev.parents.all()) == [main]
    assert sorted(selectors.revision_files(rev)) == sorted([*selectors.revision_files(main), "NOTE.md"])
    # metadata read back from the stored output (the LoRA summary)
    assert (rev.r, rev.target_modules, rev.dtype) == (main.r, main.target_modules, main.dtype)
    assert selectors.refs_of(rev) == ["merge"]


@pytest.mark.parametrize("bad", ["path", "shapes"])
def test_failed_final_step_leaves_no_revision_and_no_blob(user, peft_adapter, bad, orphans):
    import json

    from hub.registry import selectors
    from hub.registry.models import Blob, Revision
    from workers import runner

    main = selectors.revision_resolve(peft_adapter, "main")
    before = set(Blob.objects.values_list("sha256", flat=True))

    def fn(ctx):
        files = dict(selectors.revision_files(main))
        files["fresh.txt"] = f"new bytes of {ctx.id}".encode()
        if bad == "path":
            files["zz/../escape.txt"] = b"x"
        else:  # the output claims a rank its tensors do not have
            d = ctx.materialize_revision(main, ctx.workdir / "in")
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg["r"] = 7
            files["adapter_config.json"] = json.dumps(cfg).encode()
        return runner.RevisionOutput(adapter=peft_adapter, files=files, kind="merge", parents=[main])

    job = make_job(user, adapter=peft_adapter)
    assert runner.run(job.id, fn) == "failed"
    job = reload(job)
    assert job.error.startswith("bad_filename:" if bad == "path" else "shape_mismatch:")
    assert Revision.objects.filter(job=job).count() == 0 and job.result_revision is None
    assert set(Blob.objects.values_list("sha256", flat=True)) == before
    assert orphans() == {"unreferenced_rows": set(), "files_without_row": set()}


# --- checkpoints ------------------------------------------------------------------------------------------


def test_checkpoints_survive_a_retry_and_go_when_done(user, tmp_path, orphans):
    from hub.registry.models import Blob
    from workers import runner

    seen = {}

    def fn(ctx):
        if ctx.attempt == 1:
            p = tmp_path / "stage1.bin"
            p.write_bytes(b"stage one output")
            seen["sha"] = ctx.save_checkpoint("stage1", p)
            ctx.save_checkpoint("stage0", b"stage zero")
            raise OperationalError("connection reset")
        seen["stage1"] = Path(ctx.load_checkpoint("stage1")).read_bytes()
        seen["missing"] = ctx.load_checkpoint("stage2")
        return runner.Done()

    job = make_job(user)
    assert runner.run(job.id, fn) == "requeued"
    assert set(reload(job).checkpoints) == {"stage0", "stage1"}
    assert Blob.objects.filter(sha256=seen["sha"]).exists()
    assert runner.run(job.id, fn) == "succeeded"
    assert seen["stage1"] == b"stage one output" and seen["missing"] is None
    assert reload(job).checkpoints == {}
    assert not Blob.objects.filter(sha256=seen["sha"]).exists()
    assert orphans() == {"unreferenced_rows": set(), "files_without_row": set()}


# --- the validate op ------------------------------------------------------------------------------------------


def _weights_blob(adapter):
    from hub.registry import selectors

    return selectors.revision_files(selectors.revision_resolve(adapter, "main"))["adapter_model.safetensors"]


@pytest.mark.parametrize("damage,error", [
    (None, None),
    ("flip", "checksum_mismatch: adapter_model.safetensors: the stored bytes hash to"),
    ("truncate", "size_mismatch: adapter_model.safetensors: the store holds"),
    ("manifest", "shape_mismatch: adapter_model.safetensors: "),
])
def test_validate_op(user, peft_adapter, settings, damage, error, request):
    from hub.registry.models import Revision
    from workers import runner
    from workers.ops.validate import validate

    blob = _weights_blob(peft_adapter)
    path = Path(settings.BLOB_ROOT) / blob.key
    # The blob store outlives the test database: put the bytes back afterwards.
    original = path.read_bytes()
    request.addfinalizer(lambda: path.write_bytes(original))
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "manifest":
        base = peft_adapter.base_model
        key = next(k for k in base.manifest if k.endswith("q_proj.weight"))
        base.manifest[key]["shape"] = [base.manifest[key]["shape"][0] + 1, base.manifest[key]["shape"][1]]
        base.save()
    progress = []

    def fn(ctx):
        orig = ctx.progress
        ctx.progress = lambda f, m="": (progress.append(f), orig(f, m))[1]
        return validate(ctx)

    job = make_job(user, op="validate", params={"adapter": "alice/lora"}, adapter=peft_adapter)
    revisions = Revision.objects.count()
    outcome = runner.run(job.id, fn)
    job = reload(job)
    assert Revision.objects.count() == revisions  # validate never creates a revision
    if error is None:
        assert outcome == "succeeded", job.error
        from hub.registry import selectors

        files = selectors.revision_files(selectors.revision_resolve(peft_adapter, "main"))
        total = sum(b.size for b in files.values())
        # 2 layers x (q_proj, v_proj)
        assert job.message == (f"OK: {len(files)} files ({total} bytes) match their sha256; "
                               "4 LoRA modules (r=4, F32) fit tiny-base.")
        assert progress == sorted(progress) and len(progress) >= 3
    else:
        assert outcome == "failed"
        assert job.error.startswith(error), job.error
