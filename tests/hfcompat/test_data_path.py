"""The zero-copy data path (hub/api/downloads.py, hub/storage.py, hub/registry/uploads.py).

Through a real gunicorn started the way `hubctl serve` starts it, on this
test's database and blobs: full downloads and ranges leave through the WSGI
file_wrapper and `sendfile(2)` (a gunicorn config hook records each sendfile
call: the one piece of instrumentation, since a socket cannot tell how its
bytes were written), with Range, ETag, 304, 416 and the private-adapter 404s
answered on that path. Then the parts one by one: the slice object for
servers that iterate, the upload spool committed by a hard link, S3's
multipart upload and ranged proxy, the front-server modes, and the spool's
garbage collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hub.nginx import standalone_conf
from tests.hfcompat.conftest import upload_adapter
from tests.live_workers import database_url

ROOT = Path(__file__).resolve().parents[2]

# Loaded by gunicorn with --config: after fork, wrap Response.sendfile so each
# call appends {"count": bytes, "used": bool} to SENDFILE_LOG, and the request
# body's reads so each one that returns bytes appends "body <count>" to BODY_LOG,
# or "socket <count>" when the hub read them off the socket past gunicorn's
# buffers (hub/registry/request_body.py): whether and how the web process read
# an upload's bytes.
GUNICORN_CONF = """
import json, os
from gunicorn.http import body, wsgi
from hub.registry import request_body

def post_fork(server, worker):
    original = wsgi.Response.sendfile
    def sendfile(self, respiter):
        used = original(self, respiter)
        with open(os.environ["SENDFILE_LOG"], "a") as f:
            f.write(json.dumps({"used": bool(used), "count": self.response_length}) + "\\n")
        return used
    wsgi.Response.sendfile = sendfile
    for name in ("read", "readline"):
        def counted(self, size=None, _original=getattr(body.Body, name)):
            data = _original(self, size)
            if data:
                with open(os.environ["BODY_LOG"], "a") as f:
                    f.write(f"body {len(data)}\\n")
            return data
        setattr(body.Body, name, counted)
    def readinto(self, view, _original=request_body._GunicornSocketBody.readinto):
        n = _original(self, view)
        if n:
            with open(os.environ["BODY_LOG"], "a") as f:
                f.write(f"socket {n}\\n")
        return n
    request_body._GunicornSocketBody.readinto = readinto
"""


def body_reads(tmp_path, how: str | None = None) -> int:
    """Body bytes the gunicorn of this test read so far ("body": through gunicorn's
    buffers, "socket": off the socket by the hub; None: both)."""
    log = tmp_path / "body_reads.log"
    lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return sum(int(n) for kind, n in lines if how in (None, kind))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gunicorn_hub(transactional_db, settings, tmp_path):
    """(url, sendfile_calls()) of a gunicorn serving this test's data."""
    yield from _gunicorn(settings, tmp_path, {})


