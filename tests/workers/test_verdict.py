"""Quality verdicts on real workers, on the tiny zoo: the worker's verdict is
the library's on the same held-out seeds; a failed compress is shown as failed
(REST, job message); a transfer that fails its verdict does not take `main`,
its owner gets `adapter.move_failed`, and the scheduled retransfer does not
count it as moved."""

import datetime as dt

import pytest
from django.utils import timezone

from tests.live_workers import wait_jobs, wait_until
from tests.workers.test_ops_tensor import _upload
from tests.workers.test_ops_transfer import _register_dir

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def zoo_caesar(user, staff_user, zoo_dir):
    base = _register_dir(staff_user, "tiny-llama-3.0", zoo_dir / "bases" / "tiny-llama-3.0")
    _upload(user, base, zoo_dir / "adapters" / "caesar", "caesar",
            seeds=(zoo_dir / "tasks" / "caesar" / "seed.jsonl").read_bytes())
    return base


def test_compress_at_density_0_1_fails_its_verdict_on_held_out_seeds(celery_procs, user, zoo_caesar, zoo_dir, api):
    from adapters_ops import compeft, verdict
    from adapters_ops.adapter import Adapter
    from adapters_ops.evaluate import evaluate, read_examples
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.selectors import revision_resolve

    celery_procs.worker()
    job = job_create(user=user, op="compress", params={"adapter": "alice/caesar", "density": 0.1})
    done = wait_jobs([job.id], timeout=300)[str(job.id)]
    assert done.status == "succeeded", done.error
    rev = done.result_revision
    v = rev.verdict
    # what the library says on the same split: the scale chosen on one half, judged on the other
    base, lora = zoo_dir / "bases" / "tiny-llama-3.0", Adapter.load(zoo_dir / "adapters" / "caesar")
    plan = verdict.plan_examples(read_examples(zoo_dir / "tasks" / "caesar" / "seed.jsonl"), selects=True)
    choice = compeft.choose_scale(lora, 0.1, lambda c: evaluate(base, plan.choose, adapter=c).accuracy)
    local = verdict.assess(plan, source=(base, lora), derived=(base, choice.compressed.decompress()),
                           bare=(base, None))
    assert v == local
    assert v["status"] == "failed" and v["before"] > v["after"]
    assert v["examples"] == {"source": "held_out_seeds", "n": 8, "of": 16, "indices": plan.indices}
    assert rev.metrics["scale_search"]["examples"] == 8  # the search saw only the other half
    assert "Verdict: failed" in done.message and "Compressed" in done.message
    # REST: the revision and the job's result carry it
    revs = api.get("/api/v1/adapters/alice/caesar/revisions/").json()["results"]
    assert {r["sha"]: r["verdict"] for r in revs}[rev.sha]["status"] == "failed"
    assert [r["verdict"] for r in revs if r["kind"] == "upload"] == [None]
    assert api.get(f"/api/v1/jobs/{job.id}/").json()["result"]["verdict"]["ratio"] == v["ratio"]
    adapter = AdapterRow.objects.get(owner="alice", name="caesar")
    assert revision_resolve(adapter, "main").kind == "upload"


def test_failed_transfer_keeps_main_tells_the_owner_and_is_not_counted_as_moved(
        celery_procs, user, staff_user, zoo_caesar, zoo_dir, client_for, webhook_receiver):
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.models import Ref
    from hub.registry.services import base_model_deprecate
    from hub.registry.webhooks import webhook_create
    from workers.retransfer import sweep

    target = _register_dir(staff_user, "tiny-llama-3.1", zoo_dir / "bases" / "tiny-llama-3.1")
    webhook_create(user=user, owner="alice", url=webhook_receiver.url,
                   events=["adapter.moved", "adapter.move_failed", "job.finished"])
    celery_procs.worker()
    # scale 0: the re-based adapter is empty, so it cannot keep the skill (a diff transfer
    # chooses nothing on the seeds: judged on all 16)
    zero = job_create(user=user, op="transfer", params={"adapter": "alice/caesar", "target": "tiny-llama-3.1",
                                                        "method": "diff", "scale": 0.0, "name": "alice/caesar-zero"})
    done = wait_jobs([zero.id], timeout=300)[str(zero.id)]
    assert done.status == "succeeded", done.error
    v = done.result_revision.verdict
    assert v["status"] == "failed" and v["after"] == v["base"] and v["examples"]["source"] == "all_seeds"
    assert "main not moved" in done.message
    moved = AdapterRow.objects.get(owner="alice", name="caesar-zero")
    assert dict(Ref.objects.filter(adapter=moved).values_list("name", "revision__sha")) == {
        "transfer": done.result_revision.sha}
    wait_until(lambda: len(webhook_receiver.requests) >= 2, timeout=60, what="the job's two webhooks")
    events = {r.json["type"]: r.json["data"] for r in webhook_receiver.requests}
    assert set(events) == {"job.finished", "adapter.move_failed"}
    assert events["adapter.move_failed"]["reason"] == "verdict_failed"
    assert events["adapter.move_failed"]["verdict"]["status"] == "failed"
    assert events["job.finished"]["revision"]["verdict"] == v

    # the base is retired into its successor: the failed transfer is not a move, and not retried
    base_model_deprecate(base=zoo_caesar, successor=target, at=timezone.now() - dt.timedelta(minutes=1))
    assert sweep()["tiny-llama-3.0"]["rejected"] == 1
    plan = client_for(user).get("/api/v1/base-models/tiny-llama-3.0/").json()["retransfer"]
    assert [(r["adapter"], r["state"], r["result"]) for r in plan] == [("alice/caesar", "verdict failed", None)]
