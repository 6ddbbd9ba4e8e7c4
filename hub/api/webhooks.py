"""Webhook routes: an owner (a user, or a writer of an organization)
subscribes to events about its adapters, sees each delivery and can send a
test ping. Webhooks of namespaces the caller cannot write are a 404."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, permissions, status
from rest_framework.response import Response

from hub.api import serializers as s
from hub.api.base import ApiView
from hub.registry import webhooks
from hub.registry.models import Webhook
from hub.registry.selectors import NotFound
from hub.registry.validation import ascii_digits

HOOK_ID = OpenApiParameter("id", int, OpenApiParameter.PATH)


def webhook_get(user, pk: str) -> Webhook:
    hook = webhooks.webhooks_visible_to(user).filter(pk=int(pk)).first() if ascii_digits(pk) else None
    if hook is None:
        raise NotFound("webhook_not_found", f"Webhook {pk} does not exist or is not yours.")
    return hook


class WebhookList(ApiView, generics.ListAPIView):
    serializer_class = s.WebhookSerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self):
        return webhooks.webhooks_visible_to(self.request.user)

    @extend_schema(request=s.WebhookCreateSerializer, responses={201: s.WebhookCreatedSerializer})
    def post(self, request):
        ser = s.WebhookCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        hook = webhooks.webhook_create(user=request.user, owner=data.get("owner") or request.user.username,
                                       url=data["url"], events=data.get("events"),
                                       description=data.get("description", ""))
        return Response(s.WebhookCreatedSerializer(hook).data, status=status.HTTP_201_CREATED)


@extend_schema(parameters=[HOOK_ID])
class WebhookDetail(ApiView):
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(responses=s.WebhookSerializer)
    def get(self, request, pk):
        return Response(s.WebhookSerializer(webhook_get(request.user, pk)).data)

    @extend_schema(request=s.WebhookPatchSerializer, responses=s.WebhookSerializer)
    def patch(self, request, pk):
        hook = webhook_get(request.user, pk)
        ser = s.WebhookPatchSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        hook = webhooks.webhook_update(webhook=hook, **ser.validated_data)
        return Response(s.WebhookSerializer(hook).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk):
        webhook_get(request.user, pk).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema(parameters=[HOOK_ID])
class WebhookRotateSecret(ApiView):
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(request=None, responses=s.WebhookCreatedSerializer)
    def post(self, request, pk):
        hook = webhooks.webhook_rotate_secret(webhook=webhook_get(request.user, pk))
        return Response(s.WebhookCreatedSerializer(hook).data)


@extend_schema(parameters=[HOOK_ID])
class WebhookPing(ApiView):
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(request=None, responses={202: s.WebhookDeliverySerializer})
    def post(self, request, pk):
        delivery = webhooks.ping(webhook_get(request.user, pk))
        return Response(s.WebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)


@extend_schema(parameters=[HOOK_ID])
class WebhookDeliveries(ApiView, generics.ListAPIView):
    serializer_class = s.WebhookDeliverySerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self):
        return webhook_get(self.request.user, self.kwargs["pk"]).deliveries.all()
