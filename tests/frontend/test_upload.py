"""The upload page without JavaScript (the form posts to the page, which calls
the same service as the REST API) and the error-to-field mapping the
JavaScript path shares."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def wide_adapter(make_peft_adapter, tmp_path_factory):
    """A real PEFT adapter for a wider base (hidden 96): wrong shapes for tiny-base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model_fixtures import TINY_CONFIG

    wide = tmp_path_factory.mktemp("wide-base")
    LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, "hidden_size": 96})).save_pretrained(wide)
    return make_peft_adapter("wrong", base_dir=wide)


@pytest.fixture(scope="module")
def good(make_peft_adapter):
    return make_peft_adapter("ok")


def post_upload(client, folder, **fields):
    data = {"base_model": "tiny-base", "owner": "alice", "name": "uploaded", "visibility": "private",
            "tags": "Math, demo", "description": "# Card"}
    data.update(fields)
    handles = [open(p, "rb") for p in sorted(folder.iterdir()) if p.is_file()]
    try:
        return client.post("/upload/", {**data, "files": handles})
    finally:
        for h in handles:
            h.close()


def test_upload_without_javascript(web, user, tiny_base, good):
    from hub.registry.models import Adapter

    r = post_upload(web(user), good)
    assert r.status_code == 302 and r["Location"] == "/adapters/alice/uploaded/"
    a = Adapter.objects.get(owner="alice", name="uploaded")
    assert (a.visibility, sorted(a.tags.values_list("name", flat=True)), a.r) == ("private", ["demo", "math"], 4)
    page = web(user).get(r["Location"]).content.decode()
    assert "adapter_model.safetensors" in page and "<h2>Card</h2>" in page


@pytest.mark.parametrize("case, field, words", [
    ("wrong_shapes", "files", ["q_proj", "96", "64"]),
    ("unknown_base", "base_model", ["not registered"]),
    ("bad_name", "name", ["letters, digits"]),
    ("foreign_owner", "owner", ["not one of the available choices"]),
    ("taken", "name", ["already exists"]),
])
def test_upload_errors_sit_next_to_their_field_and_store_nothing(
    web, user, tiny_base, good, wide_adapter, case, field, words,
):
    from hub.registry.models import Adapter, Blob

    c = web(user)
    if case == "taken":
        assert post_upload(c, good).status_code == 302
    before = (Adapter.objects.count(), Blob.objects.count())
    folder = wide_adapter if case == "wrong_shapes" else good
    extra = {"unknown_base": {"base_model": "nope"}, "bad_name": {"name": "../x"},
             "foreign_owner": {"owner": "mallory"}}.get(case, {})
    r = post_upload(c, folder, **extra)
    assert r.status_code == 400
    html = r.content.decode()
    msg = html.split(f'id="err-{field}" role="alert">', 1)[1].split("</p>", 1)[0]
    for w in words:
        assert w in msg, (case, msg)
    assert (Adapter.objects.count(), Blob.objects.count()) == before


@pytest.mark.parametrize("field, slot", [
    ("adapter_model.safetensors", "files"), ("adapter_config.json", "files"), ("files", "files"),
    ("extra.safetensors", "files"), ("base_model", "base_model"), ("seeds", "seeds"), ("name", "name"),
    (None, None), ("params", None),
])
def test_error_field_mapping(field, slot):
    from frontend.views import upload_error_field

    assert upload_error_field(field) == slot
