"""`resolve`: one file's bytes with the headers HF clients need (X-Repo-Commit,
ETag = sha256, X-Linked-*), through hub.api.downloads (zero-copy, Range, 304/416)."""

from __future__ import annotations

from django.http import HttpResponse

from hub.api.downloads import blob_response, parse_range
from hub.registry import services
from hub.registry.validation import content_disposition

from .auth import _method, read_user
from .errors import HfError, hf_route
from .snapshots import snapshot

# --- downloads -------------------------------------------------------------------------


def _bytes_response(request, content: bytes, path: str, headers: dict) -> HttpResponse:
    size = len(content)
    rng = parse_range(request.headers.get("Range", ""), size) if request.method == "GET" else None
    if rng == "unsatisfiable":
        resp = HttpResponse(status=416)
        resp["Content-Range"] = f"bytes */{size}"
        return resp
    start, end = (0, size - 1) if rng is None else rng
    body = b"" if request.method == "HEAD" else content[start:end + 1]
    resp = HttpResponse(body, status=200 if rng is None else 206, content_type="application/octet-stream")
    resp["Content-Length"] = str(end - start + 1 if size else 0)
    resp["Accept-Ranges"] = "bytes"
    resp["Content-Disposition"] = content_disposition(path, "inline")
    if rng is not None:
        resp["Content-Range"] = f"bytes {start}-{end}/{size}"
    for k, v in headers.items():
        resp[k] = v
    return resp


@hf_route
def resolve(request, repo, rev, path):
    if (bad := _method(request, "GET", "HEAD")) is not None:
        return bad
    snap = snapshot(read_user(request), repo, rev)
    entry = snap.files.get(path)
    if entry is None:
        raise HfError(404, f"{path} does not exist in {repo} at {snap.sha}.", "EntryNotFound",
                      headers={"X-Repo-Commit": snap.sha})
    etag = f'"{entry.sha256}"'
    headers = {"X-Repo-Commit": snap.sha, "ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)}
    if entry.content is not None:
        return _bytes_response(request, entry.content, path, headers)
    if snap.adapter is not None:
        services.count_download(snap.adapter, request)
    return blob_response(request, entry.blob, path, headers)


