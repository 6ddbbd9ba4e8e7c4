"""One error shape for every API failure: `{"error": code, "detail": text}`."""

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_handler

from hub.errors import HubError


def _flatten(detail) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{k}: {_flatten(v)}" for k, v in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(v) for v in detail)
    return str(detail)


def error_response(code: str, detail: str, status_code: int, field: str | None = None, headers=None) -> Response:
    body = {"error": code, "detail": detail}
    if field:
        body["field"] = field
    return Response(body, status=status_code, headers=headers)


def exception_handler(exc, context):
    if isinstance(exc, HubError):  # the hub's own refusals carry their status
        return error_response(exc.code, exc.detail, exc.status, exc.field)
    if isinstance(exc, DjangoValidationError):
        return error_response("invalid", " ".join(exc.messages), status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, Http404):
        return error_response("not_found", "Not found.", status.HTTP_404_NOT_FOUND)
    if isinstance(exc, PermissionDenied):
        return error_response("forbidden", "You may not do this.", status.HTTP_403_FORBIDDEN)
    response = drf_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else ("invalid" if isinstance(exc, exceptions.ValidationError) else exc.default_code)
        body = {"error": code, "detail": _flatten(exc.detail)}
        if isinstance(exc, exceptions.ValidationError) and isinstance(exc.detail, dict):
            body["fields"] = exc.detail
        response.data = body
    return response


@csrf_exempt  # as DRF's views are: a DELETE to a wrong path is a 404, not a CSRF page
def no_such_route(request, *args, **kwargs):
    """A path under an API collection that matches no route (an id with a '/',
    a newline or a character names cannot have): the API's 404, not Django's HTML page."""
    return JsonResponse({"error": "not_found", "detail": "No such API route."}, status=404)
