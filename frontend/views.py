"""Server-rendered pages of the hub (Django templates + htmx).

Every adapter, job and webhook a page shows comes from `visible(request)`
(frontend/visible.py), directly or through hub.registry.selectors, which
restrict by the same rule. Writes go through the registry's services.
No torch here: the web process only reads headers and rows.
"""

from __future__ import annotations

import uuid

from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import Http404, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from adapters_ops import opspecs
from hub import demo_status
from hub.registry import jobs as job_services
from hub.registry import plans, selectors, services
from hub.registry import webhooks as webhook_services
from hub.registry.models import ApiToken, BaseModel, Job, Tag
from hub.registry.querysets import owner_names
from hub.registry.selectors import NotFound
from hub.registry.validation import ValidationError

from . import forms, graph, job_forms
from .visible import visible as see

PAGE_SIZE = 24
FILE_FIELDS = {"files", services.ADAPTER_CONFIG, services.ADAPTER_WEIGHTS}
UPLOAD_FIELDS = {"name", "owner", "base_model", "visibility", "tags", "description", "seeds", "files"}


def is_htmx(request) -> bool:
    return request.headers.get("HX-Request") == "true"


def not_found(request, exc: NotFound | None = None):
    detail = exc.detail if exc else "This page does not exist or is not visible to you."
    return render(request, "frontend/not_found.html", {"detail": detail}, status=404)


def upload_error_field(field: str | None) -> str | None:
    """The upload form field an API / service error belongs to (None: the form)."""
    if not field:
        return None
    if field in FILE_FIELDS or field.endswith((".safetensors", ".json", ".bin", ".pt")):
        return "files"  # a file of the adapter folder: shown next to the drop zone
    return field if field in UPLOAD_FIELDS else None


@require_GET
def favicon(request):
    from django.templatetags.static import static

    return redirect(static("frontend/favicon.svg"), permanent=True)


# --- browse -------------------------------------------------------------------------------


@require_GET
def home(request):
    """The adapters list: search, filters (base model, tag, kind) and sort."""
    form = forms.BrowseForm(request.GET or None)
    visible = see(request).adapters
    f = form.cleaned_data if form.is_bound and form.is_valid() else {}
    qs = selectors.adapter_search(request.user, q=f.get("q", ""), base_model=f.get("base_model", ""),
                                  tag=f.get("tag", ""), kind=f.get("kind", ""), sort=f.get("sort") or "updated")
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    params = request.GET.copy()
    params.pop("page", None)
    tags = Tag.objects.filter(adapters__in=visible).distinct().order_by("name").values_list("name", flat=True)
    return render(request, "frontend/home.html", {
        "form": form, "page": page, "query": params.urlencode(), "tags": list(tags)[:200], "demo": _demo_notice(),
    })


def _demo_notice() -> dict | None:
    """`hubctl serve`'s demo while it builds or after it failed (None when ready or not served)."""
    from django.conf import settings

    status = demo_status.read(settings.HUB_HOME)
    return status if status and status["state"] != "ready" else None


@require_GET
def base_models(request):
    visible = see(request).adapters
    counts = dict(visible.values_list("base_model").annotate(n=Count("id")).values_list("base_model", "n"))
    bases = list(BaseModel.objects.select_related("successor").order_by("slug"))
    for b in bases:
        b.n_adapters = counts.get(b.id, 0)
    return render(request, "frontend/base_models.html", {"bases": bases})


# --- base model ---------------------------------------------------------------------------------


def _base_context(request, base, deprecate_form=None):
    adapters = (
        see(request).adapters.filter(base_model=base).prefetch_related("tags").order_by("owner", "name")
    )
    plan = plans.retransfer_plan(request.user, base)
    return {
        "base": base, "adapters": adapters, "plan": plan,
        "plan_active": any(row.active_job for row in plan),
        "n_weights": len(base.manifest or {}),
        "deprecate_form": deprecate_form or (forms.DeprecateForm(base=base) if request.user.is_staff else None),
        "predecessors": base.predecessors.order_by("slug"),
        "writable": set(see(request).writable_adapters.filter(base_model=base).values_list("id", flat=True)),
        "can_transfer": _op_enabled("transfer"),
    }


