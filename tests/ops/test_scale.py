"""`scale`: the library function, then the op end to end on a real worker."""

import pytest
import torch

from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError
from tests.live_workers import wait_jobs


def _lora(dtype=torch.float32, **config):
    g = torch.Generator().manual_seed(0)
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{m}.lora_A.weight": torch.randn(4, 16, generator=g).to(dtype),
               f"{m}.lora_B.weight": torch.randn(16, 4, generator=g).to(dtype)}
    return Adapter(config={"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}, tensors=tensors)


@pytest.mark.parametrize("factor", [0.5, -1.0, 0.0, 3])
def test_scale_multiplies_every_update_exactly(factor):
    from adapters_ops.scale import scale

    lora = _lora()
    out = scale(lora, factor)
    for module in lora.modules():
        assert torch.allclose(out.delta(module), factor * lora.delta(module), atol=1e-6)
    assert out.config == lora.config and out.tensors.keys() == lora.tensors.keys()
    assert all(torch.equal(lora.tensors[k], _lora().tensors[k]) for k in lora.tensors)  # input untouched


def test_scale_keeps_the_dtype_and_refuses_what_it_cannot_scale():
    from adapters_ops.scale import scale

    out = scale(_lora(torch.bfloat16), 0.5)
    assert {t.dtype for t in out.tensors.values()} == {torch.bfloat16}
    with pytest.raises(AdapterError, match="DoRA"):
        scale(_lora(use_dora=True), 2.0)
    extra = _lora()
    extra.tensors["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(2, 2)
    with pytest.raises(AdapterError, match="modules_to_save"):
        scale(extra, 2.0)
    for bad in (float("nan"), float("inf"), True, "2"):
        with pytest.raises(AdapterError, match="finite number"):
            scale(_lora(), bad)


@pytest.mark.django_db(transaction=True)
def test_scale_job_makes_a_scale_revision(celery_procs, user, peft_adapter, peft_adapter_dir, tmp_path):
    from hub.registry.jobs import job_create
    from hub.registry.selectors import revision_resolve
    from hub.storage import copy_to_path

    celery_procs.worker()
    job = job_create(user=user, op="scale", params={"adapter": "alice/lora", "factor": -0.5})
    done = wait_jobs([job.id], timeout=120)[str(job.id)]
    assert done.status == "succeeded", done.error
    rev = revision_resolve(peft_adapter, "scale")
    assert rev.kind == "scale" and rev.metrics == {"factor": -0.5}
    assert list(rev.parents.all()) == [revision_resolve(peft_adapter, "main")]
    for rf in rev.files.select_related("blob"):
        copy_to_path(rf.blob, tmp_path / rf.path)
    stored, source = Adapter.load(tmp_path), Adapter.load(peft_adapter_dir)
    for module in source.modules():
        assert torch.allclose(stored.delta(module), -0.5 * source.delta(module), atol=1e-6)
    assert revision_resolve(peft_adapter, "main").kind == "upload"  # main did not move