def _wait_until_up(proc: subprocess.Popen, url: str, seconds: float, log: Path) -> None:
    """Until `url` answers; a server that exits or stays silent fails the test with its log's tail."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url + "/api/v1/base-models/", timeout=2)
            return
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(log.read_text()[-3000:] if log.exists() else f"{url} never answered")
            time.sleep(0.1)


def _gunicorn(settings, tmp_path, extra_env: dict):
    from django.db import connection

    from hub.cli.serve import gunicorn_extra_flags

    conf = tmp_path / "gunicorn_conf.py"
    conf.write_text(GUNICORN_CONF)
    log = tmp_path / "sendfile.jsonl"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("S3_BUCKET", "BLOB_ACCEL", "UPLOAD_ACCEL")}
    env.update(DJANGO_SETTINGS_MODULE="hub.settings", HUB_HOME=str(settings.HUB_HOME),
               BLOB_ROOT=str(settings.BLOB_ROOT), DATABASE_URL=database_url(connection.settings_dict),
               PYTHONPATH=str(ROOT), SENDFILE_LOG=str(log), BODY_LOG=str(tmp_path / "body_reads.log"),
               **extra_env)
    out = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hub.cli.serve:embedded_app()", "--bind", f"127.0.0.1:{port}",
         "--worker-class", "gthread", "--workers", "1", "--threads", "4", "--config", str(conf),
         *gunicorn_extra_flags()],
        env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(proc, url, 60, tmp_path / "gunicorn.log")

    def calls(at_least: int = 0) -> list[dict]:
        """The sendfile calls so far; waits a little for `at_least` of them (the
        worker logs a call after the client already has the bytes)."""
        deadline = time.monotonic() + 10
        while True:
            lines = log.read_text().splitlines() if log.exists() else []
            if len(lines) >= at_least or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.05)

    yield url, calls
    os.killpg(proc.pid, 9)
    proc.wait(10)
    out.close()


@pytest.fixture
def big_base(transactional_db, staff_user, tmp_path):
    """A base whose model.safetensors is 3 MiB of varied bytes: large enough
    that an iterating server and sendfile would differ in how they send it."""
    from hub.registry.services import IncomingFile, base_model_register

    folder = tmp_path / "big"
    folder.mkdir()
    n = 3 * 1024 * 1024 // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    data = len(header).to_bytes(8, "little") + header + bytes(range(256)) * (n * 4 // 256)
    (folder / "model.safetensors").write_bytes(data)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(folder.iterdir())]
    try:
        base = base_model_register(slug="big-base", files=files, user=staff_user)
    finally:
        for f in files:
            f.fileobj.close()
    return base, data


def test_downloads_go_through_sendfile_with_range_etag_304_416(gunicorn_hub, big_base):
    url, calls = gunicorn_hub
    _, data = big_base
    sha = hashlib.sha256(data).hexdigest()
    for route in ("/api/v1/base-models/big-base/files/model.safetensors", "/big-base/resolve/main/model.safetensors"):
        before = len(calls())
        r = httpx.get(url + route)
        assert r.status_code == 200 and r.content == data
        assert r.headers["etag"] == f'"{sha}"' and r.headers["content-length"] == str(len(data))
        r = httpx.get(url + route, headers={"Range": "bytes=1000-1999999"})
        assert r.status_code == 206 and r.content == data[1000:2000000]
        assert r.headers["content-range"] == f"bytes 1000-1999999/{len(data)}"
        r = httpx.get(url + route, headers={"Range": "bytes=-100"})
        assert r.status_code == 206 and r.content == data[-100:]
        sent = calls(before + 3)[before:]
        assert [c["count"] for c in sent] == [len(data), 1999000, 100]
        assert all(c["used"] for c in sent), sent  # the kernel sent the bytes, not a Python loop

        assert httpx.get(url + route, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        r = httpx.get(url + route, headers={"If-None-Match": f'"{sha}"'})
        assert r.status_code == 304 and r.content == b""
        r = httpx.head(url + route)
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == str(len(data))
        time.sleep(0.3)
        assert len(calls()) == before + 3  # 416, 304 and HEAD send no file


def test_private_adapter_is_404_on_the_zero_copy_path(gunicorn_hub, tiny_base, user, other_user, token_for, peft_dir):
    url, calls = gunicorn_hub
    upload_adapter(owner="alice", name="secret", base=tiny_base, adapter_dir=peft_dir, user=user,
                   visibility="private")
    weights = (peft_dir / "adapter_model.safetensors").read_bytes()
    routes = ("/api/v1/adapters/alice/secret/files/adapter_model.safetensors",
              "/alice/secret/resolve/main/adapter_model.safetensors")
    for route in routes:
        for token in (None, token_for(other_user)):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            for extra in ({}, {"Range": "bytes=0-9"}):
                r = httpx.get(url + route, headers={**headers, **extra})
                assert r.status_code == 404, (route, token, extra)
                assert weights[:64] not in r.content
    assert calls() == []
    owner = {"Authorization": f"Bearer {token_for(user)}"}
    for route in routes:
        r = httpx.get(url + route, headers={**owner, "Range": "bytes=8-"})
        assert r.status_code == 206 and r.content == weights[8:]
    assert [c["used"] for c in calls(2)] == [True, True]


def test_upload_through_gunicorn_is_hashed_and_linked(gunicorn_hub, staff_user, token_for, big_base, settings,
                                                      tmp_path):
    from hub.registry.models import BaseModel
    from hub.storage import blob_key

    url, _ = gunicorn_hub
    _, data = big_base
    data2 = data[:-4] + b"\x01\x02\x03\x04"  # other bytes, same header: a new blob
    (tmp_path / "w.safetensors").write_bytes(data2)
    with open(tmp_path / "w.safetensors", "rb") as w:
        r = httpx.post(url + "/api/v1/base-models/", headers={"Authorization": f"Bearer {token_for(staff_user)}"},
                       data={"slug": "up-base"}, files=[("files", ("model.safetensors", w)),
                                                        ("files", ("config.json", b"{}"))], timeout=60)
    assert r.status_code == 201, r.text
    sha = hashlib.sha256(data2).hexdigest()
    f = BaseModel.objects.get(slug="up-base").files.get(path="model.safetensors")
    assert f.blob.sha256 == sha and f.blob.size == len(data2)
    stored = Path(settings.BLOB_ROOT) / blob_key(sha)
    assert stored.read_bytes() == data2
    assert list((Path(settings.BLOB_ROOT) / ".uploads").iterdir()) == []  # the spool is gone with the request


def test_a_put_cut_off_at_gunicorn_keeps_its_bytes_and_the_resume_sends_only_the_rest(
        gunicorn_hub, user, token_for, settings, tmp_path):
    """The resumable PUT under gunicorn: the bytes of a client that went away are
    kept; the rest comes on a keep-alive connection, read from the socket past
    gunicorn's body buffers (hub/registry/request_body.py), and the next
    requests on that connection start where they should."""
    from hub.storage import blob_key
    from tests.cli.test_push_parallel import cut_off_put

    url, _ = gunicorn_hub
    token = token_for(user)
    data = os.urandom(6 * 1024 * 1024 + 5)
    sha, sent = hashlib.sha256(data).hexdigest(), 4 * 1024 * 1024 + 1
    answer = cut_off_put(url, token, data, sent)
    assert b"incomplete_body" in answer, answer[:300]
    auth = {"Authorization": f"Bearer {token}"}
    h = httpx.head(f"{url}/api/v1/uploads/{sha}", headers=auth)
    assert h.status_code == 404 and h.headers["upload-offset"] == str(sent)

    body_log = tmp_path / "body_reads.log"
    body_log.unlink(missing_ok=True)
    other = os.urandom(3 * 1024 * 1024)
    with httpx.Client(base_url=url, headers={**auth, "Content-Type": "application/octet-stream"},
                      timeout=60) as c:
        r = c.put(f"/api/v1/uploads/{sha}", content=data[sent:],
                  headers={"Content-Range": f"bytes {sent}-{len(data) - 1}/{len(data)}"})
        assert r.status_code == 201, r.text
        # The same connection carries on: a whole file as one ranged PUT, then a plain one, then a HEAD.
        sha_other = hashlib.sha256(other).hexdigest()
        r = c.put(f"/api/v1/uploads/{sha_other}", content=other,
                  headers={"Content-Range": f"bytes 0-{len(other) - 1}/{len(other)}"})
        assert r.status_code == 201, r.text
        plain = b"a plain PUT after them" * 1000
        assert c.put(f"/api/v1/uploads/{hashlib.sha256(plain).hexdigest()}", content=plain).status_code == 201
        assert c.head(f"/api/v1/uploads/{sha}").status_code == 200
    # Every byte of the three bodies came off the socket, none through gunicorn's buffers.
    assert body_reads(tmp_path, "body") == 0
    assert body_reads(tmp_path, "socket") == len(data) - sent + len(other) + len(plain)
    for payload in (data, other):
        assert (Path(settings.BLOB_ROOT) / blob_key(hashlib.sha256(payload).hexdigest())).read_bytes() == payload
    assert list((Path(settings.BLOB_ROOT) / ".partial").iterdir()) == []


def test_a_ranged_put_pipelined_with_the_next_request_leaves_it_intact(gunicorn_hub, user, token_for):
    """A small body arrives with its headers and the next request behind it, in
    one packet: the socket reader takes the body's bytes only."""
    url, _ = gunicorn_hub
    token = token_for(user)
    data = b"pipelined body " * 7
    sha = hashlib.sha256(data).hexdigest()
    host, port = url.removeprefix("http://").split(":")
    put = (f"PUT /api/v1/uploads/{sha} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n"
           f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}\r\n\r\n").encode() + data
    head = (f"HEAD /api/v1/uploads/{sha} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(put + head)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"201", b"200"], answer[:600]


# --- the parts, without a server ------------------------------------------------------------------


def test_file_slice_stops_at_the_end_of_its_range(tmp_path):
    from hub.api.downloads import FileSlice

    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 10)
    s = FileSlice(str(p), 300, 1000)
    got = b"".join(iter(lambda: s.read(333), b""))
    assert got == p.read_bytes()[300:1300]
    assert os.lseek(FileSlice(str(p), 77, 5).fileno(), 0, os.SEEK_CUR) == 77  # where sendfile starts
    s.close()


