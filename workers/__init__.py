"""Background workers: the Celery app (`workers.app`), the job runner every op
uses (`workers.runner`), the reaper and one thin task per op in `ops/`.

`celery -A workers worker` and `celery -A workers.app worker` both find the app.
"""

from hub.queue import knob  # noqa: F401  (one reader of worker settings, shared with the hub)


def __getattr__(name):
    # Lazy: importing a submodule (workers.inputs) need not build the app.
    if name in ("app", "celery"):
        from importlib import import_module

        return import_module("workers.app").app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")