@require_GET
def base_model_page(request, slug):
    try:
        base = selectors.base_model_get(slug)
    except NotFound as exc:
        return not_found(request, exc)
    ctx = _base_context(request, base)
    if is_htmx(request) and request.GET.get("part") == "plan":
        return render(request, "frontend/_plan.html", ctx)
    return render(request, "frontend/base_model.html", ctx)


@require_POST
def base_model_deprecate(request, slug):
    try:
        base = selectors.base_model_get(slug)
    except NotFound as exc:
        return not_found(request, exc)
    if not request.user.is_staff:
        return HttpResponseForbidden("Only staff may deprecate base models.")
    form = forms.DeprecateForm(request.POST, base=base)
    if form.is_valid():
        succ = form.cleaned_data["successor"]
        try:
            services.base_model_deprecate(
                base=base, successor=selectors.base_model_get(succ) if succ else None, at=form.cleaned_data["at"],
            )
            return redirect("frontend:base-model", slug=base.slug)
        except (ValidationError, NotFound) as exc:
            form.add_error("successor" if getattr(exc, "field", None) == "successor" else None, exc.detail)
    return render(request, "frontend/base_model.html", _base_context(request, base, form), status=400)


# --- adapter ---------------------------------------------------------------------------------------


def _op_enabled(op: str) -> bool:
    return op in opspecs.OPS


def _can_write(user, adapter) -> bool:
    return services.can_write(user, adapter.owner)


def _lineage(request, adapter):
    return graph.layout(selectors.lineage(request.user, adapter), current=adapter.repo_id)


def _adapter_context(request, adapter, bound_form=None):
    try:
        rev = selectors.revision_resolve(adapter, request.GET.get("rev"))
    except NotFound:
        if request.GET.get("rev"):
            raise
        rev = adapter.revisions.first()
    files = sorted(selectors.revision_files(rev).items()) if rev else []
    revisions = list(adapter.revisions.select_related("base_model", "job").prefetch_related("refs", "parents__adapter"))
    parent_adapters = {p.adapter_id for r in revisions for p in r.parents.all()}
    # parents in adapters the user may not see are left out, as in the lineage graph
    seen = set(see(request).adapters.filter(pk__in=parent_adapters).values_list("id", flat=True))
    for r in revisions:
        r.accuracy = graph.accuracy_of(r.metrics)
        r.visible_parents = [p for p in r.parents.all() if p.adapter_id in seen]
    can_write = _can_write(request.user, adapter)
    panels = []
    if can_write:
        panels = job_forms.op_panels(adapter)
        if bound_form is not None:
            panels = [dict(p, form=bound_form) if p["op"] == bound_form.op else p for p in panels]
    recent_jobs = []
    if request.user.is_authenticated:
        recent_jobs = list(see(request).jobs.filter(adapter=adapter)[:5])
    endpoint = request.build_absolute_uri("/").rstrip("/")
    return {
        "adapter": adapter, "rev": rev, "files": files, "revisions": revisions,
        "tags": list(adapter.tags.values_list("name", flat=True)),
        "lineage": _lineage(request, adapter), "can_write": can_write, "panels": panels,
        "recent_jobs": recent_jobs, "endpoint": endpoint,
    }


@require_GET
def adapter_page(request, owner, name):
    try:
        adapter = selectors.adapter_get(request.user, owner, name)
        ctx = _adapter_context(request, adapter)
    except NotFound as exc:
        return not_found(request, exc)
    return render(request, "frontend/adapter.html", ctx)


@require_GET
def adapter_lineage(request, owner, name):
    """The lineage graph alone: htmx swaps it in when a job finishes."""
    try:
        adapter = selectors.adapter_get(request.user, owner, name)
    except NotFound as exc:
        return not_found(request, exc)
    return render(request, "frontend/_lineage.html", {"adapter": adapter, "lineage": _lineage(request, adapter)})