def test_file_response_is_used_and_iterating_it_respects_the_range(big_base, rf):
    from django.http import FileResponse

    from hub.api.downloads import FileSlice, blob_response

    base, data = big_base
    blob = base.files.get(path="model.safetensors").blob
    r = blob_response(rf.get("/x", HTTP_RANGE="bytes=5-1048580"), blob, "model.safetensors")
    # What Django's WSGI handler hands to the server's file_wrapper:
    assert isinstance(r, FileResponse) and isinstance(r.file_to_stream, FileSlice)
    assert r.status_code == 206 and r["Content-Length"] == str(1048576)
    assert b"".join(r.streaming_content) == data[5:1048581]  # a server that iterates stops at the range's end
    r.close()


def test_spooled_upload_is_committed_by_a_hard_link(transactional_db, settings):
    from django.db import transaction

    from hub.registry.uploads import SpooledUpload
    from hub.storage import blob_batch, upload_temp_dir

    spool = SpooledUpload("model.safetensors", "application/octet-stream", 0, None)
    payload = os.urandom(300_000)
    spool.write(payload)
    spool.seek(0)
    assert os.path.dirname(spool.temporary_file_path()) == upload_temp_dir()
    with blob_batch() as batch, transaction.atomic():
        blob = batch.put(spool, hashlib.sha256(payload).hexdigest(), len(payload))
    stored = Path(settings.BLOB_ROOT) / blob.key
    assert os.stat(stored).st_ino == os.stat(spool.temporary_file_path()).st_ino  # linked, not copied
    spool.close()
    assert stored.read_bytes() == payload


