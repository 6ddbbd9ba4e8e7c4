"""Upload offload by the front server (`UPLOAD_ACCEL=nginx`, docs/deploy.md):
nginx stores the body of `PUT /api/v1/uploads/{sha256}` in a file of its own
and names it in `X-Upload-File`; the hub checks, hashes and links that file and
never reads the body. The header is trusted only with the setting on, and
only for a regular file under `UPLOAD_ACCEL_ROOT`.

First through the Django test client (the rules, one by one), then through
a real nginx in front of a real gunicorn, with the configuration the docs
show (skipped where no nginx is installed)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.hfcompat.test_data_path import _nginx, body_reads, nginx_binary


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(root: Path) -> list[Path]:
    return sorted(p for p in (root / "sha256").rglob("*") if p.is_file()) if (root / "sha256").exists() else []


# --- the rules, through the test client -----------------------------------------------------------


@pytest.fixture
def accel(settings, blob_root):
    """UPLOAD_ACCEL on, with the front server's body folder inside the blob root."""
    body = blob_root / ".nginx-body"
    body.mkdir(parents=True)
    settings.UPLOAD_ACCEL = "nginx"
    settings.UPLOAD_ACCEL_ROOT = str(body)
    return body


def put_named(client, sha: str, path, length=None, body: bytes = b""):
    """A PUT as nginx passes it on: no body, the file's path and the client's Content-Length."""
    extra = {"HTTP_X_UPLOAD_FILE": str(path)}
    if length is not None:
        extra["HTTP_X_UPLOAD_LENGTH"] = str(length)
    return client.generic("PUT", f"/api/v1/uploads/{sha}", body, content_type="application/octet-stream", **extra)


def test_the_front_servers_file_is_hashed_and_linked_not_read_through_the_request(api, accel, blob_root,
                                                                                   monkeypatch):
    from hub.registry.models import StagedUpload
    from hub.registry.uploads import HashingUploadHandler
    from hub.storage import blob_key

    def never(*a, **k):
        raise AssertionError("the upload handler read a body")

    monkeypatch.setattr(HashingUploadHandler, "receive_data_chunk", never)
    data = os.urandom(3 * 1024 * 1024 + 17)
    tmp = accel / "3" / "0000000003"  # as nginx names them: levels, then a sequence number
    tmp.parent.mkdir()
    tmp.write_bytes(data)
    r = put_named(api, sha256(data), tmp, len(data))
    assert r.status_code == 201, r.content
    assert r.json() == {"sha256": sha256(data), "size": len(data)}
    blob = blob_root / blob_key(sha256(data))
    assert os.stat(blob).st_ino == os.stat(tmp).st_ino  # committed by a hard link, no byte copied
    tmp.unlink()  # what nginx does after the request: the blob keeps its bytes
    assert blob.read_bytes() == data and os.stat(blob).st_nlink == 1
    assert StagedUpload.objects.filter(blob_id=sha256(data)).count() == 1
    tmp.write_bytes(data)  # the same file again: 200, as on the body path
    assert put_named(api, sha256(data), tmp, len(data)).status_code == 200


def test_a_wrong_sha256_keeps_nothing(api, accel, blob_root):
    from hub.registry.models import Blob, StagedUpload

    data = b"bytes whose hash is not the url's" * 1000
    tmp = accel / "0000000001"
    tmp.write_bytes(data)
    r = put_named(api, sha256(b"other"), tmp, len(data))
    assert r.status_code == 400 and r.json()["error"] == "sha256_mismatch"
    assert stored(blob_root) == [] and not Blob.objects.exists() and not StagedUpload.objects.exists()
    assert tmp.read_bytes() == data  # the front server's file is the front server's to delete


@pytest.mark.parametrize("case", ["short", "long", "no_length", "too_large"])
def test_length_rules_on_the_front_servers_file(case, api, accel, blob_root, settings):
    data = os.urandom(4096)
    tmp = accel / "0000000002"
    tmp.write_bytes(data)
    length = {"short": len(data) - 1, "long": len(data) + 1, "no_length": None, "too_large": len(data)}[case]
    if case == "too_large":
        settings.MAX_UPLOAD_BYTES = len(data) - 1
    r = put_named(api, sha256(data), tmp, length)
    status, code = {"short": (400, "incomplete_body"), "long": (400, "incomplete_body"),
                    "no_length": (411, "length_required"), "too_large": (413, "upload_too_large")}[case]
    assert (r.status_code, r.json()["error"]) == (status, code), r.content
    assert stored(blob_root) == []


