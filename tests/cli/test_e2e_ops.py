"""Operations end to end on real services, driven by hubctl: push, compress
job on a real worker, pull --compressed decoded on the client and loaded by
peft; then a bulk transfer to a new base version with its live table."""

import pytest
import torch

from tests.model_fixtures import TINY_CONFIG
from tests.workers.test_ops_transfer import _register

pytestmark = pytest.mark.django_db(transaction=True)


def _logits(model):
    torch.manual_seed(0)
    ids = torch.randint(4, 90, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_push_compress_pull_compressed_peft_loads(hub, hubctl, celery_procs, token_for, user, tiny_base,
                                                  tiny_base_dir, cli_adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters_ops import compeft
    from adapters_ops.adapter import Adapter

    token = token_for(user)
    celery_procs.worker()
    r = hubctl("push", cli_adapter_dir, "--base", "tiny-base", "--name", "alice/skill", token=token)
    assert r.code == 0, r.err
    r = hubctl("compress", "alice/skill", "--density", "0.25", "--wait", token=token)
    assert r.code == 0, r.err
    out = tmp_path / "decoded"
    r = hubctl("pull", "alice/skill", "--compressed", "-o", out, token=token)
    assert r.code == 0, r.err
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    # peft loads the decoded folder, and it computes what the library's decompression computes
    expected = compeft.compress(Adapter.load(cli_adapter_dir), density=0.25).decompress().save(tmp_path / "local")
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    got = _logits(PeftModel.from_pretrained(base, out))
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    want = _logits(PeftModel.from_pretrained(base, expected))
    assert torch.allclose(got, want, atol=1e-6)
    r = hubctl("lineage", "alice/skill", token=token)
    assert r.code == 0 and "compeft" in r.out


def test_bulk_transfer_with_hubctl(hub, hubctl, celery_procs, token_for, user, staff_user, tiny_base,
                                   cli_adapter_dir, make_peft_adapter, tmp_path):
    from hub.registry.models import Adapter

    token = token_for(user)
    _register(staff_user, "tiny-base-2", TINY_CONFIG, tmp_path, seed=5)
    celery_procs.worker()
    for name, folder in (("a", cli_adapter_dir), ("b", make_peft_adapter("cli-b", r=2, seed=11))):
        assert hubctl("push", folder, "--base", "tiny-base", "--name", f"alice/{name}", token=token).code == 0
    r = hubctl("transfer", "--from", "tiny-base", "--to", "tiny-base-2", "--method", "diff", "--wait", token=token)
    assert r.code == 0, r.err
    assert "alice/a" in r.out and "alice/b" in r.out
    assert sorted(Adapter.objects.filter(base_model__slug="tiny-base-2").values_list("name", flat=True)) == [
        "a-tiny-base-2", "b-tiny-base-2"]
    r = hubctl("lineage", "alice/a-tiny-base-2", token=token)
    assert r.code == 0 and "transfer" in r.out and "alice/a" in r.out
