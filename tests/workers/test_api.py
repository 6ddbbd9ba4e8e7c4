"""Job REST routes and the op declarations (no worker needed: the request path only
validates, writes the row and enqueues on commit)."""

from __future__ import annotations

import base64
import json

import pytest

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def other_api(client_for, other_user):
    return client_for(other_user)


@pytest.fixture
def adapters(peft_adapter, other_user):
    """alice/lora (public, alice's), mallory/secret (private), mallory/open (public)."""
    from hub.registry.models import Adapter

    for name, vis in (("secret", "private"), ("open", "public")):
        Adapter.objects.create(owner="mallory", name=name, base_model=peft_adapter.base_model, visibility=vis)
    return peft_adapter


# --- submit ----------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"op": "nope", "params": {}}, 400, "unknown_op", "Unknown op 'nope'"),
    ({"op": "validate", "params": {}}, 400, "invalid_params", "adapter is required"),
    ({"op": "validate", "params": {"adapter": 7}}, 400, "invalid_params", "adapter must name an adapter"),
    # Trans-LoRA settings are declared too: an unknown or ill-typed key is a 400, not a failed job
    ({"op": "transfer", "params": {"adapter": "alice/lora", "target": "b", "translora": {"stepz": 9}}}, 400,
     "invalid_params", "Unknown translora setting(s) stepz"),
    ({"op": "transfer", "params": {"adapter": "alice/lora", "target": "b", "translora": {"steps": "many"}}}, 400,
     "invalid_params", "translora.steps must be an integer"),
    ({"op": "scale", "params": {"adapter": "alice/lora"}}, 400, "invalid_params", "factor is required"),
    ({"op": "merge", "params": {"adapters": ["alice/lora", "alice/lora2"], "name": "alice/m", "weights": [1, 2, 3]}},
     400, "invalid_params", "weights must list one number per adapter (2)"),
    ({"op": "validate", "params": {"adapter": "no-slash"}}, 400, "invalid_params", "\"owner/name\""),
    ({"op": "validate", "params": {"adapter": "alice/lora", "x": 1}}, 400, "invalid_params", "Unknown parameter(s) x"),
    ({"op": "validate", "params": {"adapter": "alice/lora", "revision": "../x"}}, 400, "invalid_params", "ref name"),
    ({"op": "validate", "params": {"adapter": "alice/lora", "revision": "deadbeef"}}, 404, "revision_not_found", ""),
    ({"op": "validate", "params": {"adapter": "mallory/secret"}}, 404, "repo_not_found", ""),  # invisible
    ({"op": "validate", "params": {"adapter": "mallory/open"}}, 403, "forbidden", "namespace 'mallory'"),
    ({"op": "validate", "params": {"adapter": "alice/missing"}}, 404, "repo_not_found", ""),
    ({"op": "sleep", "params": {"seconds": "long"}}, 400, "invalid_params", "seconds must be a number"),
    ({"op": "sleep", "params": {"seconds": 1, "steps": 2.5}}, 400, "invalid_params", "steps must be an integer"),
    ({"op": "sleep", "params": {"seconds": True}}, 400, "invalid_params", "seconds must be a number"),
    ({"op": "fail", "params": {"kind": "meteor"}}, 400, "invalid_params", "kind must be"),
    ({"op": "sleep", "params": "x"}, 400, "invalid", ""),
    ({"params": {}}, 400, "invalid", "op"),
    ({"op": "compress", "params": {"adapter": "alice/lora", "magnitude_bits": 5}}, 400, "invalid_params",
     "magnitude_bits"),
    ({"op": "compress", "params": {"adapter": "alice/lora", "magnitude_bits": 2, "alpha": 0.1}}, 400,
     "invalid_params", "cannot be combined"),
    ({"op": "compress", "params": {"adapter": "alice/lora", "factorization": "svd"}}, 400, "invalid_params",
     "factorization must be as_is or balanced"),
    ({"op": "quantize", "params": {"adapter": "alice/lora", "group_size": 12}}, 400, "invalid_params",
     "group_size must be 4, 8, 16, 32, 64 or 128"),
]


