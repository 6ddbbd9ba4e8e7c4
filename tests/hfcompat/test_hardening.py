"""The HF-compatible routes after the security review: commits and preuploads refuse file
paths with hidden or compatibility characters, and every download names its file in a
Content-Disposition that a quote cannot break (RFC 6266 filename* with an ASCII fallback)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from django.utils.http import parse_header_parameters

from hub.registry.models import Blob, Revision

from .test_routes import file_op, post_commit

pytestmark = pytest.mark.django_db

BAD_PATHS = [
    "evil\u202egnp.safetensors",  # right-to-left override
    "adapter_model\u200b.safetensors",  # zero-width space
    "docs/\u2066notes.md",  # bidi isolate
    "\uff0e\uff0e/x.json",  # fullwidth dots: "../x.json" once NFKC-normalised
    "notes\u2028.txt",  # line separator
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_commits_refuse_hidden_and_fullwidth_paths(published, client_for, user, path):
    revs, blobs = Revision.objects.count(), Blob.objects.count()
    resp = post_commit(client_for(user), "alice/x", file_op(path, b"{}"))
    assert resp.status_code == 400, resp.content
    assert resp.json()["reason"] == "bad_filename" and resp["X-Error-Message"].isascii()
    assert Revision.objects.count() == revs and Blob.objects.count() == blobs


@pytest.mark.parametrize("path", BAD_PATHS)
def test_preupload_refuses_them_too(published, client_for, user, path):
    resp = client_for(user).post("/api/models/alice/x/preupload/main",
                                 {"files": [{"path": path, "sample": "", "size": 2}]}, format="json")
    assert resp.status_code == 400 and resp.json()["reason"] == "bad_filename", resp.content


def filename_of(resp) -> tuple[str, str, str]:
    """(disposition, the ASCII fallback, the name filename* carries)."""
    value = resp["Content-Disposition"]
    assert value.isascii()
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    kind, params = parse_header_parameters(value)  # filename* overrides filename, as RFC 6266 says
    return kind, fallback, params["filename"]


@pytest.mark.parametrize("name,fallback", [
    ('we"ird; x.txt', "we_ird; x.txt"),
    ("r\u00e9sum\u00e9.md", "r_sum_.md"),
])
def test_downloads_name_the_file_safely(published, client_for, user, client, name, fallback):
    resp = post_commit(client_for(user), "alice/x", file_op(f"docs/{name}", b"hello"))
    assert resp.status_code == 200, resp.content
    for url in (f"/alice/x/resolve/main/docs/{quote(name)}", f"/api/v1/adapters/alice/x/files/docs/{quote(name)}"):
        got = client.get(url)
        assert got.status_code == 200, (url, got.content)
        assert filename_of(got) == ("attachment", fallback, name), url


def test_the_generated_card_is_inline_with_both_names(published, client):
    resp = client.get("/alice/x/resolve/main/README.md")
    assert resp.status_code == 200
    assert filename_of(resp) == ("inline", "README.md", "README.md")
    assert "filename*=UTF-8''README.md" in resp["Content-Disposition"]
