"""`hubctl webhook ...` against the live server: the secret printed once, the
list, a ping delivered signed to a real receiver, errors as one line."""

from __future__ import annotations

import re

import pytest
import standardwebhooks

pytestmark = pytest.mark.django_db(transaction=True)


def test_webhook_commands(hub, hubctl, user, other_user, token_for, webhook_receiver, broker):
    from hub.registry.models import Webhook, WebhookDelivery
    from workers.webhooks import deliver

    alice, bob = token_for(user), token_for(other_user)
    r = hubctl("webhook", "add", webhook_receiver.url, "--events", "adapter.moved,adapter.move_failed",
               token=alice)
    assert r.code == 0, r.err
    secret = re.search(r"secret: (whsec_\S+)", r.out).group(1)
    hook = Webhook.objects.get()
    assert hook.secret == secret and hook.events == ["adapter.moved", "adapter.move_failed"]

    r = hubctl("webhook", "list", token=alice)
    assert r.code == 0 and webhook_receiver.url in r.out and secret not in r.out
    assert hubctl("webhook", "list", token=bob).err.startswith("No webhooks")

    r = hubctl("webhook", "ping", str(hook.id), token=alice)
    assert r.code == 0, r.err
    deliver(WebhookDelivery.objects.get().id)
    [req] = webhook_receiver.requests
    standardwebhooks.Webhook(secret).verify(req.body, req.headers)
    r = hubctl("webhook", "deliveries", str(hook.id), token=alice)
    assert r.code == 0 and "ping" in r.out and "delivered" in r.out

    r = hubctl("webhook", "rotate", str(hook.id), token=alice)
    new = re.search(r"secret: (whsec_\S+)", r.out).group(1)
    assert new != secret and Webhook.objects.get().secret == new
    assert hubctl("webhook", "disable", str(hook.id), token=alice).out.strip() == f"Webhook {hook.id} disabled."
    assert Webhook.objects.get().active is False

    # refusals: one line, exit 1, nothing changed
    r = hubctl("webhook", "add", "ftp://x.example/", token=alice)
    assert r.code == 1 and "http:// or https://" in r.err and "Traceback" not in r.err
    r = hubctl("webhook", "add", "https://x.example/", "--events", "nope", token=alice)
    assert r.code == 1 and "Unknown event nope" in r.err
    r = hubctl("webhook", "add", "https://x.example/", "--owner", "alice", token=bob)
    assert r.code == 1 and "namespace 'alice'" in r.err
    r = hubctl("webhook", "rm", str(hook.id), token=bob)
    assert r.code == 1 and "does not exist or is not yours" in r.err
    assert Webhook.objects.count() == 1

    assert hubctl("webhook", "rm", str(hook.id), token=alice).code == 0
    assert not Webhook.objects.exists()
