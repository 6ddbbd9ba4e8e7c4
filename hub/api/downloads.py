"""Streamed blob responses with Range, ETag and HEAD: shared by the REST files
route and the Hugging Face-compatible resolve route."""

from __future__ import annotations

import re

from django.conf import settings
from django.http import HttpResponse, HttpResponseRedirect, StreamingHttpResponse

from hub.registry.models import Blob
from hub.registry.validation import content_disposition
from hub.storage import CHUNK, open_blob, presigned_url

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _iter_range(blob: Blob, start: int, length: int):
    with open_blob(blob) as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for one byte range; None without a usable header;
    "unsatisfiable" when the range lies past the end."""
    m = RANGE_RE.match(header.strip()) if header else None
    if not m or (not m[1] and not m[2]):
        return None
    if m[1]:
        start = int(m[1])
        end = int(m[2]) if m[2] else size - 1
    else:  # suffix range: the last N bytes
        n = int(m[2])
        if n == 0:
            return "unsatisfiable"
        start, end = max(size - n, 0), size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, min(end, size - 1)


def blob_response(request, blob: Blob, filename: str, headers: dict | None = None, allow_redirect: bool = True):
    headers = dict(headers or {})
    etag = f'"{blob.sha256}"'
    headers.setdefault("ETag", etag)
    headers["Accept-Ranges"] = "bytes"
    if allow_redirect and settings.S3_BUCKET and settings.S3_DOWNLOAD_MODE == "redirect" and request.method == "GET":
        url = presigned_url(blob, filename)
        resp = HttpResponseRedirect(url)
        for k, v in headers.items():
            resp[k] = v
        return resp
    if request.headers.get("If-None-Match") in (etag, blob.sha256):
        resp = HttpResponse(status=304)
        for k, v in headers.items():
            resp[k] = v
        return resp
    size = blob.size
    rng = parse_range(request.headers.get("Range", ""), size) if request.method == "GET" else None
    if rng == "unsatisfiable":
        resp = HttpResponse(status=416)
        resp["Content-Range"] = f"bytes */{size}"
        return resp
    if rng is None:
        status, start, length = 200, 0, size
    else:
        status, start, length = 206, rng[0], rng[1] - rng[0] + 1
    if request.method == "HEAD":
        resp = HttpResponse(status=status)
    else:
        resp = StreamingHttpResponse(_iter_range(blob, start, length), status=status)
    resp["Content-Type"] = "application/octet-stream"
    resp["Content-Length"] = str(length)
    resp["Content-Disposition"] = content_disposition(filename)
    if status == 206:
        resp["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    for k, v in headers.items():
        resp[k] = v
    return resp
