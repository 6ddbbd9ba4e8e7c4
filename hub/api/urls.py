from django.urls import path, re_path

from . import errors, views
from . import jobs as job_views
from . import ops as op_views
from . import tokens as token_views
from . import uploads as upload_views
from . import webhooks as webhook_views

app_name = "api"

OWNER_NAME = r"(?P<owner>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"

urlpatterns = [
    path("me", views.Me.as_view(), name="me"),
    path("tokens/", token_views.TokenList.as_view(), name="token-list"),
    path("base-models/", views.BaseModelList.as_view(), name="base-model-list"),
    path("base-models/<str:slug>/", views.BaseModelDetail.as_view(), name="base-model-detail"),
    path("base-models/<str:slug>/deprecate", views.BaseModelDeprecate.as_view(), name="base-model-deprecate"),
    path("base-models/<str:slug>/files/<path:path>", views.BaseModelFile.as_view(), name="base-model-file"),
    path("base-models/<str:slug>/transfer", job_views.TransferAll.as_view(), name="base-model-transfer"),
    path("adapters/", views.AdapterList.as_view(), name="adapter-list"),
    re_path(rf"^adapters/{OWNER_NAME}/$", views.AdapterDetail.as_view(), name="adapter-detail"),
    re_path(rf"^adapters/{OWNER_NAME}/revisions/$", views.RevisionList.as_view(), name="revision-list"),
    re_path(rf"^adapters/{OWNER_NAME}/lineage$", views.Lineage.as_view(), name="lineage"),
    re_path(rf"^adapters/{OWNER_NAME}/files/(?P<path>.+)$", views.AdapterFile.as_view(), name="adapter-file"),
    re_path(rf"^adapters/{OWNER_NAME}/jobs$", job_views.AdapterJobs.as_view(), name="adapter-jobs"),
    re_path(rf"^uploads/(?P<sha256>{upload_views.SHA256})$", upload_views.Upload.as_view(), name="upload"),
    path("ops", op_views.OpList.as_view(), name="op-list"),
    path("jobs/", job_views.JobList.as_view(), name="job-list"),
    path("jobs/<str:pk>/", job_views.JobDetail.as_view(), name="job-detail"),
    path("jobs/<str:pk>/cancel", job_views.JobCancel.as_view(), name="job-cancel"),
    path("webhooks/", webhook_views.WebhookList.as_view(), name="webhook-list"),
    path("webhooks/<str:pk>/", webhook_views.WebhookDetail.as_view(), name="webhook-detail"),
    path("webhooks/<str:pk>/ping", webhook_views.WebhookPing.as_view(), name="webhook-ping"),
    path("webhooks/<str:pk>/rotate-secret", webhook_views.WebhookRotateSecret.as_view(), name="webhook-rotate"),
    path("webhooks/<str:pk>/deliveries", webhook_views.WebhookDeliveries.as_view(), name="webhook-deliveries"),
    # Last. Only the collections' own prefixes: other paths under api/v1/ fall through to the
    # HF-compatible routes (a repo `api/v1`).
    re_path(r"^(?:me|tokens|ops|base-models|adapters|jobs|webhooks|uploads)(?:/[\s\S]*)?$", errors.no_such_route),
]
