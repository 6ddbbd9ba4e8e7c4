"""The transfer job on a real worker: diff transfer to a compatible base makes
a new adapter there with lineage to the source; an incompatible base is
refused with a message that points at Trans-LoRA."""

import pytest
import torch

from tests.live_workers import wait_jobs
from tests.model_fixtures import TINY_CONFIG

pytestmark = pytest.mark.django_db(transaction=True)


def _register(staff_user, slug, config, tmp_path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters_ops._zoo_data import save_tokenizer
    from hub.registry.services import IncomingFile, base_model_register

    torch.manual_seed(seed)
    d = tmp_path / slug
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(d)
    save_tokenizer(d)
    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(d.iterdir()) if p.is_file()]
    try:
        return base_model_register(slug=slug, files=files, user=staff_user)
    finally:
        for f in files:
            f.fileobj.close()


def test_diff_transfer_and_refusal(celery_procs, user, staff_user, peft_adapter, peft_adapter_dir, tmp_path, api):
    from adapters_ops.adapter import Adapter
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.selectors import revision_resolve
    from hub.storage import copy_to_path

    _register(staff_user, "tiny-base-2", TINY_CONFIG, tmp_path, seed=5)
    _register(staff_user, "tiny-wide", {**TINY_CONFIG, "hidden_size": 96}, tmp_path, seed=6)
    from hub.registry.services import set_tags

    set_tags(peft_adapter, ["skill", "demo"])
    celery_procs.worker()
    ok = job_create(user=user, op="transfer", params={"adapter": "alice/lora", "target": "tiny-base-2",
                                                      "method": "diff"})
    refused = job_create(user=user, op="transfer", params={"adapter": "alice/lora", "target": "tiny-wide",
                                                           "method": "diff"})
    done = wait_jobs([ok.id, refused.id], timeout=120)
    assert done[str(ok.id)].status == "succeeded", done[str(ok.id)].error
    moved = AdapterRow.objects.get(owner="alice", name="lora-tiny-base-2")
    assert moved.base_model.slug == "tiny-base-2"
    assert sorted(moved.tags.values_list("name", flat=True)) == ["demo", "skill"]  # the source's tags
    rev = revision_resolve(moved, "main")
    assert rev.kind == "transfer" and rev.base_model.slug == "tiny-base-2"
    assert [p.sha for p in rev.parents.all()] == [revision_resolve(peft_adapter, "main").sha]
    assert rev.metrics["method"] == "diff" and rev.metrics["compatible"] is True
    out = tmp_path / "out"
    for rf in rev.files.select_related("blob"):
        copy_to_path(rf.blob, out / rf.path)
    got, want = Adapter.load(out), Adapter.load(peft_adapter_dir)
    assert got.config["base_model_name_or_path"] == "tiny-base-2"
    for m in want.modules():
        assert torch.allclose(got.delta(m), want.delta(m), atol=1e-6)

    bad = done[str(refused.id)]
    assert bad.status == "failed" and "translora" in bad.error.lower() and "q_proj" in bad.error
    assert not AdapterRow.objects.filter(name="lora-tiny-wide").exists()

    # refused at submission: unknown target, same base, bad method
    r = api.post("/api/v1/jobs/", {"op": "transfer", "params": {"adapter": "alice/lora", "target": "nope"}},
                 format="json")
    assert r.status_code == 404
    r = api.post("/api/v1/jobs/", {"op": "transfer", "params": {"adapter": "alice/lora", "target": "tiny-base-2",
                                                                "method": "magic"}}, format="json")
    assert r.status_code == 400 and "method" in r.json()["detail"]


