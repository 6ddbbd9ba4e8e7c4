"""adapters_ops.moving.move, the policy a transfer job runs, on manifests alone where it can:
which method it uses, what it refuses, and that it reads no base weights it does not need.
The seeded paths (gate, fine-tune, Trans-LoRA, verdict) run on real workers in
tests/workers/test_ops_transfer.py and tests/workers/test_verdict.py."""

from __future__ import annotations

import pytest
import torch

from adapters_ops import moving
from adapters_ops.errors import AdapterError, IncompatibleAdapters
from tests.ops.test_transfer import llama_shapes, lora_adapter


def manifest(shapes):
    return {n: {"shape": list(s), "dtype": "F32"} for n, s in shapes.items()}


def no_weights():
    raise AssertionError("read a base folder it does not need")


def move(lora, source, target, **kw):
    return moving.move(lora, source_manifest=manifest(source), target_manifest=manifest(target), target_slug="t",
                       source_dir=no_weights, target_dir=no_weights, **kw)


@pytest.mark.parametrize("method", ["diff", "auto"])
def test_a_diff_without_seeds_rebases_exactly_and_is_unverified(method):
    shapes = llama_shapes()
    lora = lora_adapter(shapes)
    moved = move(lora, shapes, shapes, method=method, scale=0.5)
    assert moved.method == "diff" and moved.metrics == {"compatible": True, "method": "diff"}
    assert moved.verdict["status"] == "unverified"
    assert moved.adapter.config["base_model_name_or_path"] == "t"
    for module in lora.modules():
        assert torch.allclose(moved.adapter.delta(module), 0.5 * lora.delta(module))


def test_refusals_name_the_reason():
    lora = lora_adapter(llama_shapes())
    wider = llama_shapes(hidden=64, kv=32)
    with pytest.raises(IncompatibleAdapters) as info:
        move(lora, llama_shapes(), wider, method="diff")
    assert info.value.code == "incompatible_bases"
    for method in ("auto", "translora"):  # Trans-LoRA would be needed, and learns from the seeds
        with pytest.raises(AdapterError) as info:
            move(lora, llama_shapes(), wider, method=method)
        assert info.value.code == "no_seeds"
    with pytest.raises(AdapterError) as info:
        move(lora, llama_shapes(), llama_shapes(), method="teleport")
    assert info.value.code == "invalid_parameter"
