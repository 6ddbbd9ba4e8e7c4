"""HF-style error answers: status, `X-Error-Code`, the readable `error` text, and
`hf_route`, which maps registry exceptions to them."""

from __future__ import annotations

import functools

from django.http import JsonResponse

from hub.registry import selectors
from hub.registry.services import Conflict, Forbidden
from hub.registry.validation import ValidationError

from .. import card

NOT_FOUND_CODES = {
    "repo_not_found": "RepoNotFound",
    "base_model_not_found": "RepoNotFound",
    "revision_not_found": "RevisionNotFound",
    "entry_not_found": "EntryNotFound",
}



# --- errors -------------------------------------------------------------------------


class HfError(Exception):
    """An answer other than 2xx, in the shape the HF clients understand."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra or {}


def repo_not_found(repo_id: str) -> HfError:
    return HfError(404, f"Repository {repo_id} not found (or not visible with this token).", "RepoNotFound")


def _header_text(text: str) -> str:
    # HTTP header values: one line of latin-1; keep it short.
    one_line = " ".join(str(text).split())
    return one_line.encode("ascii", "replace").decode()[:500]


def error_response(err: HfError) -> JsonResponse:
    body = {"error": err.message, **err.extra}
    if err.error_code:
        body["code"] = err.error_code
    resp = JsonResponse(body, status=err.status)
    if err.error_code:
        resp["X-Error-Code"] = err.error_code
    resp["X-Error-Message"] = _header_text(err.message)
    for k, v in err.headers.items():
        resp[k] = v
    return resp


def hf_route(view):
    """Turn registry exceptions into HF-style answers (status, X-Error-Code, `error` text)."""

    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except HfError as err:
            return error_response(err)
        except selectors.NotFound as exc:
            return error_response(HfError(404, exc.detail, NOT_FOUND_CODES.get(exc.code)))
        except ValidationError as exc:
            status = 413 if exc.code == "upload_too_large" else 400
            extra = {"field": exc.field} if getattr(exc, "field", None) else {}
            return error_response(HfError(status, exc.detail, extra={"reason": exc.code, **extra}))
        except card.CardError as exc:
            return error_response(HfError(400, str(exc), extra={"reason": "invalid_card"}))
        except Conflict as exc:
            return error_response(HfError(409, exc.detail))
        except Forbidden as exc:
            return error_response(HfError(403, exc.detail))

    return wrapped