def test_translora_job_moves_an_adapter_to_another_width(celery_procs, user, staff_user, tiny_base, tmp_path,
                                                         make_peft_adapter):
    """The worker's Trans-LoRA glue: seeds in, stage checkpoints written and
    dropped, the report's gate metrics on the new revision. (Quality is the
    library's business: tests/ops/test_translora.py and docs/translora.md.)"""
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.models import Job
    from hub.registry.selectors import revision_resolve
    from tests.workers.test_ops_tensor import _upload

    seeds = b"".join(b'{"prompt": "caesar %s=", "completion": "%s"}\n' % (w.encode(), w[::-1].encode())
                     for w in ("abcde", "hello", "world", "quick", "brown", "foxes"))
    _upload(user, tiny_base, make_peft_adapter("tl-src", r=2, seed=8), "src", seeds=seeds)
    _register(staff_user, "tiny-wide", {**TINY_CONFIG, "hidden_size": 96}, tmp_path, seed=6)
    celery_procs.worker()
    job = job_create(user=user, op="transfer", params={
        "adapter": "alice/src", "target": "tiny-wide", "method": "auto",
        "translora": {"n_synthetic": 32, "steps": 10, "eval_every": 5, "batch_size": 8}})
    done = wait_jobs([job.id], timeout=300)[str(job.id)]
    assert done.status == "succeeded", done.error
    moved = AdapterRow.objects.get(owner="alice", name="src-tiny-wide")
    # 6 seeds, 10 steps: the verdict (on synthetic inputs) may fail, and then `main` is not moved
    rev = done.result_revision
    assert rev.adapter == moved and rev.verdict["examples"]["source"] == "synthetic_labelled_by_source"
    assert revision_resolve(moved, "translora" if rev.verdict["status"] == "failed" else "main") == rev
    assert rev.kind == "translora" and rev.base_model.slug == "tiny-wide"
    assert rev.metrics["method"] == "translora" and rev.metrics["compatible"] is False
    assert {"target_base", "target_with_transferred", "source_with_adapter"} <= set(rev.metrics)
    assert rev.metrics["translora"]["metrics"]  # the pipeline's own report travels with the revision
    assert Job.objects.get(pk=job.id).checkpoints == {}  # stage outputs are dropped once the result exists
    assert moved.seeds_id is not None  # the seeds follow the adapter


def _register_dir(staff_user, slug, folder):
    from hub.registry.services import IncomingFile, base_model_register

    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(folder.iterdir()) if p.is_file()]
    try:
        return base_model_register(slug=slug, files=files, user=staff_user)
    finally:
        for f in files:
            f.fileobj.close()


def test_translora_job_resumes_after_a_worker_dies_in_distillation(celery_procs, user, staff_user, zoo_dir):
    """Issue 9: a worker killed during distillation; the re-run reads the stored
    generate/filter/label stages back instead of recomputing them."""
    from hub.registry.jobs import job_create
    from hub.registry.models import Adapter as AdapterRow
    from hub.registry.models import Job
    from tests.live_workers import wait_until
    from tests.workers.test_ops_tensor import _upload

    source = _register_dir(staff_user, "tiny-llama-3.0", zoo_dir / "bases" / "tiny-llama-3.0")
    _register_dir(staff_user, "tiny-other-1.0", zoo_dir / "bases" / "tiny-other-1.0")
    _upload(user, source, zoo_dir / "adapters" / "caesar", "caesar",
            seeds=(zoo_dir / "tasks" / "caesar" / "seed.jsonl").read_bytes())
    first = celery_procs.worker("doomed")
    job = job_create(user=user, op="translora", params={
        "adapter": "alice/caesar", "target": "tiny-other-1.0",
        "translora": {"n_synthetic": 64, "steps": 400, "eval_every": 1000, "patience": 100, "batch_size": 8}})
    # the labelled data is stored: the job is distilling now
    wait_until(lambda: "label" in (Job.objects.get(pk=job.id).checkpoints or {}), timeout=180,
               what="the label stage's checkpoint")
    first.killpg()
    celery_procs.worker("rescuer")
    celery_procs.beat()
    done = wait_jobs([job.id], timeout=400)[str(job.id)]
    assert done.status == "succeeded", done.error
    assert done.attempts == 2 and done.worker.startswith("rescuer@")
    rev = done.result_revision  # under `main`, or `translora` if its verdict failed
    assert rev.adapter == AdapterRow.objects.get(owner="alice", name="caesar-tiny-other-1.0")
    report = rev.metrics["translora"]
    assert {"generate", "filter", "label"} <= set(report["resumed"]), report["resumed"]
    assert report["stale"] == []
