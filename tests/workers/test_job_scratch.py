"""A killed attempt's leftovers and its redelivered message: the next attempt
and the reaper remove its scratch directory, and the message the broker
gives back takes the job over without waiting for the reaper."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.utils import timezone

from tests.workers.test_runner import done_fn, make_job, reload

pytestmark = [pytest.mark.django_db(transaction=True)]

TIMEOUT = 5


@pytest.fixture(autouse=True)
def _knobs(settings, broker, tmp_path):
    settings.JOB_HEARTBEAT_TIMEOUT = TIMEOUT
    settings.JOB_PROGRESS_INTERVAL = 0
    settings.JOB_WORK_DIR = str(tmp_path)


def leftover(job, attempt, size=1 << 20):
    """What a SIGKILLed attempt leaves: its scratch directory with a big file."""
    from django.conf import settings

    d = Path(settings.JOB_WORK_DIR) / f"job-{job.id}-{attempt}"
    (d / "merged").mkdir(parents=True)
    (d / "merged" / "adapter_model.safetensors").write_bytes(b"\0" * size)
    return d


def test_the_next_attempt_removes_a_killed_attempts_scratch(user, tmp_path):
    from workers import runner

    job = make_job(user, status="running", attempts=1, worker="gone/1/x",
                   heartbeat_at=timezone.now() - timedelta(seconds=60))
    old = leftover(job, 1)
    seen = {}

    def fn(ctx):
        seen["workdir"], seen["old_there"] = ctx.workdir, old.exists()
        return done_fn(ctx)

    assert runner.run(job.id, fn) == "succeeded"
    assert seen == {"workdir": tmp_path / f"job-{job.id}-2", "old_there": False}
    assert list(tmp_path.iterdir()) == []


def test_the_reaper_removes_scratch_of_finished_jobs_and_lost_attempts(user, tmp_path):
    from workers.reaper import reap_task

    finished = make_job(user, status="failed", attempts=1)
    running = make_job(user, status="running", attempts=2, worker="w/1/x", heartbeat_at=timezone.now())
    gone = [leftover(finished, 1), leftover(running, 1)]
    kept = [leftover(running, 2)]  # the live attempt's
    stranger = tmp_path / "job-00000000-0000-4000-8000-000000000000-1"  # not this database's job
    stranger.mkdir()
    counts = reap_task()
    assert counts["scratch_removed"] == 2
    assert [d.exists() for d in gone] == [False, False]
    assert all(d.exists() for d in kept) and stranger.exists()


# --- the redelivered message --------------------------------------------------------------------


class Retried(Exception):
    pass


class FakeTask:
    """The bits of a bound Celery task the runner reads: the delivery flags
    and retry(), which here records the countdown instead of sending."""

    def __init__(self, redelivered: bool, hostname="w1@node"):
        self.request = SimpleNamespace(hostname=hostname, delivery_info={"redelivered": redelivered}, retries=0)
        self.countdowns = []

    def retry(self, countdown=None, **kwargs):
        self.countdowns.append(countdown)
        return Retried()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def running_job(user, worker, age=0.0):
    return make_job(user, status="running", attempts=1, worker=worker,
                    heartbeat_at=timezone.now() - timedelta(seconds=age))


def test_a_redelivered_message_takes_over_from_a_dead_process_at_once(user):
    """The pool child running the job was killed; the broker gave its message
    back at once to this node, while the heartbeat is still fresh."""
    from workers import runner

    job = running_job(user, f"w1@node/{dead_pid()}/abcd")
    task = FakeTask(redelivered=True)
    assert runner.run(job.id, done_fn, task=task) == "succeeded"
    job = reload(job)
    assert (job.status, job.attempts, task.countdowns) == ("succeeded", 2, [])
    assert job.worker.startswith("w1@node/")


@pytest.mark.parametrize("worker", ["w2@other-node/4242/abcd", "w1@node/{own_pid}/abcd"])
def test_a_redelivered_message_comes_back_when_the_heartbeat_goes_stale(user, worker):
    """Its worker may be alive (another node, or a live process here): the
    message is sent again for when the heartbeat will be stale, not dropped."""
    import os

    from workers import runner

    job = running_job(user, worker.format(own_pid=os.getpid()), age=1.0)
    task = FakeTask(redelivered=True)
    with pytest.raises(Retried):
        runner.run(job.id, done_fn, task=task)
    [countdown] = task.countdowns
    assert TIMEOUT - 1.0 - 0.5 < countdown <= TIMEOUT - 1.0 + runner.heartbeat_interval()
    assert reload(job).attempts == 1

    # The message sent again is a plain delivery: once the heartbeat is stale it claims the job ...
    job.heartbeat_at = timezone.now() - timedelta(seconds=TIMEOUT + 1)
    job.save(update_fields=["heartbeat_at"])
    again = FakeTask(redelivered=False)
    assert runner.run(job.id, done_fn, task=again) == "succeeded" and again.countdowns == []


def test_a_duplicate_message_for_a_live_job_is_dropped_not_deferred(user):
    """Only a redelivery (its worker died) is looked at again: a plain
    duplicate for a job whose heartbeat is fresh does nothing."""
    from workers import runner

    job = running_job(user, "w2@other-node/4242/abcd")
    task = FakeTask(redelivered=False)
    assert runner.run(job.id, done_fn, task=task) == "skipped"
    assert task.countdowns == [] and reload(job).attempts == 1