@require_POST
def job_start(request, owner, name):
    """Start a job on an adapter from one of the op forms of its page."""
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    try:
        adapter = selectors.adapter_get(request.user, owner, name)
    except NotFound as exc:
        return not_found(request, exc)
    if not _can_write(request.user, adapter):
        return HttpResponseForbidden("You may not start jobs on this adapter.")
    op = request.POST.get("op", "")
    form = job_forms.op_form(op, adapter, data=request.POST)
    if form is None:
        return HttpResponse(f"Unknown op {op!r}.", status=400)
    job = None
    if form.is_valid():
        try:
            job = job_services.job_create(user=request.user, op=op, params=form.params())
        except ValidationError as exc:
            form.add_error(form.field_for(exc.field), exc.detail)
        except (services.Forbidden, services.Conflict, NotFound) as exc:
            form.add_error(None, exc.detail)
    if is_htmx(request):
        # The form again (fresh on success, with its errors otherwise) plus, out
        # of band, the new job's live widget at the top of the job list.
        fresh = job_forms.op_form(op, adapter) if job else form
        return render(request, "frontend/_job_start.html",
                      {"panel": {"op": op, "form": fresh}, "adapter": adapter, "job": job},
                      status=200 if job else 422)
    if job:
        return redirect(f"{reverse('frontend:adapter', args=[owner, name])}?job={job.id}#jobs")
    return render(request, "frontend/adapter.html", _adapter_context(request, adapter, bound_form=form), status=400)


# --- upload ----------------------------------------------------------------------------------------------


def _upload_context(request, form, errors=None):
    bases = BaseModel.objects.exclude(status="retired").order_by("slug")
    return {"form": form, "bases": bases, "errors": errors or {}, "max_bytes": _max_upload()}


def _max_upload() -> int:
    from django.conf import settings

    return getattr(settings, "MAX_UPLOAD_BYTES", 0)


@login_required
@require_http_methods(["GET", "POST"])
def upload(request):
    """The upload page. JavaScript posts the files to the REST API with a
    progress bar; this POST is the fallback without JavaScript."""
    owners = owner_names(request.user)
    if request.method == "GET":
        form = forms.UploadForm(owners=owners, initial={"owner": request.user.username,
                                                        "base_model": request.GET.get("base", "")})
        return render(request, "frontend/upload.html", _upload_context(request, form))

    form = forms.UploadForm(request.POST, owners=owners)
    errors: dict[str, str] = {}
    files = request.FILES.getlist("files")
    if not files:
        errors["files"] = "Choose the adapter's files (adapter_config.json and adapter_model.safetensors)."
    if form.is_valid() and not errors:
        d = form.cleaned_data
        base = BaseModel.objects.filter(slug=d["base_model"]).first()
        seeds = request.FILES.get("seeds")
        try:
            if base is None:
                raise ValidationError("unknown_base_model", selectors.unknown_base_detail(d["base_model"]),
                                      field="base_model")
            services.adapter_create_from_upload(
                owner=d["owner"], name=d["name"], base=base, user=request.user,
                files=[_incoming(f) for f in files], visibility=d["visibility"],
                tags=[t.strip() for t in d["tags"].split(",") if t.strip()], description=d["description"],
                seeds=_incoming(seeds) if seeds else None,
            )
            return redirect("frontend:adapter", owner=d["owner"], name=d["name"])
        except ValidationError as exc:
            errors[upload_error_field(exc.field) or "form"] = exc.detail
        except services.Conflict as exc:
            errors["name"] = exc.detail
        except services.Forbidden as exc:
            errors["owner"] = exc.detail
    for field, errs in form.errors.items():
        errors.setdefault(field, " ".join(errs))
    return render(request, "frontend/upload.html", _upload_context(request, form, errors), status=400)


def _incoming(uploaded) -> services.IncomingFile:
    return services.IncomingFile(path=uploaded.name, fileobj=uploaded, sha256=getattr(uploaded, "sha256", None),
                                 size=uploaded.size)


# --- jobs ------------------------------------------------------------------------------------------------------


def _job_get(request, pk) -> Job:
    try:
        pk = uuid.UUID(str(pk))
    except ValueError:
        raise Http404 from None
    job = see(request).jobs.filter(pk=pk).first()
    if job is None:
        raise Http404
    return job


