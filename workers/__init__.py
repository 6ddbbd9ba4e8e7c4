"""Background workers: the Celery app (`workers.app`), the job runner every op
uses (`workers.runner`), the op catalog (`workers.catalog`, importable by the
web process without torch), the reaper and one thin task per op in `ops/`.

`celery -A workers worker` and `celery -A workers.app worker` both find the app.
"""

import os


def __getattr__(name):
    # Lazy so `import workers.catalog` in the web process does not build the app.
    if name in ("app", "celery"):
        from importlib import import_module

        return import_module("workers.app").app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")


def knob(name: str, default):
    """A worker setting: Django settings first (the lead may add it there), then
    the environment, then `default` (whose type decides the cast)."""
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
