"""OpenAPI for the error answers: every operation documents the statuses it can
give in the one error shape of hub/api/errors.py, so that clients (and the
schemathesis test, tests/api/test_schema_fuzz.py) can rely on the schema."""

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="a stable code: not_found, invalid, forbidden, …")
    detail = serializers.CharField(help_text="what went wrong, for people")
    field = serializers.CharField(required=False, help_text="the parameter or field at fault, when one is")
    fields = serializers.DictField(required=False, help_text="field -> messages, for invalid bodies")


ERRORS = {
    400: "Invalid parameters or body.",
    401: "No valid token where one is needed, or an invalid or revoked one.",
    403: "Not allowed: staff only, not a writer of the namespace, or a session request without CSRF token.",
    404: "No such object, or not visible to the caller (also a page past the last).",
    409: "Conflicts with the current state: the name is taken, or the job has finished.",
    413: "The upload is larger than the hub accepts.",
    415: "The body's media type is not one the operation reads.",
    429: "Too many requests: see Retry-After.",
}


def error(code: int, description: str | None = None) -> OpenApiResponse:
    """An explicit error answer for `extend_schema(responses=...)` (409, 413)."""
    return OpenApiResponse(ErrorSerializer, description=description or ERRORS[code])


class ApiSchema(AutoSchema):
    """Adds the error answers each operation can give, judged from its shape:
    any may be throttled or sent a bad token; parameters and bodies can be
    invalid; path parameters and page numbers can miss; writes can be refused."""

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        params = operation.get("parameters", [])
        where = {p["in"] for p in params}
        has_body = "requestBody" in operation
        codes = [401, 429]
        if has_body or "query" in where:
            codes.append(400)
        if method not in ("GET", "HEAD", "OPTIONS"):
            codes.append(403)
        if "path" in where or any(p["name"] == "page" for p in params):
            codes.append(404)
        if has_body:
            codes.append(415)
        ref = self.resolve_serializer(ErrorSerializer, "response").ref
        responses = operation["responses"]
        for code in codes:
            responses.setdefault(str(code), {"content": {"application/json": {"schema": ref}},
                                             "description": ERRORS[code]})
        # The HTTP server refuses an over-long request line before Django sees it, in its own format.
        responses.setdefault("414", {"description": "Request line too long."})
        operation["responses"] = dict(sorted(responses.items()))
        return operation
