"""The hub's send-only side of the task queue: one Celery app object that
knows the broker but no task code. The web process sends jobs and webhook
deliveries by task name through it and never imports `workers`; the workers
import this same app and give it their queues, routes and tasks
(workers/app.py), so both sides always talk to the same broker.
"""

from __future__ import annotations

import os
import sys

from celery import Celery

app = Celery("hub")
# CELERY_BROKER_URL and CELERY_RESULT_BACKEND (both REDIS_URL by default).
app.config_from_object("django.conf:settings", namespace="CELERY")

_redis_clients: dict = {}


def knob(name: str, default):
    """A setting of the queue side: Django settings first, then the environment,
    then `default` (whose type decides the cast)."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        if hasattr(settings, name):
            return getattr(settings, name)
    except ImproperlyConfigured:  # no settings module: a plain library use
        pass
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(raw)


def send(task_name: str, args: list, queue: str, countdown: float | None = None) -> None:
    """Send one message; raises when the broker cannot be reached (callers log and retry later)."""
    app.send_task(task_name, args, queue=queue, countdown=countdown)


def broker_redis():
    """A redis client on the broker's database (job sent-markers live beside the messages)."""
    import redis

    url = app.conf.broker_url
    client = _redis_clients.get(url)
    if client is None:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        _redis_clients[url] = client
    return client


# --- the consumers' command lines (`hubctl serve` and the tests start them) ----------------


def worker_argv(
    queues=("cpu", "gpu"), concurrency: int = 1, beat: bool = False, name: str | None = None,
    loglevel: str = "INFO", schedule: str | None = None,
) -> list[str]:
    """The command line of one worker (for `hubctl serve` and the tests).

    With beat=True the worker also runs the reaper schedule (`-B`): fine for a
    single-node hub; production runs `celery -A workers.app beat` once instead.
    """
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", ",".join(queues),
            "--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", loglevel,
            # no worker-to-worker chatter: the Job rows coordinate everything
            "--without-mingle", "--without-gossip"]
    if name:
        argv += ["-n", name]
    if beat:
        argv += ["-B"]
        if schedule:
            argv += ["--schedule", schedule]
    return argv


def beat_argv(schedule: str | None = None, loglevel: str = "INFO") -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel", loglevel]
    if schedule:
        argv += ["--schedule", schedule]
    return argv
