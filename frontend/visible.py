"""What one request may see, restricted in one place: every page reads
adapters, jobs and webhooks through `visible(request)`, never through the
model managers (tests/frontend/test_visibility.py checks the views for it).
The REST API restricts its querysets the same way (hub/registry/selectors.py
and the API views' `visible_jobs`)."""

from __future__ import annotations

from functools import cached_property

from hub.registry import webhooks as webhook_services
from hub.registry.models import Adapter, Job


class Visible:
    def __init__(self, user):
        self.user = user

    @cached_property
    def adapters(self):
        return Adapter.objects.visible_to(self.user)

    @cached_property
    def writable_adapters(self):
        return Adapter.objects.writable_by(self.user)

    @cached_property
    def jobs(self):
        return Job.objects.visible_to(self.user).select_related("adapter", "result_revision__adapter")

    @cached_property
    def webhooks(self):
        return webhook_services.webhooks_visible_to(self.user)


def visible(request) -> Visible:
    """The request's Visible, made once per request."""
    if not hasattr(request, "_visible"):
        request._visible = Visible(request.user)
    return request._visible
