"""Owner webhooks: the REST routes, the events a finished job raises, and
signed delivery to a real HTTP receiver, checked with the Standard Webhooks
library a receiver would use."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
import standardwebhooks
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def other_api(client_for, other_user):
    return client_for(other_user)


def _hook(api, url, **extra):
    r = api.post("/api/v1/webhooks/", {"url": url, **extra}, format="json")
    assert r.status_code == 201, r.json()
    return r.json()


# --- signing ---------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_example():
    from hub.registry.webhooks import sign

    # The example of the Standard Webhooks specification.
    got = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
               b'{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_rejects_tampering_other_secrets_and_replays():
    from hub.registry.webhooks import new_secret, signed_headers, verify

    secret, body = new_secret(), b'{"type": "ping"}'
    headers = signed_headers(secret, "d1", body)
    assert verify(secret, headers, body)
    standardwebhooks.Webhook(secret).verify(body, headers)  # the receiver's library agrees
    assert not verify(secret, headers, body + b" ")
    assert not verify(new_secret(), headers, body)
    assert not verify(secret, {**headers, "webhook-id": "d2"}, body)
    old = signed_headers(secret, "d1", body, timestamp=int(time.time()) - 3600)
    assert not verify(secret, old, body)
    assert not verify(secret, {k: v for k, v in headers.items() if k != "webhook-signature"}, body)
    for odd in ("¹", "٣٣", "1e3", " 12"):  # not ASCII digits: refused, never a crash in int()
        assert not verify(secret, {**headers, "webhook-timestamp": odd}, body)


# --- routes ----------------------------------------------------------------------------------


def test_create_list_show_update_delete(api, user):
    from hub.registry.models import Webhook

    created = _hook(api, "https://example.com/hook", events=["adapter.moved"], description="ci")
    assert created["owner"] == user.username and created["events"] == ["adapter.moved"]
    assert created["secret"].startswith("whsec_") and created["active"] is True
    pk = created["id"]
    listed = api.get("/api/v1/webhooks/").json()["results"]
    assert [h["id"] for h in listed] == [pk] and "secret" not in listed[0]
    shown = api.get(f"/api/v1/webhooks/{pk}/").json()
    assert "secret" not in shown and shown["url"] == "https://example.com/hook"

    r = api.patch(f"/api/v1/webhooks/{pk}/", {"active": False, "events": ["job.finished", "adapter.moved"]},
                  format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["active"] is False and r.json()["events"] == ["adapter.moved", "job.finished"]

    rotated = api.post(f"/api/v1/webhooks/{pk}/rotate-secret").json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert Webhook.objects.get(pk=pk).secret == rotated["secret"]

    assert api.delete(f"/api/v1/webhooks/{pk}/").status_code == 204
    assert not Webhook.objects.exists()
    assert api.get(f"/api/v1/webhooks/{pk}/").status_code == 404


def test_default_events_are_all_of_them(api):
    from hub.registry.models import Webhook

    assert _hook(api, "https://example.com/h")["events"] == Webhook.EVENTS


BAD = [
    ({"url": "ftp://example.com/x"}, "invalid_url"),
    ({"url": "example.com/x"}, "invalid_url"),
    ({"url": "https://user:pw@example.com/x"}, "invalid_url"),
    ({"url": "https:///nohost"}, "invalid_url"),
    ({"url": "https://example.com/x", "events": ["adapter.exploded"]}, "invalid_events"),
    ({"url": "https://example.com/x", "events": []}, "invalid_events"),
    ({"url": "https://example.com/x", "events": "adapter.moved"}, "invalid"),
    ({}, "invalid"),
]


@pytest.mark.parametrize("body,code", BAD)
def test_bad_input_is_refused_and_nothing_stored(api, body, code):
    from hub.registry.models import Webhook

    r = api.post("/api/v1/webhooks/", body, format="json")
    assert r.status_code == 400 and r.json()["error"] == code, r.json()
    assert not Webhook.objects.exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/x",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/x"])
def test_private_addresses_are_refused_unless_allowed(api, settings, url):
    from hub.registry.models import Webhook

    settings.WEBHOOK_ALLOW_PRIVATE = False
    r = api.post("/api/v1/webhooks/", {"url": url}, format="json")
    assert r.status_code == 400 and r.json()["error"] == "private_address", r.json()
    assert not Webhook.objects.exists()
    settings.WEBHOOK_ALLOW_PRIVATE = True
    assert api.post("/api/v1/webhooks/", {"url": url}, format="json").status_code == 201


def test_other_users_cannot_see_or_touch_a_webhook(api, other_api, client_for):
    from hub.registry.models import Webhook

    pk = _hook(api, "https://example.com/h")["id"]
    for method, path in [("get", f"/api/v1/webhooks/{pk}/"), ("patch", f"/api/v1/webhooks/{pk}/"),
                         ("delete", f"/api/v1/webhooks/{pk}/"), ("post", f"/api/v1/webhooks/{pk}/ping"),
                         ("post", f"/api/v1/webhooks/{pk}/rotate-secret"),
                         ("get", f"/api/v1/webhooks/{pk}/deliveries")]:
        r = getattr(other_api, method)(path, {}, format="json")
        assert r.status_code == 404 and r.json()["error"] == "webhook_not_found", (method, path)
    assert other_api.get("/api/v1/webhooks/").json()["results"] == []
    r = other_api.post("/api/v1/webhooks/", {"url": "https://evil.example/h", "owner": "alice"}, format="json")
    assert r.status_code == 403
    assert client_for(None).get("/api/v1/webhooks/").status_code == 401
    assert Webhook.objects.count() == 1 and Webhook.objects.get().url == "https://example.com/h"


def test_an_org_writer_subscribes_for_the_org(api, other_api, user):
    from hub.registry.services import org_create

    org_create(name="acme", user=user)
    hook = _hook(api, "https://example.com/acme", owner="acme")
    assert hook["owner"] == "acme"
    assert other_api.post("/api/v1/webhooks/", {"url": "https://x.example/", "owner": "acme"},
                          format="json").status_code == 403


# --- events and delivery ---------------------------------------------------------------------


@pytest.fixture
def moved_setup(user, staff_user, tiny_base, peft_adapter, tmp_path):
    """alice/lora on a deprecated tiny-base whose successor is tiny-base-next."""
    from hub.registry.services import base_model_deprecate
    from tests.model_fixtures import TINY_CONFIG
    from tests.workers.test_ops_transfer import _register

    successor = _register(staff_user, "tiny-base-next", TINY_CONFIG, tmp_path, seed=9)
    base_model_deprecate(base=tiny_base, successor=successor, at=timezone.now() - dt.timedelta(minutes=1))
    return peft_adapter, successor


def _finished_job(user, adapter, op="transfer", status="failed", **params):
    from hub.registry.models import Job

    return Job.objects.create(owner=user, op=op, adapter=adapter, status=status, finished_at=timezone.now(),
                              params={"adapter": adapter.repo_id, **params}, error="quality_gate: too far",
                              message="Failed: quality_gate: too far")


def test_a_failed_move_is_delivered_signed_to_the_owner_only(api, other_api, broker, moved_setup, user,
                                                              webhook_receiver):
    from hub.registry import webhooks
    from hub.registry.models import WebhookDelivery
    from workers.webhooks import deliver

    adapter, successor = moved_setup
    hook = _hook(api, webhook_receiver.url)
    moves_only = _hook(api, webhook_receiver.url + "?moves", events=["adapter.move_failed"])
    _hook(other_api, "https://example.com/someone-else")  # another owner's: never called
    job = _finished_job(user, adapter, target=successor.slug, method="auto")

    assert webhooks.job_finished(job.id) == 3  # job.finished + move_failed for hook, move_failed for moves_only
    assert webhooks.job_finished(job.id) == 0  # announced once
    rows = WebhookDelivery.objects.order_by("webhook_id", "event")
    assert [(d.webhook_id, d.event) for d in rows] == [
        (hook["id"], "adapter.move_failed"), (hook["id"], "job.finished"), (moves_only["id"], "adapter.move_failed")]
    sent = [json.loads(m)["headers"]["task"] for m in broker.lrange("cpu", 0, -1)]
    assert sent == ["workers.webhooks.deliver"] * 3  # one message per delivery, after the commit

    for d in rows:
        assert deliver(d.id) == "delivered"
    assert deliver(rows[0].id) == "skipped"  # a duplicate message
    assert len(webhook_receiver.requests) == 3
    by_hook = {}
    for req in webhook_receiver.requests:
        secret = hook["secret"] if req.path == "/hook" else moves_only["secret"]
        standardwebhooks.Webhook(secret).verify(req.body, req.headers)  # raises if the signature is wrong
        by_hook.setdefault(req.path, []).append(req.json)
    assert sorted(p["type"] for p in by_hook["/hook"]) == ["adapter.move_failed", "job.finished"]
    [failed] = by_hook["/hook?moves"]
    assert failed["type"] == "adapter.move_failed"
    data = failed["data"]
    assert data["adapter"] == "alice/lora" and data["from_base"] == "tiny-base" and data["to_base"] == "tiny-base-next"
    assert data["retransfer"] is True and data["job"]["status"] == "failed"
    assert data["job"]["error"] == "quality_gate: too far" and data["revision"] is None
    assert {d.status for d in WebhookDelivery.objects.all()} == {"delivered"}

    r = api.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["results"]
    assert {d["event"] for d in r} == {"adapter.move_failed", "job.finished"}
    assert all(d["status"] == "delivered" and d["response_status"] == 204 and d["attempts"] == 1 for d in r)


def test_a_refused_delivery_is_retried_then_marked_failed(api, broker, settings, moved_setup, user, webhook_receiver):
    from hub.registry import webhooks
    from hub.registry.models import WebhookDelivery
    from workers.webhooks import deliver

    settings.WEBHOOK_RETRY_DELAYS = [0, 0]  # three attempts in all
    webhook_receiver.replies = [500, 503, 410]
    hook = _hook(api, webhook_receiver.url, events=["job.finished"])
    adapter, _ = moved_setup
    webhooks.job_finished(_finished_job(user, adapter, op="validate", status="succeeded").id)
    d = WebhookDelivery.objects.get()
    assert [deliver(d.id) for _ in range(3)] == ["retrying", "retrying", "failed"]
    d.refresh_from_db()
    assert (d.status, d.attempts, d.response_status) == ("failed", 3, 410)
    assert "HTTP 410" in d.error
    ids = {r.headers["webhook-id"] for r in webhook_receiver.requests}
    assert ids == {str(d.id)} and len(webhook_receiver.requests) == 3  # one id across retries
    # after each retryable failure a message was sent again, with the delay
    assert len(broker.lrange("cpu", 0, -1)) == 1 + 2
    assert deliver(d.id) == "skipped"
    assert api.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["results"][0]["status"] == "failed"


def test_an_unreachable_receiver_is_retried(api, broker, settings, moved_setup, user):
    from hub.registry import webhooks
    from hub.registry.models import WebhookDelivery
    from workers.webhooks import deliver

    settings.WEBHOOK_TIMEOUT = 2
    _hook(api, "http://127.0.0.1:9/closed", events=["job.finished"])  # nothing listens on port 9
    adapter, _ = moved_setup
    webhooks.job_finished(_finished_job(user, adapter, op="validate").id)
    d = WebhookDelivery.objects.get()
    assert deliver(d.id) == "retrying"
    d.refresh_from_db()
    assert d.status == "pending" and d.response_status is None and "refused" in d.error.lower()
    assert d.next_attempt_at > timezone.now()


def test_private_address_checked_again_at_delivery(api, broker, settings, moved_setup, user, webhook_receiver):
    from hub.registry import webhooks
    from hub.registry.models import WebhookDelivery
    from workers.webhooks import deliver

    _hook(api, webhook_receiver.url, events=["job.finished"])  # allowed when created
    settings.WEBHOOK_ALLOW_PRIVATE = False
    adapter, _ = moved_setup
    webhooks.job_finished(_finished_job(user, adapter, op="validate").id)
    d = WebhookDelivery.objects.get()
    assert deliver(d.id) == "retrying"
    d.refresh_from_db()
    assert d.error.startswith("private_address") and webhook_receiver.requests == []


def test_event_filters_and_inactive_webhooks(api, broker, moved_setup, user):
    from hub.registry import webhooks
    from hub.registry.models import WebhookDelivery

    adapter, successor = moved_setup
    _hook(api, "https://example.com/moves", events=["adapter.moved"])
    off = _hook(api, "https://example.com/off")
    api.patch(f"/api/v1/webhooks/{off['id']}/", {"active": False}, format="json")
    assert webhooks.job_finished(_finished_job(user, adapter, op="validate").id) == 0  # not a move
    assert webhooks.job_finished(_finished_job(user, adapter, target=successor.slug).id) == 0  # failed, not moved
    assert not WebhookDelivery.objects.exists()


def test_ping(api, broker, webhook_receiver):
    from hub.registry.models import WebhookDelivery
    from workers.webhooks import deliver

    hook = _hook(api, webhook_receiver.url, events=["adapter.moved"])
    r = api.post(f"/api/v1/webhooks/{hook['id']}/ping")
    assert r.status_code == 202 and r.json()["event"] == "ping" and r.json()["status"] == "pending"
    assert deliver(r.json()["id"]) == "delivered"
    [req] = webhook_receiver.requests
    standardwebhooks.Webhook(hook["secret"]).verify(req.body, req.headers)
    assert req.json["type"] == "ping" and req.json["id"] == r.json()["id"] and req.headers["x-hub-event"] == "ping"
    assert WebhookDelivery.objects.get().status == "delivered"


def test_cancelling_a_queued_job_raises_job_finished(api, broker, moved_setup, user):
    from hub.registry.models import WebhookDelivery

    _hook(api, "https://example.com/h", events=["job.finished"])
    r = api.post("/api/v1/jobs/", {"op": "validate", "params": {"adapter": "alice/lora"}}, format="json")
    assert r.status_code == 201
    assert api.post(f"/api/v1/jobs/{r.json()['id']}/cancel").json()["status"] == "cancelled"
    d = WebhookDelivery.objects.get()
    assert d.event == "job.finished" and d.payload["data"]["job"]["status"] == "cancelled"


def test_the_reaper_resends_a_delivery_whose_message_was_lost(api, broker, moved_setup, user):
    from hub.registry import webhooks
    from hub.registry.models import WebhookDelivery
    from workers.reaper import reap

    _hook(api, "https://example.com/h", events=["job.finished"])
    adapter, _ = moved_setup
    webhooks.job_finished(_finished_job(user, adapter, op="validate").id)
    broker.delete("cpu")  # the message is lost
    assert reap()["webhooks_resent"] == 0  # not overdue yet
    WebhookDelivery.objects.update(next_attempt_at=timezone.now() - dt.timedelta(minutes=10))
    assert reap()["webhooks_resent"] == 1
    [msg] = [json.loads(m) for m in broker.lrange("cpu", 0, -1)]
    assert msg["headers"]["task"] == "workers.webhooks.deliver"
