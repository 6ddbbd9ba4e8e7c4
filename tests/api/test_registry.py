"""The registry over REST: register a base, upload real PEFT adapters, list,
filter, download (Range, ETag), refuse bad input without leaving anything
behind, and keep private adapters invisible."""

import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from hub.registry.models import Adapter, Blob, Revision


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_of(folder: Path, names=("adapter_config.json", "adapter_model.safetensors")):
    return [SimpleUploadedFile(n, (folder / n).read_bytes()) for n in names]


def upload(client, folder, name="alice/skill", base="tiny-base", files=None, **extra):
    data = {"name": name, "base_model": base, "files": files if files is not None else files_of(folder), **extra}
    return client.post("/api/v1/adapters/", data, format="multipart")


def stored_blob_count(settings):
    root = Path(settings.BLOB_ROOT)
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@pytest.fixture
def adapter_dir(make_peft_adapter):
    return make_peft_adapter("lora", r=4, targets=("q_proj", "v_proj"))


def test_register_base_reads_manifest_from_headers(staff_api, tiny_base_dir, db):
    files = [SimpleUploadedFile(p.name, p.read_bytes()) for p in sorted(tiny_base_dir.iterdir()) if p.is_file()]
    r = staff_api.post("/api/v1/base-models/", {"slug": "tb", "family": "tiny", "files": files}, format="multipart")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert body["manifest"]["model.layers.0.self_attn.q_proj.weight"]["shape"] == [64, 64]
    assert body["manifest"]["model.layers.0.self_attn.k_proj.weight"]["shape"] == [32, 64]
    assert body["architectures"] == ["LlamaForCausalLM"]
    assert len(body["sha"]) == 40
    # the same files again under another name are fine; the same name is a conflict
    files = [SimpleUploadedFile(p.name, p.read_bytes()) for p in sorted(tiny_base_dir.iterdir()) if p.is_file()]
    r = staff_api.post("/api/v1/base-models/", {"slug": "tb", "files": files}, format="multipart")
    assert r.status_code == 409 and r.json()["error"] == "already_exists"


def test_only_staff_registers_bases(api, tiny_base_dir):
    files = [SimpleUploadedFile("model.safetensors", (tiny_base_dir / "model.safetensors").read_bytes())]
    r = api.post("/api/v1/base-models/", {"slug": "tb", "files": files}, format="multipart")
    assert r.status_code == 403


