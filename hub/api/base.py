"""The base of every REST view (first among its bases, before a generic view):
the error answers in its OpenAPI operations, and a 400 for text no database
column can hold."""

from rest_framework.views import APIView

from hub.api.schema import ApiSchema
from hub.registry.validation import ValidationError


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class ApiView(APIView):
    schema = ApiSchema()

    def streams_body(self, request) -> bool:
        """True for a request whose view reads the body itself, as a stream of
        bytes (a resumable upload's part): it is not parsed here first."""
        return False

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        # PostgreSQL refuses NUL in text and jsonb: a query, path or body with one would be a 500 there.
        parsed = request.method in ("POST", "PUT", "PATCH") and not self.streams_body(request)
        body = request.data if parsed else None
        if hasattr(body, "lists"):  # a QueryDict (form or multipart): every value of every key
            body = dict(body.lists())
        if _has_nul(dict(request.query_params.lists())) or _has_nul(kwargs) or _has_nul(body):
            raise ValidationError("invalid_text", "Text may not contain NUL (\\x00) characters.")
