"""Resumable staged uploads (hub/registry/partial_uploads.py): a PUT with
`Content-Range` keeps its bytes as they arrive, HEAD's `Upload-Offset` says
how many the hub holds, a part that does not continue them is a 409, the
whole file is checked against its sha256 before it is staged, and partials
are per user and collected by `gc_blobs` when abandoned."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _private_blobs(blob_root):
    """Every test here on its own blob store (tests/conftest.py)."""
    return blob_root


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_part(client, sha: str, data: bytes, start: int | None, total: int, **extra):
    rng = f"bytes */{total}" if start is None else f"bytes {start}-{start + len(data) - 1}/{total}"
    return client.generic("PUT", f"/api/v1/uploads/{sha}", data, content_type="application/octet-stream",
                          HTTP_CONTENT_RANGE=rng, **extra)


def partials(root) -> list[str]:
    folder = root / ".partial"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def stored(root, sha: str) -> bytes | None:
    path = root / "sha256" / sha[:2] / sha[2:4] / sha
    return path.read_bytes() if path.exists() else None


def test_parts_in_order_make_the_staged_blob(api, user, blob_root):
    from hub.registry.models import StagedUpload

    data = os.urandom(5 * 1024 * 1024 + 3)
    sha, cut = sha256(data), 2 * 1024 * 1024 + 1
    r = put_part(api, sha, data[:cut], 0, len(data))
    assert r.status_code == 202, r.content
    assert r.json() == {"sha256": sha, "size": len(data), "received": cut}
    assert r["Upload-Offset"] == str(cut)
    h = api.head(f"/api/v1/uploads/{sha}")
    assert h.status_code == 404 and h["Upload-Offset"] == str(cut)  # not staged, but this much is held
    assert partials(blob_root) == [f"{user.pk}-{sha}"] and stored(blob_root, sha) is None

    r = put_part(api, sha, data[cut:], cut, len(data))
    assert r.status_code == 201, r.content
    assert r.json() == {"sha256": sha, "size": len(data)}
    assert stored(blob_root, sha) == data
    assert partials(blob_root) == []  # linked into the store, its name gone
    assert StagedUpload.objects.filter(user=user, blob_id=sha).exists()
    h = api.head(f"/api/v1/uploads/{sha}")
    assert h.status_code == 200 and "Upload-Offset" not in h
    # The whole file in one ranged PUT, once more: already staged.
    assert put_part(api, sha, data, 0, len(data)).status_code == 200


def test_a_part_that_does_not_continue_the_held_bytes_is_a_409(api, blob_root):
    data = os.urandom(300_000)
    sha = sha256(data)
    assert put_part(api, sha, data[:100_000], 0, len(data)).status_code == 202
    for start in (50_000, 150_000):  # a gap, or bytes the hub has already
        r = put_part(api, sha, data[start:], start, len(data))
        assert r.status_code == 409, r.content
        assert r.json()["error"] == "upload_offset_mismatch" and "100000" in r.json()["detail"]
        assert r["Upload-Offset"] == "100000"
    assert (blob_root / ".partial").joinpath(partials(blob_root)[0]).read_bytes() == data[:100_000]
    # Starting over from byte 0 is always allowed: the held bytes are dropped.
    r = put_part(api, sha, data[:10], 0, len(data))
    assert r.status_code == 202 and r.json()["received"] == 10
    assert put_part(api, sha, data[10:], 10, len(data)).status_code == 201
    assert stored(blob_root, sha) == data


def test_a_whole_file_with_another_sha256_is_refused_and_nothing_is_kept(api, blob_root):
    from hub.registry.models import Blob

    data, claimed = os.urandom(200_000), sha256(b"something else")
    assert put_part(api, claimed, data[:1000], 0, len(data)).status_code == 202
    r = put_part(api, claimed, data[1000:], 1000, len(data))
    assert r.status_code == 400 and r.json()["error"] == "sha256_mismatch", r.content
    assert sha256(data) in r.json()["detail"]
    assert partials(blob_root) == [] and not Blob.objects.exists()
    h = api.head(f"/api/v1/uploads/{claimed}")
    assert h.status_code == 404 and "Upload-Offset" not in h


def test_star_range_reports_the_held_bytes_and_finishes_a_whole_partial(api, user, blob_root):
    from hub.registry.partial_uploads import partial_path

    data = os.urandom(70_000)
    sha = sha256(data)
    r = put_part(api, sha, b"", None, len(data))
    assert r.status_code == 202 and r.json()["received"] == 0
    assert partials(blob_root) == []  # asking leaves nothing behind
    assert put_part(api, sha, data[:500], 0, len(data)).status_code == 202
    r = put_part(api, sha, b"", None, len(data))
    assert r.status_code == 202 and r.json()["received"] == 500 and r["Upload-Offset"] == "500"
    # Every byte arrived but the request died before its commit (a crash): the partial is whole.
    partial_path(user.pk, sha).write_bytes(data)
    assert api.head(f"/api/v1/uploads/{sha}")["Upload-Offset"] == str(len(data))
    r = put_part(api, sha, b"", None, len(data))
    assert r.status_code == 201, r.content
    assert stored(blob_root, sha) == data and partials(blob_root) == []


@pytest.mark.parametrize(("header", "body", "error"), [
    ("bytes 0-9/5", b"x" * 10, "bad_content_range"),           # past the total
    ("bytes 5-4/10", b"", "bad_content_range"),               # end before start
    ("items 0-9/10", b"x" * 10, "bad_content_range"),          # not bytes
    ("bytes 0-9/*", b"x" * 10, "bad_content_range"),           # the total is needed
    ("bytes 0-9/20", b"x" * 5, "bad_content_range"),           # the body is not the range's length
    ("bytes */20", b"x" * 5, "bad_content_range"),             # a status query carries no body
])
def test_malformed_ranges_are_400_and_nothing_is_kept(api, blob_root, header, body, error):
    r = api.generic("PUT", f"/api/v1/uploads/{'a' * 64}", body, content_type="application/octet-stream",
                    HTTP_CONTENT_RANGE=header)
    assert r.status_code == 400, r.content
    assert r.json()["error"] == error
    assert partials(blob_root) == []


def test_a_total_past_the_limit_is_a_413_before_any_byte_is_kept(api, settings, blob_root):
    settings.MAX_UPLOAD_BYTES = 1000
    r = put_part(api, "b" * 64, b"x" * 10, 0, 1001)
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large", r.content
    assert partials(blob_root) == []


def test_partials_are_each_users_own(api, user, client_for, other_user, blob_root):
    data = os.urandom(50_000)
    sha = sha256(data)
    assert put_part(api, sha, data[:20_000], 0, len(data)).status_code == 202
    mallory = client_for(other_user)
    assert "Upload-Offset" not in mallory.head(f"/api/v1/uploads/{sha}")  # alice's bytes are not hers
    r = put_part(mallory, sha, data[20_000:], 20_000, len(data))
    assert r.status_code == 409 and r["Upload-Offset"] == "0"
    assert "Upload-Offset" not in mallory.head(f"/api/v1/uploads/{sha}")  # her refused part left no partial
    assert partials(blob_root) == [f"{user.pk}-{sha}"]
    assert put_part(client_for(None), sha, data, 0, len(data)).status_code in (401, 403)
    assert api.head(f"/api/v1/uploads/{sha}")["Upload-Offset"] == "20000"


def test_one_request_at_a_time_writes_a_partial(api, user, blob_root):
    from hub.registry.partial_uploads import locked_partial

    data = os.urandom(10_000)
    sha = sha256(data)
    with locked_partial(user.pk, sha):  # a request sending this file right now
        r = put_part(api, sha, data, 0, len(data))
        assert r.status_code == 409 and r.json()["error"] == "upload_in_progress", r.content
    assert put_part(api, sha, data, 0, len(data)).status_code == 201


def test_gc_blobs_removes_partials_left_past_the_grace(api, user, blob_root, capsys):
    from django.core.management import call_command

    old, young = os.urandom(1000), os.urandom(1000)
    for data in (old, young):
        assert put_part(api, sha256(data), data[:10], 0, len(data)).status_code == 202
    old_name = f"{user.pk}-{sha256(old)}"
    hours_ago = time.time() - 7200
    os.utime(blob_root / ".partial" / old_name, (hours_ago, hours_ago))
    call_command("gc_blobs")
    assert capsys.readouterr().out.split() == [f".partial/{old_name}"]
    assert partials(blob_root) == [f"{user.pk}-{sha256(young)}"]
    assert "Upload-Offset" not in api.head(f"/api/v1/uploads/{sha256(old)}")
