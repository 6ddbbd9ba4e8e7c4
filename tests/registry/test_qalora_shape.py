"""Upload validation of QA-LoRA shapes, from headers only: a lora_A with in/G columns is a
QA-LoRA only when adapter_config.json declares that group size; undeclared or wrongly declared,
the upload is refused with an error that names both readings (the API answers 400).

Pure unit tests like test_validation.py: files written with safetensors' numpy writer."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from hub.registry import validation as v
from hub.registry.validation import ValidationError

HIDDEN, KV, INTER = 64, 32, 128
P = "base_model.model."
# PEFT writes these two keys into every LoraConfig; they declare nothing on their own
PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "qalora_group_size": 16, "use_qalora": False}
MEAN_16 = {"qalora_group_size": 16, "qalora_pooling": "mean"}


def manifest() -> dict:
    pre = "model.layers.0."
    m = {pre + "self_attn.q_proj.weight": [HIDDEN, HIDDEN], pre + "self_attn.v_proj.weight": [KV, HIDDEN],
         pre + "mlp.down_proj.weight": [HIDDEN, INTER], "model.embed_tokens.weight": [100, HIDDEN]}
    return {k: {"shape": s, "dtype": "BF16"} for k, s in m.items()}


def header(group: int = 1, r: int = 4) -> dict:
    """An adapter whose lora_A has in/group columns in every module (group 1: a plain LoRA)."""
    shapes = {}
    for module, out, n in (("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.v_proj", KV, HIDDEN),
                           ("mlp.down_proj", HIDDEN, INTER)):
        shapes[f"{P}model.layers.0.{module}.lora_A.weight"] = [r, n // group]
        shapes[f"{P}model.layers.0.{module}.lora_B.weight"] = [out, r]
    data = st_save({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()})
    return v.read_safetensors_header(io.BytesIO(data), len(data))


def raises(code, fn, *args) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        fn(*args)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value.detail}"
    assert info.value.detail
    return info.value


def check(config: dict, group: int) -> v.AdapterSummary:
    """What the upload service does: parse the config, then check the weights' header against the base."""
    parsed = v.validate_peft_config(json.dumps(config).encode())
    return v.check_lora_shapes(header(group), parsed, manifest())


# --- refused -------------------------------------------------------------------------------------


def test_a_qa_lora_repository_adapter_without_declaration_is_refused():
    err = raises("qalora_undeclared", check, PEFT_CONFIG, 16)
    for text in ("lora_A of model.layers.0.mlp.down_proj has 8 columns", "a QA-LoRA with group size 16",
                 "over in_features 128", "not a LoRA (128 columns)", '"qalora_group_size": 16',
                 '"qalora_pooling": "mean"', '"use_qalora": true'):
        assert text in err.detail, (text, err.detail)
    assert err.field == v.WEIGHTS_FIELD
    # without PEFT's default keys too (the qa-lora repository's config is older than them)
    bare = {k: val for k, val in PEFT_CONFIG.items() if not k.endswith("qalora") and k != "qalora_group_size"}
    raises("qalora_undeclared", check, bare, 32)


WRONG = [
    ("PEFT flag, other group", {"use_qalora": True, "qalora_group_size": 8}, 16,
     ["has 8 columns", "a QA-LoRA with group size 16", "declared qalora_group_size 8 (16 columns)",
      '"qalora_group_size": 16']),
    ("mean pooling, other group", {**MEAN_16, "qalora_group_size": 32}, 16,
     ["group size 16", "declared qalora_group_size 32 (4 columns)"]),
    ("a plain LoRA declared as QA-LoRA", MEAN_16, 1,
     ["has 128 columns", "a LoRA over in_features 128", "declared qalora_group_size 16 (8 columns)", "remove"]),
]


@pytest.mark.parametrize("name,declare,group,mentions", WRONG, ids=[c[0] for c in WRONG])
def test_wrong_declarations_are_refused_naming_both_shapes(name, declare, group, mentions):
    err = raises("qalora_declaration_mismatch", check, {**PEFT_CONFIG, **declare}, group)
    for text in mentions:
        assert text in err.detail, (text, err.detail)


def test_one_odd_module_is_still_a_plain_shape_mismatch():
    shapes = header(1)
    key = f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"
    shapes[key] = {**shapes[key], "shape": [4, HIDDEN // 2]}  # only q_proj: no one group size explains it
    err = raises("shape_mismatch", v.check_lora_shapes, shapes, PEFT_CONFIG, manifest())
    assert "needs [4, 64]" in err.detail


BAD_CONFIGS = [
    ("use_qalora not a boolean", {"use_qalora": "yes"}),
    ("unknown pooling", {"qalora_pooling": "max"}),
    ("declared without a group size", {"qalora_pooling": "mean", "qalora_group_size": None}),
    ("declared with group size 0", {"use_qalora": True, "qalora_group_size": 0}),
    ("declared with a string group size", {"qalora_pooling": "mean", "qalora_group_size": "16"}),
]


@pytest.mark.parametrize("name,extra", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_qalora_config_fields(name, extra):
    raises("invalid_config", v.validate_peft_config, json.dumps({**PEFT_CONFIG, **extra}).encode())


# --- accepted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("declare", [MEAN_16, {"use_qalora": True, "qalora_group_size": 16}],
                         ids=["qalora_pooling mean", "use_qalora"])
def test_declared_qalora_with_its_shapes_is_accepted(declare):
    s = check({**PEFT_CONFIG, **declare}, 16)
    assert (s.r, s.modules, s.target_modules) == (4, 3, ["down_proj", "q_proj", "v_proj"])


def test_plain_lora_with_peft_default_keys_is_accepted():
    assert check(PEFT_CONFIG, 1).modules == 3


# --- the API answers 400 -------------------------------------------------------------------------


def test_the_api_maps_the_refusal_to_400():
    from hub.api.errors import exception_handler

    with pytest.raises(ValidationError) as info:
        check(PEFT_CONFIG, 16)
    response = exception_handler(info.value, {})
    assert response.status_code == 400
    assert response.data["error"] == "qalora_undeclared" and "group size 16" in response.data["detail"]


def test_the_shared_declaration_rule_keeps_torch_out_of_the_web_process():
    """validation imports adapters_ops.qalora_declaration (one rule for upload and library): it must
    stay standard library only, or the web process would load torch on every upload."""
    import subprocess
    import sys

    code = ("import sys, hub.registry.validation, adapters_ops.qalora_declaration; "
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'adapters_ops.adapter') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
