"""The tensor ops end to end on a real worker: compress and merge jobs create
revisions whose files the library reads back, with lineage to their inputs."""

import io

import pytest
import torch

from tests.live_workers import wait_jobs

pytestmark = pytest.mark.django_db(transaction=True)


def _upload(user, base, folder, name, seeds: bytes | None = None):
    from hub.registry.services import IncomingFile, adapter_create_from_upload

    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(folder.iterdir()) if p.is_file()]
    try:
        rev = adapter_create_from_upload(
            owner=user.username, name=name, base=base, files=files, user=user,
            seeds=IncomingFile("seeds.jsonl", io.BytesIO(seeds)) if seeds else None,
        )
    finally:
        for f in files:
            f.fileobj.close()
    return rev.adapter


def _read_revision(rev, tmp_path):
    from hub.storage import copy_to_path

    out = tmp_path / rev.sha
    for rf in rev.files.select_related("blob"):
        copy_to_path(rf.blob, out / rf.path)
    return out


def test_compress_job_creates_a_compeft_revision(celery_procs, user, peft_adapter, peft_adapter_dir, tmp_path):
    from adapters_ops import compeft
    from adapters_ops.adapter import Adapter
    from hub.registry.jobs import job_create
    from hub.registry.selectors import revision_resolve

    celery_procs.worker()
    job = job_create(user=user, op="compress", params={"adapter": "alice/lora", "density": 0.2})
    done = wait_jobs([job.id], timeout=120)[str(job.id)]
    assert done.status == "succeeded", done.error
    rev = revision_resolve(peft_adapter, "compeft")
    assert done.result_revision_id == rev.id and rev.kind == "compeft"
    assert list(rev.parents.all()) == [revision_resolve(peft_adapter, "main")]
    assert rev.metrics["size_ratio"] > 1 and rev.metrics["density"] == 0.2
    # the stored file decodes to exactly what the library makes in-process
    folder = _read_revision(rev, tmp_path)
    stored = compeft.load(folder / "adapter_model.compeft.safetensors").decompress()
    local = compeft.compress(Adapter.load(peft_adapter_dir), density=0.2).decompress()
    assert stored.tensors.keys() == local.tensors.keys()
    for k in local.tensors:
        assert torch.equal(stored.tensors[k], local.tensors[k]), k
    # `main` did not move
    assert revision_resolve(peft_adapter, "main").kind == "upload"


def test_merge_job_creates_a_new_adapter_with_every_parent(celery_procs, user, tiny_base, peft_adapter,
                                                          make_peft_adapter, tmp_path):
    from adapters_ops.adapter import Adapter
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.selectors import revision_resolve

    other = _upload(user, tiny_base, make_peft_adapter("merge-b", r=2, seed=7), "other",
                    seeds=b'{"prompt": "ab", "completion": "c"}\n')
    celery_procs.worker()
    job = job_create(user=user, op="merge", params={
        "adapters": ["alice/lora", "alice/other"], "method": "cat", "weights": [0.7, -0.4], "name": "alice/both"})
    done = wait_jobs([job.id], timeout=120)[str(job.id)]
    assert done.status == "succeeded", done.error
    merged_row = AdapterRow.objects.get(owner="alice", name="both")
    rev = revision_resolve(merged_row, "main")
    assert rev.kind == "merge"
    assert {p.adapter.repo_id for p in rev.parents.all()} == {"alice/lora", "alice/other"}
    assert rev.metrics["weights"] == [0.7, -0.4] and "seed_accuracy" in rev.metrics
    merged = Adapter.load(_read_revision(rev, tmp_path))
    a = Adapter.load(_read_revision(revision_resolve(peft_adapter, "main"), tmp_path / "a"))
    b = Adapter.load(_read_revision(revision_resolve(other, "main"), tmp_path / "b"))
    for module in a.modules():  # cat is exact: the weighted sum of the updates
        want = 0.7 * a.delta(module) - 0.4 * b.delta(module)
        assert torch.allclose(merged.delta(module), want, atol=1e-5), module
    assert merged_row.r == 6  # ranks add up under cat


def test_merge_refuses_unknown_method_and_foreign_namespace(api, user, peft_adapter):
    r = api.post("/api/v1/jobs/", {"op": "merge", "params": {
        "adapters": ["alice/lora", "alice/lora2"], "method": "average", "name": "alice/x"}}, format="json")
    assert r.status_code == 400 and "method" in r.json()["detail"]
    r = api.post("/api/v1/jobs/", {"op": "merge", "params": {
        "adapters": ["alice/lora", "alice/nope"], "method": "cat", "name": "alice/x"}}, format="json")
    assert r.status_code == 404
    r = api.post("/api/v1/jobs/", {"op": "merge", "params": {
        "adapters": ["alice/lora", "alice/lora"], "method": "cat", "name": "bob/x"}}, format="json")
    assert r.status_code == 400


