"""Blob responses with Range, ETag and HEAD: shared by the REST files route
and the Hugging Face-compatible resolve route.

How the bytes leave (docs/deploy.md):
- filesystem blobs: a `FileResponse` over the file, positioned at the range's
  start, with Content-Length = the range's length. Under gunicorn the WSGI
  `file_wrapper` hands the descriptor to `sendfile(2)`: the kernel copies page
  cache to socket, no byte passes through Python. Other servers iterate the
  same object, which stops at the range's end.
- `BLOB_ACCEL=x-accel-redirect|x-sendfile`: an empty answer naming the file for
  the front server (nginx / Apache, lighttpd), which sends it and serves Range.
- S3: `S3_DOWNLOAD_MODE=redirect` answers a presigned URL; `proxy` streams one
  ranged GET in 8 MiB pieces.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.http import FileResponse, HttpResponse, HttpResponseRedirect, StreamingHttpResponse

from hub.registry.models import Blob
from hub.registry.validation import content_disposition
from hub.storage import BIG_CHUNK, iter_blob, local_path, presigned_url

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class FileSlice:
    """`length` bytes of a file from `start`, for FileResponse.

    gunicorn's sendfile takes the offset from the descriptor's position and the
    count from Content-Length; read() stops at the slice's end for servers that
    iterate instead. Neither tell() nor seek(): given those, FileResponse
    measures the file itself, reading it through or from the wrong end."""

    def __init__(self, path: str, start: int, length: int):
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the response
        self._f.seek(start)
        self._end = start + length

    def fileno(self) -> int:
        return self._f.fileno()

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._f.tell()
        if left <= 0:
            return b""
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def close(self) -> None:
        self._f.close()


def _body(blob: Blob, status: int, start: int, length: int) -> HttpResponse:
    path = local_path(blob)
    accel = settings.BLOB_ACCEL
    if path is not None and accel == "x-accel-redirect":
        # nginx serves the internal location and applies the client's Range itself.
        resp = HttpResponse(status=200)
        resp["X-Accel-Redirect"] = settings.BLOB_ACCEL_PREFIX.rstrip("/") + "/" + blob.key
        return resp
    if path is not None and accel == "x-sendfile":
        resp = HttpResponse(status=200)
        resp["X-Sendfile"] = path
        return resp
    if path is not None:
        resp = FileResponse(FileSlice(path, start, length), status=status, content_type="application/octet-stream")
        resp.block_size = BIG_CHUNK  # when a server iterates instead of sendfile
        return resp
    return StreamingHttpResponse(iter_blob(blob, start, length), status=status)


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
    resp = HttpResponse(status=status) if request.method == "HEAD" else _body(blob, status, start, length)
    resp["Content-Type"] = "application/octet-stream"
    resp["Content-Disposition"] = content_disposition(filename)
    if "X-Accel-Redirect" in resp or "X-Sendfile" in resp:
        for k, v in headers.items():  # the front server answers Range and sets the length
            resp[k] = v
        return resp
    resp["Content-Length"] = str(length)
    if status == 206:
        resp["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    for k, v in headers.items():
        resp[k] = v
    return resp
