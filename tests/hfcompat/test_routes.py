"""The Hugging Face-compatible routes through Django's test client: headers,
error codes, visibility, paging, the generated model card and the commit
route's refusals (the live-client flows are in test_clients.py)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from hub.hfcompat import card
from hub.hfcompat.views import listings
from hub.registry.models import Adapter, Blob, Revision

from .conftest import upload_adapter

pytestmark = pytest.mark.django_db


def body_of(resp) -> bytes:
    return b"".join(resp.streaming_content) if resp.streaming else resp.content


def ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def file_op(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


HEADER = {"key": "header", "value": {"summary": "edit", "description": ""}}


def post_commit(client, repo, *ops, rev="main", header=HEADER):
    return client.post(f"/api/models/{repo}/commit/{rev}", data=ndjson(header, *ops),
                       content_type="application/x-ndjson")


@pytest.fixture
def private_adapter(user, tiny_base, peft_dir):
    return upload_adapter(owner="alice", name="secret", base=tiny_base, adapter_dir=peft_dir, user=user,
                          visibility="private")


# --- visibility: one table, every route ------------------------------------------------

ROUTES = [
    ("get", "/api/models/alice/secret", None),
    ("get", "/api/models/alice/secret/revision/main", None),
    ("get", "/api/models/alice/secret/tree/main", None),
    ("get", "/api/models/alice/secret/tree/main/adapter_config.json", None),
    ("get", "/api/models/alice/secret/refs", None),
    ("head", "/alice/secret/resolve/main/adapter_config.json", None),
    ("get", "/alice/secret/resolve/main/adapter_config.json", None),
    ("get", "/alice/secret/resolve/main/README.md", None),
    ("post", "/api/models/alice/secret/preupload/main", {"files": [{"path": "a.json", "sample": "", "size": 2}]}),
    ("post", "/api/models/alice/secret/commit/main", None),
    ("put", "/api/models/alice/secret/settings", {"private": False}),
]


@pytest.mark.parametrize("who", ["anonymous", "other"])
@pytest.mark.parametrize("method,url,payload", ROUTES)
def test_private_adapter_is_repo_not_found_for_others(private_adapter, client_for, other_user, who, method, url,
                                                      payload):
    client = client_for(other_user if who == "other" else None)
    if url.endswith("/commit/main"):
        resp = client.post(url, data=ndjson(HEADER, file_op("x.txt", b"x")), content_type="application/x-ndjson")
    elif payload is not None:
        resp = getattr(client, method)(url, data=payload, format="json")
    else:
        resp = getattr(client, method)(url)
    assert resp.status_code == 404
    assert resp["X-Error-Code"] == "RepoNotFound"
    assert "X-Repo-Commit" not in resp  # nothing about the repo leaks
    assert Adapter.objects.get(pk=private_adapter.adapter_id).visibility == "private"
    assert private_adapter.adapter.revisions.count() == 1


def test_private_adapter_is_served_to_its_owner(private_adapter, client_for, user):
    client = client_for(user)
    assert client.get("/api/models/alice/secret").json()["private"] is True
    resp = client.head("/alice/secret/resolve/main/adapter_config.json")
    assert resp.status_code == 200 and resp["X-Repo-Commit"] == private_adapter.sha


def test_a_bad_token_is_401_not_a_missing_repo(published, client):
    resp = client.get("/api/models/alice/x", HTTP_AUTHORIZATION="Bearer hub_not-a-token")
    assert resp.status_code == 401 and "Invalid credentials" in resp.json()["error"]


# --- resolve: headers, ranges, errors ---------------------------------------------------


def test_resolve_head_has_what_huggingface_hub_needs(published, client, peft_dir):
    data = (peft_dir / "adapter_model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    resp = client.head("/alice/x/resolve/main/adapter_model.safetensors")
    assert resp.status_code == 200
    assert resp["X-Repo-Commit"] == published.sha
    assert resp["ETag"] == resp["X-Linked-Etag"] == f'"{sha}"'
    assert resp["X-Linked-Size"] == resp["Content-Length"] == str(len(data))
    assert "X-Xet-Hash" not in resp
    assert body_of(resp) == b""


@pytest.mark.parametrize("path", ["adapter_model.safetensors", "README.md"])
@pytest.mark.parametrize("rng,start,end", [("bytes=100-", 100, None), ("bytes=5-9", 5, 9), ("bytes=-7", -7, None)])
def test_resolve_honours_range(published, client, path, rng, start, end):
    full = body_of(client.get(f"/alice/x/resolve/main/{path}"))
    resp = client.get(f"/alice/x/resolve/main/{path}", HTTP_RANGE=rng)
    n = len(full)
    first = start if start >= 0 else n + start
    last = n - 1 if end is None else end
    assert resp.status_code == 206
    assert resp["Content-Range"] == f"bytes {first}-{last}/{n}"
    assert body_of(resp) == full[first:last + 1]
    assert resp["Content-Length"] == str(last - first + 1)


def test_resolve_range_past_the_end_is_416(published, client):
    resp = client.get("/alice/x/resolve/main/adapter_config.json", HTTP_RANGE="bytes=999999-")
    assert resp.status_code == 416 and resp["Content-Range"].startswith("bytes */")


@pytest.mark.parametrize("url,code", [
    ("/alice/x/resolve/main/missing.bin", "EntryNotFound"),
    ("/alice/x/resolve/nobranch/adapter_config.json", "RevisionNotFound"),
    ("/alice/x/resolve/refs%2Fpr%2F1/adapter_config.json", "RevisionNotFound"),
    ("/alice/x/resolve/" + "0" * 40 + "/adapter_config.json", "RevisionNotFound"),
    ("/alice/nope/resolve/main/adapter_config.json", "RepoNotFound"),
    ("/no-such-base/resolve/main/config.json", "RepoNotFound"),
    ("/tiny-base/resolve/" + "f" * 40 + "/config.json", "RevisionNotFound"),
    ("/api/models/alice/x/revision/nobranch", "RevisionNotFound"),
    ("/api/models/alice/x/tree/main/nodir", "EntryNotFound"),
])
def test_error_codes(published, client, url, code):
    resp = client.get(url)
    assert resp.status_code == 404 and resp["X-Error-Code"] == code
    assert resp.json()["error"]  # readable text for huggingface_hub's message
    if code == "EntryNotFound":
        assert resp["X-Repo-Commit"] == published.sha


@pytest.mark.parametrize("pin", ["full", "prefix", "main"])
def test_revisions_by_ref_or_commit_id(published, client, client_for, user, pin):
    rev = {"full": published.sha, "prefix": published.sha[:12], "main": "main"}[pin]
    later = post_commit(client_for(user), "alice/x", file_op("notes.txt", b"hello"))
    assert later.status_code == 200
    resp = client.head(f"/alice/x/resolve/{rev}/adapter_config.json")
    expected = later.json()["commitOid"] if pin == "main" else published.sha
    assert resp["X-Repo-Commit"] == expected
    assert client.get(f"/api/models/alice/x/revision/{rev}").json()["sha"] == expected


def test_base_model_is_a_repo_with_one_revision(tiny_base, client, tiny_base_dir):
    info = client.get("/api/models/tiny-base?blobs=true").json()
    assert info["id"] == "tiny-base" and info["sha"] == tiny_base.sha
    on_disk = {p.name: p.stat().st_size for p in tiny_base_dir.iterdir() if p.is_file()}
    assert {s["rfilename"]: s["size"] for s in info["siblings"]} == on_disk
    assert info["config"]["architectures"] == ["LlamaForCausalLM"]
    for rev in ("main", tiny_base.sha, tiny_base.sha[:10]):
        resp = client.head(f"/tiny-base/resolve/{rev}/model.safetensors")
        assert resp.status_code == 200 and resp["X-Repo-Commit"] == tiny_base.sha
        assert resp["ETag"] == f'"{hashlib.sha256((tiny_base_dir / "model.safetensors").read_bytes()).hexdigest()}"'


def test_downloads_count_full_gets_only(published, client):
    def count():
        return Adapter.objects.get(pk=published.adapter_id).downloads

    client.head("/alice/x/resolve/main/adapter_model.safetensors")
    client.get("/alice/x/resolve/main/adapter_model.safetensors", HTTP_RANGE="bytes=10-")
    assert count() == 0
    body_of(client.get("/alice/x/resolve/main/adapter_model.safetensors"))
    assert count() == 1


# --- listings -------------------------------------------------------------------------------


@pytest.fixture
def nested(user, tiny_base, peft_dir, tmp_path):
    import shutil

    d = tmp_path / "nested"
    shutil.copytree(peft_dir, d)
    (d / "docs").mkdir()
    (d / "docs" / "a.md").write_text("a")
    (d / "docs" / "deep").mkdir()
    (d / "docs" / "deep" / "b.md").write_text("b")
    from hub.registry.services import IncomingFile, adapter_create_from_upload

    paths = ["adapter_config.json", "adapter_model.safetensors", "docs/a.md", "docs/deep/b.md"]
    files = [IncomingFile(p, open(d / p, "rb")) for p in paths]
    try:
        return adapter_create_from_upload(owner="alice", name="nested", base=tiny_base, files=files, user=user)
    finally:
        for f in files:
            f.fileobj.close()


def test_tree_listing_flat_recursive_and_subfolder(nested, client):
    flat = client.get("/api/models/alice/nested/tree/main").json()
    assert [(e["type"], e["path"]) for e in flat] == [
        ("file", "README.md"), ("file", "adapter_config.json"), ("file", "adapter_model.safetensors"),
        ("directory", "docs"),
    ]
    deep = client.get("/api/models/alice/nested/tree/main?recursive=true").json()
    assert [e["path"] for e in deep] == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "docs", "docs/a.md", "docs/deep",
        "docs/deep/b.md",
    ]
    sub = client.get("/api/models/alice/nested/tree/main/docs").json()
    assert [(e["type"], e["path"]) for e in sub] == [("file", "docs/a.md"), ("directory", "docs/deep")]
    f = next(e for e in deep if e["path"] == "docs/a.md")
    assert f["size"] == 1 and f["lfs"]["oid"] == hashlib.sha256(b"a").hexdigest() and len(f["oid"]) == 40


def test_tree_pages_with_link_header(nested, client, monkeypatch):
    monkeypatch.setattr(listings, "TREE_PAGE_SIZE", 3)
    url = "/api/models/alice/nested/tree/main?recursive=true"
    seen = []
    pages = 0
    while url:
        resp = client.get(url)
        pages += 1
        seen += [e["path"] for e in resp.json()]
        link = resp.get("Link")
        url = link[link.index("<") + 1:link.index(">")].split("testserver", 1)[1] if link else None
        if link:
            assert link.endswith('rel="next"')
    assert pages == 3 and len(seen) == 7 and len(set(seen)) == 7


def test_siblings_and_refs(published, client, user):
    info = client.get("/api/models/alice/x").json()
    assert [s["rfilename"] for s in info["siblings"]] == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    assert "size" not in info["siblings"][0]
    assert info["adapter"]["r"] == 4 and info["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    refs = client.get("/api/models/alice/x/refs").json()
    assert refs["branches"] == [{"name": "main", "ref": "refs/heads/main", "targetCommit": published.sha}]


# --- the model card ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,relation", [
    ("upload", "adapter"), ("transfer", "adapter"), ("translora", "adapter"), ("merge", "merge"),
    ("compeft", "quantized"), ("qalora", "quantized"),
])
def test_generated_card_relation_by_kind(published, client, kind, relation):
    from hub.registry.services import revision_create

    adapter = published.adapter
    blobs = {rf.path: rf.blob for rf in published.files.select_related("blob")}
    rev = revision_create(adapter=adapter, files=blobs, kind=kind, parents=[published], ref=kind)
    text = body_of(client.get(f"/alice/x/resolve/{kind}/README.md")).decode()
    data, body = card.parse_card(text)
    assert data["library_name"] == "peft"
    assert data["base_model_relation"] == relation
    # A merge names what it merged (here: this adapter itself, public); the rest name the base.
    assert data["base_model"] == (["alice/x"] if kind == "merge" else "tiny-base")
    assert "demo" in data["tags"] and "new_version" not in data
    assert "A demo adapter." in body and rev.sha in body
    info = client.get(f"/api/models/alice/x/revision/{kind}").json()
    assert info["cardData"] == data and info["sha"] == rev.sha


def test_generated_card_of_a_merge_states_the_kept_energy(published, client):
    from hub.registry.services import revision_create

    blobs = {rf.path: rf.blob for rf in published.files.select_related("blob")}
    metrics = {"method": "ties", "requested_rank": None, "min_captured_energy": 0.61, "mean_captured_energy": 0.7}
    revision_create(adapter=published.adapter, files=blobs, kind="merge", parents=[published], ref="merge",
                    metrics=metrics)
    _, body = card.parse_card(body_of(client.get("/alice/x/resolve/merge/README.md")).decode())
    assert "captured energy" in body and "0.6100 / 0.7000" in body and "lossy" in body


def test_generated_card_names_the_successor_adapter(published, client, user, staff_user, tiny_base, tiny_base_dir):
    from hub.registry.models import BaseModel
    from hub.registry.services import Adapter as A
    from hub.registry.services import revision_create

    successor = BaseModel.objects.create(slug="tiny-base-2", manifest=tiny_base.manifest, sha="1" * 40)
    tiny_base.successor = successor
    tiny_base.save()
    moved = A.objects.create(owner="alice", name="x-v2", base_model=successor, visibility="public")
    blobs = {rf.path: rf.blob for rf in published.files.select_related("blob")}
    revision_create(adapter=moved, files=blobs, kind="transfer", parents=[published], ref="main", base=successor)
    data, _ = card.parse_card(body_of(client.get("/alice/x/resolve/main/README.md")).decode())
    assert data["new_version"] == "alice/x-v2"
    # A private successor of a public adapter is not named (its name would leak).
    A.objects.filter(pk=moved.pk).update(visibility="private")
    data, _ = card.parse_card(body_of(client.get("/alice/x/resolve/main/README.md")).decode())
    assert "new_version" not in data


def test_own_readme_is_served_as_is(user, tiny_base, peft_dir, client):
    rev = upload_adapter(owner="alice", name="carded", base=tiny_base, adapter_dir=peft_dir, user=user, skip=())
    served = body_of(client.get("/alice/carded/resolve/main/README.md"))
    assert served == (peft_dir / "README.md").read_bytes()
    info = client.get("/api/models/alice/carded").json()
    assert info["cardData"]["library_name"] == "peft" and info["sha"] == rev.sha


@pytest.mark.parametrize("text,meta,body", [
    ("---\nbase_model: a\ntags: [x, Y, 'base_model:adapter:a']\n---\n# T\n", {"base_model": "a"}, "# T\n"),
    ("# no front matter\n", {}, "# no front matter\n"),
    ("---\n---\nbody", {}, "body"),
])
def test_parse_card(text, meta, body):
    data, rest = card.parse_card(text)
    assert {k: v for k, v in data.items() if k != "tags"} == meta and rest == body
    if "tags" in data:
        assert card.card_tags(data) == ["x", "y"]


# --- uploads: the protocol's edges ------------------------------------------------------------


def test_validate_yaml(client):
    ok = client.post("/api/validate-yaml", {"content": "---\nlicense: mit\n---\nhi", "repoType": "model"},
                     content_type="application/json")
    assert ok.status_code == 200 and ok.json() == {"errors": [], "warnings": []}
    empty = client.post("/api/validate-yaml", {"content": "hi"}, content_type="application/json")
    assert empty.status_code == 200 and empty.json()["warnings"]
    bad = client.post("/api/validate-yaml", {"content": "---\na: [1\n---\n"}, content_type="application/json")
    assert bad.status_code == 400 and bad.json()["errors"][0]["message"].startswith("The YAML metadata")


def test_whoami(client, client_for, user):
    from hub.registry.services import org_create

    org_create(name="acme", user=user)
    me = client_for(user).get("/api/whoami-v2").json()
    assert me["name"] == "alice" and me["type"] == "user"
    assert [o["name"] for o in me["orgs"]] == ["acme"] and me["auth"]["accessToken"]["displayName"] == "test"
    assert client.get("/api/whoami-v2").status_code == 401


@pytest.mark.parametrize("payload,who,status", [
    ({"name": "fresh"}, "alice", 200),
    ({"name": "fresh", "organization": "mallory"}, "alice", 403),
    ({"name": "x"}, "alice", 409),
    ({"name": "../x"}, "alice", 400),
    ({"name": "fresh", "type": "dataset"}, "alice", 400),
    ({"name": "fresh"}, None, 401),
])
def test_create_repo(published, client_for, user, other_user, payload, who, status):
    resp = client_for(user if who else None).post("/api/repos/create", payload, format="json")
    assert resp.status_code == status, resp.content
    if status == 200:
        assert resp.json()["url"] == "http://testserver/alice/fresh"
        assert not Adapter.objects.filter(name="fresh").exists()  # the first commit creates it
    assert Adapter.objects.count() == 1


def test_preupload_answers_regular(published, client_for, user):
    resp = client_for(user).post(
        "/api/models/alice/x/preupload/main",
        {"files": [{"path": "adapter_config.json", "sample": "", "size": 10}, {"path": "w.safetensors",
                                                                               "sample": "", "size": 10 ** 6}]},
        format="json",
    )
    assert resp.json()["files"] == [
        {"path": "adapter_config.json", "uploadMode": "regular", "shouldIgnore": False},
        {"path": "w.safetensors", "uploadMode": "regular", "shouldIgnore": False},
    ]
    pickle = client_for(user).post("/api/models/alice/x/preupload/main",
                                   {"files": [{"path": "model.bin", "sample": "", "size": 1}]}, format="json")
    assert pickle.status_code == 400 and "pickle" in pickle.json()["error"]


def test_commit_deletes_files_and_updates_the_card(published, client_for, user, client):
    api = client_for(user)
    card_text = b"---\nbase_model: tiny-base\ntags: [chat]\n---\n# Mine\n\nNew words.\n"
    one = post_commit(api, "alice/x", file_op("README.md", card_text), file_op("docs/n.txt", b"n"))
    assert one.status_code == 200, one.content
    adapter = Adapter.objects.get(pk=published.adapter_id)
    assert adapter.description == "# Mine\n\nNew words." and list(adapter.tags.values_list("name", flat=True)) == [
        "chat"]
    assert body_of(client.get("/alice/x/resolve/main/README.md")) == card_text
    two = post_commit(api, "alice/x", {"key": "deletedFile", "value": {"path": "README.md"}},
                      {"key": "deletedFolder", "value": {"path": "docs/"}})
    assert two.status_code == 200, two.content
    head = Revision.objects.get(sha=two.json()["commitOid"])
    assert sorted(head.files.values_list("path", flat=True)) == ["adapter_config.json", "adapter_model.safetensors"]
    generated = body_of(client.get("/alice/x/resolve/main/README.md")).decode()
    assert "New words." in generated and card.parse_card(generated)[0]["base_model"] == "tiny-base"


@pytest.mark.parametrize("case,status,needle", [
    ("bad_base64", 400, "not valid base64"),
    ("lfs", 400, "LFS/Xet uploads are not supported"),
    ("stale_parent", 412, "is not the head of main"),
    ("derived_ref", 400, "Commits go to 'main'"),
    ("missing_delete", 404, "doesn't exist"),
    ("no_header", 400, "no header"),
    ("broken_config", 400, "adapter_config.json"),
    ("pull_request", 400, "Pull requests"),
])
def test_commit_refusals_store_nothing(published, client_for, user, case, status, needle):
    from hub.registry.services import revision_create

    api = client_for(user)
    url_rev = "main"
    items = [HEADER]
    if case == "bad_base64":
        items.append({"key": "file", "value": {"path": "a.txt", "content": "@@@@", "encoding": "base64"}})
    elif case == "lfs":
        items.append({"key": "lfsFile", "value": {"path": "a.bin", "algo": "sha256", "oid": "0" * 64, "size": 1}})
    elif case == "stale_parent":
        items[0] = {"key": "header", "value": {"summary": "s", "parentCommit": "a" * 40}}
        items.append(file_op("a.txt", b"a"))
    elif case == "derived_ref":
        blobs = {rf.path: rf.blob for rf in published.files.select_related("blob")}
        revision_create(adapter=published.adapter, files=blobs, kind="compeft", parents=[published])
        url_rev = "compeft"
        items.append(file_op("a.txt", b"a"))
    elif case == "missing_delete":
        items.append({"key": "deletedFile", "value": {"path": "nothing.txt"}})
    elif case == "no_header":
        items = [file_op("a.txt", b"a")]
    elif case == "broken_config":
        items.append(file_op("adapter_config.json", b"{not json"))
    blobs_before = Blob.objects.count()
    revs_before = Revision.objects.count()
    url = f"/api/models/alice/x/commit/{url_rev}" + ("?create_pr=1" if case == "pull_request" else "")
    resp = api.post(url, data=ndjson(*items), content_type="application/x-ndjson")
    assert resp.status_code == status, resp.content
    assert needle in resp.json()["error"]
    assert Revision.objects.count() == revs_before and Blob.objects.count() == blobs_before


@pytest.mark.parametrize("who,status", [("anonymous", 401), ("other", 403)])
def test_commit_to_a_public_adapter_needs_write_rights(published, client_for, other_user, who, status):
    client = client_for(other_user if who == "other" else None)
    resp = post_commit(client, "alice/x", file_op("a.txt", b"a"))
    assert resp.status_code == status
    assert published.adapter.revisions.count() == 1


def test_commit_without_create_repo_creates_a_private_adapter(tiny_base, client_for, user, peft_dir):
    ops = [file_op(n, (peft_dir / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")]
    resp = post_commit(client_for(user), "alice/direct", *ops)
    assert resp.status_code == 200, resp.content
    adapter = Adapter.objects.get(owner="alice", name="direct")
    assert adapter.visibility == "private" and adapter.base_model == tiny_base
    flip = client_for(user).put("/api/models/alice/direct/settings", {"private": False}, format="json")
    assert flip.status_code == 200 and Adapter.objects.get(pk=adapter.pk).visibility == "public"


def test_commit_to_another_namespace_or_a_base_is_refused(tiny_base, client_for, user, peft_dir):
    ops = [file_op(n, (peft_dir / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")]
    other_ns = post_commit(client_for(user), "mallory/thing", *ops)
    assert other_ns.status_code == 404 and other_ns["X-Error-Code"] == "RepoNotFound"
    base = post_commit(client_for(user), "tiny-base", *ops)
    assert base.status_code == 403 and "base model" in base.json()["error"]
    assert not Adapter.objects.exists()


def test_views_do_not_import_torch():
    from tests.web_process import forbidden_modules_after

    assert forbidden_modules_after("import hub.urls, hub.hfcompat.views, hub.hfcompat.card") == []


def test_files_over_the_line_limit_are_413(published, client_for, user, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 20_000  # one commit line (a base64 file) at most
    api = client_for(user)
    pre = api.post("/api/models/alice/x/preupload/main",
                   {"files": [{"path": "big.txt", "sample": "", "size": 30_000}]}, format="json")
    assert pre.status_code == 413 and "big.txt" in pre.json()["error"]
    resp = post_commit(api, "alice/x", file_op("big.txt", b"z" * 30_000))
    assert resp.status_code == 413 and published.adapter.revisions.count() == 1
    ok = post_commit(api, "alice/x", file_op("small.txt", b"z" * 10_000))
    assert ok.status_code == 200


def test_generated_card_states_the_verdict_and_a_failed_move_is_not_a_new_version(published, client, tiny_base):
    """The card of a derived revision says what the op did to the skill; a transfer that failed its
    verdict is not the adapter's new version (plans.moves: one rule for the plan, the sweep and the card)."""
    from hub.registry.models import BaseModel, Revision
    from hub.registry.services import Adapter as A
    from hub.registry.services import revision_create

    failed = {"status": "failed", "before": 1.0, "after": 0.0, "ratio": 0.0, "base": 0.0,
              "examples": {"used": "held_out", "count": 8}}
    blobs = {rf.path: rf.blob for rf in published.files.select_related("blob")}
    rev = revision_create(adapter=published.adapter, files=blobs, kind="compeft", parents=[published], ref="compeft")
    Revision.objects.filter(pk=rev.pk).update(verdict=failed)
    data, body = card.parse_card(body_of(client.get("/alice/x/resolve/compeft/README.md")).decode())
    assert data["verdict"]["status"] == "failed" and "quality verdict" in body and "**failed**" in body

    successor = BaseModel.objects.create(slug="tiny-base-2", manifest=tiny_base.manifest, sha="1" * 40)
    tiny_base.successor = successor
    tiny_base.save()
    moved = A.objects.create(owner="alice", name="x-v2", base_model=successor, visibility="public")
    move = revision_create(adapter=moved, files=blobs, kind="transfer", parents=[published], ref="transfer",
                           base=successor)
    Revision.objects.filter(pk=move.pk).update(verdict=failed)
    data, _ = card.parse_card(body_of(client.get("/alice/x/resolve/main/README.md")).decode())
    assert "new_version" not in data
    Revision.objects.filter(pk=move.pk).update(verdict={**failed, "status": "passed", "after": 1.0, "ratio": 1.0})
    data, _ = card.parse_card(body_of(client.get("/alice/x/resolve/main/README.md")).decode())
    assert data["new_version"] == "alice/x-v2"