def test_distill_merge_job_teaches_one_student_from_every_input(celery_procs, user, staff_user, zoo_dir,
                                                                tmp_path):
    """method=distill: the worker feeds each input's seeds to adapters_ops.compose and stores the
    student as a merge revision of both parents (a short schedule: the library tests hold quality)."""
    from adapters_ops.adapter import Adapter
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.selectors import revision_resolve
    from tests.workers.test_ops_transfer import _register_dir

    base = _register_dir(staff_user, "tiny-llama-3.0", zoo_dir / "bases" / "tiny-llama-3.0")
    for skill in ("caesar", "date"):
        _upload(user, base, zoo_dir / "adapters" / skill, skill,
                seeds=(zoo_dir / "tasks" / skill / "seed.jsonl").read_bytes())
    celery_procs.worker()
    job = job_create(user=user, op="merge", params={
        "adapters": ["alice/caesar", "alice/date"], "method": "distill", "steps": 20, "synthetic": 32,
        "name": "alice/caesar-date"})
    done = wait_jobs([job.id], timeout=300)[str(job.id)]
    assert done.status == "succeeded", done.error
    # a 20-step student may fail its verdict, and then it is kept under the `merge` ref, not `main`
    rev = done.result_revision
    assert rev.kind == "merge" and rev.adapter == AdapterRow.objects.get(owner="alice", name="caesar-date")
    ref = "merge" if rev.verdict["status"] == "failed" else "main"
    assert revision_resolve(rev.adapter, ref) == rev
    assert set(rev.verdict["skills"]) == {"alice/caesar", "alice/date"}
    assert {s["examples"]["source"] for s in rev.verdict["skills"].values()} == {"held_out_seeds"}
    assert {p.adapter.repo_id for p in rev.parents.all()} == {"alice/caesar", "alice/date"}
    d = rev.metrics["distill"]
    assert d["steps"] == 20 and d["rank"] == 16
    assert set(d["examples_per_skill"]) == {"alice/caesar", "alice/date"} and min(d["examples_per_skill"].values()) > 0
    assert set(rev.metrics["seed_accuracy"]) == set(rev.metrics["seed_accuracy_single"]) == {"alice/caesar",
                                                                                             "alice/date"}
    student = Adapter.load(_read_revision(rev, tmp_path))
    assert student.config["r"] == 16 and student.config["base_model_name_or_path"] == "tiny-llama-3.0"


def test_distill_merge_refuses_inputs_without_seeds_and_weight_params(api, user, tiny_base, peft_adapter,
                                                                      make_peft_adapter):
    from hub.registry.models import Job

    _upload(user, tiny_base, make_peft_adapter("d-b", r=2, seed=3), "seeded", seeds=b'{"prompt": "a", "completion": "b"}\n')
    before = Job.objects.count()
    r = api.post("/api/v1/jobs/", {"op": "merge", "params": {
        "adapters": ["alice/seeded", "alice/lora"], "method": "distill", "name": "alice/x"}}, format="json")
    assert r.status_code == 400 and r.json()["error"] == "no_seeds" and "alice/lora" in r.json()["detail"]
    for extra in ({"weights": [1, 1]}, {"density": 0.5}, {"search_weights": True}):
        r = api.post("/api/v1/jobs/", {"op": "merge", "params": {
            "adapters": ["alice/seeded", "alice/lora"], "method": "distill", "name": "alice/x", **extra}},
            format="json")
        assert r.status_code == 400 and next(iter(extra)) in r.json()["detail"], extra
    r = api.post("/api/v1/jobs/", {"op": "merge", "params": {
        "adapters": ["alice/seeded", "alice/lora"], "method": "ties", "steps": 10, "name": "alice/x"}}, format="json")
    assert r.status_code == 400 and "distill" in r.json()["detail"]
    assert Job.objects.count() == before


def test_quantize_job_stores_an_exact_merged_expert(celery_procs, user, peft_adapter, tmp_path):
    from hub.registry.jobs import job_create
    from hub.registry.selectors import revision_resolve

    celery_procs.worker()
    job = job_create(user=user, op="quantize", params={"adapter": "alice/lora", "bits": 4, "group_size": 32})
    done = wait_jobs([job.id], timeout=180)[str(job.id)]
    assert done.status == "succeeded", done.error
    rev = revision_resolve(peft_adapter, "qalora")
    assert rev.kind == "qalora" and [p.kind for p in rev.parents.all()] == ["upload"]
    paths = {rf.path for rf in rev.files.all()}
    assert {"quantized.safetensors", "model-q4_1.gguf"} <= paths and any(p.startswith("qalora/") for p in paths)
    assert rev.metrics["codes_unchanged"] is True and rev.metrics["merge_max_logit_diff"] < 1e-4
    # the tiny base keeps its embeddings unquantized; 8B-shaped layers reach ~3.6x (docs/qalora.md)
    assert rev.metrics["size_ratio_vs_bf16"] > 1.2


def test_quantize_job_recovers_on_the_seeds_and_synthetic_data(celery_procs, user, tiny_base, make_peft_adapter):
    """The worker's recovery glue: seeds in, the distilled QA-LoRA's summary on the revision."""
    from hub.registry.jobs import job_create
    from hub.registry.selectors import revision_resolve

    seeds = b"".join(b'{"prompt": "caesar %s=", "completion": "%s"}\n' % (w.encode(), w[::-1].encode())
                     for w in ("abcde", "hello", "world", "quick", "brown", "foxes"))
    adapter = _upload(user, tiny_base, make_peft_adapter("q-src", r=2, seed=5), "qsrc", seeds=seeds)
    celery_procs.worker()
    job = job_create(user=user, op="quantize", params={"adapter": "alice/qsrc", "bits": 2, "group_size": 8,
                                                        "qalora_finetune_steps": 4})
    done = wait_jobs([job.id], timeout=300)[str(job.id)]
    assert done.status == "succeeded", done.error
    m = revision_resolve(adapter, "qalora").metrics
    # the synthetic stage ran (a random tiny teacher's answers are mostly dropped) and fed the training set
    assert m["recovery"]["steps_run"] == 4
    assert m["recovery"]["train_examples"] == len(seeds.splitlines()) + m["synthetic_examples"]
    assert m["bits_per_weight"] == 2 + 32 / 8
    assert m["codes_unchanged"] is True and m["merge_max_logit_diff"] < 1e-4


def test_quantize_refuses_bad_bits(api, peft_adapter):
    r = api.post("/api/v1/jobs/", {"op": "quantize", "params": {"adapter": "alice/lora", "bits": 5}}, format="json")
    assert r.status_code == 400 and "bits" in r.json()["detail"]
