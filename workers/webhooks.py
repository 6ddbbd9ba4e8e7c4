"""Webhook delivery: POST one stored event to its owner's URL, signed, and
retry with growing delays until it is accepted (any 2xx) or the delays run
out. The delivery row is the truth, as for jobs: a worker first takes a lease
on it (pushes `next_attempt_at` forward), so a duplicate message does
nothing, and the reaper re-sends deliveries whose message was lost.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from hub.registry import webhooks
from hub.registry.models import WebhookDelivery
from workers.app import app

log = logging.getLogger(__name__)

USER_AGENT = "adapter-hub-webhooks/1"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could lead to an address the URL check refused; the receiver
    # must answer at the registered URL.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _lease() -> timedelta:
    return timedelta(seconds=float(settings.WEBHOOK_TIMEOUT) * 3 + 60)


def _claim(delivery_id) -> WebhookDelivery | None:
    now = timezone.now()
    n = WebhookDelivery.objects.filter(pk=delivery_id, status="pending", next_attempt_at__lte=now).update(
        next_attempt_at=now + _lease())
    return WebhookDelivery.objects.select_related("webhook").get(pk=delivery_id) if n else None


def post(delivery: WebhookDelivery) -> tuple[int | None, str]:
    """One attempt: (HTTP status or None, error text ('' when accepted))."""
    hook = delivery.webhook
    if not settings.WEBHOOK_ALLOW_PRIVATE and webhooks.is_private_host(urlsplit(hook.url).hostname or ""):
        return None, "private_address: the URL resolves to a private address"
    body = json.dumps({**delivery.payload, "id": str(delivery.id), "timestamp": delivery.created_at.isoformat()},
                      sort_keys=True).encode()
    headers = {**webhooks.signed_headers(hook.secret, str(delivery.id), body), "user-agent": USER_AGENT,
               "x-hub-event": delivery.event}
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=float(settings.WEBHOOK_TIMEOUT)) as response:
            response.read(1024)
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"{type(exc).__name__}: {reason}"[:500]


def deliver(delivery_id) -> str:
    """Try the delivery once; returns "delivered", "retrying", "failed" or "skipped"."""
    close_old_connections()
    delivery = _claim(delivery_id)
    if delivery is None:
        return "skipped"
    attempt = delivery.attempts + 1
    if not delivery.webhook.active:
        code, error = None, "webhook_disabled: the webhook was turned off"
    else:
        code, error = post(delivery)
    now = timezone.now()
    fields = {"attempts": attempt, "response_status": code, "error": error[:500]}
    if code is not None and 200 <= code < 300:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(status="delivered", finished_at=now, **fields)
        return "delivered"
    delays = [float(d) for d in settings.WEBHOOK_RETRY_DELAYS]
    if attempt > len(delays) or not delivery.webhook.active:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(status="failed", finished_at=now, **fields)
        log.warning("webhook delivery %s to %s failed after %d attempts: %s", delivery.pk, delivery.webhook.url,
                    attempt, error)
        return "failed"
    delay = delays[attempt - 1]
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=now + timedelta(seconds=delay), **fields)
    webhooks.send(delivery.pk, countdown=delay)
    return "retrying"


def resend_lost(now=None, grace: float = 120.0) -> int:
    """Re-send pending deliveries whose time came and went without a worker
    taking them (their message was lost). Called by the reaper."""
    now = now or timezone.now()
    due = WebhookDelivery.objects.filter(status="pending", next_attempt_at__lt=now - timedelta(seconds=grace))
    sent = 0
    for pk in due.values_list("pk", flat=True)[:1000]:
        sent += webhooks.send(pk)
    return sent


@app.task(name=webhooks.DELIVER_TASK, ignore_result=True)
def deliver_task(delivery_id: str) -> str:
    return deliver(delivery_id)