def test_a_callers_own_file_is_copied_not_linked(transactional_db, settings, tmp_path):
    from django.db import transaction

    from hub.storage import blob_batch

    src = tmp_path / "mine.bin"
    src.write_bytes(b"mine" * 1000)
    with blob_batch() as batch, transaction.atomic(), open(src, "rb") as f:
        blob = batch.put(f)
    assert os.stat(Path(settings.BLOB_ROOT) / blob.key).st_ino != os.stat(src).st_ino
    src.write_bytes(b"changed")  # the caller's later edits never reach the store
    assert (Path(settings.BLOB_ROOT) / blob.key).read_bytes() == b"mine" * 1000


def test_background_hash_matches_hashlib():
    from hub.registry.uploads import BackgroundHash

    pieces = [os.urandom(n) for n in (1, 5000, 1 << 20, 3)]
    h = BackgroundHash()
    for p in pieces:
        h.update(p)
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_stale_spool_files_are_collected(transactional_db, settings, blob_root):
    from hub.storage import UPLOAD_DIR, collect_garbage, upload_temp_dir

    old = Path(upload_temp_dir()) / "tmp-old.upload"
    young = Path(upload_temp_dir()) / "tmp-young.upload"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert collect_garbage(3600, dry_run=True) == [f"{UPLOAD_DIR}/tmp-old.upload"] and old.exists()
    assert collect_garbage(3600) == [f"{UPLOAD_DIR}/tmp-old.upload"]
    assert not old.exists() and young.exists()


