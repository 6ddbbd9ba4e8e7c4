"""evaluate(): exact match of greedy completions and teacher-forced completion
loss, on the cached zoo (`zoo_dir` fixture). Checked against the skill
adapters (the base fails, its LoRA succeeds), against a loss computed by hand,
against PEFT's own forward, and for batch-size invariance and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, IncompatibleAdapters
from adapters_ops.evaluate import (
    EvalResult,
    completion_loss,
    evaluate,
    evaluate_model,
    load_model,
    load_tokenizer,
    read_examples,
)

N = 48  # test examples per check: enough to separate 0 from >0.9, quick on one core


@pytest.fixture(scope="module")
def paths(zoo_dir):
    return {
        "v30": zoo_dir / "bases" / "tiny-llama-3.0",
        "other": zoo_dir / "bases" / "tiny-other-1.0",
        "adapters": zoo_dir / "adapters",
        "tasks": zoo_dir / "tasks",
    }


def _test(paths, skill, n=N):
    return read_examples(paths["tasks"] / skill / "test.jsonl")[:n]


@pytest.mark.parametrize("skill", ["caesar", "date"])
def test_lora_lifts_the_base_on_its_skill(paths, skill):
    base = evaluate(paths["v30"], _test(paths, skill))
    tuned = evaluate(paths["v30"], _test(paths, skill), adapter=paths["adapters"] / skill)
    assert isinstance(base, EvalResult) and base.n == tuned.n == N
    assert base.accuracy <= 0.05
    assert tuned.accuracy > 0.9
    assert tuned.loss < base.loss / 4


def test_evaluate_reads_jsonl_and_is_deterministic(paths, tmp_path):
    items = _test(paths, "reverse", 24)
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in items) + "\n")
    a = evaluate(paths["v30"], f, adapter=paths["adapters"] / "reverse", batch_size=8)
    b = evaluate(paths["v30"], items, adapter=Adapter.load(paths["adapters"] / "reverse"), batch_size=8)
    assert a == b and a.predictions == b.predictions and a.n == 24


def test_exact_match_counts_only_identical_completions(paths):
    """Feed the model's own greedy outputs back as references: all match; perturb half: half match."""
    model = load_model(paths["v30"], paths["adapters"] / "caesar")
    tok = load_tokenizer(paths["v30"])
    items = _test(paths, "caesar", 16)
    preds = evaluate_model(model, tok, items).predictions
    own = [{"prompt": x["prompt"], "completion": p} for x, p in zip(items, preds, strict=True)]
    assert evaluate_model(model, tok, own).accuracy == 1.0
    half = [dict(x, completion=x["completion"] + ("x" if i % 2 else "")) for i, x in enumerate(own)]
    assert evaluate_model(model, tok, half).accuracy == 0.5


def test_batch_size_does_not_change_the_predictions(paths):
    model = load_model(paths["v30"], paths["adapters"] / "digitsum")
    tok = load_tokenizer(paths["v30"])
    items = _test(paths, "digitsum", 20)
    one = evaluate_model(model, tok, items, batch_size=1)
    many = evaluate_model(model, tok, items, batch_size=7)
    assert one.predictions == many.predictions
    assert one.loss == pytest.approx(many.loss, rel=1e-5)


def test_completion_loss_matches_a_hand_computation(paths):
    model = load_model(paths["v30"], paths["adapters"] / "date")
    tok = load_tokenizer(paths["v30"])
    items = _test(paths, "date", 3)
    total, count = 0.0, 0
    with torch.no_grad():
        for x in items:
            p = tok(x["prompt"])["input_ids"]
            c = tok(x["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
            for j, t in enumerate(c):  # token p+j is predicted at position len(p)+j-1
                total -= float(logp[len(p) + j - 1, t])
                count += 1
    assert completion_loss(model, tok, items, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_merging_deltas_matches_peft_forward(paths):
    tok = load_tokenizer(paths["v30"])
    enc = tok([x["prompt"] for x in _test(paths, "reverse", 8)], return_tensors="pt", padding=True)
    merged = load_model(paths["v30"], paths["adapters"] / "reverse", method="merge")
    peft = load_model(paths["v30"], paths["adapters"] / "reverse", method="peft")
    plain = load_model(paths["v30"])
    with torch.no_grad():
        a, b, c = (m(**enc).logits for m in (merged, peft, plain))
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    assert (a - c).abs().max() > 0.1  # the adapter really changed the model


def test_adapter_on_an_unrelated_base_is_incompatible(paths):
    with pytest.raises(IncompatibleAdapters) as err:
        load_model(paths["other"], paths["adapters"] / "caesar")
    assert err.value.code == "shape_mismatch"


def test_non_lora_tensors_are_refused(paths):
    ad = Adapter.load(paths["adapters"] / "caesar")
    ad.tensors["base_model.model.lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(AdapterError) as err:
        load_model(paths["v30"], ad)
    assert err.value.code == "unsupported_tensor"


@pytest.mark.parametrize("content,code", [
    (None, "missing_examples"),
    ('{"prompt": "a="}\n', "invalid_examples"),
    ("not json\n", "invalid_examples"),
    ("\n", "invalid_examples"),
    ('{"prompt": 1, "completion": "x"}\n', "invalid_examples"),
])
def test_bad_example_files(tmp_path, content, code):
    f = tmp_path / "t.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(AdapterError) as err:
        read_examples(f)
    assert err.value.code == code


def test_bad_parameters(paths, tmp_path):
    with pytest.raises(AdapterError, match="method"):
        load_model(paths["v30"], method="bogus")
    with pytest.raises(AdapterError) as err:
        load_model(tmp_path)
    assert err.value.code == "missing_base"
    with pytest.raises(AdapterError, match="batch_size"):
        evaluate(paths["v30"], _test(paths, "caesar", 2), batch_size=0)
