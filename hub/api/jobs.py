"""Job routes: submit, list, show, cancel. A job is visible only to its owner
(and superusers): every view starts from `Job.objects.visible_to(user)`, and
another user's job is a 404, indistinguishable from a missing one."""

import uuid

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, permissions, serializers, status
from rest_framework.response import Response

from hub.api import serializers as s
from hub.api.base import ApiView
from hub.api.schema import error
from hub.registry import jobs, selectors
from hub.registry.models import Job
from hub.registry.selectors import NotFound
from hub.registry.validation import ValidationError


def visible_jobs(user):
    return Job.objects.visible_to(user).select_related("adapter", "owner", "result_revision__adapter")


def job_get(user, pk) -> Job:
    try:
        pk = uuid.UUID(str(pk))
    except ValueError:
        raise NotFound("job_not_found", f"Job {pk} does not exist or is not yours.") from None
    job = visible_jobs(user).filter(pk=pk).first()
    if job is None:
        raise NotFound("job_not_found", f"Job {pk} does not exist or is not yours.")
    return job


def _filter(qs, qp):
    if qp.get("status"):
        wanted = [v for v in qp["status"].split(",") if v]
        unknown = sorted(set(wanted) - {st for st, _ in Job.STATUS})
        if unknown:
            raise ValidationError("invalid_filter", f"Unknown status {', '.join(unknown)}.", field="status")
        qs = qs.filter(status__in=wanted)
    if qp.get("op"):
        qs = qs.filter(op=qp["op"])
    if qp.get("adapter"):
        owner, _, name = qp["adapter"].partition("/")
        if not owner or not name:
            raise ValidationError("invalid_filter", "adapter must be owner/name.", field="adapter")
        qs = qs.filter(adapter__owner=owner, adapter__name=name)
    return qs


JOB_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH)
FILTERS = [
    OpenApiParameter("status", str, description="queued, running, succeeded, failed or cancelled (comma-separated)"),
    OpenApiParameter("op", str),
    OpenApiParameter("adapter", str, description="owner/name"),
]


class JobList(ApiView, generics.ListAPIView):
    serializer_class = s.JobSerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self):
        return _filter(visible_jobs(self.request.user), self.request.query_params)

    @extend_schema(parameters=FILTERS)
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(request=s.JobCreateSerializer, responses={201: s.JobSerializer})
    def post(self, request):
        ser = s.JobCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        job = jobs.job_create(user=request.user, op=ser.validated_data["op"], params=ser.validated_data["params"])
        return Response(s.JobSerializer(job_get(request.user, job.pk)).data, status=status.HTTP_201_CREATED)


class JobDetail(ApiView):
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(parameters=[JOB_ID], responses=s.JobSerializer)
    def get(self, request, pk):
        return Response(s.JobSerializer(job_get(request.user, pk)).data)


class JobCancel(ApiView):
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(parameters=[JOB_ID], request=None, responses={200: s.JobSerializer, 409: error(409)})
    def post(self, request, pk):
        job = jobs.job_cancel(job=job_get(request.user, pk))
        return Response(s.JobSerializer(job_get(request.user, job.pk)).data)


class TransferAllRequest(serializers.Serializer):
    target = serializers.CharField(max_length=96, help_text="the base model to move to")
    params = serializers.DictField(required=False, default=dict,
                                   help_text="the transfer op's other params (method, finetune_steps, translora, "
                                             "...), the same for every adapter")


class TransferAll(ApiView):
    """Move every adapter on this base that the caller may write: one transfer job each."""

    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(request=TransferAllRequest, responses={201: inline_serializer("TransferAllResult", {
        "jobs": s.JobSerializer(many=True),
        "refused": serializers.ListField(child=serializers.DictField(),
                                         help_text="adapters the transfer op refused: adapter, error, detail"),
    })})
    def post(self, request, slug):
        ser = TransferAllRequest(data=request.data)
        ser.is_valid(raise_exception=True)
        params = {**ser.validated_data["params"], "target": ser.validated_data["target"]}
        created, refused = jobs.transfer_all(user=request.user, source=slug, params=params)
        data = [s.JobSerializer(job_get(request.user, j.pk)).data for j in created]
        return Response({"jobs": data, "refused": refused}, status=status.HTTP_201_CREATED)


class AdapterJobs(ApiView, generics.ListAPIView):
    """The caller's jobs on one adapter (the adapter must be visible)."""

    serializer_class = s.JobSerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self):
        adapter = selectors.adapter_get(self.request.user, self.kwargs["owner"], self.kwargs["name"])
        qp = self.request.query_params.copy()
        qp.pop("adapter", None)
        return _filter(visible_jobs(self.request.user).filter(adapter=adapter), qp)

    @extend_schema(parameters=FILTERS[:2])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)
