"""QA-LoRA as a library: an adapter whose lora_A has in/G columns is read only as its config
declares it (a qa-lora-repository adapter with a plain LoRA config is refused, not guessed);
every entry point takes an Adapter or a PEFT folder; the in-memory example of docs/qalora.md runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters_ops import qalora as Q
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, IncompatibleAdapters

ROOT = Path(__file__).resolve().parents[2]
P = "base_model.model."
# (weight name, out, in): the two input widths of a llama block
WEIGHTS = [("model.layers.0.self_attn.q_proj.weight", 64, 64), ("model.layers.0.mlp.down_proj.weight", 64, 128)]


def base_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(out, n, generator=g) for name, out, n in WEIGHTS}
    state["model.norm.weight"] = torch.ones(64)
    return state


@pytest.fixture
def base_dir(tmp_path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    save_file(base_state(), str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    return d


def adapter(columns_group: int, declare: dict | None = None, r=2, seed=1) -> Adapter:
    """lora_A with in/columns_group columns (1: a plain LoRA), under a config with `declare` added.
    With no declaration the config is what the qa-lora repository writes: a plain LoRA config."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, out, n in WEIGHTS:
        module = P + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, n // columns_group, generator=g)
        tensors[f"{module}.lora_B.weight"] = torch.randn(out, r, generator=g)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "down_proj"],
           "qalora_group_size": 16, "use_qalora": False, **(declare or {})}  # PEFT writes these two always
    return Adapter(cfg, tensors)


MEAN = {"qalora_pooling": "mean"}
SHAPES = {name: (out, n) for name, out, n in WEIGHTS} | {"model.norm.weight": (64,)}


def code_of(exc_info) -> str:
    return exc_info.value.code


# --- undeclared QA-LoRA shapes are refused -------------------------------------------------------


def test_undeclared_qalora_shapes_name_both_readings():
    ad = adapter(16)  # a qa-lora-repository adapter: group 16, plain LoRA config
    with pytest.raises(AdapterError) as e:
        Q.dense_updates(ad, base_shapes=SHAPES)
    assert code_of(e) == "qalora_undeclared"
    msg = str(e.value)
    for text in ("lora_A of model.layers.0.mlp.down_proj has 8 columns", "a QA-LoRA with group size 16",
                 "over in_features 128", "not a LoRA (128 columns)", '"qalora_group_size": 16',
                 '"qalora_pooling": "mean"', '"use_qalora": true'):
        assert text in msg, (text, msg)
    for fn in (Q.to_dense_lora, Q.qalora_group_size, Q.check_base_shapes):
        with pytest.raises(AdapterError) as e:
            fn(ad, SHAPES)
        assert code_of(e) == "qalora_undeclared", fn.__name__


def test_quantize_base_refuses_an_undeclared_qalora_instead_of_broadcasting(base_dir):
    with pytest.raises(AdapterError) as e:
        Q.quantize_base(base_dir, 4, 16, adapter=adapter(16))
    assert code_of(e) == "qalora_undeclared"
    with pytest.raises(AdapterError) as e:
        Q.naive_merge_quantize(base_dir, adapter(16), 4, 16)
    assert code_of(e) == "qalora_undeclared"
    assert Q.weight_shapes(base_dir) == SHAPES


def test_quantized_model_merge_and_attach_refuse_undeclared_shapes():
    qm = Q.QuantizedModel.from_state_dict(base_state(), {}, Q.QuantSpec(4, 16))
    with pytest.raises(AdapterError) as e:
        qm.merge(adapter(16))
    assert code_of(e) == "qalora_undeclared"
    with pytest.raises(AdapterError) as e:
        Q.attach_qalora(tiny_model(), adapter(16))
    assert code_of(e) == "qalora_undeclared"


