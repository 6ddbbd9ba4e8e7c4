"""Who is asking: bearer tokens (never the session cookie for writes), request
bodies and methods, and `whoami-v2`."""

from __future__ import annotations

import json

from django.contrib.auth.models import AnonymousUser
from django.http import JsonResponse

from hub.api.auth import user_for_token
from hub.registry.models import ApiToken

from .errors import HfError, error_response, hf_route

# --- who is asking -------------------------------------------------------------------


def _bearer(request) -> str | None:
    header = request.headers.get("Authorization", "")
    if not header:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise HfError(401, "Invalid credentials in Authorization header: send 'Authorization: Bearer <token>'.")
    return parts[1]


def token_user(request):
    """The user of the bearer token; AnonymousUser without one; 401 for a bad one
    (a stale HF_TOKEN should say so, not look like a missing repo)."""
    raw = _bearer(request)
    if raw is None:
        return AnonymousUser()
    user = user_for_token(raw)
    if user is None:
        raise HfError(401, "Invalid credentials in Authorization header: the token is unknown, expired or revoked.")
    return user


def read_user(request):
    """Readers may also use the browser session (download links in the UI)."""
    user = token_user(request)
    if not user.is_authenticated and getattr(request, "user", None) is not None and request.user.is_authenticated:
        return request.user
    return user


def _json_body(request) -> dict:
    try:
        data = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HfError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise HfError(400, "The request body must be a JSON object.")
    return data


def _method(request, *allowed):
    if request.method not in allowed:
        resp = error_response(HfError(405, f"Use {' or '.join(allowed)} on this route."))
        resp["Allow"] = ", ".join(allowed)
        return resp
    return None



# --- account -------------------------------------------------------------------------------


@hf_route
def whoami(request):
    raw = _bearer(request)
    user = user_for_token(raw) if raw else None
    if user is None:
        raise HfError(401, "Invalid credentials in Authorization header.")
    token = ApiToken.objects.filter(key_hash=ApiToken.hash(raw)).first()
    orgs = [
        {"type": "org", "name": m.org.name, "fullname": m.org.name, "roleInOrg": m.role}
        for m in user.memberships.select_related("org").order_by("org__name")
    ]
    return JsonResponse({
        "type": "user",
        "id": str(user.pk),
        "name": user.username,
        "fullname": user.get_full_name() or user.username,
        "email": user.email or None,
        "isPro": False,
        "orgs": orgs,
        "auth": {"type": "access_token",
                 "accessToken": {"displayName": token.name if token else "", "role": "write"}},
    })

