"""Owner webhooks: subscriptions, the events a finished job raises, and the
signature of a delivery.

Signing follows the Standard Webhooks scheme (standardwebhooks.com), so a
receiver can verify with any of its libraries: headers `webhook-id` (the
delivery id, the same on every retry), `webhook-timestamp` (Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`,
where key is the base64-decoded part of the secret after `whsec_`.

The HTTP POST itself runs on a worker (workers/webhooks.py): this module only
writes the delivery rows and sends their Celery messages by name, so the web
process can raise events too (a cancelled job) without importing the worker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from .models import Job, Webhook, WebhookDelivery
from .services import check_can_write
from .validation import ValidationError, ascii_digits

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
DELIVER_TASK = "workers.webhooks.deliver"
# Ops that put a copy of an adapter on another base model.
MOVE_OPS = ("transfer", "translora")


# --- signing ---------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


def verify(secret: str, headers, body: bytes, tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent
    (a replayed old message fails). `headers` is any case-insensitive mapping."""
    get = {k.lower(): v for k, v in dict(headers).items()}.get
    msg_id, ts = get("webhook-id"), get("webhook-timestamp")
    if not msg_id or not ts or not ascii_digits(ts):
        return False
    if abs((time.time() if now is None else now) - int(ts)) > tolerance:
        return False
    expected = sign(secret, msg_id, int(ts), body).split(",", 1)[1]
    # Several space-separated signatures may be sent while a secret rotates.
    return any(hmac.compare_digest(sig.split(",", 1)[-1], expected) for sig in (get("webhook-signature") or "").split())


# --- subscriptions ---------------------------------------------------------------------------