def test_from_state_dict_refuses_a_delta_of_another_shape():
    wrong = Q.dense_updates(adapter(16))  # no base given: the config says LoRA, the update is out x in/G
    with pytest.raises(IncompatibleAdapters) as e:
        Q.QuantizedModel.from_state_dict(base_state(), {}, Q.QuantSpec(4, 16), deltas=wrong)
    assert code_of(e) == "shape_mismatch" and "(64, 4)" in str(e.value) and "(64, 64)" in str(e.value)
    stray = {"model.layers.5.mlp.up_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(IncompatibleAdapters) as e:
        Q.QuantizedModel.from_state_dict(base_state(), {}, Q.QuantSpec(4, 16), deltas=stray)
    assert code_of(e) == "missing_module"


# --- wrong declarations -----------------------------------------------------------------------------


@pytest.mark.parametrize("group,declare,mentions", [
    (16, {"use_qalora": True, "qalora_group_size": 8},
     ["has 8 columns", "a QA-LoRA with group size 16", "declared qalora_group_size 8 (16 columns)",
      '"qalora_group_size": 16']),
    (16, {**MEAN, "qalora_group_size": 32},
     ["has 8 columns", "group size 16", "declared qalora_group_size 32 (4 columns)"]),
    (1, {"use_qalora": True, "qalora_group_size": 16},
     ["has 128 columns", "a LoRA over in_features 128", "declared qalora_group_size 16 (8 columns)",
      "remove"]),
], ids=["peft-flag-wrong-group", "mean-wrong-group", "lora-declared-as-qalora"])
def test_wrong_declarations_name_both_shapes(group, declare, mentions):
    ad = adapter(group, declare)
    qm = Q.QuantizedModel.from_state_dict(base_state(), {}, Q.QuantSpec(4, 16))
    for call in (lambda: Q.dense_updates(ad, base_shapes=SHAPES), lambda: qm.merge(ad)):
        with pytest.raises(AdapterError) as e:
            call()
        assert code_of(e) == "qalora_declaration_mismatch"
        for text in mentions:
            assert text in str(e.value), (text, str(e.value))


def test_shapes_that_fit_no_reading_are_a_shape_mismatch():
    ad = adapter(16, {**MEAN, "qalora_group_size": 16})
    ad.tensors[P + "model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 64)  # one module plain
    with pytest.raises(IncompatibleAdapters) as e:
        Q.dense_updates(ad, base_shapes=SHAPES)
    assert code_of(e) == "shape_mismatch" and "q_proj has 64 columns" in str(e.value)
    bad_b = adapter(1)
    bad_b.tensors[P + "model.layers.0.mlp.down_proj.lora_B.weight"] = torch.zeros(32, 2)
    with pytest.raises(IncompatibleAdapters) as e:
        Q.dense_updates(bad_b, base_shapes=SHAPES)
    assert code_of(e) == "shape_mismatch" and "32 rows" in str(e.value)
    with pytest.raises(IncompatibleAdapters) as e:
        Q.dense_updates(adapter(1), base_shapes={k: v for k, v in SHAPES.items() if "q_proj" not in k})
    assert code_of(e) == "missing_module"


# --- declared QA-LoRAs are read as declared ---------------------------------------------------------


def mean_pool(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, group)).mean(-1)


def test_declared_mean_pooling_is_the_qa_lora_repository_update():
    """qa-lora's layer: scale * B(A'(avg_pool(x))); declared with qalora_pooling "mean" it comes out
    exactly, with PEFT's use_qalora flag in/G times larger (the trap the declaration table names)."""
    g = 16
    ours = adapter(g, {**MEAN, "qalora_group_size": g})
    peft_flag = adapter(g, {"use_qalora": True, "qalora_group_size": g})
    assert Q.qalora_group_size(ours, SHAPES) == g
    dense = Q.dense_updates(ours, base_shapes=SHAPES)
    dense_peft = Q.dense_updates(peft_flag, base_shapes=SHAPES)
    x = torch.randn(3, 128)
    for name, out, n in WEIGHTS:
        module = P + name.removesuffix(".weight")
        a, b = ours.tensors[f"{module}.lora_A.weight"], ours.tensors[f"{module}.lora_B.weight"]
        want = ours.scaling(module) * (mean_pool(x[:, :n], g) @ a.T @ b.T)
        assert dense[name].shape == (out, n)
        assert torch.allclose(x[:, :n] @ dense[name].T, want, atol=1e-5)
        assert torch.allclose(dense_peft[name], dense[name] * (n // g), rtol=1e-5, atol=1e-6)
    plain = Q.to_dense_lora(ours, base_shapes=SHAPES)
    assert Q.qalora_group_size(plain, SHAPES) is None  # now a LoRA with in columns, checked as one
    assert Q.dense_updates(adapter(1), base_shapes=SHAPES)[WEIGHTS[1][0]].shape == (64, 128)


# --- every entry point takes an Adapter or a folder ---------------------------------------------------


def tiny_model() -> torch.nn.Module:
    """A module tree with the HF names of WEIGHTS (what attach_qalora walks)."""
    layer = torch.nn.ModuleDict({"self_attn": torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 64, bias=False)}),
                                 "mlp": torch.nn.ModuleDict({"down_proj": torch.nn.Linear(128, 64, bias=False)})})
    return torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"layers": torch.nn.ModuleList([layer])})})


def test_entry_points_take_a_peft_folder(tmp_path, base_dir):
    qa, lora = adapter(16, {**MEAN, "qalora_group_size": 16}), adapter(1)
    qa_dir, lora_dir = qa.save(tmp_path / "qa"), lora.save(tmp_path / "lora")
    for path in (qa_dir, str(qa_dir)):
        assert Q.qalora_group_size(path) == 16
        assert Q.qalora_group_size(path, SHAPES) == 16
        for name, d in Q.dense_updates(path, base_shapes=SHAPES).items():
            assert torch.equal(d, Q.dense_updates(qa)[name])
        assert Q.to_dense_lora(path).tensors.keys() == qa.tensors.keys()
        module = P + "model.layers.0.self_attn.q_proj"
        assert torch.equal(Q.qalora_group_update(path, module), Q.qalora_group_update(qa, module))
        assert Q.student_adapter(path, 16).config["r"] == 2
        qm = Q.QuantizedModel.from_state_dict(base_state(), {}, Q.QuantSpec(4, 16))
        assert qm.merge(path).weights.keys() == qm.weights.keys()
        assert set(Q.attach_qalora(tiny_model(), path)) == {P + n.removesuffix(".weight") for n, _, _ in WEIGHTS}
    converted, report = Q.to_qalora(str(lora_dir), 16)
    assert Q.qalora_group_size(converted) == 16 and report["rel_error"] > 0
    assert Q.quantize_base(base_dir, 4, 16, adapter=str(lora_dir)).weights.keys() == {n for n, _, _ in WEIGHTS}
    assert Q.naive_merge_quantize(base_dir, lora_dir, 4, 16).weights.keys() == {n for n, _, _ in WEIGHTS}


# --- docs/qalora.md: the in-memory example runs as written ------------------------------------------


def doc_example() -> str:
    text = (ROOT / "docs" / "qalora.md").read_text()
    m = re.search(r"<!-- example: from_state_dict[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/qalora.md has no from_state_dict example block"
    return m.group(1)


def test_the_from_state_dict_example_in_the_docs_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example(), "docs/qalora.md", "exec"), {"__name__": "docs_example"})  # noqa: S102
    summary = capsys.readouterr().out
    assert "'layers': 2" in summary
    assert (tmp_path / "quantized-demo" / Q.QUANT_FILE).is_file()
    assert json.loads((tmp_path / "quantized-demo" / "config.json").read_text()) == {}