def test_upload_list_filter_detail_download(api, tiny_base, adapter_dir, make_peft_adapter, client_for):
    r = upload(api, adapter_dir, tags="math, Demo", description="# Skill\nAdds.")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert body["id"] == "alice/skill"
    assert body["r"] == 4 and body["target_modules"] == ["q_proj", "v_proj"] and body["dtype"] == "F32"
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    config = (adapter_dir / "adapter_config.json").read_bytes()
    assert body["size"] == len(weights) + len(config)
    assert sorted(body["tags"]) == ["demo", "math"]

    other = make_peft_adapter("lora8", r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2)
    assert upload(api, other, name="alice/wide").status_code == 201

    def ids(**q):
        res = api.get("/api/v1/adapters/", q)
        assert res.status_code == 200
        return sorted(a["id"] for a in res.json()["results"])

    assert ids() == ["alice/skill", "alice/wide"]
    assert ids(r=8) == ["alice/wide"]
    assert ids(max_r=4) == ["alice/skill"]
    assert ids(target_module="k_proj") == ["alice/wide"]
    assert ids(target_module="q_proj") == ["alice/skill", "alice/wide"]
    assert ids(tag="math") == ["alice/skill"]
    assert ids(q="wid") == ["alice/wide"]
    assert ids(base_model="tiny-base") == ["alice/skill", "alice/wide"]
    assert ids(base_model="nope") == []
    assert ids(dtype="f32") == ["alice/skill", "alice/wide"]
    assert ids(kind="upload") == ["alice/skill", "alice/wide"]
    assert api.get("/api/v1/adapters/", {"r": "x"}).status_code == 400

    detail = api.get("/api/v1/adapters/alice/skill/").json()
    assert detail["description"].startswith("# Skill") and set(detail["refs"]) == {"main"}

    # downloads: byte-identical, ETag = sha256, Content-Length
    anon = client_for(None)
    res = anon.get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors")
    assert res.status_code == 200
    got = b"".join(res.streaming_content)
    assert sha256(got) == sha256(weights)
    assert res["ETag"] == f'"{sha256(weights)}"' and int(res["Content-Length"]) == len(weights)
    head = anon.head("/api/v1/adapters/alice/skill/files/adapter_model.safetensors")
    assert head.status_code == 200 and int(head["Content-Length"]) == len(weights)
    # Range: a resumed download
    part = anon.get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors", HTTP_RANGE="bytes=100-")
    assert part.status_code == 206
    assert b"".join(part.streaming_content) == weights[100:]
    assert part["Content-Range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"
    tail = anon.get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors", HTTP_RANGE="bytes=-10")
    assert b"".join(tail.streaming_content) == weights[-10:]
    bad = anon.get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors", HTTP_RANGE=f"bytes={len(weights)}-")
    assert bad.status_code == 416
    cached = anon.get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors",
                      HTTP_IF_NONE_MATCH=f'"{sha256(weights)}"')
    assert cached.status_code == 304
    # a pinned revision by commit id, and a missing file
    sha = detail["refs"]["main"]
    res = anon.get(f"/api/v1/adapters/alice/skill/files/adapter_config.json?revision={sha[:10]}")
    assert b"".join(res.streaming_content) == config
    missing = anon.get("/api/v1/adapters/alice/skill/files/nope.bin")
    assert missing.status_code == 404 and missing.json()["error"] == "entry_not_found"
    assert anon.get("/api/v1/adapters/alice/skill/files/adapter_config.json?revision=dev").json()["error"] == "revision_not_found"

    revs = api.get("/api/v1/adapters/alice/skill/revisions/").json()["results"]
    assert len(revs) == 1 and revs[0]["kind"] == "upload" and revs[0]["refs"] == ["main"]
    assert {f["path"] for f in revs[0]["files"]} == {"adapter_config.json", "adapter_model.safetensors"}


def test_patch_and_delete(api, client_for, other_user, tiny_base, adapter_dir, settings):
    assert upload(api, adapter_dir).status_code == 201
    assert client_for(other_user).patch("/api/v1/adapters/alice/skill/", {"visibility": "private"},
                                        format="json").status_code == 403
    r = api.patch("/api/v1/adapters/alice/skill/", {"visibility": "private", "tags": ["x"]}, format="json")
    assert r.status_code == 200 and r.json()["visibility"] == "private" and r.json()["tags"] == ["x"]
    before = stored_blob_count(settings)
    assert api.delete("/api/v1/adapters/alice/skill/").status_code == 204
    assert not Adapter.objects.exists()
    # the adapter's blobs go with it (the base's stay)
    assert stored_blob_count(settings) == before - 2


# --- bad input: a 4xx JSON error, and nothing stored ---------------------------------------


def _safetensors_bytes(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def _bad_cases(adapter_dir, wrong_shape_dir):
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    config = (adapter_dir / "adapter_config.json").read_bytes()
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + n])
    payload = weights[8 + n :]
    first = next(k for k in header if k != "__metadata__")
    lying = dict(header)
    lying[first] = {**header[first], "data_offsets": [0, header[first]["data_offsets"][1] + 4]}
    cfg = lambda b: SimpleUploadedFile("adapter_config.json", b)  # noqa: E731
    st = lambda b, name="adapter_model.safetensors": SimpleUploadedFile(name, b)  # noqa: E731
    return {
        "truncated_safetensors": ([cfg(config), st(weights[:-100])], 400, None),
        "lying_offsets": ([cfg(config), st(_safetensors_bytes(lying, payload))], 400, None),
        "oversized_header": ([cfg(config), st(struct.pack("<Q", 1 << 40) + b"{}")], 400, "header_too_large"),
        "pickle_bin": ([cfg(config), st(b"\x80\x04K\x01.", "adapter_model.bin")], 400, "pickle_refused"),
        "wrong_shapes": (files_of(wrong_shape_dir), 400, "shape_mismatch"),
        "missing_config": ([st(weights)], 400, "missing_config"),
        "empty_file": ([cfg(config), st(b"")], 400, "empty_file"),
        "config_not_json": ([cfg(b"{nope"), st(weights)], 400, "invalid_config"),
    }


