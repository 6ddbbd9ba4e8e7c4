"""Visibility, enforced in one place: every list, detail, file, HF-compatible
and UI view starts from `Adapter.objects.visible_to(user)`."""

from django.db import models
from django.db.models import Q


def owner_names(user) -> list[str]:
    """The namespaces a user may act in: their username and their orgs."""
    if user is None or not user.is_authenticated:
        return []
    names = [user.username]
    names += list(user.memberships.values_list("org__name", flat=True))
    return names


class AdapterQuerySet(models.QuerySet):
    def visible_to(self, user):
        if user is not None and user.is_authenticated and user.is_superuser:
            return self
        return self.filter(Q(visibility="public") | Q(owner__in=owner_names(user)))

    def writable_by(self, user):
        if user is None or not user.is_authenticated:
            return self.none()
        if user.is_superuser:
            return self
        return self.filter(owner__in=owner_names(user))


class JobQuerySet(models.QuerySet):
    def visible_to(self, user):
        if user is None or not user.is_authenticated:
            return self.none()
        if user.is_superuser:
            return self
        return self.filter(owner=user)