def is_private_host(host: str) -> bool:
    """Whether the host is or resolves to a loopback, private, link-local or reserved address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # unresolvable now: the delivery checks again
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return True
    return False


def check_url(url: str) -> str:
    """A webhook URL: http(s), a host, no credentials; private addresses only
    where WEBHOOK_ALLOW_PRIVATE is on (the server would otherwise probe its own network)."""
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("invalid_url", "The webhook URL must be an http:// or https:// URL with a host.",
                              field="url")
    if parts.username or parts.password:
        raise ValidationError("invalid_url", "Put no credentials in the webhook URL; verify the signature instead.",
                              field="url")
    if len(url) > 500:
        raise ValidationError("invalid_url", "The webhook URL is longer than 500 characters.", field="url")
    if not settings.WEBHOOK_ALLOW_PRIVATE and is_private_host(parts.hostname):
        raise ValidationError("private_address", f"{parts.hostname} is a private or loopback address; this hub "
                              "does not send webhooks there (WEBHOOK_ALLOW_PRIVATE).", field="url")
    return url


def check_events(events) -> list[str]:
    if events is None:
        return list(Webhook.EVENTS)
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise ValidationError("invalid_events", "events must be a non-empty list of event names.", field="events")
    unknown = sorted(set(events) - set(Webhook.EVENTS))
    if unknown:
        raise ValidationError("invalid_events", f"Unknown event {', '.join(unknown)}; known: "
                              f"{', '.join(Webhook.EVENTS)}.", field="events")
    return sorted(set(events), key=Webhook.EVENTS.index)


def webhooks_visible_to(user):
    """Webhooks of the namespaces the user may write (all of them for superusers)."""
    from .querysets import owner_names

    qs = Webhook.objects.all()
    return qs if user.is_superuser else qs.filter(owner__in=owner_names(user))


def webhook_create(*, user, owner: str, url: str, events=None, description: str = "") -> Webhook:
    check_can_write(user, owner)
    return Webhook.objects.create(owner=owner, url=check_url(url), events=check_events(events),
                                  description=(description or "")[:200], secret=new_secret(), created_by=user)


def webhook_update(*, webhook: Webhook, url=None, events=None, active=None, description=None) -> Webhook:
    if url is not None:
        webhook.url = check_url(url)
    if events is not None:
        webhook.events = check_events(events)
    if active is not None:
        webhook.active = bool(active)
    if description is not None:
        webhook.description = description[:200]
    webhook.save()
    return webhook


def webhook_rotate_secret(*, webhook: Webhook) -> Webhook:
    webhook.secret = new_secret()
    webhook.save(update_fields=["secret"])
    return webhook


# --- events ----------------------------------------------------------------------------------


def _job_data(job: Job) -> dict:
    rev = job.result_revision
    return {
        "job": {
            "id": str(job.id), "op": job.op, "status": job.status, "message": job.message,
            "error": job.error, "params": job.params, "attempts": job.attempts,
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "url": f"/api/v1/jobs/{job.id}/",
        },
        "adapter": job.adapter.repo_id if job.adapter else None,
        "revision": None if rev is None else {
            "adapter": rev.adapter.repo_id, "sha": rev.sha, "kind": rev.kind, "metrics": rev.metrics,
            "verdict": rev.verdict, "url": f"/api/v1/adapters/{rev.adapter.repo_id}/",
        },
        # the result's quality verdict (docs/jobs.md), null when the job made no revision
        "verdict": None if rev is None else rev.verdict,
    }


def events_for(job: Job) -> list[tuple[str, dict]]:
    """(event type, data) pairs a finished job raises."""
    data = _job_data(job)
    out = [("job.finished", data)]
    adapter = job.adapter
    if job.op in MOVE_OPS and adapter is not None and job.status in ("succeeded", "failed"):
        base = adapter.base_model
        target = (job.params or {}).get("target")
        # A result whose verdict failed did not take `main` on the target: for the owner the move failed.
        rejected = job.status == "succeeded" and verdict_failed(job.result_revision)
        moved = {
            **data,
            "from_base": base.slug,
            "to_base": target,
            # the scheduled retransfer of a deprecated base, rather than a user's own request
            "retransfer": base.status == "deprecated" and base.successor is not None and base.successor.slug == target,
        }
        if rejected:
            moved["reason"] = "verdict_failed"
        out.append(("adapter.moved" if job.status == "succeeded" and not rejected else "adapter.move_failed", moved))
    return out


def verdict_failed(rev) -> bool:
    return rev is not None and (rev.verdict or {}).get("status") == "failed"


def job_finished(job_id) -> int:
    """Queue the deliveries a finished job owes its adapter's owner. Never
    raises (a finished job must not fail over its notifications); safe to call
    more than once. Returns the number of deliveries queued."""
    try:
        return _job_finished(job_id)
    except Exception:
        log.warning("job %s: could not queue its webhooks", job_id, exc_info=True)
        return 0


def _job_finished(job_id) -> int:
    job = (Job.objects.select_related("adapter__base_model__successor", "result_revision__adapter")
           .filter(pk=job_id, status__in=Job.FINISHED).first())
    if job is None or job.adapter is None:
        return 0
    hooks = list(Webhook.objects.filter(owner=job.adapter.owner, active=True))
    if not hooks:
        return 0
    queued = 0
    for event, data in events_for(job):
        for hook in hooks:
            if event in hook.events and queue_delivery(hook, event, data, f"{event}:{job.id}") is not None:
                queued += 1
    return queued


def queue_delivery(hook: Webhook, event: str, data: dict, dedupe_key: str) -> WebhookDelivery | None:
    """Store the delivery and send its message after the commit; None if that
    event was already queued for this webhook."""
    try:
        with transaction.atomic():
            delivery = WebhookDelivery.objects.create(webhook=hook, event=event, dedupe_key=dedupe_key[:120],
                                                      payload={"type": event, "data": data},
                                                      next_attempt_at=timezone.now())
    except IntegrityError:
        return None
    transaction.on_commit(lambda: send(delivery.id))
    return delivery


def ping(hook: Webhook) -> WebhookDelivery:
    """A test event, to check the receiver and its signature check."""
    data = {"webhook": hook.id, "owner": hook.owner, "message": "Ping from the adapter hub."}
    return queue_delivery(hook, "ping", data, f"ping:{secrets.token_hex(8)}")


def send(delivery_id, countdown: float | None = None) -> bool:
    """Send the delivery's Celery message. A failure is logged: the delivery
    stays pending and the reaper sends it again."""
    from hub import queue

    try:
        queue.send(DELIVER_TASK, [str(delivery_id)], "cpu", countdown)
        return True
    except Exception:
        log.warning("webhook delivery %s: could not reach the broker", delivery_id, exc_info=True)
        return False