def test_without_upload_accel_the_header_is_refused_and_never_followed(api, settings, blob_root, tmp_path):
    from hub.registry.models import Blob

    settings.UPLOAD_ACCEL = ""
    settings.UPLOAD_ACCEL_ROOT = str(tmp_path)
    secret = tmp_path / "someone-elses-file"
    secret.write_bytes(b"not yours" * 100)
    r = put_named(api, sha256(secret.read_bytes()), secret, secret.stat().st_size)
    assert r.status_code == 400 and r.json()["error"] == "upload_file_header_refused"
    # With a body too: refused before the body is read, whichever hash the URL names.
    for body in (secret.read_bytes(), b"my own bytes"):
        r = put_named(api, sha256(body), secret, len(body), body=body)
        assert r.status_code == 400 and r.json()["error"] == "upload_file_header_refused"
    assert stored(blob_root) == [] and not Blob.objects.exists()
    # The same PUT without the header is an ordinary upload.
    r = api.generic("PUT", f"/api/v1/uploads/{sha256(b'my own bytes')}", b"my own bytes",
                    content_type="application/octet-stream")
    assert r.status_code == 201


def test_with_upload_accel_a_put_without_the_header_reads_its_body(api, accel, blob_root):
    data = b"sent to the hub directly" * 100
    r = api.generic("PUT", f"/api/v1/uploads/{sha256(data)}", data, content_type="application/octet-stream")
    assert r.status_code == 201 and [p.name for p in stored(blob_root)] == [sha256(data)]


@pytest.mark.parametrize("trick", ["outside", "dotdot", "symlink_out", "symlinked_dir", "root_itself", "relative",
                                   "directory", "fifo", "missing", "prefix_sibling"])
def test_paths_outside_the_front_servers_folder_are_refused(trick, api, accel, blob_root, tmp_path, monkeypatch):
    from hub.registry.models import Blob

    data = b"a file the hub must not take" * 100
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data)
    if trick == "outside":
        path = outside
    elif trick == "dotdot":
        path = f"{accel}/../../outside.bin"
    elif trick == "symlink_out":
        path = accel / "0000000009"
        path.symlink_to(outside)
    elif trick == "symlinked_dir":
        (accel / "7").symlink_to(tmp_path, target_is_directory=True)
        path = accel / "7" / "outside.bin"
    elif trick == "root_itself":
        path = accel
    elif trick == "relative":
        monkeypatch.chdir(tmp_path)  # where outside.bin lies: a relative path never counts, wherever it points
        path = "outside.bin"
    elif trick == "directory":
        path = accel / "sub"
        path.mkdir()
    elif trick == "fifo":
        path = accel / "0000000010"
        os.mkfifo(path)  # opening it for reading must not hang the request
    elif trick == "missing":
        path = accel / "0000000404"
    else:  # a sibling whose name starts with the root's: not under it
        sibling = Path(str(accel) + "-evil")
        sibling.mkdir()
        path = sibling / "f"
        path.write_bytes(data)
    r = put_named(api, sha256(data), path, len(data))
    assert r.status_code == 400 and r.json()["error"] == "bad_upload_file", r.content
    assert stored(blob_root) == [] and not Blob.objects.exists()
    assert outside.read_bytes() == data


def test_settings_refuse_an_unknown_mode_or_a_missing_root(monkeypatch):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for env, needle in (({"UPLOAD_ACCEL": "apache"}, "UPLOAD_ACCEL='apache'"),
                        ({"UPLOAD_ACCEL": "nginx"}, "needs UPLOAD_ACCEL_ROOT"),
                        ({"UPLOAD_ACCEL": "nginx", "UPLOAD_ACCEL_ROOT": "relative/dir"}, "needs UPLOAD_ACCEL_ROOT")):
        full = {**os.environ, "DJANGO_SETTINGS_MODULE": "hub.settings", "PYTHONPATH": str(root), **env}
        r = subprocess.run([sys.executable, "-c", "import hub.settings"], env=full, capture_output=True, text=True,
                           cwd=root)
        assert r.returncode != 0 and needle in r.stderr, r.stderr[-500:]


