"""A base model slug the hub does not know is a 404 that lists the registered
slugs and the closest ones, on every route that takes one (the base's own
routes, a job's target, an upload's base), so `hubctl transfer --from llama3.0`
and REST users learn the right name instead of "nothing found"."""

from __future__ import annotations

import pytest

from tests.frontend.conftest import make_adapter, make_base

REGISTERED = "Registered: tiny-llama-3.0, tiny-llama-3.1, tiny-other-1.0."


@pytest.fixture
def bases(db):
    old = make_base("tiny-llama-3.0")
    make_base("tiny-llama-3.1")
    make_base("tiny-other-1.0")
    return old


def test_base_routes_name_the_registered_slugs(api, bases):
    r = api.get("/api/v1/base-models/llama3.0/")
    assert r.status_code == 404 and r.json()["error"] == "base_model_not_found"
    assert r.json()["detail"] == (f"Base model 'llama3.0' is not registered. {REGISTERED} "
                                  "Did you mean tiny-llama-3.0 or tiny-llama-3.1?")  # the closest first
    r = api.get("/api/v1/base-models/mistral-7b/")  # nothing close: no guess
    assert r.status_code == 404 and r.json()["detail"].endswith(REGISTERED)


def test_a_jobs_unknown_target_names_them_too(api, bases, user):
    from hub.registry.models import Job

    make_adapter("alice", "caesar", bases, user=user)
    r = api.post("/api/v1/jobs/", {"op": "transfer", "params": {"adapter": "alice/caesar", "target": "llama3.1"}},
                 format="json")
    assert r.status_code == 404 and "Did you mean tiny-llama-3.1 or tiny-llama-3.0?" in r.json()["detail"]
    assert REGISTERED in r.json()["detail"] and not Job.objects.exists()


def test_no_base_registered_yet(api, db):
    r = api.get("/api/v1/base-models/llama3.0/")
    assert r.status_code == 404
    assert r.json()["detail"] == "Base model 'llama3.0' is not registered; no base model is registered yet."
