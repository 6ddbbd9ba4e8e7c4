"""Input the API used to answer 500, or quietly misread, found by a security
review and by schemathesis (tests/api/test_schema_fuzz.py): each answers a
4xx in the API's error shape now, and the schema says so."""

from __future__ import annotations

from urllib.parse import quote

import pytest

pytestmark = pytest.mark.django_db

# "¹" passes str.isdigit() but int() refuses it; int() reads "٣" (Arabic-Indic) as 3.
LOOK_ALIKE_IDS = ["¹", "٣", "٣" * 32, "9" * 40, "-1", "1.0", " 1"]

WEBHOOK_ROUTES = [
    ("get", "/api/v1/webhooks/{}/"),
    ("patch", "/api/v1/webhooks/{}/"),
    ("delete", "/api/v1/webhooks/{}/"),
    ("post", "/api/v1/webhooks/{}/ping"),
    ("post", "/api/v1/webhooks/{}/rotate-secret"),
    ("get", "/api/v1/webhooks/{}/deliveries"),
]
JOB_ROUTES = [("get", "/api/v1/jobs/{}/"), ("post", "/api/v1/jobs/{}/cancel")]


@pytest.fixture
def hook(api):
    r = api.post("/api/v1/webhooks/", {"url": "http://127.0.0.1:9/hook"}, format="json")
    assert r.status_code == 201, r.json()
    return r.json()


@pytest.mark.parametrize("method,route", WEBHOOK_ROUTES + JOB_ROUTES)
@pytest.mark.parametrize("bad", LOOK_ALIKE_IDS)
def test_look_alike_ids_are_404(api, method, route, bad):
    r = getattr(api, method)(route.format(quote(bad)), {}, format="json")
    assert r.status_code == 404, (r.status_code, r.content[:200])
    assert r.json()["error"] in ("webhook_not_found", "job_not_found")


def test_a_look_alike_id_never_reaches_a_real_webhook(api, user):
    from hub.registry.models import Webhook

    Webhook.objects.create(pk=3, owner=user.username, url="http://127.0.0.1:9/hook", secret="s", created_by=user)
    assert api.get("/api/v1/webhooks/3/").status_code == 200
    assert api.get(f"/api/v1/webhooks/{quote('٣')}/").status_code == 404  # not webhook 3


@pytest.mark.parametrize("bad", ["¹", "٣", "-1", "1.0", "x"])
def test_cli_refuses_look_alike_webhook_ids(bad):
    from hub.cli.client import UserError
    from hub.cli.webhook import _path

    with pytest.raises(UserError):
        _path(bad)
    assert _path("12").endswith("/webhooks/12/")


# --- pagination and filters ---------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "page_size=false", "page_size=0", "page_size=-5", "page_size=1.5", "page_size=", "page_size=%C2%B9",
    "page=abc", "page=0", "page=", "page=%D9%A3",
])
@pytest.mark.parametrize("route", ["/api/v1/adapters/", "/api/v1/base-models/", "/api/v1/jobs/", "/api/v1/webhooks/"])
def test_bad_page_parameters_are_400(api, route, query):
    r = api.get(f"{route}?{query}")
    assert r.status_code == 400, (r.status_code, r.content[:200])
    assert r.json()["error"] in ("invalid_page_size", "invalid_page")


def test_good_page_parameters(api, hook):
    assert api.get("/api/v1/webhooks/?page_size=1").json()["count"] == 1
    assert len(api.get("/api/v1/webhooks/?page_size=100000").json()["results"]) == 1  # capped, not refused
    assert api.get("/api/v1/webhooks/?page=last").status_code == 200
    r = api.get("/api/v1/webhooks/?page=7")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


@pytest.mark.parametrize("query", ["sort=bogus", "sort=", "r=%D9%A3", "r=3_0", "r=+3", "max_r=", "max_r=1.0"])
def test_bad_adapter_filters_are_400(api, query):
    r = api.get(f"/api/v1/adapters/?{query}")
    assert r.status_code == 400, (r.status_code, r.content[:200])
    assert r.json()["error"] == "invalid_filter"


# --- NUL characters: PostgreSQL refuses them in text and jsonb (a 500 there) ------------------


@pytest.mark.parametrize("method,url,body", [
    ("get", "/api/v1/adapters/?q=a%00b", None),
    ("get", "/api/v1/jobs/?op=%00", None),
    ("get", "/api/v1/base-models/a%00b/", None),
    ("get", "/api/v1/base-models/x/files/a%00b", None),
    ("post", "/api/v1/webhooks/", {"url": "http://127.0.0.1:9/hook", "description": "a\x00b"}),
    ("post", "/api/v1/jobs/", {"op": "compress", "params": {"adapter\x00": "a/b"}}),
])
def test_nul_characters_are_400(api, method, url, body):
    r = getattr(api, method)(url, body, format="json")
    assert r.status_code == 400, (r.status_code, r.content[:200])
    assert r.json()["error"] == "invalid_text"


def test_nul_in_a_patch_changes_nothing(api, hook):
    r = api.patch(f"/api/v1/webhooks/{hook['id']}/", {"description": "a\x00b"}, format="json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_text"
    assert api.get(f"/api/v1/webhooks/{hook['id']}/").json()["description"] == ""


# --- paths that match no route -------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "delete", "post"])
@pytest.mark.parametrize("path", ["adapters/a/b/c/", "adapters/a%2Fb/c/", "base-models/a%0A/files/x%0Ay", "webhooks/1/2/"])
def test_unrouted_api_paths_are_json_404(client, method, path):
    from django.test import Client

    # CSRF checks on, as for a browser session: the 404 must not turn into Django's HTML 403.
    r = getattr(Client(enforce_csrf_checks=True), method)(f"/api/v1/{path}")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "detail": "No such API route."}


def test_other_paths_under_api_v1_still_reach_the_hf_routes(client):
    # A repo named api/v1 is an HF-compatible path, not an API collection.
    r = client.get("/api/v1/resolve/main/config.json")
    assert r.status_code == 404 and r.headers.get("X-Error-Code") == "RepoNotFound"


# --- the schema tells the truth ---------------------------------------------------------------


@pytest.fixture
def openapi(client):
    return client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()


def test_schema_successor_is_nullable(openapi):
    for name in ("BaseModel", "BaseModelDetail"):
        assert openapi["components"]["schemas"][name]["properties"]["successor"]["nullable"] is True


def test_schema_documents_error_answers(openapi):
    paths = openapi["paths"]
    error = {"$ref": "#/components/schemas/Error"}
    hook = paths["/api/v1/webhooks/{id}/"]
    assert hook["get"]["parameters"][0]["schema"]["type"] == "integer"
    for code in ("401", "404", "429"):
        assert hook["get"]["responses"][code]["content"]["application/json"]["schema"] == error
    assert {"400", "403", "404", "415"} <= set(hook["patch"]["responses"])
    upload = paths["/api/v1/adapters/"]["post"]["responses"]
    assert {"201", "400", "401", "403", "409", "413", "414"} <= set(upload)
    listing = paths["/api/v1/adapters/"]["get"]
    assert {"200", "400", "404"} <= set(listing["responses"]) and "403" not in listing["responses"]
    page_size = next(p for p in listing["parameters"] if p["name"] == "page_size")
    assert page_size["schema"] == {"type": "integer", "minimum": 1}
    assert paths["/api/v1/jobs/{id}/"]["get"]["parameters"][0]["schema"]["format"] == "uuid"
