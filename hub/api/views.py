"""REST API v1. Views stay thin: parse, call a service or selector, serialize.
Visibility comes from `Adapter.objects.visible_to` (see AdapterScoped)."""

from contextlib import ExitStack

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, permissions, status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response

from hub.api import serializers as s
from hub.api.base import ApiView
from hub.api.downloads import blob_response
from hub.api.schema import error
from hub.registry import plans, selectors, services
from hub.registry.models import Adapter, BaseModel
from hub.registry.services import IncomingFile
from hub.registry.validation import ValidationError, ascii_digits


def incoming(uploaded) -> IncomingFile:
    return IncomingFile(
        path=uploaded.name, fileobj=uploaded, sha256=getattr(uploaded, "sha256", None), size=uploaded.size
    )


def is_json(request) -> bool:
    """A commit of staged files (JSON) rather than a multipart upload."""
    return (request.content_type or "").split(";")[0].strip().lower() == "application/json"


def split_tags(raw) -> list[str]:
    if isinstance(raw, list):
        return [t for t in raw if t]
    return [t.strip() for t in (raw or "").split(",") if t.strip()]


class Me(ApiView):
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(responses={200: dict})
    def get(self, request):
        u = request.user
        return Response({"username": u.username, "orgs": list(u.orgs.values_list("name", flat=True)),
                         "is_staff": u.is_staff})


# --- base models ---------------------------------------------------------------


class BaseModelList(ApiView, generics.ListCreateAPIView):
    queryset = BaseModel.objects.select_related("successor").prefetch_related("files__blob")
    serializer_class = s.BaseModelSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def get_queryset(self):
        qs = super().get_queryset()
        for field in ("status", "family"):
            if self.request.query_params.get(field):
                qs = qs.filter(**{field: self.request.query_params[field]})
        return qs

    @extend_schema(request={"multipart/form-data": s.BaseModelCreateSerializer,
                            "application/json": s.BaseModelCommitSerializer},
                   responses={201: s.BaseModelDetailSerializer, 409: error(409), 413: error(413)},
                   description="The files as multipart parts, or (JSON) named by path and sha256 after each was "
                               "staged with PUT /api/v1/uploads/{sha256}.")
    def post(self, request):
        if not request.user.is_staff:
            return Response({"error": "forbidden", "detail": "Only staff may register base models."}, status=403)
        staged = is_json(request)
        ser = (s.BaseModelCommitSerializer if staged else s.BaseModelCreateSerializer)(data=request.data)
        ser.is_valid(raise_exception=True)
        with ExitStack() as stack:
            if staged:
                entries = [(f["path"], f["sha256"]) for f in ser.validated_data["files"]]
                files = services.staged_files(request.user, entries, stack)
            else:
                files = [incoming(f) for f in request.FILES.getlist("files")]
            base = services.base_model_register(
                slug=ser.validated_data["slug"], family=ser.validated_data["family"],
                version=ser.validated_data["version"], description=ser.validated_data["description"],
                files=files, user=request.user,
            )
        if staged:
            services.unstage(request.user, [sha for _, sha in entries])
        return Response(s.BaseModelDetailSerializer(base).data, status=status.HTTP_201_CREATED)