@pytest.mark.parametrize("mode", ["x-accel-redirect", "x-sendfile"])
def test_front_server_modes_name_the_file_and_leave_the_bytes(mode, client_for, big_base, settings):
    from hub.storage import blob_key

    settings.BLOB_ACCEL = mode
    settings.BLOB_ACCEL_PREFIX = "/_blobs/"
    _, data = big_base
    sha = hashlib.sha256(data).hexdigest()
    c = client_for(None)
    r = c.get("/big-base/resolve/main/model.safetensors", HTTP_RANGE="bytes=0-9")
    assert r.status_code == 200 and r.content == b""  # the front server sends the bytes and the range
    header = "X-Accel-Redirect" if mode == "x-accel-redirect" else "X-Sendfile"
    expected = f"/_blobs/{blob_key(sha)}" if mode == "x-accel-redirect" else str(Path(settings.BLOB_ROOT) / blob_key(sha))
    assert r[header] == expected
    assert r["ETag"] == f'"{sha}"' and r["X-Repo-Commit"] and r["X-Linked-Size"] == str(len(data))
    assert c.get("/big-base/resolve/main/model.safetensors", HTTP_IF_NONE_MATCH=f'"{sha}"').status_code == 304
    assert c.get("/big-base/resolve/main/model.safetensors", HTTP_RANGE=f"bytes={len(data)}-").status_code == 416
    head = c.head("/big-base/resolve/main/model.safetensors")
    assert head.status_code == 200 and header not in head and head["Content-Length"] == str(len(data))


def test_s3_multipart_upload_and_ranged_proxy(s3_storage, transactional_db, client_for, settings):
    from django.db import transaction

    from hub.registry.uploads import SpooledUpload
    from hub.storage import S3_PART, blob_batch, copy_to_path, iter_blob

    settings.S3_DOWNLOAD_MODE = "proxy"
    payload = os.urandom(2 * S3_PART + 12345)  # three parts
    spool = SpooledUpload("w.bin", "application/octet-stream", 0, None)
    spool.write(payload)
    spool.seek(0)
    with blob_batch() as batch, transaction.atomic():
        blob = batch.put(spool, hashlib.sha256(payload).hexdigest(), len(payload))
    spool.close()
    head = s3_storage["client"].head_object(Bucket=s3_storage["bucket"], Key=blob.key)
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    assert b"".join(iter_blob(blob, S3_PART - 10, 20 + S3_PART)) == payload[S3_PART - 10:2 * S3_PART + 10]
    assert b"".join(iter_blob(blob, 0, 0)) == b""
    assert copy_to_path(blob, settings.HUB_HOME / "copy.bin").read_bytes() == payload
    (settings.HUB_HOME / "copy.bin").unlink()


    # open_blob reads what is asked, by ranged GETs: never the whole object into memory.
    import tracemalloc

    from hub.storage import open_blob

    tracemalloc.start()
    with open_blob(blob) as f:
        assert f.read(8) == payload[:8]
        f.seek(S3_PART + 5)
        assert f.read(100) == payload[S3_PART + 5:S3_PART + 105]
        assert f.seek(0, os.SEEK_END) == len(payload) and f.read(10) == b""
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes held to read a few bytes of a {len(payload)}-byte object"


