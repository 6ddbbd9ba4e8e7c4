"""The job engine end to end: real `celery worker` and `celery beat`
subprocesses on real Redis and the test database (SQLite by default,
PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import collections
import time

import pytest

from tests.live_workers import RedisServer, point_app_at, wait_jobs, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


def submit(user, op, **params):
    from hub.registry import jobs

    return jobs.job_create(user=user, op=op, params=params)


def job(pk):
    from hub.registry.models import Job

    return Job.objects.select_related("result_revision").get(pk=pk)


def test_sigkill_mid_job_is_rerun_elsewhere_with_one_result(celery_procs, user, peft_adapter, orphans):
    from hub.registry.models import Revision

    first = celery_procs.worker("doomed")
    j = submit(user, "touch", adapter="alice/lora", seconds=2.0, steps=20)
    wait_until(lambda: job(j.id).status == "running" and job(j.id).progress >= 0.15, what="the job to run")
    assert job(j.id).worker.startswith("doomed@")
    first.killpg()  # worker and its pool child die at once, mid-job, message unacknowledged
    assert job(j.id).status == "running"
    celery_procs.worker("rescuer")
    celery_procs.beat()

    done = wait_jobs([j.id], timeout=40)[str(j.id)]
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    assert done.worker.startswith("rescuer@")
    results = list(Revision.objects.filter(job_id=j.id))
    assert len(results) == 1 and done.result_revision_id == results[0].id
    assert results[0].kind == "merge" and results[0].adapter.repo_id == "alice/lora"
    assert [p.kind for p in results[0].parents.all()] == ["upload"]
    assert orphans() == {"unreferenced_rows": set(), "files_without_row": set()}
    # The killed worker's message, when Redis hands it out again, finds the job finished.
    from hub.registry import jobs
    from workers.app import app

    app.send_task("ops.touch", [str(j.id)], queue="gpu")
    jobs.enqueue(done)
    time.sleep(1.0)
    assert Revision.objects.filter(job_id=j.id).count() == 1
    assert job(j.id).attempts == 2


def test_redis_restart_loses_no_queued_job(celery_procs, user, tmp_path, redis_url):
    import redis

    server = RedisServer(tmp_path).start()
    point_app_at(server.url)
    try:
        queued = [submit(user, "sleep", seconds=0.1, steps=2) for _ in range(6)]
        assert redis.Redis.from_url(server.url).llen("cpu") == 6  # no worker yet: all wait in Redis
        server.kill()
        server.start()  # same port, no persistence: every queued message is gone
        assert redis.Redis.from_url(server.url).llen("cpu") == 0

        env = {"REDIS_URL": server.url, "CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url}
        celery_procs.worker("w1", env=env)
        celery_procs.beat(env=env)
        rows = wait_jobs([j.id for j in queued], timeout=40)
        assert {r.status for r in rows.values()} == {"succeeded"}, {k: r.error for k, r in rows.items()}
        assert all(r.attempts == 1 for r in rows.values())  # re-sent by the reaper, run once
    finally:
        point_app_at(redis_url)
        server.kill()


def test_fifty_jobs_progress_monotone_no_duplicates(celery_procs, user, peft_adapter):
    from hub.registry.models import Revision

    celery_procs.worker("w1", concurrency=2)
    t0 = time.monotonic()
    submitted = [submit(user, "touch", adapter="alice/lora", seconds=0.2, steps=4) for _ in range(50)]
    samples: dict[str, list[float]] = collections.defaultdict(list)

    def record(rows):
        for pk, r in rows.items():
            if not samples[pk] or samples[pk][-1] != r.progress:
                samples[pk].append(r.progress)

    rows = wait_jobs([j.id for j in submitted], timeout=90, on_poll=record)
    elapsed = time.monotonic() - t0
    assert {r.status for r in rows.values()} == {"succeeded"}, {k: r.error for k, r in rows.items() if r.error}
    for pk, seq in samples.items():
        assert seq == sorted(seq), f"progress of {pk} went backwards: {seq}"
        assert seq[-1] == 1.0
    seen_progress = sum(1 for seq in samples.values() if any(0 < p < 1 for p in seq))
    assert seen_progress > 0  # intermediate progress reached the row
    revs = list(Revision.objects.filter(kind="merge").values_list("job_id", flat=True))
    assert sorted(map(str, revs)) == sorted(rows)  # exactly one result revision per job
    assert all(r.result_revision.job_id == r.pk for r in rows.values())
    assert all(r.attempts == 1 for r in rows.values())
    print(f"\n50 touch jobs on 1 worker x 2 processes: {elapsed:.1f} s")


def test_failing_ops_record_their_error(celery_procs, user, peft_adapter):
    from hub.registry.models import Revision

    celery_procs.worker("w1")
    user_err = submit(user, "fail", kind="user", adapter="alice/lora")
    transient = submit(user, "fail", kind="transient")
    bug = submit(user, "fail", kind="bug")
    rows = wait_jobs([user_err.id, transient.id, bug.id], timeout=40)

    u = rows[str(user_err.id)]
    assert (u.status, u.error, u.attempts) == ("failed", "test_failure: The test op failed on purpose.", 1)
    assert u.message == "Failed: test_failure: The test op failed on purpose."
    t = rows[str(transient.id)]
    assert t.status == "failed" and t.attempts == 3  # retried with backoff, then given up
    assert t.error.startswith("transient_error: gave up after 3 attempts: OperationalError:")
    b = rows[str(bug.id)]
    assert (b.status, b.attempts) == ("failed", 1)  # a bug is not retried
    assert b.error.startswith("internal_error: KeyError") and "Traceback" not in b.error
    assert Revision.objects.filter(job__isnull=False).count() == 0
    assert Revision.objects.count() == 1  # only the upload


def test_cancel_queued_and_running(celery_procs, user, client_for):
    api = client_for(user)
    celery_procs.worker("w1")  # one process: the second job waits in the queue
    running = submit(user, "sleep", seconds=20, steps=200)
    queued = submit(user, "sleep", seconds=0.1, steps=1)
    wait_until(lambda: job(running.id).status == "running", what="the first job to start")

    r = api.post(f"/api/v1/jobs/{queued.id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # at once
    r = api.post(f"/api/v1/jobs/{running.id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True

    rows = wait_jobs([running.id], timeout=10)
    assert rows[str(running.id)].status == "cancelled" and rows[str(running.id)].progress < 1.0
    time.sleep(0.5)  # the worker now takes the cancelled job's message: it must do nothing
    q = job(queued.id)
    assert (q.status, q.attempts, q.started_at) == ("cancelled", 0, None)
    assert api.post(f"/api/v1/jobs/{running.id}/cancel").json()["status"] == "cancelled"  # idempotent
