"""`/api/v1/tokens`: the caller's own API tokens. Listing shows what the UI's token page
shows (never a token's value); creating answers the new value once, as the UI does."""

from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.parsers import JSONParser
from rest_framework.response import Response

from hub.api.base import ApiView
from hub.registry import services
from hub.registry.models import ApiToken


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at"]
        read_only_fields = fields


class StrictCharField(serializers.CharField):
    """Only a JSON string: DRF's CharField would take 5 or true as "5" / "True"."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class TokenCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=64, help_text="a reminder of where it is used")
    expires = StrictCharField(max_length=16, required=False, allow_blank=True, default="",
                              help_text="lifetime: 30d, 12h, 90m, or empty / 'never'")


class TokenCreatedSerializer(TokenSerializer):
    token = serializers.CharField(help_text="the token itself, shown this once")

    class Meta(TokenSerializer.Meta):
        fields = TokenSerializer.Meta.fields + ["token"]
        read_only_fields = fields


class TokenList(ApiView, generics.ListAPIView):
    serializer_class = TokenSerializer
    permission_classes = [permissions.IsAuthenticated]
    parser_classes = [JSONParser]  # a JSON object with a name: anything else is refused, never a default token

    def get_queryset(self):
        return self.request.user.api_tokens.order_by("-created_at", "-id")

    @extend_schema(request=TokenCreateSerializer, responses={201: TokenCreatedSerializer})
    def post(self, request):
        ser = TokenCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        raw = services.token_create(user=request.user, name=ser.validated_data["name"],
                                    expires=ser.validated_data["expires"])
        token = ApiToken.objects.get(key_hash=ApiToken.hash(raw))
        return Response({**TokenSerializer(token).data, "token": raw}, status=status.HTTP_201_CREATED)