@pytest.mark.parametrize(
    "case",
    ["truncated_safetensors", "lying_offsets", "oversized_header", "pickle_bin", "wrong_shapes",
     "missing_config", "empty_file", "config_not_json"],
)
def test_bad_uploads_leave_nothing(case, api, tiny_base, adapter_dir, make_peft_adapter, tmp_path, settings):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model_fixtures import TINY_CONFIG

    wide_base = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, "hidden_size": 96, "num_attention_heads": 4})).save_pretrained(wide_base)
    wrong = make_peft_adapter("wrong", base_dir=wide_base)
    files, status, code = _bad_cases(adapter_dir, wrong)[case]
    blobs_before, stored_before = Blob.objects.count(), stored_blob_count(settings)
    r = upload(api, adapter_dir, files=files)
    assert r.status_code == status, r.content
    body = r.json()
    assert set(body) >= {"error", "detail"} and body["detail"]
    if code:
        assert body["error"] == code, body
    if case == "wrong_shapes":
        assert "q_proj" in body["detail"] and "96" in body["detail"] and "64" in body["detail"]
    assert not Adapter.objects.exists() and not Revision.objects.exists()
    assert Blob.objects.count() == blobs_before and stored_blob_count(settings) == stored_before


def test_unknown_base_duplicate_name_and_bad_names(api, tiny_base, adapter_dir, client_for, other_user):
    r = upload(api, adapter_dir, base="llama-9")
    assert r.status_code == 400 and r.json()["error"] == "unknown_base_model" and "llama-9" in r.json()["detail"]
    assert upload(api, adapter_dir).status_code == 201
    blobs = Blob.objects.count()
    dup = upload(api, adapter_dir)
    assert dup.status_code == 409 and dup.json()["error"] == "already_exists"
    assert Revision.objects.count() == 1 and Blob.objects.count() == blobs
    bad = upload(api, adapter_dir, name="../etc")
    assert bad.status_code == 400 and Adapter.objects.count() == 1
    # writing into somebody else's namespace
    r = upload(client_for(other_user), adapter_dir, name="alice/mine")
    assert r.status_code == 403 and Adapter.objects.count() == 1
    anon = upload(client_for(None), adapter_dir, name="alice/anon")
    assert anon.status_code in (401, 403)


def test_traversal_and_hidden_filenames_refused(user, tiny_base, adapter_dir):
    from hub.registry.services import IncomingFile, adapter_create_from_upload
    from hub.registry.validation import ValidationError

    for bad in ("../adapter_model.safetensors", "/etc/passwd", "a/../../b", ".env"):
        files = [IncomingFile(p, io.BytesIO((adapter_dir / p).read_bytes()))
                 for p in ("adapter_config.json", "adapter_model.safetensors")]
        files.append(IncomingFile(bad, io.BytesIO(b"x")))
        with pytest.raises(ValidationError) as exc:
            adapter_create_from_upload(owner="alice", name="t", base=tiny_base, files=files, user=user)
        assert exc.value.code == "bad_filename"
    assert not Adapter.objects.exists()


def test_upload_over_the_cap_is_413(api, tiny_base, adapter_dir, settings):
    settings.MAX_UPLOAD_BYTES = 1000
    r = upload(api, adapter_dir)
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large"
    assert not Adapter.objects.exists() and not Blob.objects.filter(revision_files__isnull=False).exists()


