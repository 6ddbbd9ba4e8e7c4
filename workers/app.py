"""The Celery app. Workers are Django processes: they read the hub's settings
(REDIS_URL, DATABASE_URL, storage) and write the Job rows.

Run (see docs/jobs.md):
    celery -A workers.app worker -Q cpu,gpu --concurrency 1      # a worker
    celery -A workers.app beat                                    # once per site: the reaper
hub.queue.worker_argv() and beat_argv() build these command lines for `hubctl serve`.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hub.settings")

from kombu import Exchange, Queue  # noqa: E402

from adapters_ops import opspecs  # noqa: E402
from hub.queue import app, knob  # noqa: E402  (the hub's sender, given our queues and tasks here)

# Seconds between reaper runs, and the broker's redelivery delay for a message
# taken but never acknowledged. The latter must outlast the longest hard time
# limit, or Redis would hand a still-running job's message to a second worker.
REAPER_INTERVAL = float(knob("JOB_REAPER_INTERVAL", 30.0))
RETRANSFER_INTERVAL = float(knob("RETRANSFER_INTERVAL", 300.0))
BLOB_GC_INTERVAL = float(knob("BLOB_GC_INTERVAL", 24 * 3600.0))
VISIBILITY_TIMEOUT = max(int(knob("JOB_VISIBILITY_TIMEOUT", 6 * 3600)), int(opspecs.max_time_limit() * 1.25) + 600)

app.conf.update(
    task_always_eager=False,  # never: the worker is a separate process in every setting
    task_acks_late=True,  # ack after the task ran: a killed worker's message is redelivered
    task_reject_on_worker_lost=True,  # ... also when only the pool child died
    worker_prefetch_multiplier=1,  # one job per process at a time; the rest stay in Redis
    worker_cancel_long_running_tasks_on_connection_loss=False,  # the job row, not the ack, is the truth
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    task_ignore_result=True,  # results live in the Job row
    result_expires=24 * 3600,
    task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in opspecs.QUEUES],
    task_default_queue="cpu",
    task_routes={
        **{spec.task_name: {"queue": spec.queue} for spec in opspecs.OPS.values()},
        "workers.reaper.reap": {"queue": "cpu"},
        "workers.retransfer.sweep": {"queue": "cpu"},
        "workers.webhooks.deliver": {"queue": "cpu"},
    },
    task_annotations={
        spec.task_name: {"soft_time_limit": spec.soft_time_limit, "time_limit": spec.time_limit}
        for spec in opspecs.OPS.values()
    },
    include=sorted({spec.module for spec in opspecs.OPS.values()} | {"workers.reaper", "workers.retransfer", "workers.webhooks"}),
    beat_schedule={
        "reap-jobs": {
            "task": "workers.reaper.reap",
            "schedule": REAPER_INTERVAL,
            # A reaper message that waited longer than one interval is stale: the next one follows.
            "options": {"queue": "cpu", "expires": max(REAPER_INTERVAL, 1.0)},
        },
        "retransfer-deprecated-bases": {
            "task": "workers.retransfer.sweep",
            "schedule": RETRANSFER_INTERVAL,
            "options": {"queue": "cpu", "expires": max(RETRANSFER_INTERVAL, 1.0)},
        },
        "gc-blobs": {
            "task": "workers.reaper.gc_blobs",
            "schedule": BLOB_GC_INTERVAL,
            "options": {"queue": "cpu", "expires": max(BLOB_GC_INTERVAL, 1.0)},
        },
    },
    worker_hijack_root_logger=False,
)
