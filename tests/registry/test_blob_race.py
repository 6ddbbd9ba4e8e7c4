"""A delete racing an upload of the same bytes, and the blob garbage collector.

The blob store is content-addressed: bob's adapter and alice's identical
upload share one Blob row and one file. The delete must never remove a file
the upload is about to reference: both sides take the blob's row lock
(hub/storage.py). Each test here runs on its own blob directory.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction

pytestmark = [pytest.mark.django_db(transaction=True)]

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(autouse=True)
def _private_blobs(blob_root):
    """Every test here on its own blob store (tests/conftest.py)."""
    return blob_root


@pytest.fixture
def adapter_dir(make_peft_adapter):
    return make_peft_adapter("race-lora")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def incoming(folder: Path):
    from hub.registry.services import IncomingFile

    return [IncomingFile(name, open(folder / name, "rb")) for name in FILES]


def upload_service(owner, name, folder, base, user):
    from hub.registry.services import adapter_create_from_upload

    files = incoming(folder)
    try:
        return adapter_create_from_upload(owner=owner, name=name, base=base, files=files, user=user).adapter
    finally:
        for f in files:
            f.fileobj.close()


def stored_path(root: Path, sha: str) -> Path:
    from hub.storage import blob_key

    return root / blob_key(sha)


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run fn on its own thread (and so its own database connection)."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # reported by the test, not lost in the thread
            out["error"] = exc
        finally:
            connection.close()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


# --- put ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_put_rewrites_a_rows_missing_or_short_file(blob_root, damage):
    from hub.registry.models import Blob
    from hub.storage import blob_batch

    data = b"the bytes of a blob " * 100
    with blob_batch() as batch, transaction.atomic():
        batch.put_bytes(data)
    path = stored_path(blob_root, sha256(data))
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:-7])
    with blob_batch() as batch, transaction.atomic():
        blob = batch.put_bytes(data)
    assert path.read_bytes() == data
    assert Blob.objects.get(sha256=sha256(data)).size == blob.size == len(data)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no second copy under another name


def test_a_rolled_back_put_leaves_no_file(blob_root):
    from hub.storage import blob_batch

    data = b"rejected upload"
    with pytest.raises(RuntimeError), blob_batch() as batch, transaction.atomic():
        batch.put_bytes(data)
        raise RuntimeError("validation failed after the bytes were stored")
    assert not stored_path(blob_root, sha256(data)).exists()


# --- delete under a concurrent reference ----------------------------------------------------------


def test_delete_waits_for_an_upload_holding_the_same_blob(blob_root, tiny_base, make_user, adapter_dir,
                                                          monkeypatch):
    """bob deletes his adapter while alice's upload of the same bytes has
    stored its blobs but not yet committed its revision: the delete waits for
    her commit, then keeps the files she now references."""
    from hub.registry import services
    from hub.registry.models import Adapter

    alice, bob = make_user("alice"), make_user("bob")
    bobs = upload_service("bob", "x", adapter_dir, tiny_base, bob)

    holding, release = threading.Event(), threading.Event()
    real_revision_create = services.revision_create

    def paused_revision_create(**kwargs):
        if kwargs["adapter"].owner == "alice":
            holding.set()  # her blobs are stored and their rows held
            assert release.wait(30)
        return real_revision_create(**kwargs)

    monkeypatch.setattr(services, "revision_create", paused_revision_create)
    uploader, uploaded = in_thread(upload_service, "alice", "y", adapter_dir, tiny_base, alice)
    assert holding.wait(30), uploaded
    deleter, deleted = in_thread(services.adapter_delete, adapter=bobs)
    deleter.join(1.0)
    assert deleter.is_alive(), "the delete went ahead while the upload held the blob rows"
    release.set()
    uploader.join(30)
    deleter.join(30)
    assert "error" not in uploaded and "error" not in deleted, (uploaded, deleted)

    assert not Adapter.objects.filter(owner="bob").exists()
    for name in FILES:
        data = (adapter_dir / name).read_bytes()
        assert stored_path(blob_root, sha256(data)).read_bytes() == data


def test_delete_unreferenced_keeps_what_is_referenced(blob_root, user):
    from hub.registry.models import Blob, Job
    from hub.storage import blob_batch, delete_unreferenced

    with blob_batch() as batch, transaction.atomic():
        free, checkpoint = batch.put_bytes(b"nobody's"), batch.put_bytes(b"a running job's stage output")
    Job.objects.create(op="sleep", owner=user, status="running", checkpoints={"stage": checkpoint.sha256})
    assert delete_unreferenced([free, checkpoint]) == 1
    assert set(Blob.objects.values_list("sha256", flat=True)) == {checkpoint.sha256}
    assert not stored_path(blob_root, free.sha256).exists()
    assert stored_path(blob_root, checkpoint.sha256).exists()


# --- gc_blobs ---------------------------------------------------------------------------------------


def test_gc_blobs_removes_old_orphans_only(blob_root, capsys):
    from django.core.management import call_command

    from hub.storage import blob_batch, blob_key

    def orphan(data: bytes, age: float) -> Path:
        path = stored_path(blob_root, sha256(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    with blob_batch() as batch, transaction.atomic():
        kept = batch.put_bytes(b"referenced by a row")
    kept_path = stored_path(blob_root, kept.sha256)
    os.utime(kept_path, (time.time() - 7200, time.time() - 7200))
    old, young = orphan(b"a crashed upload", 7200), orphan(b"an upload in flight", 60)

    call_command("gc_blobs", "--dry-run")
    assert capsys.readouterr().out.split() == [blob_key(sha256(b"a crashed upload"))]
    assert old.exists()

    call_command("gc_blobs", "--grace-seconds", "3600")
    assert capsys.readouterr().out.split() == [blob_key(sha256(b"a crashed upload"))]
    assert not old.exists() and young.exists() and kept_path.exists()

    call_command("gc_blobs", "--grace-seconds", "0")
    assert not young.exists() and kept_path.exists()


# --- the race itself, over HTTP-level requests on PostgreSQL -------------------------------------------


def test_delete_racing_an_identical_upload_breaks_nothing(tiny_base, make_user, client_for, adapter_dir):
    """bob uploads X, then bob's DELETE of X and alice's upload of the same
    bytes run together (0-30 ms apart). Whatever the order, no request
    answers 500 and every adapter left downloads with the right sha256."""
    if connection.vendor != "postgresql":
        pytest.skip("the stress race needs PostgreSQL's concurrent writers (set DATABASE_URL); "
                    "SQLite serializes writers, and the deterministic tests above cover it")
    alice, bob = make_user("alice"), make_user("bob")
    clients = {"alice": client_for(alice), "bob": client_for(bob)}
    for c in clients.values():
        c.raise_request_exception = False  # count a 500, do not raise it here
    files = {name: (adapter_dir / name).read_bytes() for name in FILES}

    def post(client, repo):
        body = [SimpleUploadedFile(n, data) for n, data in files.items()]
        return client.post("/api/v1/adapters/", {"name": repo, "base_model": "tiny-base", "files": body},
                           format="multipart").status_code

    def race(delete_first: bool, offset: float, barrier: threading.Barrier, i: int):
        statuses = {}

        def delete():
            barrier.wait()
            if not delete_first:
                time.sleep(offset)
            statuses["delete"] = clients["bob"].delete(f"/api/v1/adapters/bob/x{i}/").status_code

        def upload():
            barrier.wait()
            if delete_first:
                time.sleep(offset)
            statuses["upload"] = post(clients["alice"], f"alice/y{i}")

        threads = [in_thread(delete)[0], in_thread(upload)[0]]
        for t in threads:
            t.join(60)
        return statuses

    rng = random.Random(7)
    tries = broken = errors = 0
    started = time.monotonic()
    while tries < 200 and time.monotonic() - started < 45:
        i = tries
        assert post(clients["bob"], f"bob/x{i}") == 201
        statuses = race(rng.random() < 0.5, rng.uniform(0, 0.03), threading.Barrier(2), i)
        tries += 1
        errors += sum(code >= 500 for code in statuses.values())
        assert statuses.get("delete") in (204, 500) and statuses.get("upload") in (201, 500), statuses
        if statuses["upload"] == 201:
            for name, data in files.items():
                r = clients["alice"].get(f"/api/v1/adapters/alice/y{i}/files/{name}")
                try:
                    body = b"".join(r.streaming_content) if r.status_code == 200 else b""
                except OSError:  # the file was deleted under the row
                    body = b""
                broken += sha256(body) != sha256(data)
            assert clients["alice"].delete(f"/api/v1/adapters/alice/y{i}/").status_code == 204
    elapsed = time.monotonic() - started
    print(f"blob race: {tries} tries, {broken} broken files, {errors} answers >= 500, {elapsed:.1f} s")
    assert (broken, errors) == (0, 0)
    assert tries >= 20
