"""The live API against its own OpenAPI schema: schemathesis generates requests
from /api/schema/ for every operation (valid data, invalid data, and valid data
aimed at objects that exist) and checks that no answer is a server error and
that every answer (status, content type, body) is one the schema documents.

Deterministic: Hypothesis runs derandomized with no example database, so CI
sends the same requests every time. Not fuzzed: `POST /api/v1/jobs/` (a valid
request starts real work on the workers; its validation has its own tests).
"""

from __future__ import annotations

import time
from http.cookiejar import DefaultCookiePolicy

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EXAMPLES = 20  # per operation and mode: about 1,300 requests, about 2 minutes on 2 cores (25 took 143 s here)
NOT_FUZZED = {"POST /api/v1/jobs/"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture
def fuzz_world(broker, staff_user, token_for, tiny_base, make_peft_adapter):
    """Objects for the aimed runs: a deprecated base with a successor and one
    without, an adapter with a revision, a webhook with a delivery, a job.
    `broker`: a Redis of its own, where pings and job messages wait for no worker."""
    from hub.registry import jobs, services, webhooks
    from hub.registry.models import BaseModel
    from hub.registry.services import IncomingFile

    newer = BaseModel.objects.create(slug="tiny-base-2", family="tiny", version="2", weights_uri="file:///none")
    services.base_model_deprecate(base=tiny_base, successor=newer, at=None)
    folder = make_peft_adapter("lora", r=4, targets=("q_proj", "v_proj"))
    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(folder.iterdir()) if p.is_file()]
    try:
        services.adapter_create_from_upload(owner="admin", name="skill", base=tiny_base, user=staff_user,
                                            files=files, visibility="public", tags=["demo"], description="")
    finally:
        for f in files:
            f.fileobj.close()
    hook = webhooks.webhook_create(user=staff_user, owner="admin", url="http://127.0.0.1:9/hook", events=None,
                                   description="fuzz")
    webhooks.ping(hook)
    job = jobs.job_create(user=staff_user, op="compress", params={"adapter": "admin/skill"})
    return {
        "token": token_for(staff_user),
        "aim": {
            "slug": "tiny-base", "owner": "admin", "name": "skill", "path": "adapter_config.json",
            "webhooks": hook.pk, "jobs": str(job.pk),
        },
    }


def _aimed(operation, aim: dict) -> dict:
    """Path parameters that name existing objects (`id` depends on the route)."""
    names = {p.name for p in operation.path_parameters}
    chosen = {k: v for k, v in aim.items() if k in names}
    if "id" in names:
        chosen["id"] = aim["webhooks" if "/webhooks/" in operation.path else "jobs"]
    return chosen


def _fuzz(operation, mode, path_parameters, call, failures: dict, counts: dict) -> None:
    """EXAMPLES generated requests for one operation; failures by operation, mode and kind."""

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters or None))
    def run(case):
        counts["requests"] += 1
        try:
            call(case)
        except (Failure, FailureGroup) as exc:
            for failure in getattr(exc, "exceptions", [exc]):
                failures.setdefault(f"{operation.label} [{mode.value}]: {failure.title}",
                                    f"{failure.message}\n    {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        # Nothing in the operation can be made invalid (no parameters, or only free text).
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_api_conforms_to_its_schema(live_server, fuzz_world):
    headers = {"Authorization": f"Bearer {fuzz_world['token']}"}
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/", headers=headers)
    session = requests.Session()
    # No cookies kept between requests: each answer depends on its own request and the data, not on
    # a session cookie an earlier operation happened to set (reproducible runs).
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))

    def call(case):
        case.call_and_validate(base_url=live_server.url, session=session, headers=headers, checks=CHECKS, timeout=30)

    failures: dict[str, str] = {}
    counts = {"operations": 0, "requests": 0}
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in NOT_FUZZED:
            continue
        counts["operations"] += 1
        _fuzz(operation, GenerationMode.POSITIVE, {}, call, failures, counts)
        _fuzz(operation, GenerationMode.NEGATIVE, {}, call, failures, counts)
        if operation.path_parameters and operation.method.upper() != "DELETE":
            # Random ids rarely exist: aim valid requests at real objects too (never deleting them).
            _fuzz(operation, GenerationMode.POSITIVE, _aimed(operation, fuzz_world["aim"]), call, failures, counts)

    elapsed = time.monotonic() - started
    print(f"schemathesis: {counts['operations']} operations, {counts['requests']} requests, {elapsed:.0f} s")
    assert not failures, "\n".join(f"{k}\n    {v}" for k, v in sorted(failures.items()))
