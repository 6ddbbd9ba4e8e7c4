"""Staged uploads (`PUT|HEAD /api/v1/uploads/{sha256}`) and the JSON commits
that name them (`POST /api/v1/adapters/`, `POST /api/v1/base-models/`): the
body's hash is checked while it is spooled, a staged blob is its uploader's
only, a commit validates exactly as a multipart upload does, and `gc_blobs`
removes what was staged and never committed."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

pytestmark = pytest.mark.django_db

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(autouse=True)
def _private_blobs(blob_root):
    """Every test here on its own blob store (tests/conftest.py)."""
    return blob_root


@pytest.fixture
def folder(make_peft_adapter) -> Path:
    return make_peft_adapter("staged-lora", r=4, targets=("q_proj", "v_proj"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(client, data: bytes, sha: str | None = None):
    return client.generic("PUT", f"/api/v1/uploads/{sha or sha256(data)}", data,
                          content_type="application/octet-stream")


def head(client, sha: str):
    return client.head(f"/api/v1/uploads/{sha}")


def stored_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "sha256").rglob("*") if p.is_file()) if (root / "sha256").exists() else []


def spooled_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".uploads").iterdir()) if (root / ".uploads").exists() else []


def stage_folder(client, folder: Path, names=FILES) -> dict[str, str]:
    shas = {}
    for name in names:
        data = (folder / name).read_bytes()
        r = put(client, data)
        assert r.status_code in (200, 201), r.content
        shas[name] = sha256(data)
    return shas


def commit(client, name: str, shas: dict[str, str], **extra):
    body = {"name": name, "base_model": "tiny-base", "files": [{"path": p, "sha256": s} for p, s in shas.items()],
            **extra}
    return client.post("/api/v1/adapters/", body, format="json")


def multipart(client, name: str, files: dict[str, bytes]):
    parts = [SimpleUploadedFile(p, data) for p, data in files.items()]
    return client.post("/api/v1/adapters/", {"name": name, "base_model": "tiny-base", "files": parts},
                       format="multipart")


# --- staging ---------------------------------------------------------------------------------------


def test_put_stages_a_blob_for_its_uploader_only(api, client_for, other_user, blob_root):
    from hub.registry.models import Blob, StagedUpload

    data = os.urandom(3 * 1024 * 1024 + 17)
    sha = sha256(data)
    assert head(api, sha).status_code == 404
    r = put(api, data)
    assert r.status_code == 201, r.content
    assert r.json() == {"sha256": sha, "size": len(data)}
    assert (blob_root / "sha256" / sha[:2] / sha[2:4] / sha).read_bytes() == data
    assert spooled_files(blob_root) == []  # linked into the store, the spool file gone
    assert Blob.objects.get(sha256=sha).size == len(data)
    assert head(api, sha).status_code == 200
    assert head(api, sha)["ETag"] == f'"{sha}"'
    assert put(api, data).status_code == 200  # again: already staged
    assert StagedUpload.objects.filter(blob_id=sha).count() == 1

    mallory = client_for(other_user)
    assert head(mallory, sha).status_code == 404  # knowing the hash is not enough
    assert head(client_for(None), sha).status_code in (401, 403)


def test_an_empty_file_can_be_staged_and_a_body_needs_its_length(api):
    url = f"/api/v1/uploads/{sha256(b'')}"
    r = api.generic("PUT", url, b"", content_type="application/octet-stream")  # no Content-Length at all
    assert r.status_code == 411 and r.json()["error"] == "length_required"
    r = api.generic("PUT", url, b"", content_type="application/octet-stream", CONTENT_LENGTH="0")
    assert r.status_code == 201, r.content
    assert r.json()["sha256"] == sha256(b"")


def test_a_wrong_sha256_is_a_400_and_nothing_is_kept(api, blob_root):
    from hub.registry.models import Blob, StagedUpload

    data, claimed = b"the bytes sent" * 1000, sha256(b"other bytes")
    r = put(api, data, sha=claimed)
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "sha256_mismatch" and sha256(data) in r.json()["detail"]
    assert not Blob.objects.exists() and not StagedUpload.objects.exists()
    assert stored_files(blob_root) == [] and spooled_files(blob_root) == []
    assert head(api, claimed).status_code == 404 and head(api, sha256(data)).status_code == 404


def test_past_the_size_limit_is_a_413_and_nothing_is_kept(api, settings, blob_root):
    from hub.registry.models import Blob

    settings.MAX_UPLOAD_BYTES = 1000
    r = put(api, b"x" * 1001)
    assert r.status_code == 413, r.content
    assert r.json()["error"] == "upload_too_large"
    assert not Blob.objects.exists() and stored_files(blob_root) == [] and spooled_files(blob_root) == []
    assert put(api, b"x" * 1000).status_code == 201


def test_anonymous_and_malformed_puts_are_refused(client_for, api, blob_root):
    from hub.registry.models import Blob

    r = put(client_for(None), b"data")
    assert r.status_code in (401, 403) and r.json()["error"] == "not_authenticated"
    assert put(api, b"data", sha="A" * 64).status_code == 404  # not a lowercase hex sha256: no such route
    assert put(api, b"data", sha="ab" * 31).status_code == 404
    assert not Blob.objects.exists() and stored_files(blob_root) == []


# --- commits of staged files ------------------------------------------------------------------------


def test_a_commit_of_staged_files_makes_the_revision_a_multipart_upload_makes(api, tiny_base, folder):
    from hub.registry.models import Adapter, StagedUpload

    shas = stage_folder(api, folder)
    r = commit(api, "alice/staged", shas, tags="a,b", visibility="private")
    assert r.status_code == 201, r.content
    staged = r.json()
    r = multipart(api, "alice/multi", {n: (folder / n).read_bytes() for n in FILES})
    assert r.status_code == 201, r.content
    multi = r.json()
    for key in ("r", "lora_alpha", "target_modules", "dtype", "size", "base_model"):
        assert staged[key] == multi[key], key
    assert staged["visibility"] == "private" and sorted(staged["tags"]) == ["a", "b"]

    def files(repo):
        (rev,) = api.get(f"/api/v1/adapters/{repo}/revisions/").json()["results"]
        return {f["path"]: f["sha256"] for f in rev["files"]}

    assert files("alice/staged") == files("alice/multi") == shas
    r = api.get(f"/api/v1/adapters/alice/staged/files/{FILES[1]}")
    assert b"".join(r.streaming_content) == (folder / FILES[1]).read_bytes()
    assert not StagedUpload.objects.exists()  # the commit took them
    assert Adapter.objects.count() == 2


def test_seeds_can_be_staged_too(api, tiny_base, folder):
    seeds = b"".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}).encode() + b"\n" for i in range(4))
    assert put(api, seeds).status_code == 201
    r = commit(api, "alice/seeded", stage_folder(api, folder), seeds=sha256(seeds))
    assert r.status_code == 201, r.content
    assert r.json()["has_seeds"] is True


def test_another_users_staged_or_private_blob_cannot_be_committed(api, client_for, other_user, tiny_base, folder):
    from hub.registry.models import Adapter, Revision

    shas = stage_folder(api, folder)
    mallory = client_for(other_user)
    for sha in shas.values():
        assert head(mallory, sha).status_code == 404
    r = commit(mallory, "mallory/stolen", shas)
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "unknown_upload"
    assert not Adapter.objects.filter(owner="mallory").exists() and not Revision.objects.exists()

    # Committed into alice's private adapter: still not mallory's to name.
    assert commit(api, "alice/private", shas, visibility="private").status_code == 201
    assert head(mallory, shas[FILES[1]]).status_code == 404
    assert commit(mallory, "mallory/stolen", shas).status_code == 400
    # Public: mallory can read it anyway, so a commit may name it without sending it again.
    api.patch("/api/v1/adapters/alice/private/", {"visibility": "public"}, format="json")
    assert head(mallory, shas[FILES[1]]).status_code == 200
    r = commit(mallory, "mallory/fork", shas)
    assert r.status_code == 201, r.content


def test_an_unknown_sha_is_a_400(api, tiny_base, folder):
    from hub.registry.models import Adapter

    shas = stage_folder(api, folder, names=FILES[:1])
    shas[FILES[1]] = "0" * 64
    r = commit(api, "alice/partial", shas)
    assert r.status_code == 400 and r.json()["error"] == "unknown_upload" and FILES[1] in r.json()["detail"]
    assert not Adapter.objects.exists()
    r = api.post("/api/v1/adapters/", {"name": "alice/x", "base_model": "tiny-base",
                                       "files": [{"path": FILES[0], "sha256": "not-a-sha"}]}, format="json")
    assert r.status_code == 400


@pytest.mark.parametrize("weights", [b"not a safetensors file at all",
                                     (100).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [2], "data_'])
def test_an_invalid_safetensors_file_is_refused_as_the_multipart_path_refuses_it(api, tiny_base, folder, weights,
                                                                                   blob_root):
    from hub.registry.models import Adapter, Revision

    files = {FILES[0]: (folder / FILES[0]).read_bytes(), FILES[1]: weights}
    via_multipart = multipart(api, "alice/bad-multi", files)
    assert via_multipart.status_code == 400, via_multipart.content
    shas = {}
    for name, data in files.items():
        assert put(api, data).status_code == 201  # staging does not validate: the commit does
        shas[name] = sha256(data)
    via_staged = commit(api, "alice/bad-staged", shas)
    assert via_staged.status_code == via_multipart.status_code
    assert via_staged.json() == via_multipart.json()
    assert not Adapter.objects.exists() and not Revision.objects.exists()


def test_a_base_model_commit_of_staged_files(staff_api, api, tiny_base_dir):
    from hub.registry.models import BaseModel

    names = sorted(p.name for p in tiny_base_dir.iterdir() if p.is_file())
    shas = stage_folder(staff_api, tiny_base_dir, names=names)
    body = {"slug": "staged-base", "files": [{"path": p, "sha256": s} for p, s in shas.items()]}
    r = api.post("/api/v1/base-models/", body, format="json")
    assert r.status_code == 403  # staff only, staged or not
    r = staff_api.post("/api/v1/base-models/", body, format="json")
    assert r.status_code == 201, r.content
    base = r.json()
    assert {f["path"]: f["sha256"] for f in base["files"]} == shas
    assert base["manifest"] and base["architectures"]
    bad = {**body, "slug": "broken-base",
           "files": [{"path": "model.safetensors", "sha256": sha256(b"junk")}]}
    assert put(staff_api, b"junk").status_code == 201
    r = staff_api.post("/api/v1/base-models/", bad, format="json")
    assert r.status_code == 400, r.content
    assert not BaseModel.objects.filter(slug="broken-base").exists()


# --- garbage collection -------------------------------------------------------------------------------


def test_gc_blobs_removes_staged_uploads_never_committed(api, client_for, other_user, tiny_base, folder,
                                                         blob_root, capsys):
    from django.core.management import call_command
    from django.utils import timezone

    from hub.registry.models import Blob, StagedUpload
    from hub.storage import blob_key

    def age(sha):
        StagedUpload.objects.filter(blob_id=sha).update(touched_at=timezone.now() - timedelta(hours=2))

    old, young, shared, touched = b"abandoned push", b"a push in flight", b"staged by two", b"resumed push"
    for data in (old, young, shared, touched):
        assert put(api, data).status_code == 201
    assert put(client_for(other_user), shared).status_code == 201
    for data in (old, touched):
        age(sha256(data))
    StagedUpload.objects.filter(blob_id=sha256(shared)).exclude(user=other_user).update(
        touched_at=timezone.now() - timedelta(hours=2))  # alice's staging is old, mallory's young
    assert head(api, sha256(touched)).status_code == 200  # a HEAD keeps a staged upload alive
    committed = stage_folder(api, folder)
    assert commit(api, "alice/kept", committed).status_code == 201
    for name, sha in committed.items():  # staged long ago by mallory too, now referenced by alice's revision
        assert put(client_for(other_user), (folder / name).read_bytes()).status_code == 201
        age(sha)

    call_command("gc_blobs", "--dry-run")
    assert capsys.readouterr().out.split() == [blob_key(sha256(old))]
    assert Blob.objects.filter(sha256=sha256(old)).exists()

    call_command("gc_blobs")
    assert capsys.readouterr().out.split() == [blob_key(sha256(old))]
    assert not Blob.objects.filter(sha256=sha256(old)).exists()
    assert not StagedUpload.objects.filter(blob_id=sha256(old)).exists()
    assert sha256(old) not in stored_files(blob_root)
    for data in (young, shared, touched):
        assert sha256(data) in stored_files(blob_root)
    assert StagedUpload.objects.filter(blob_id=sha256(shared)).get().user == other_user
    for sha in committed.values():
        assert sha in stored_files(blob_root) and not StagedUpload.objects.filter(blob_id=sha).exists()
    assert api.get("/api/v1/adapters/alice/kept/files/adapter_model.safetensors").status_code == 200
    # The abandoned bytes are gone: a commit naming them is refused, not broken.
    r = commit(api, "alice/late", {FILES[0]: committed[FILES[0]], FILES[1]: sha256(old)})
    assert r.status_code == 400 and r.json()["error"] == "unknown_upload"