def test_a_store_that_fails_the_write_is_a_503_and_the_whole_partial_waits(s3_storage, transactional_db,
                                                                           client_for, user, staff_user, settings):
    """A real S3 fault (the bucket is gone): the staged PUT and the multipart
    form answer 503 `storage_unavailable`, keep no row, and the resumable
    upload keeps its whole file: once the store is back, `bytes */TOTAL`
    stages it without the bytes travelling again."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from hub.registry.models import Blob, StagedUpload
    from hub.storage import S3_PART, blob_key, partial_upload_dir

    payload = os.urandom(S3_PART + 77)
    sha = hashlib.sha256(payload).hexdigest()
    api = client_for(user)
    good = settings.STORAGES
    settings.STORAGES = {**good, "default": {**good["default"], "OPTIONS": {
        **good["default"]["OPTIONS"], "bucket_name": "no-such-bucket"}}}
    r = api.generic("PUT", f"/api/v1/uploads/{sha}", payload, content_type="application/octet-stream")
    assert r.status_code == 503, r.content
    assert r.json()["error"] == "storage_unavailable" and "nothing was kept" in r.json()["detail"]
    assert not Blob.objects.exists() and not StagedUpload.objects.exists()
    assert (partial_upload_dir() / f"{user.pk}-{sha}").stat().st_size == len(payload)
    assert api.head(f"/api/v1/uploads/{sha}")["Upload-Offset"] == str(len(payload))
    n = 1024
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    weights = len(header).to_bytes(8, "little") + header + os.urandom(4 * n)
    r = client_for(staff_user).post("/api/v1/base-models/", {"slug": "nowhere", "files": [
        SimpleUploadedFile("model.safetensors", weights), SimpleUploadedFile("config.json", b"{}")]},
        format="multipart")
    assert r.status_code == 503 and r.json()["error"] == "storage_unavailable", r.content
    assert not Blob.objects.exists()

    settings.STORAGES = good  # the store is back
    r = api.generic("PUT", f"/api/v1/uploads/{sha}", b"", content_type="application/octet-stream",
                    HTTP_CONTENT_RANGE=f"bytes */{len(payload)}")
    assert r.status_code == 201, r.content
    got = s3_storage["client"].get_object(Bucket=s3_storage["bucket"], Key=blob_key(sha))["Body"].read()
    assert got == payload


def test_s3_resumable_upload_is_kept_on_disk_then_sent_in_parts(s3_storage, transactional_db, client_for, user,
                                                                settings):
    from hub.storage import S3_PART, blob_key, partial_upload_dir

    payload = os.urandom(S3_PART + 999)
    sha, cut = hashlib.sha256(payload).hexdigest(), S3_PART // 2
    api = client_for(user)

    def part(start, end):
        return api.generic("PUT", f"/api/v1/uploads/{sha}", payload[start:end], content_type="application/octet-stream",
                           HTTP_CONTENT_RANGE=f"bytes {start}-{end - 1}/{len(payload)}")

    assert part(0, cut).status_code == 202
    assert partial_upload_dir() == Path(settings.HUB_HOME) / "partial-uploads"  # S3 has no blob root
    assert api.head(f"/api/v1/uploads/{sha}")["Upload-Offset"] == str(cut)
    r = part(cut, len(payload))
    assert r.status_code == 201, r.content
    got = s3_storage["client"].get_object(Bucket=s3_storage["bucket"], Key=blob_key(sha))["Body"].read()
    assert got == payload
    assert not (partial_upload_dir() / f"{user.pk}-{sha}").exists()


def nginx_binary() -> str:
    import shutil

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("no nginx binary (apt-get install nginx-light)")
    return nginx


@pytest.fixture
def nginx_hub(transactional_db, settings, tmp_path):
    """nginx (the docs/deploy.md configuration) in front of a gunicorn with
    BLOB_ACCEL=x-accel-redirect; skipped where no nginx is installed."""
    yield from _nginx(settings, tmp_path, {"BLOB_ACCEL": "x-accel-redirect", "BLOB_ACCEL_PREFIX": "/_blobs/"})


def _nginx(settings, tmp_path, hub_env: dict):
    """(url, sendfile_calls()) of nginx, configured as docs/deploy.md shows
    (downloads by X-Accel-Redirect, staged uploads stored by nginx under
    BLOB_ROOT/.nginx-body), in front of a gunicorn started with `hub_env`."""
    nginx = nginx_binary()
    gen = _gunicorn(settings, tmp_path, hub_env)
    upstream, calls = next(gen)
    home = tmp_path / "nginx"
    home.mkdir()
    Path(settings.BLOB_ROOT).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (home / "nginx.conf").write_text(standalone_conf(home=str(home), listen=f"127.0.0.1:{port}",
                                                     upstream=upstream.removeprefix("http://"),
                                                     blob_root=str(settings.BLOB_ROOT), as_root=os.geteuid() == 0))
    proc = subprocess.Popen([nginx, "-p", str(home), "-c", str(home / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(proc, url, 20, home / "error.log")
    yield url, calls
    os.killpg(proc.pid, 9)
    proc.wait(10)
    next(gen, None)


def test_nginx_sends_the_file_named_by_x_accel_redirect(nginx_hub, big_base, tiny_base, user, token_for, peft_dir):
    url, calls = nginx_hub
    _, data = big_base
    sha = hashlib.sha256(data).hexdigest()
    route = "/big-base/resolve/main/model.safetensors"
    r = httpx.get(url + route)
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{sha}"' and r.headers["x-repo-commit"] and "x-accel-redirect" not in r.headers
    r = httpx.get(url + route, headers={"Range": "bytes=100-1999"})
    assert r.status_code == 206 and r.content == data[100:2000]  # nginx answered the range from the file
    assert r.headers["content-range"] == f"bytes 100-1999/{len(data)}"
    assert httpx.get(url + route, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    assert httpx.get(url + route, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    head = httpx.head(url + route)
    assert head.status_code == 200 and head.headers["x-linked-size"] == str(len(data))
    upload_adapter(owner="alice", name="secret", base=tiny_base, adapter_dir=peft_dir, user=user,
                   visibility="private")
    private = "/alice/secret/resolve/main/adapter_model.safetensors"
    assert httpx.get(url + private).status_code == 404
    owner = {"Authorization": f"Bearer {token_for(user)}"}
    r = httpx.get(url + private, headers=owner)
    assert r.status_code == 200 and r.content == (peft_dir / "adapter_model.safetensors").read_bytes()
    assert calls() == []  # gunicorn sent no file: nginx did
    # The internal location is not reachable from outside.
    from hub.storage import blob_key
    assert httpx.get(url + "/_blobs/" + blob_key(sha)).status_code == 404


def test_source_path_trusts_only_the_objects_own_descriptor(tmp_path):
    import tempfile

    from django.core.files import File

    from hub.storage import _source_path

    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    with open(p, "rb") as f:
        assert _source_path(f) == str(p)
        assert _source_path(File(f, name="sha256/ab/cd/abcd")) is None  # a storage key, not a path
    other = tmp_path / "other.bin"
    other.write_bytes(b"xyz")
    with open(p, "rb") as f:
        class Renamed:  # a wrapper whose name points elsewhere than its descriptor
            name = str(other)
            fileno = f.fileno
        assert _source_path(Renamed()) is None
    with tempfile.NamedTemporaryFile(dir=tmp_path) as t:
        assert _source_path(t) == t.name
    assert _source_path(__import__("io").BytesIO(b"x")) is None


def test_docs_deploy_shows_the_server_block_the_tests_run():
    """docs/deploy.md's nginx block is hub.nginx's, which the nginx tests and the benchmark run."""
    import re

    from hub.nginx import server_block

    doc = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    shown = re.search(r"```nginx\n(server \{.*?\n\})\n```", doc, re.S)
    assert shown and shown.group(1) + "\n" == server_block()


def test_manage_nginx_conf_prints_it_for_the_settings(settings):
    from io import StringIO

    from django.core.management import call_command

    settings.BLOB_ROOT = Path("/data/hub-blobs")
    settings.UPLOAD_ACCEL_ROOT = "/data/hub-blobs/.body"
    out = StringIO()
    call_command("nginx_conf", "--upstream", "10.0.0.5:9000", stdout=out)
    text = out.getvalue()
    assert "alias /data/hub-blobs/;" in text and "client_body_temp_path /data/hub-blobs/.body 1 2;" in text
    assert text.count("proxy_pass http://10.0.0.5:9000;") == 2 and text.startswith("server {")
