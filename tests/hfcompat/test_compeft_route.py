"""docs/hf-compat.md's route to a `compeft` revision works as written: the
compressed file downloads with `hf_hub_download(..., revision="compeft")`,
`adapters_ops.compeft` decodes it into a PEFT folder, and `PeftModel` loads
that folder with the same outputs as the decoded adapter; while
`PeftModel.from_pretrained(base, repo, revision="compeft")` fails (the revision
holds no PEFT weights file), as the page says."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def compressed(published, peft_dir, tmp_path):
    """alice/x's `compeft` revision, made by the library (as the compress job does)."""
    from django.db import transaction

    from adapters_ops import compeft
    from adapters_ops.adapter import Adapter
    from hub.registry.services import revision_create
    from hub.storage import blob_batch

    path = tmp_path / compeft.FILE_NAME
    compeft.compress(Adapter.load(peft_dir), density=0.5).save(path)
    with transaction.atomic(), blob_batch() as batch:
        files = {compeft.FILE_NAME: batch.put_path(path),
                 "adapter_config.json": batch.put_path(peft_dir / "adapter_config.json")}
        revision_create(adapter=published.adapter, files=files, kind="compeft", parents=[published])
    return path


def test_the_documented_compeft_route(hf_client, compressed, tiny_base_dir, tmp_path):
    out = hf_client(f"""
        import json, torch
        from huggingface_hub import hf_hub_download
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from adapters_ops import compeft

        path = hf_hub_download("alice/x", "adapter_model.compeft.safetensors", revision="compeft")
        compeft.load(path).decompress().save(r"{tmp_path / 'x-decoded'}")
        local = compeft.load(r"{compressed}").decompress()
        local.save(r"{tmp_path / 'x-local'}")
        base = lambda: AutoModelForCausalLM.from_pretrained(r"{tiny_base_dir}")
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = PeftModel.from_pretrained(base(), r"{tmp_path / 'x-decoded'}").eval()(ids).logits
            b = PeftModel.from_pretrained(base(), r"{tmp_path / 'x-local'}").eval()(ids).logits
        try:
            PeftModel.from_pretrained(base(), "alice/x", revision="compeft")
            direct = "loaded"
        except Exception as exc:
            direct = type(exc).__name__ + ": " + str(exc)
        print(json.dumps({{"same": torch.equal(a, b), "direct": direct}}))
        """)
    assert out["same"] is True
    assert out["direct"] != "loaded"  # as docs/hf-compat.md says: decode first