@pytest.mark.parametrize("body,code,error,detail", BAD_REQUESTS)
def test_submit_refused(api, adapters, body, code, error, detail):
    from hub.registry.models import Job

    r = api.post("/api/v1/jobs/", body, format="json")
    assert r.status_code == code, r.json()
    assert r.json()["error"] == error and detail in r.json()["detail"]
    assert Job.objects.count() == 0


def test_submit_anonymous_is_refused(client_for):
    r = client_for(None).post("/api/v1/jobs/", {"op": "sleep", "params": {}}, format="json")
    assert r.status_code == 401


def test_submit_creates_the_row_and_enqueues_on_commit(api, adapters, broker, django_capture_on_commit_callbacks):
    from hub.registry import jobs, selectors
    from hub.registry.models import Job

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        r = api.post("/api/v1/jobs/", {"op": "validate", "params": {"adapter": "alice/lora", "revision": "main"}},
                     format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    main = selectors.revision_resolve(adapters, "main")
    assert body["status"] == "queued" and body["op"] == "validate" and body["adapter"] == "alice/lora"
    assert body["params"] == {"adapter": "alice/lora", "revision": main.sha}  # the ref is pinned
    assert (body["attempts"], body["max_attempts"], body["progress"], body["result"]) == (0, 3, 0.0, None)
    job = Job.objects.get(pk=body["id"])
    assert job.adapter_id == adapters.id and job.owner.username == "alice"
    assert len(callbacks) == 1
    [msg] = [json.loads(m) for m in broker.lrange("cpu", 0, -1)]
    assert msg["headers"]["task"] == "ops.validate"
    assert json.loads(base64.b64decode(msg["body"]))[0] == [str(job.id)]
    assert jobs.message_pending(job.id)


def test_gpu_ops_go_to_the_gpu_queue(api, adapters, broker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post("/api/v1/jobs/", {"op": "touch", "params": {"adapter": "alice/lora"}}, format="json")
    assert r.status_code == 201
    assert (broker.llen("gpu"), broker.llen("cpu")) == (1, 0)


# --- read and cancel -----------------------------------------------------------------------------------


def make(user, op="sleep", status="queued", adapter=None):
    from hub.registry.models import Job

    return Job.objects.create(owner=user, op=op, status=status, adapter=adapter, params={})


def test_jobs_are_visible_to_their_owner_only(api, other_api, user, other_user, adapters):
    mine = [make(user), make(user, op="validate", status="succeeded", adapter=adapters), make(user, status="failed")]
    theirs = make(other_user)

    def ids(r):
        return sorted(j["id"] for j in r.json()["results"])

    assert ids(api.get("/api/v1/jobs/")) == sorted(str(j.id) for j in mine)
    assert ids(other_api.get("/api/v1/jobs/")) == [str(theirs.id)]
    assert api.get(f"/api/v1/jobs/{theirs.id}/").status_code == 404
    assert api.get(f"/api/v1/jobs/{theirs.id}/").json()["error"] == "job_not_found"
    assert api.post(f"/api/v1/jobs/{theirs.id}/cancel").status_code == 404
    assert api.get("/api/v1/jobs/not-a-uuid/").status_code == 404
    assert api.get(f"/api/v1/jobs/{mine[0].id}/").json()["id"] == str(mine[0].id)
    # filters
    assert ids(api.get("/api/v1/jobs/?status=failed,queued")) == sorted([str(mine[0].id), str(mine[2].id)])
    assert ids(api.get("/api/v1/jobs/?op=validate")) == [str(mine[1].id)]
    assert ids(api.get("/api/v1/jobs/?adapter=alice/lora")) == [str(mine[1].id)]
    assert ids(api.get("/api/v1/adapters/alice/lora/jobs")) == [str(mine[1].id)]
    assert other_api.get("/api/v1/adapters/alice/lora/jobs").json()["results"] == []
    assert api.get("/api/v1/jobs/?status=bogus").json()["error"] == "invalid_filter"
    assert api.get("/api/v1/jobs/?adapter=bogus").json()["error"] == "invalid_filter"


@pytest.mark.parametrize("status,code,after", [
    ("queued", 200, "cancelled"),
    ("running", 200, "running"),  # flagged; the runner stops at its next progress point
    ("cancelled", 200, "cancelled"),
    ("succeeded", 409, "succeeded"),
    ("failed", 409, "failed"),
])
def test_cancel(api, user, status, code, after):
    job = make(user, status=status)
    r = api.post(f"/api/v1/jobs/{job.id}/cancel")
    assert r.status_code == code
    job.refresh_from_db()
    assert job.status == after
    if code == 200:
        assert r.json()["status"] == after
        assert job.cancel_requested is (status in ("queued", "running"))
    else:
        assert r.json()["error"] == "job_finished" and not job.cancel_requested


# --- op declarations ----------------------------------------------------------------------------------------------


def test_op_declarations_match_the_app():
    import importlib

    from adapters_ops import opspecs
    from workers.app import VISIBILITY_TIMEOUT, app

    assert "validate" in opspecs.OPS
    for name, spec in opspecs.OPS.items():
        importlib.import_module(spec.module)
        task = app.tasks[f"ops.{name}"]  # one name everywhere
        assert spec.queue in ("cpu", "gpu")
        assert spec.soft_time_limit < spec.time_limit < VISIBILITY_TIMEOUT
        assert app.conf.task_routes[task.name] == {"queue": spec.queue}
        assert app.conf.task_annotations[task.name] == {
            "soft_time_limit": spec.soft_time_limit, "time_limit": spec.time_limit}
    conf = app.conf
    assert (conf.task_acks_late, conf.task_reject_on_worker_lost, conf.worker_prefetch_multiplier) == (True, True, 1)
    assert conf.task_always_eager is False
    assert conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT
    assert conf.beat_schedule["reap-jobs"]["task"] == "workers.reaper.reap"


def test_web_side_imports_no_torch():
    from tests.web_process import forbidden_modules_after

    # The whole web side, the job service and the op declarations: no torch, and no `workers` at all
    # (the hub sends by task name through hub.queue).
    imports = "import hub.urls, hub.registry.jobs, hub.queue, adapters_ops.opspecs, frontend.job_forms, sys"
    assert forbidden_modules_after(imports, also=("workers",)) == []
    # The worker app on top of it still loads no op module (and so no torch) until a task runs.
    assert forbidden_modules_after("import workers.app, sys") == []


# --- transfer every adapter of a base, in one request ------------------------------------------------


def test_transfer_all_makes_one_job_per_writable_adapter(api, adapters, user):
    from hub.registry.models import Adapter, BaseModel, Job

    base = adapters.base_model
    target = BaseModel.objects.create(slug="next", family="tiny", manifest=base.manifest)
    Adapter.objects.create(owner=user.username, name="second", base_model=base)
    r = api.post(f"/api/v1/base-models/{base.slug}/transfer", {"target": "next", "params": {"method": "diff"}},
                 format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    # mallory's adapters are not alice's to move; each job names its own adapter
    assert sorted(j["params"]["adapter"] for j in body["jobs"]) == ["alice/lora", "alice/second"]
    assert body["refused"] == []
    assert all(j["params"]["target"] == target.slug and j["params"]["method"] == "diff" for j in body["jobs"])
    assert Job.objects.filter(op="transfer").count() == 2


@pytest.mark.parametrize("body,code,error", [
    ({"target": "nowhere"}, 404, "base_model_not_found"),  # one answer, not one refusal per adapter
    ({"target": "next", "params": {"method": "teleport"}}, 400, "invalid_params"),
    ({"target": "next", "params": {"adapter": "alice/lora"}}, 400, "invalid_params"),
    ({"target": "next", "params": {"translora": {"stepz": 1}}}, 400, "invalid_params"),
])
def test_transfer_all_refuses_shared_mistakes_and_makes_no_job(api, adapters, body, code, error):
    from hub.registry.models import BaseModel, Job

    BaseModel.objects.create(slug="next", family="tiny", manifest=adapters.base_model.manifest)
    r = api.post(f"/api/v1/base-models/{adapters.base_model.slug}/transfer", body, format="json")
    assert (r.status_code, r.json()["error"]) == (code, error)
    assert Job.objects.count() == 0
    r = api.post("/api/v1/base-models/missing/transfer", {"target": "next"}, format="json")
    assert r.status_code == 404 and Job.objects.count() == 0
