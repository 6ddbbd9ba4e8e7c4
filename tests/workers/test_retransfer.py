"""Scheduled retransfer: deprecating a base with a date in the past moves its
adapters to the successor by the beat sweep alone; sweeping again adds nothing."""

import datetime as dt

import pytest
from django.utils import timezone

from tests.live_workers import wait_until
from tests.model_fixtures import TINY_CONFIG
from tests.workers.test_ops_transfer import _register

pytestmark = pytest.mark.django_db(transaction=True)


def test_beat_moves_every_adapter_of_a_deprecated_base_once(celery_procs, user, staff_user, tiny_base, peft_adapter,
                                                            make_peft_adapter, tmp_path, client_for, webhook_receiver):
    import standardwebhooks

    from hub.registry.models import Adapter, Job
    from hub.registry.services import base_model_deprecate
    from hub.registry.webhooks import webhook_create
    from tests.workers.test_ops_tensor import _upload
    from workers.retransfer import sweep

    _upload(user, tiny_base, make_peft_adapter("second", r=2, seed=3), "second")
    successor = _register(staff_user, "tiny-base-next", TINY_CONFIG, tmp_path, seed=9)
    # a future date: nothing moves yet
    base_model_deprecate(base=tiny_base, successor=successor, at=timezone.now() + dt.timedelta(days=3))
    assert sweep() == {}
    base_model_deprecate(base=tiny_base, successor=successor, at=timezone.now() - dt.timedelta(minutes=1))

    hook = webhook_create(user=user, owner=user.username, url=webhook_receiver.url, events=["adapter.moved"])

    celery_procs.worker()
    celery_procs.beat(env={"RETRANSFER_INTERVAL": "1"})
    wait_until(lambda: Adapter.objects.filter(base_model=successor).count() == 2, timeout=120,
               what="both adapters on the successor")
    moved = sorted(Adapter.objects.filter(base_model=successor).values_list("name", flat=True))
    assert moved == ["lora-tiny-base-next", "second-tiny-base-next"]
    jobs = Job.objects.filter(op="transfer")
    assert jobs.count() == 2 and set(jobs.values_list("status", flat=True)) == {"succeeded"}
    # later sweeps (beat keeps running) add nothing
    counts = sweep()
    assert counts["tiny-base"] == {"enqueued": 0, "skipped": 2, "waiting": 0, "rejected": 0}
    assert Job.objects.filter(op="transfer").count() == 2
    # the plan, as the owner sees it over REST
    plan = client_for(user).get("/api/v1/base-models/tiny-base/").json()["retransfer"]
    assert {r["adapter"]: r["state"] for r in plan} == {"alice/lora": "transferred", "alice/second": "transferred"}
    assert all(r["method"] == "diff" for r in plan)
    # the owner was told, once per adapter, by a signed webhook
    wait_until(lambda: len(webhook_receiver.requests) >= 2, timeout=60, what="two adapter.moved webhooks")
    for req in webhook_receiver.requests:
        standardwebhooks.Webhook(hook.secret).verify(req.body, req.headers)
    told = sorted((r.json["data"]["adapter"], r.json["data"]["revision"]["adapter"]) for r in webhook_receiver.requests)
    assert told == [("alice/lora", "alice/lora-tiny-base-next"), ("alice/second", "alice/second-tiny-base-next")]
    assert all(r.json["type"] == "adapter.moved" and r.json["data"]["retransfer"] for r in webhook_receiver.requests)


def test_sweep_respects_the_concurrency_limit(db, user, staff_user, tiny_base, peft_adapter, make_peft_adapter,
                                              tmp_path, monkeypatch, settings):
    from hub.registry.models import Job
    from hub.registry.services import base_model_deprecate
    from tests.workers.test_ops_tensor import _upload
    from workers import retransfer

    monkeypatch.setenv("RETRANSFER_MAX_ACTIVE", "1")
    monkeypatch.setattr("hub.registry.jobs.enqueue_on_commit", lambda job, countdown=None: None)  # no broker here
    _upload(user, tiny_base, make_peft_adapter("third", r=2, seed=4), "third")
    successor = _register(staff_user, "tiny-base-n2", TINY_CONFIG, tmp_path, seed=9)
    base_model_deprecate(base=tiny_base, successor=successor, at=timezone.now() - dt.timedelta(seconds=1))
    assert retransfer.sweep()["tiny-base"] == {"enqueued": 1, "skipped": 0, "waiting": 1, "rejected": 0}
    assert retransfer.sweep()["tiny-base"] == {"enqueued": 0, "skipped": 1, "waiting": 1, "rejected": 0}
    Job.objects.filter(op="transfer").update(status="succeeded")
    assert retransfer.sweep()["tiny-base"] == {"enqueued": 1, "skipped": 1, "waiting": 0, "rejected": 0}
    assert Job.objects.filter(op="transfer").count() == 2
