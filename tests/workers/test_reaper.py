"""The reaper in-process, on the real broker database: each case is a job row
state and what one reaper pass must do with it."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from django.utils import timezone

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _knobs(settings, broker):
    settings.JOB_HEARTBEAT_TIMEOUT = 10
    settings.JOB_REQUEUE_AFTER = 30.0


def ago(seconds):
    return timezone.now() - timedelta(seconds=seconds)


# Heartbeat ages in seconds (made datetimes in the test: collection may be long before).


CASES = [
    # (fields, marker, expected status, expected count key, messages sent)
    ({"status": "running", "heartbeat_at": 60, "attempts": 1}, False, "queued", "requeued", 1),
    ({"status": "running", "heartbeat_at": 60, "attempts": 3}, False, "failed", "failed", 0),
    ({"status": "running", "heartbeat_at": 60, "attempts": 1, "cancel_requested": True}, False,
     "cancelled", "cancelled", 0),
    ({"status": "running", "heartbeat_at": 2, "attempts": 1}, False, "running", None, 0),
    ({"status": "queued", "heartbeat_at": 120}, False, "queued", "resent", 1),
    ({"status": "queued", "heartbeat_at": 120}, True, "queued", None, 0),  # its message is still there
    ({"status": "queued", "heartbeat_at": 5}, False, "queued", None, 0),  # sent a moment ago
    ({"status": "queued", "heartbeat_at": 120, "op": "no-such-op"}, False, "failed", "failed", 0),
    ({"status": "succeeded", "heartbeat_at": 600, "attempts": 1}, False, "succeeded", None, 0),
]


@pytest.mark.parametrize("fields,marker,status,counted,sent", CASES)
def test_reap(user, broker, fields, marker, status, counted, sent):
    from hub.registry import jobs
    from hub.registry.models import Job
    from workers.reaper import reap

    fields = {"op": "sleep", "params": {"seconds": 0.1, "steps": 1}, "max_attempts": 3, **fields}
    fields["heartbeat_at"] = ago(fields["heartbeat_at"])
    if fields["status"] == "running":
        fields["worker"] = "gone/1/x"
    job = Job.objects.create(owner=user, **fields)
    if marker:
        broker.set(jobs.marker_key(job.id), "1")
    counts = reap()
    job.refresh_from_db()
    assert job.status == status
    assert counts == {k: int(k == counted) for k in ("requeued", "failed", "cancelled", "resent", "webhooks_resent")}
    queued_msgs = [json.loads(m) for m in broker.lrange("cpu", 0, -1)]
    assert len(queued_msgs) == sent
    if sent:
        assert queued_msgs[0]["headers"]["task"] == "ops.sleep"
        assert json.loads(base64.b64decode(queued_msgs[0]["body"]))[0] == [str(job.id)]  # the id, nothing else
        assert jobs.message_pending(job.id)
        assert job.heartbeat_at > ago(5)  # the re-send time, so the next pass waits again
    if counted == "failed" and fields["op"] == "sleep":
        assert job.error == "worker_lost: the worker running this job was lost 3 times (no heartbeat for 10 s); giving up."
        assert job.message == "Failed: worker lost 3 times."
    if counted == "requeued":
        assert (job.worker, job.attempts) == ("", 1)
    assert reap() == {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0, "webhooks_resent": 0}  # a second pass: nothing to do


def test_enqueue_survives_a_dead_broker(user, settings):
    """The API must answer even with Redis down: the job stays queued for the reaper."""
    from hub.registry import jobs
    from hub.registry.models import Job
    from tests.live_workers import free_port, point_app_at
    from workers.app import app

    good = app.conf.broker_url
    point_app_at(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        job = Job.objects.create(owner=user, op="sleep", params={"seconds": 0.1, "steps": 1})
        assert jobs.enqueue(job) is False
    finally:
        point_app_at(good)
    assert Job.objects.get(pk=job.pk).status == "queued"