class BaseModelDetail(ApiView):
    @extend_schema(responses=s.BaseModelDetailSerializer)
    def get(self, request, slug):
        base = selectors.base_model_get(slug)
        data = s.BaseModelDetailSerializer(base).data
        # Which of the caller's visible adapters move to the successor, how, and how far.
        data["retransfer"] = plans.plan_as_dict(plans.retransfer_plan(request.user, base))
        return Response(data)

    @extend_schema(request=s.BaseModelPatchSerializer, responses=s.BaseModelDetailSerializer)
    def patch(self, request, slug):
        base = selectors.base_model_get(slug)
        if not request.user.is_staff:
            raise services.Forbidden("Only staff may change base models.")
        ser = s.BaseModelPatchSerializer(base, data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        ser.save()
        return Response(s.BaseModelDetailSerializer(base).data)


class BaseModelDeprecate(ApiView):
    @extend_schema(request=s.DeprecateSerializer, responses=s.BaseModelDetailSerializer)
    def post(self, request, slug):
        base = selectors.base_model_get(slug)
        if not request.user.is_staff:
            raise services.Forbidden("Only staff may deprecate base models.")
        ser = s.DeprecateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        succ = ser.validated_data.get("successor")
        successor = selectors.base_model_get(succ) if succ else None
        base = services.base_model_deprecate(base=base, successor=successor, at=ser.validated_data.get("at"))
        return Response(s.BaseModelDetailSerializer(base).data)


# --- adapters --------------------------------------------------------------------


class AdapterList(ApiView, generics.ListAPIView):
    serializer_class = s.AdapterSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(parameters=[
        OpenApiParameter("base_model", str), OpenApiParameter("q", str), OpenApiParameter("tag", str),
        OpenApiParameter("kind", str), OpenApiParameter("owner", str), OpenApiParameter("r", int),
        OpenApiParameter("max_r", int), OpenApiParameter("target_module", str), OpenApiParameter("dtype", str),
        OpenApiParameter("sort", str, enum=list(selectors.ADAPTER_SORTS)),
    ])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        qp = self.request.query_params
        numbers = {}
        for key in ("r", "max_r"):
            if key in qp:
                if not ascii_digits(qp[key].removeprefix("-")):
                    raise ValidationError("invalid_filter", f"{key} must be an integer.", field=key)
                numbers[key] = int(qp[key])
        sort = qp.get("sort", "updated")
        if sort not in selectors.ADAPTER_SORTS:
            raise ValidationError("invalid_filter", f"sort must be one of {', '.join(selectors.ADAPTER_SORTS)}.",
                                  field="sort")
        text = {k: qp.get(k, "") for k in ("q", "base_model", "tag", "kind", "owner", "dtype", "target_module")}
        return selectors.adapter_search(self.request.user, **text, **numbers, sort=sort)

    @extend_schema(request={"multipart/form-data": s.AdapterCreateSerializer,
                            "application/json": s.AdapterCommitSerializer},
                   responses={201: s.AdapterDetailSerializer, 409: error(409), 413: error(413)},
                   description="The files (and seeds) as multipart parts, or (JSON) named by path and sha256 after "
                               "each was staged with PUT /api/v1/uploads/{sha256}; validated and stored the same "
                               "way, atomically.")
    def post(self, request):
        if not request.user.is_authenticated:
            raise services.Forbidden("Sign in (a token) to upload.")
        staged = is_json(request)
        ser = (s.AdapterCommitSerializer if staged else s.AdapterCreateSerializer)(data=request.data)
        ser.is_valid(raise_exception=True)
        owner, name = ser.validated_data["name"].split("/", 1)
        base = BaseModel.objects.filter(slug=ser.validated_data["base_model"]).first()
        if base is None:
            raise ValidationError(
                "unknown_base_model", selectors.unknown_base_detail(ser.validated_data["base_model"]),
                field="base_model",
            )
        with ExitStack() as stack:
            if staged:
                entries = [(f["path"], f["sha256"]) for f in ser.validated_data["files"]]
                if ser.validated_data.get("seeds"):
                    entries.append(("seeds", ser.validated_data["seeds"]))
                files = services.staged_files(request.user, entries, stack)
                seeds = files.pop() if ser.validated_data.get("seeds") else None
            else:
                files = [incoming(f) for f in request.FILES.getlist("files")]
                seeds = incoming(request.FILES["seeds"]) if request.FILES.get("seeds") else None
            services.adapter_create_from_upload(
                owner=owner, name=name, base=base, user=request.user, files=files,
                visibility=ser.validated_data["visibility"], tags=split_tags(ser.validated_data["tags"]),
                description=ser.validated_data["description"], seeds=seeds,
            )
        if staged:
            services.unstage(request.user, [sha for _, sha in entries])
        adapter = Adapter.objects.get(owner=owner, name=name)
        return Response(s.AdapterDetailSerializer(adapter).data, status=status.HTTP_201_CREATED)


class AdapterDetail(ApiView):
    @extend_schema(responses=s.AdapterDetailSerializer)
    def get(self, request, owner, name):
        return Response(s.AdapterDetailSerializer(selectors.adapter_get(request.user, owner, name)).data)

    @extend_schema(request=s.AdapterPatchSerializer, responses=s.AdapterDetailSerializer)
    def patch(self, request, owner, name):
        adapter = selectors.adapter_get(request.user, owner, name)
        services.check_can_write(request.user, adapter.owner)
        ser = s.AdapterPatchSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        for field in ("visibility", "description"):
            if field in data:
                setattr(adapter, field, data[field])
        adapter.save()
        if "tags" in data:
            services.set_tags(adapter, data["tags"])
        return Response(s.AdapterDetailSerializer(adapter).data)

    @extend_schema(responses={204: None})
    def delete(self, request, owner, name):
        adapter = selectors.adapter_get(request.user, owner, name)
        services.check_can_write(request.user, adapter.owner)
        services.adapter_delete(adapter=adapter)
        return Response(status=status.HTTP_204_NO_CONTENT)


class RevisionList(ApiView, generics.ListAPIView):
    serializer_class = s.RevisionSerializer

    def get_queryset(self):
        adapter = selectors.adapter_get(self.request.user, self.kwargs["owner"], self.kwargs["name"])
        return adapter.revisions.select_related("base_model").prefetch_related("files__blob", "refs")


class Lineage(ApiView):
    @extend_schema(responses=dict)
    def get(self, request, owner, name):
        adapter = selectors.adapter_get(request.user, owner, name)
        return Response(selectors.lineage(request.user, adapter))


# What blob_response answers besides the whole file (Range and If-None-Match requests).
FILE_RESPONSES = {
    (200, "application/octet-stream"): OpenApiTypes.BINARY,
    (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The byte range asked for."),
    304: OpenApiResponse(description="Not modified: If-None-Match named this file's ETag."),
    416: OpenApiResponse(description="The range lies past the end of the file."),
}


class AdapterFile(ApiView):
    """GET/HEAD one file of a revision: streamed, Range, ETag = sha256."""

    @extend_schema(parameters=[OpenApiParameter("revision", str)], responses=FILE_RESPONSES)
    def get(self, request, owner, name, path):
        adapter = selectors.adapter_get(request.user, owner, name)
        rev = selectors.revision_resolve(adapter, request.query_params.get("revision"))
        blob = selectors.revision_files(rev).get(path)
        if blob is None:
            raise selectors.NotFound("entry_not_found", f"{path} is not in revision {rev.sha[:12]} of {adapter.repo_id}.")
        services.count_download(adapter, request)
        return blob_response(request, blob, path, {"X-Revision": rev.sha})


class BaseModelFile(ApiView):
    @extend_schema(responses=FILE_RESPONSES)
    def get(self, request, slug, path):
        base = selectors.base_model_get(slug)
        f = base.files.select_related("blob").filter(path=path).first()
        if f is None:
            raise selectors.NotFound("entry_not_found", f"{path} is not a file of base model {slug}.")
        return blob_response(request, f.blob, path, {"X-Revision": base.sha})
