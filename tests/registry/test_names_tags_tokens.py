"""Repo names follow the Hugging Face Hub's rules (case-insensitive uniqueness, no trailing '.'
or '-', no '..' or '--', no reserved device names), tags are length-checked on every create path
(PostgreSQL's varchar(64) used to answer 500), and API tokens can expire."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction
from django.utils import timezone

from hub.registry.models import Adapter, ApiToken, Blob, repo_name_problem
from hub.registry.services import token_create, token_lifetime
from hub.registry.validation import ValidationError
from tests.api.test_registry import upload


@pytest.fixture
def adapter_dir(make_peft_adapter):
    return make_peft_adapter("names-lora", r=4, targets=("q_proj", "v_proj"))


@pytest.mark.parametrize("name", ["x.", "x-", "x..y", "a--b", "con", "CON", "lpt1.txt", "nul"])
def test_bad_repo_names_are_refused_and_nothing_is_stored(api, tiny_base, adapter_dir, name):
    blobs = Blob.objects.count()  # the base's own files
    r = upload(api, adapter_dir, name=f"alice/{name}")
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "invalid_name" and name in r.json()["detail"]
    assert not Adapter.objects.exists() and Blob.objects.count() == blobs


@pytest.mark.parametrize("name", ["x", "x.y", "my-lora_v2", "a.b-c_d", "console", "x_"])
def test_good_repo_names_pass_the_rule(name):
    assert repo_name_problem(name) is None


def test_names_that_differ_only_by_case_are_one_repository(api, tiny_base, adapter_dir):
    assert upload(api, adapter_dir, name="alice/CaseDup").status_code == 201
    r = upload(api, adapter_dir, name="alice/casedup")
    assert r.status_code == 409 and "alice/CaseDup" in r.json()["detail"]
    assert Adapter.objects.count() == 1


def test_the_database_refuses_a_case_duplicate(tiny_base):
    Adapter.objects.create(owner="alice", name="Twin", base_model=tiny_base)
    with pytest.raises(IntegrityError), transaction.atomic():
        Adapter.objects.create(owner="ALICE", name="twin", base_model=tiny_base)


def test_a_long_tag_is_a_400_on_create_not_a_500(api, tiny_base, adapter_dir):
    blobs = Blob.objects.count()
    r = upload(api, adapter_dir, tags="ok," + "t" * 65)
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "invalid_tag"
    assert not Adapter.objects.exists() and Blob.objects.count() == blobs
    assert upload(api, adapter_dir, tags="ok," + "t" * 64).status_code == 201


def test_tag_length_is_checked_on_patch_too(api, tiny_base, adapter_dir):
    assert upload(api, adapter_dir).status_code == 201
    r = api.patch("/api/v1/adapters/alice/skill/", {"tags": ["y" * 65]}, format="json")
    assert r.status_code == 400


# --- token expiry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    (None, None), ("", None), ("never", None), ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)),
    ("90m", timedelta(minutes=90)),
])
def test_token_lifetimes(text, expected):
    assert token_lifetime(text) == expected


@pytest.mark.parametrize("text", ["0d", "30", "d", "-1d", "1y", "99999999d"])
def test_bad_token_lifetimes(text):
    with pytest.raises(ValidationError) as info:
        token_lifetime(text)
    assert info.value.code == "invalid_expiry"


def test_an_expired_token_is_refused_on_every_route(db, user, client_for):
    from rest_framework.test import APIClient

    raw = token_create(user=user, name="short", expires="1m")
    token = ApiToken.objects.get(name="short")
    assert timedelta(seconds=50) < token.expires_at - timezone.now() <= timedelta(minutes=1)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/api/v1/me").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None

    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    r = client.get("/api/v1/me")
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    r = client.get("/api/models/alice/anything", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert r.status_code == 401 and "expired" in r.content.decode()


def test_the_token_page_sets_and_shows_expiry(db, user, client):
    client.force_login(user)
    r = client.post("/tokens/", {"name": "ci", "expires": "30d"})
    assert r.status_code == 302
    token = ApiToken.objects.get(name="ci")
    assert abs(token.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(days=1))
    html = client.get("/tokens/").content.decode()
    assert 'data-label="Expires"' in html and ">expired</span>" in html
    assert client.post("/tokens/", {"name": "bad", "expires": "forever"}).status_code == 400
    assert not ApiToken.objects.filter(name="bad").exists()


def test_hubtoken_takes_an_expiry_and_refuses_a_bad_one_before_creating_anything(db, capsys):
    from django.contrib.auth import get_user_model

    call_command("hubtoken", "carol", "--create-user", "--expires", "7d")
    assert ApiToken.objects.get(user__username="carol").expires_at is not None
    with pytest.raises(CommandError, match="30d"):
        call_command("hubtoken", "dave", "--create-user", "--expires", "soon")
    assert not get_user_model().objects.filter(username="dave").exists()


def test_the_tokens_route_lists_without_values_and_mints_expiring_tokens(api, user, client_for):
    r = api.post("/api/v1/tokens/", {"name": "ci", "expires": "12h"}, format="json")
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["token"].startswith("hub_") and body["name"] == "ci" and body["expires_at"]
    listed = api.get("/api/v1/tokens/").json()["results"]
    assert {t["name"] for t in listed} >= {"ci"} and all("token" not in t for t in listed)
    assert api.post("/api/v1/tokens/", {"name": "x", "expires": "forever"}, format="json").status_code == 400
    assert client_for(None).get("/api/v1/tokens/").status_code == 401


def test_the_tokens_route_refuses_a_body_without_a_name(api):
    from hub.registry.models import ApiToken

    before = ApiToken.objects.count()
    assert api.post("/api/v1/tokens/", {}, format="json").status_code == 400
    assert api.post("/api/v1/tokens/", {"name": -441}, format="json").status_code == 400  # found by the fuzzer
    assert api.post("/api/v1/tokens/", {"name": "x", "expires": 30}, format="json").status_code == 400
    assert api.post("/api/v1/tokens/", {"name": "x"}, format="multipart").status_code == 415
    assert ApiToken.objects.count() == before