def _job_response(request, job):
    if not is_htmx(request):
        return render(request, "frontend/job.html", {"job": job})
    response = render(request, "frontend/_job.html", {"job": job})
    if job.status in Job.FINISHED:
        # The widget stops polling (its new HTML has no trigger); tell the page
        # so the lineage graph and plan refresh.
        response["HX-Trigger"] = "job-finished"
    return response


@login_required
@require_GET
def jobs_page(request):
    status = request.GET.get("status", "")
    qs = see(request).jobs
    if status in {s for s, _ in Job.STATUS}:
        qs = qs.filter(status=status)
    page = Paginator(qs, 25).get_page(request.GET.get("page"))
    return render(request, "frontend/jobs.html", {"page": page, "status": status, "statuses": [s for s, _ in Job.STATUS]})


@login_required
@require_GET
def job_detail(request, pk):
    try:
        job = _job_get(request, pk)
    except Http404:
        return not_found(request)
    return _job_response(request, job)


@login_required
@require_POST
def job_cancel(request, pk):
    try:
        job = _job_get(request, pk)
    except Http404:
        return not_found(request)
    try:
        job = job_services.job_cancel(job=job)
    except job_services.JobFinished:
        job.refresh_from_db()
    if is_htmx(request):
        return _job_response(request, _job_get(request, job.pk))
    return redirect("frontend:jobs")


# --- tokens ------------------------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request):
    """API tokens for hubctl and huggingface_hub. A new token is shown once:
    it travels from the POST to the next GET in the session, then is gone."""
    form = forms.TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        request.session["new_token"] = services.token_create(user=request.user, name=form.cleaned_data["name"],
                                                             expires=form.cleaned_data["expires"])
        return redirect("frontend:tokens")
    new_token = request.session.pop("new_token", None)
    response = render(request, "frontend/tokens.html", {
        "form": form if request.method == "POST" else forms.TokenForm(),
        "tokens": request.user.api_tokens.order_by("-created_at"), "new_token": new_token,
        "endpoint": request.build_absolute_uri("/").rstrip("/"),
    }, status=400 if request.method == "POST" else 200)
    if new_token:
        response["Cache-Control"] = "no-store"  # the secret must not linger in a cache
    return response


@login_required
@require_http_methods(["GET", "POST"])
def webhooks_page(request):
    """The signed-in user's webhooks (own and their organizations'); a new
    webhook's secret is shown once, like a token."""
    owners = owner_names(request.user)
    form = forms.WebhookForm(request.POST or None, owners=owners, initial={"owner": request.user.username})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            hook = webhook_services.webhook_create(user=request.user, owner=data["owner"], url=data["url"],
                                                   events=data["events"], description=data["description"])
        except ValidationError as exc:
            form.add_error("url" if exc.field == "url" else "events" if exc.field == "events" else None, exc.detail)
        except services.Forbidden as exc:
            form.add_error("owner", exc.detail)
        else:
            request.session["new_webhook_secret"] = [hook.pk, hook.secret]
            return redirect("frontend:webhooks")
    new_secret = request.session.pop("new_webhook_secret", None)
    hooks = list(see(request).webhooks)
    for hook in hooks:  # the latest five each; payloads stay in the database
        hook.recent = list(hook.deliveries.defer("payload")[:5])
    response = render(request, "frontend/webhooks.html", {
        "form": form, "hooks": hooks, "new_secret": new_secret,
    }, status=400 if request.method == "POST" else 200)
    if new_secret:
        response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def webhook_action(request, pk, action):
    # Only webhooks of namespaces the user writes: any other id is a 404.
    hook = see(request).webhooks.filter(pk=pk).first()
    if hook is None:
        raise Http404
    if action == "delete":
        hook.delete()
    elif action == "ping":
        webhook_services.ping(hook)
    elif action in ("enable", "disable"):
        webhook_services.webhook_update(webhook=hook, active=action == "enable")
    else:
        raise Http404
    return redirect("frontend:webhooks")


@login_required
@require_POST
def token_revoke(request, pk):
    # Scoped to the signed-in user: another user's token id revokes nothing.
    ApiToken.objects.filter(user=request.user, pk=pk).delete()
    return redirect("frontend:tokens")
