"""`auto` settings on real workers, on the tiny zoo: compress --density auto
(the smallest file that passes), quantize --bits auto (the fewest bits that
pass), merge --method auto (the best data-free method on the seeds, else
distill). The searches read one half of the seeds; the verdict the other."""

import pytest

from tests.live_workers import wait_jobs
from tests.workers.test_ops_tensor import _upload
from tests.workers.test_ops_transfer import _register_dir

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def zoo_skills(user, staff_user, zoo_dir):
    base = _register_dir(staff_user, "tiny-llama-3.0", zoo_dir / "bases" / "tiny-llama-3.0")
    for skill in ("caesar", "date"):
        _upload(user, base, zoo_dir / "adapters" / skill, skill,
                seeds=(zoo_dir / "tasks" / skill / "seed.jsonl").read_bytes())
    return base


def _cheapest_first(tried: list[dict], key: str, candidates, chosen, passed):
    """The search stopped at the first candidate that passes, or tried all and kept the best."""
    from adapters_ops.verdict import PASS_RATIO

    order, ratios = [t[key] for t in tried], {t[key]: t["ratio"] for t in tried}
    assert order == list(candidates)[:len(order)]
    if passed:
        assert ratios[chosen] >= PASS_RATIO and order[-1] == chosen
        assert all(t["ratio"] < PASS_RATIO for t in tried[:-1])
    else:
        assert order == list(candidates) and ratios[chosen] == max(ratios.values())


def test_compress_density_auto(celery_procs, user, zoo_skills):
    from adapters_ops import verdict
    from hub.registry.jobs import job_create

    celery_procs.worker()
    job = job_create(user=user, op="compress", params={"adapter": "alice/caesar", "density": "auto"})
    done = wait_jobs([job.id], timeout=600)[str(job.id)]
    assert done.status == "succeeded", done.error
    m, v = done.result_revision.metrics, done.result_revision.verdict
    search = m["density_search"]
    _cheapest_first(search["tried"], "density", verdict.AUTO_DENSITIES, m["density"], search["passed"])
    assert search["examples"] == 8 and v["examples"]["source"] == "held_out_seeds" and v["examples"]["n"] == 8
    assert f"density {m['density']} (auto)" in done.result_revision.message


def test_quantize_bits_auto(celery_procs, user, zoo_skills):
    from adapters_ops import verdict
    from hub.registry.jobs import job_create

    celery_procs.worker()
    job = job_create(user=user, op="quantize", params={"adapter": "alice/caesar", "bits": "auto", "group_size": 32})
    done = wait_jobs([job.id], timeout=600)[str(job.id)]
    assert done.status == "succeeded", done.error
    m, v = done.result_revision.metrics, done.result_revision.verdict
    search = m["bits_search"]
    _cheapest_first(search["tried"], "bits", verdict.AUTO_BITS, m["bits"], search["passed"])
    assert v["examples"]["source"] == "held_out_seeds" and v["status"] in verdict.STATUSES
    assert f"INT{m['bits']} (auto)" in done.result_revision.message


def test_merge_method_auto(celery_procs, user, zoo_skills):
    from adapters_ops import verdict
    from hub.registry.jobs import job_create

    celery_procs.worker()
    job = job_create(user=user, op="merge", params={"adapters": ["alice/caesar", "alice/date"], "method": "auto",
                                                    "steps": 20, "synthetic": 32, "name": "alice/both"})
    done = wait_jobs([job.id], timeout=600)[str(job.id)]
    assert done.status == "succeeded", done.error
    m, v = done.result_revision.metrics, done.result_revision.verdict
    search = m["method_search"]
    ratios = {t["method"]: t["ratio"] for t in search["tried"]}
    assert [t["method"] for t in search["tried"]] == [name for name, _ in verdict.AUTO_MERGE_METHODS]
    if search["passed"]:
        assert m["method"] == max(ratios, key=ratios.get) and ratios[m["method"]] >= verdict.PASS_RATIO
    else:
        assert m["method"] == "distill" and max(ratios.values()) < verdict.PASS_RATIO and "distill" in m
    assert set(v["skills"]) == {"alice/caesar", "alice/date"}
    assert {s["examples"]["source"] for s in v["skills"].values()} == {"held_out_seeds"}