def test_the_put_operation_keeps_its_schema(client):
    """The refusal hook sits beside `put`, not under its schema decorator."""
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    put = next(op["put"] for path, op in schema["paths"].items() if path.startswith("/api/v1/uploads/"))
    assert {"200", "201", "202", "400", "409", "411", "413"} <= set(put["responses"])
    assert "application/octet-stream" in put["requestBody"]["content"]


# --- through a real nginx in front of a real gunicorn ---------------------------------------------


def _safetensors(n_floats: int, tail: bytes) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    body = (bytes(range(256)) * (4 * n_floats // 256 + 1))[:4 * n_floats - len(tail)] + tail
    return len(header).to_bytes(8, "little") + header + body


@pytest.fixture
def offload_hub(transactional_db, settings, tmp_path, blob_root):
    """nginx configured as docs/deploy.md shows, in front of a gunicorn with
    UPLOAD_ACCEL=nginx and BLOB_ACCEL=x-accel-redirect, on a private blob store
    (its checks look for leftovers there)."""
    nginx_binary()
    yield from _nginx(settings, tmp_path, {
        "BLOB_ACCEL": "x-accel-redirect", "BLOB_ACCEL_PREFIX": "/_blobs/",
        "UPLOAD_ACCEL": "nginx", "UPLOAD_ACCEL_ROOT": str(Path(settings.BLOB_ROOT) / ".nginx-body")})


def _upstream(tmp_path) -> str:
    """The gunicorn behind the nginx of this test (to reach it directly)."""
    conf = (tmp_path / "nginx" / "nginx.conf").read_text()
    return next(line.split()[-1] for line in conf.splitlines() if "proxy_pass http" in line).rstrip(";")


def _nginx_files(settings) -> list[Path]:
    body = Path(settings.BLOB_ROOT) / ".nginx-body"
    return [p for p in body.rglob("*") if p.is_file()] if body.exists() else []


def test_nginx_stores_the_body_and_the_hub_links_it(offload_hub, staff_user, token_for, settings, tmp_path):
    """Both directions through one nginx: the PUT's bytes never reach gunicorn,
    the staged blob is the same bytes (a link that outlives nginx's file), a
    commit names it, and the download comes back through X-Accel-Redirect."""
    from hub.registry.models import StagedUpload
    from hub.storage import blob_key

    url, sendfile_calls = offload_hub
    auth = {"Authorization": f"Bearer {token_for(staff_user)}"}
    data = _safetensors(3 * 1024 * 1024 // 4, os.urandom(8))
    sha = sha256(data)
    r = httpx.put(f"{url}/api/v1/uploads/{sha}", content=data, headers=auth, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json() == {"sha256": sha, "size": len(data)}
    assert body_reads(tmp_path) == 0  # gunicorn read no byte of the body: nginx named its file
    blob = Path(settings.BLOB_ROOT) / blob_key(sha)
    assert blob.read_bytes() == data
    deadline = time.monotonic() + 5
    while _nginx_files(settings) and time.monotonic() < deadline:  # nginx removes its file after the request
        time.sleep(0.05)
    assert _nginx_files(settings) == [] and os.stat(blob).st_nlink == 1  # the link kept the bytes
    assert list((Path(settings.BLOB_ROOT) / ".uploads").glob("*")) == []  # the hub spooled nothing
    assert StagedUpload.objects.filter(blob_id=sha, user=staff_user).exists()
    # A client's own X-Upload-File is replaced by nginx's: it names no file of the client's choosing.
    r = httpx.put(f"{url}/api/v1/uploads/{sha}", content=data, timeout=60,
                  headers={**auth, "X-Upload-File": "/etc/passwd", "X-Upload-Length": "1"})
    assert r.status_code == 200, r.text
    assert body_reads(tmp_path) == 0

    config = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()
    assert httpx.put(f"{url}/api/v1/uploads/{sha256(config)}", content=config, headers=auth).status_code == 201
    r = httpx.post(f"{url}/api/v1/base-models/", headers=auth, timeout=60, json={
        "slug": "offloaded", "files": [{"path": "model.safetensors", "sha256": sha},
                                       {"path": "config.json", "sha256": sha256(config)}]})
    assert r.status_code == 201, r.text
    r = httpx.get(f"{url}/offloaded/resolve/main/model.safetensors", timeout=60)
    assert r.status_code == 200 and r.content == data and r.headers["etag"] == f'"{sha}"'
    assert sendfile_calls() == []  # nginx sent the file

    # The instrument can tell: the same PUT straight to gunicorn (no nginx, no header) reads the body.
    upstream = _upstream(tmp_path)
    other = data[:-1] + bytes([data[-1] ^ 1])
    before = body_reads(tmp_path)  # the JSON commit's body went through gunicorn, as it should
    r = httpx.put(f"{upstream}/api/v1/uploads/{sha256(other)}", content=other, headers=auth, timeout=60)
    assert r.status_code == 201, r.text
    assert body_reads(tmp_path) - before == len(other)


def test_nginx_a_wrong_sha256_is_a_400_and_nothing_is_stored(offload_hub, user, token_for, settings, tmp_path):
    from hub.registry.models import Blob, StagedUpload
    from hub.storage import blob_key

    url, _ = offload_hub
    data = os.urandom(1024 * 1024)
    wrong = sha256(b"not these bytes")
    r = httpx.put(f"{url}/api/v1/uploads/{wrong}", content=data, timeout=60,
                  headers={"Authorization": f"Bearer {token_for(user)}"})
    assert r.status_code == 400 and r.json()["error"] == "sha256_mismatch", r.text
    assert body_reads(tmp_path) == 0
    for sha in (wrong, sha256(data)):
        assert not (Path(settings.BLOB_ROOT) / blob_key(sha)).exists()
        assert not Blob.objects.filter(sha256=sha).exists()
    assert not StagedUpload.objects.exists()
    deadline = time.monotonic() + 5
    while _nginx_files(settings) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _nginx_files(settings) == []


def test_gunicorn_with_upload_accel_refuses_a_path_outside_the_root(offload_hub, user, token_for, settings,
                                                                    tmp_path):
    """A request that reaches gunicorn directly with its own X-Upload-File (what
    binding the hub to loopback prevents) still cannot name a file outside
    UPLOAD_ACCEL_ROOT."""
    from hub.registry.models import Blob

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private bytes" * 1000)
    sha = sha256(secret.read_bytes())
    upstream = _upstream(tmp_path)
    auth = {"Authorization": f"Bearer {token_for(user)}"}
    root = Path(settings.BLOB_ROOT) / ".nginx-body"
    for path in (str(secret), f"{root}/../../{secret.relative_to(secret.anchor)}", f"{root}/../sha256"):
        r = httpx.put(f"{upstream}/api/v1/uploads/{sha}", headers={**auth, "X-Upload-File": path,
                                                                      "X-Upload-Length": str(secret.stat().st_size)})
        assert r.status_code == 400 and r.json()["error"] == "bad_upload_file", (path, r.text)
    assert not Blob.objects.filter(sha256=sha).exists()


def test_gunicorn_without_upload_accel_refuses_nginxs_header(transactional_db, settings, tmp_path, user, token_for):
    """nginx configured for offload in front of a hub without UPLOAD_ACCEL: the
    PUT is refused (400), never staged from the named file."""
    from hub.registry.models import Blob

    gen = _nginx(settings, tmp_path, {"BLOB_ACCEL": "x-accel-redirect", "BLOB_ACCEL_PREFIX": "/_blobs/"})
    url, _ = next(gen)
    try:
        data = os.urandom(64 * 1024)
        r = httpx.put(f"{url}/api/v1/uploads/{sha256(data)}", content=data,
                      headers={"Authorization": f"Bearer {token_for(user)}"})
        assert r.status_code == 400 and r.json()["error"] == "upload_file_header_refused", r.text
        assert not Blob.objects.filter(sha256=sha256(data)).exists()
    finally:
        next(gen, None)


def test_on_s3_the_front_servers_file_is_uploaded_from_its_path(accel):
    """The S3 commit (boto3's managed upload) reads a file by its path when the
    file object names one: nginx's file is sent from where it lies, like the
    hub's own spool (no S3 run here: the same `_source_path` rule)."""
    from hub.registry.uploads import open_front_server_upload
    from hub.storage import _source_path, _spooled_path

    tmp = accel / "0000000005"
    tmp.write_bytes(b"x" * 100)
    with open_front_server_upload(str(tmp)) as f:
        assert _source_path(f) == str(tmp) == _spooled_path(f)


def test_nginx_carries_resumable_parts_too(offload_hub, user, token_for, settings, tmp_path):
    """A ranged PUT of the whole file is linked like a plain one; the rest of a
    file cut off earlier is appended from nginx's file in the kernel: gunicorn
    reads no byte of either body."""
    from hub.storage import blob_key
    from tests.cli.test_push_parallel import cut_off_put

    url, _ = offload_hub
    auth = {"Authorization": f"Bearer {token_for(user)}", "Content-Type": "application/octet-stream"}
    whole = os.urandom(2 * 1024 * 1024 + 1)
    r = httpx.put(f"{url}/api/v1/uploads/{sha256(whole)}", content=whole, timeout=60,
                  headers={**auth, "Content-Range": f"bytes 0-{len(whole) - 1}/{len(whole)}"})
    assert r.status_code == 201, r.text
    assert body_reads(tmp_path) == 0
    assert (Path(settings.BLOB_ROOT) / blob_key(sha256(whole))).read_bytes() == whole

    data, sent = os.urandom(3 * 1024 * 1024 + 7), 1024 * 1024 + 3
    assert b"incomplete_body" in cut_off_put(_upstream(tmp_path), token_for(user), data, sent)  # cut at gunicorn
    before = body_reads(tmp_path)
    r = httpx.put(f"{url}/api/v1/uploads/{sha256(data)}", content=data[sent:], timeout=60,
                  headers={**auth, "Content-Range": f"bytes {sent}-{len(data) - 1}/{len(data)}"})
    assert r.status_code == 201, r.text
    assert body_reads(tmp_path) == before  # the rest came as nginx's file
    assert (Path(settings.BLOB_ROOT) / blob_key(sha256(data))).read_bytes() == data
    assert list((Path(settings.BLOB_ROOT) / ".partial").iterdir()) == []


@pytest.fixture
def offload_hub_s3(transactional_db, settings, tmp_path, blob_root, seaweedfs):
    """nginx storing upload bodies in front of a gunicorn whose blobs are on S3 (SeaweedFS)."""
    nginx_binary()
    yield from _nginx(settings, tmp_path, {
        "S3_BUCKET": seaweedfs["bucket"], "AWS_ENDPOINT_URL": seaweedfs["endpoint"], "AWS_ACCESS_KEY_ID": "hub",
        "AWS_SECRET_ACCESS_KEY": "hub", "UPLOAD_ACCEL": "nginx",
        "UPLOAD_ACCEL_ROOT": str(Path(settings.BLOB_ROOT) / ".nginx-body")})


def test_nginx_stored_body_goes_to_s3_from_its_file(offload_hub_s3, seaweedfs, user, token_for, settings, tmp_path):
    """With S3 blobs the hub sends nginx's file to the bucket (boto3's managed
    upload from the path): gunicorn reads no byte of the body, nginx's file goes."""
    from hub.storage import S3_PART, blob_key

    url, _ = offload_hub_s3
    data = os.urandom(S3_PART + 4321)  # two parts
    r = httpx.put(f"{url}/api/v1/uploads/{sha256(data)}", content=data, timeout=60,
                  headers={"Authorization": f"Bearer {token_for(user)}"})
    assert r.status_code == 201, r.text
    assert body_reads(tmp_path) == 0
    obj = seaweedfs["client"].get_object(Bucket=seaweedfs["bucket"], Key=blob_key(sha256(data)))
    assert obj["Body"].read() == data
    deadline = time.monotonic() + 5
    while _nginx_files(settings) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _nginx_files(settings) == []
    assert not (Path(settings.BLOB_ROOT) / "sha256").exists()  # nothing landed on the filesystem store
