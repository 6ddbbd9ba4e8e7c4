"""Routes of the web UI. Mounted at "" after the API and the HF-compatible
routes; adapter pages live under /adapters/ so no owner name can shadow a page."""

from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

app_name = "frontend"

OWNER_NAME = "adapters/<str:owner>/<str:name>/"

urlpatterns = [
    path("", views.home, name="home"),
    path("favicon.ico", views.favicon, name="favicon"),  # what browsers ask for on pages without an icon link
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html",
                                                redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="frontend:home"), name="logout"),
    path("upload/", views.upload, name="upload"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke", views.token_revoke, name="token-revoke"),
    path("webhooks/", views.webhooks_page, name="webhooks"),
    path("webhooks/<int:pk>/<str:action>", views.webhook_action, name="webhook-action"),
    path("jobs/", views.jobs_page, name="jobs"),
    path("jobs/<str:pk>/", views.job_detail, name="job"),
    path("jobs/<str:pk>/cancel", views.job_cancel, name="job-cancel"),
    path("bases/", views.base_models, name="base-models"),
    path("bases/<str:slug>/", views.base_model_page, name="base-model"),
    path("bases/<str:slug>/deprecate", views.base_model_deprecate, name="base-model-deprecate"),
    path(OWNER_NAME, views.adapter_page, name="adapter"),
    path(OWNER_NAME + "lineage", views.adapter_lineage, name="adapter-lineage"),
    path(OWNER_NAME + "jobs", views.job_start, name="job-start"),
]