def test_seeds_are_validated_and_stored(api, tiny_base, adapter_dir):
    bad = SimpleUploadedFile("seeds.jsonl", b'{"prompt": "a"}\n')
    r = upload(api, adapter_dir, seeds=bad)
    assert r.status_code == 400 and r.json()["error"] == "invalid_seeds"
    good = SimpleUploadedFile("seeds.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    r = upload(api, adapter_dir, seeds=good)
    assert r.status_code == 201 and r.json()["has_seeds"] is True


# --- private adapters: 404 for everybody else, on every route ----------------------------------

PRIVATE_ROUTES = [
    "/api/v1/adapters/alice/secret/",
    "/api/v1/adapters/alice/secret/revisions/",
    "/api/v1/adapters/alice/secret/lineage",
    "/api/v1/adapters/alice/secret/files/adapter_config.json",
    "/api/v1/adapters/alice/secret/files/adapter_model.safetensors",
]


@pytest.mark.parametrize("who", ["other", "anonymous"])
def test_private_adapters_are_invisible(who, api, client_for, other_user, tiny_base, adapter_dir):
    assert upload(api, adapter_dir, name="alice/secret", visibility="private").status_code == 201
    outsider = client_for(other_user if who == "other" else None)
    for route in PRIVATE_ROUTES:
        assert api.get(route).status_code == 200, route
        r = outsider.get(route)
        assert r.status_code == 404, route
        assert outsider.head(route).status_code == 404, route
    assert outsider.get("/api/v1/adapters/").json()["results"] == []
    assert [a["id"] for a in api.get("/api/v1/adapters/").json()["results"]] == ["alice/secret"]
    # writes: 404 for a signed-in outsider; anonymous writes are refused before any lookup (401),
    # the same answer as for an adapter that does not exist, so nothing leaks.
    expected = 404 if who == "other" else 401
    assert outsider.patch("/api/v1/adapters/alice/secret/", {"visibility": "public"}, format="json").status_code == expected
    assert outsider.delete("/api/v1/adapters/alice/secret/").status_code == expected
    assert outsider.delete("/api/v1/adapters/alice/none/").status_code == (404 if who == "other" else 401)


# --- the same on S3 (SeaweedFS) ------------------------------------------------------------------


@pytest.mark.s3
def test_upload_download_on_s3(s3_storage, api, tiny_base_dir, staff_api, adapter_dir, client_for):
    files = [SimpleUploadedFile(p.name, p.read_bytes()) for p in sorted(tiny_base_dir.iterdir()) if p.is_file()]
    assert staff_api.post("/api/v1/base-models/", {"slug": "tiny-base", "files": files},
                          format="multipart").status_code == 201
    assert upload(api, adapter_dir).status_code == 201
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    key = Blob.objects.get(sha256=sha256(weights)).key
    head = s3_storage["client"].head_object(Bucket=s3_storage["bucket"], Key=key)
    assert head["ContentLength"] == len(weights)
    res = client_for(None).get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors")
    assert sha256(b"".join(res.streaming_content)) == sha256(weights)
    part = client_for(None).get("/api/v1/adapters/alice/skill/files/adapter_model.safetensors", HTTP_RANGE="bytes=50-99")
    assert part.status_code == 206 and b"".join(part.streaming_content) == weights[50:100]
    # a rejected upload leaves no object behind
    listed = lambda: {o["Key"] for o in s3_storage["client"].list_objects_v2(Bucket=s3_storage["bucket"]).get("Contents", [])}  # noqa: E731
    before = listed()
    bad = [SimpleUploadedFile("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
           SimpleUploadedFile("adapter_model.safetensors", weights[:-8])]
    assert upload(api, adapter_dir, name="alice/bad", files=bad).status_code == 400
    assert listed() == before


# --- the API's own shape ---------------------------------------------------------------------------


def test_openapi_schema_generates_without_warnings(db):
    from io import StringIO

    from django.core.management import call_command

    err = StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", stdout=StringIO(), stderr=err)
    assert "Warning" not in err.getvalue() and "Error" not in err.getvalue(), err.getvalue()


def test_docs_page_served_without_cdn(client_for, db):
    r = client_for(None).get("/api/docs/")
    assert r.status_code == 200
    assert b"cdn." not in r.content and b"unpkg" not in r.content


def test_web_process_does_not_import_torch():
    from tests.web_process import forbidden_modules_after

    imports = ("import hub.urls; from django.urls import get_resolver; get_resolver().url_patterns\n"
               "import hub.api.views, hub.hfcompat.views, frontend.urls")
    assert forbidden_modules_after(imports) == []


def test_downloads_count_full_gets_only(api, client_for, tiny_base, adapter_dir):
    assert upload(api, adapter_dir).status_code == 201
    anon, route = client_for(None), "/api/v1/adapters/alice/skill/files/adapter_model.safetensors"
    b"".join(anon.get(route).streaming_content)
    b"".join(anon.get(route, HTTP_RANGE="bytes=10-").streaming_content)  # a resumed transfer: not counted
    anon.head(route)  # not counted
    b"".join(anon.get("/alice/skill/resolve/main/adapter_model.safetensors").streaming_content)  # HF route
    assert Adapter.objects.get(owner="alice", name="skill").downloads == 2
