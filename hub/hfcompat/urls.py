"""Hugging Face Hub-compatible routes (see the views package and docs/hf-compat.md).

A repo id is `owner/name` (an adapter) or a single segment (a base model
slug). Clients quote revisions (`refs%2Fpr%2F1`); the server decodes them
before routing, so a revision is taken as one path segment and anything
longer is simply not found.
"""

from django.urls import path, re_path

from . import views

app_name = "hfcompat"

REPO = r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?)"
REV = r"(?P<rev>[^/]+)"

urlpatterns = [
    path("api/whoami-v2", views.whoami, name="whoami"),
    path("api/validate-yaml", views.validate_yaml, name="validate-yaml"),
    path("api/repos/create", views.repo_create, name="repo-create"),
    path("api/repos/delete", views.repo_delete, name="repo-delete"),
    re_path(rf"^api/models/{REPO}$", views.model_info, name="model-info"),
    re_path(rf"^api/models/{REPO}/revision/(?P<rev>.+)$", views.model_info, name="model-info-revision"),
    re_path(rf"^api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?$", views.tree, name="tree"),
    re_path(rf"^api/models/{REPO}/refs$", views.refs, name="refs"),
    re_path(rf"^api/models/{REPO}/settings$", views.repo_settings, name="settings"),
    re_path(rf"^api/models/{REPO}/preupload/{REV}$", views.preupload, name="preupload"),
    re_path(rf"^api/models/{REPO}/commit/{REV}$", views.commit, name="commit"),
    re_path(rf"^{REPO}/resolve/{REV}/(?P<path>.+)$", views.resolve, name="resolve"),
]
