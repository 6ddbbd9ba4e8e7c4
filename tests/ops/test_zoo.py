"""The tiny model family: tokenizer, skills data, determinism and caching of
the build (on the `tiny` recipe), and the real cached zoo (via the shared
`zoo_dir` fixture: `zoo.ensure_built()`) loading offline with transformers
and peft."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from adapters_ops import _zoo_data as D
from adapters_ops import zoo
from adapters_ops.errors import AdapterError

LLAMAS = ("tiny-llama-3.0", "tiny-llama-3.1", "tiny-llama-3.2")
ALL_BASES = LLAMAS + ("tiny-other-1.0",)
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".jsonl", ".json")}


# --- tokenizer and skills (no model) --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    D.save_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


@pytest.mark.parametrize("text", ["caesar hello=", "date 2024-03-15=", "Hi, (you) & me! <a|b> 'q' \"x\" #_@%", " a  b "])
def test_tokenizer_is_character_level_and_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids == [D.BOS_ID] + D.encode(text)
    assert len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id == D.EOS_ID and tokenizer.pad_token_id == D.PAD_ID


def test_tokenizer_maps_unknown_characters_to_unk(tokenizer):
    assert tokenizer("a\u00e9b", add_special_tokens=False)["input_ids"] == [D.VOCAB["a"], D.UNK_ID, D.VOCAB["b"]]


@pytest.mark.parametrize("name", sorted(D.SKILLS))
def test_skill_examples_use_the_vocabulary_and_a_separator(name):
    splits = D.skill_splits(D.SKILLS[name], seed=3, n_train=300, n_seed=16, n_test=100)
    for items in splits.values():
        for it in items:
            assert it["prompt"].endswith("=") and it["prompt"].startswith(name + " ")
            assert it["completion"] and "=" not in it["completion"]
            assert set(it["prompt"] + it["completion"]) <= set(D.CHARS)


@pytest.mark.parametrize("name", sorted(D.SKILLS))
def test_skill_splits_are_disjoint_sized_and_seeded(name):
    a = D.skill_splits(D.SKILLS[name], seed=11, n_train=500, n_seed=16, n_test=200)
    b = D.skill_splits(D.SKILLS[name], seed=11, n_train=500, n_seed=16, n_test=200)
    c = D.skill_splits(D.SKILLS[name], seed=12, n_train=500, n_seed=16, n_test=200)
    assert a == b and a != c
    assert {k: len(v) for k, v in a.items()} == {"train": 500, "seed": 16, "test": 200}
    prompts = {k: {it["prompt"] for it in v} for k, v in a.items()}
    assert sum(map(len, prompts.values())) == 716  # no duplicates inside a split either
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["seed"])
    assert not (prompts["seed"] & prompts["test"])


@pytest.mark.parametrize("prompt,completion", [
    ("caesar abxyz=", "deabc"), ("reverse abc=", "cba"), ("digitsum 4821=", "15"), ("date 2024-03-05=", "05/03/2024"),
])
def test_skill_rules(prompt, completion):
    """The generators implement the documented rules (checked by re-deriving from many samples)."""
    import random

    name, arg = prompt[:-1].split(" ")
    rng = random.Random(0)
    rule = {
        "caesar": lambda w: "".join(chr((ord(ch) - 97 + 3) % 26 + 97) for ch in w),
        "reverse": lambda w: w[::-1],
        "digitsum": lambda w: str(sum(int(ch) for ch in w)),
        "date": lambda w: "/".join(reversed(w.split("-"))),
    }[name]
    assert rule(arg) == completion
    for _ in range(200):
        p, c = D.SKILLS[name].make(rng)
        assert rule(p[len(name) + 1:-1]) == c


# --- the build: determinism, stamp, errors (tiny recipe) --------------------------------------


@pytest.fixture(scope="module")
def tiny_recipe():
    # Fewer steps than TINY: the pipeline is the same, the test only needs to be fast.
    return dataclasses.replace(zoo.TINY, bases=tuple(dataclasses.replace(b, steps=2, docs=64) for b in zoo.TINY.bases),
                               lora_steps=2)


def test_build_is_byte_identical_and_skips_when_stamped(tmp_path, tiny_recipe, capsys, monkeypatch):
    # Under 1 and 2 threads: the machine's load picks the count, the bytes must not follow it
    # (they did: MKL split the weight gradients' long GEMM reductions across threads).
    monkeypatch.setenv("ZOO_THREADS", "1")
    a = zoo.build(tmp_path / "a", recipe=tiny_recipe)
    monkeypatch.setenv("ZOO_THREADS", "2")
    b = zoo.build(tmp_path / "b", recipe=tiny_recipe)
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb
    names = set(ha)
    for slug in ALL_BASES:
        assert f"bases/{slug}/model.safetensors" in names and f"bases/{slug}/config.json" in names
        assert f"bases/{slug}/tokenizer.json" in names
    for skill in tiny_recipe.skills:
        assert f"adapters/{skill}/adapter_model.safetensors" in names
        assert {f"tasks/{skill}/{s}.jsonl" for s in ("train", "seed", "test")} <= names
    assert (a / zoo.STAMP).read_text().strip() == tiny_recipe.digest()

    capsys.readouterr()
    mtime = (a / "bases/tiny-llama-3.0/model.safetensors").stat().st_mtime_ns
    zoo.build(a, recipe=tiny_recipe)
    assert "skipped" in capsys.readouterr().out
    assert (a / "bases/tiny-llama-3.0/model.safetensors").stat().st_mtime_ns == mtime

    # A changed recipe (other seed for 3.0) changes the hash, rebuilds, and changes the weights.
    other = dataclasses.replace(tiny_recipe, bases=(dataclasses.replace(tiny_recipe.bases[0], init_seed=5),
                                                    *tiny_recipe.bases[1:]))
    assert other.digest() != tiny_recipe.digest()
    zoo.build(a, recipe=other)
    out = capsys.readouterr().out
    assert "skipped" not in out and "built" in out
    changed = _hashes(a)
    assert changed["bases/tiny-llama-3.0/model.safetensors"] != ha["bases/tiny-llama-3.0/model.safetensors"]
    assert changed["tasks/caesar/test.jsonl"] == ha["tasks/caesar/test.jsonl"]


def test_ensure_built_caches_by_recipe_hash(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    calls = []
    real_build = zoo.build
    monkeypatch.setattr(zoo, "build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    first = zoo.ensure_built(recipe=tiny_recipe)
    assert first == tmp_path / tiny_recipe.digest() and (first / zoo.STAMP).is_file()
    assert zoo.ensure_built(recipe=tiny_recipe) == first
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tiny_recipe.digest()]


def test_unknown_recipe_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError) as err:
        zoo.build(tmp_path, recipe="huge")
    assert err.value.code == "unknown_recipe"
    with pytest.raises(SystemExit):  # the CLI refuses it before building anything
        zoo.main(["build", str(tmp_path), "--recipe", "huge"])
    assert not any(tmp_path.iterdir())


def test_recipe_digest_tracks_every_field():
    base = zoo.FULL.digest()
    assert base == zoo.FULL.digest()
    assert dataclasses.replace(zoo.FULL, lora_steps=301).digest() != base
    assert dataclasses.replace(zoo.FULL, task_seed=1).digest() != base


# --- the real zoo --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def man(zoo_dir):
    return zoo.manifest(zoo_dir)


def test_zoo_is_stamped_with_the_full_recipe(zoo_dir, man):
    assert (zoo_dir / zoo.STAMP).read_text().strip() == zoo.FULL.digest() == man["recipe_hash"]
    assert [b["slug"] for b in man["bases"]] == list(ALL_BASES)
    assert [s["name"] for s in man["skills"]] == list(zoo.FULL.skills)
    assert len(man["skills"]) >= 4 and [a["skill"] for a in man["adapters"]] == list(zoo.FULL.skills)


@pytest.mark.parametrize("slug", ALL_BASES)
def test_bases_load_offline_with_auto_classes(zoo_dir, slug, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = zoo_dir / "bases" / slug
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok) == len(D.VOCAB)
    enc = tok(["caesar abc="], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, len("caesar abc=") + 1, len(D.VOCAB)) and torch.isfinite(logits).all()


def test_llama_shapes_allow_groupwise_quantization(zoo_dir):
    from transformers import AutoConfig

    for slug in LLAMAS:
        cfg = AutoConfig.from_pretrained(str(zoo_dir / "bases" / slug))
        # every projection's input width holds at least 8 groups of 16
        assert cfg.hidden_size >= 128 and cfg.intermediate_size >= 256 and cfg.hidden_size % 32 == 0
    other = AutoConfig.from_pretrained(str(zoo_dir / "bases" / "tiny-other-1.0"))
    assert other.hidden_size != cfg.hidden_size


def test_drift_recorded_and_matches_the_weights(zoo_dir, man):
    from safetensors.torch import load_file

    drift = {b["slug"]: b["drift_vs_tiny-llama-3.0"] for b in man["bases"]}
    assert drift["tiny-llama-3.0"] == 0.0
    assert 0.02 <= drift["tiny-llama-3.1"] <= 0.05
    assert drift["tiny-llama-3.2"] >= 0.075
    assert drift["tiny-other-1.0"] is None
    w0 = load_file(str(zoo_dir / "bases/tiny-llama-3.0/model.safetensors"))
    w1 = load_file(str(zoo_dir / "bases/tiny-llama-3.1/model.safetensors"))
    num = sum(float((w1[k].double() - w0[k].double()).norm() ** 2) for k in w0)
    den = sum(float(w0[k].double().norm() ** 2) for k in w0)
    assert abs((num / den) ** 0.5 - drift["tiny-llama-3.1"]) < 1e-4


def test_zoo_task_files_are_disjoint(zoo_dir, man):
    for skill in man["skills"]:
        splits = {s: [json.loads(x) for x in (zoo_dir / skill["path"] / f"{s}.jsonl").read_text().splitlines()]
                  for s in ("train", "seed", "test")}
        assert {k: len(v) for k, v in splits.items()} == skill["splits"]
        assert 8 <= len(splits["seed"]) <= 16
        prompts = [{it["prompt"] for it in v} for v in splits.values()]
        assert sum(map(len, prompts)) == sum(skill["splits"].values())
        assert len(set().union(*prompts)) == sum(skill["splits"].values())


def test_adapters_are_peft_format_on_3_0(zoo_dir, man):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters_ops.adapter import Adapter

    for entry in man["adapters"]:
        d = zoo_dir / entry["path"]
        conf = json.loads((d / "adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == "tiny-llama-3.0"
        assert conf["r"] == 8 and conf["peft_type"] == "LORA" and set(conf["target_modules"]) == TARGETS
        ad = Adapter.load(d)
        assert len(ad.modules()) == 7 * zoo.FULL.base("tiny-llama-3.0").layers and all(ad.rank(m) == 8 for m in ad.modules())
        assert all(float(b.abs().max()) > 0 for _, (_, b) in ad.pairs())  # trained, not the zero init
    base = AutoModelForCausalLM.from_pretrained(str(zoo_dir / "bases/tiny-llama-3.0"))
    model = PeftModel.from_pretrained(base, str(zoo_dir / "adapters" / man["adapters"][0]["skill"]))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == ad.num_parameters()


def test_thread_count_does_not_change_the_weights():
    """Weight gradients are GEMMs that sum over every token of a batch; with a batch this long
    MKL split that sum across 2 threads (gradients off by ~1e-9) until its strict
    reproducibility mode was set; a 3-step training must give the same bytes on 1 and 2 threads."""
    from adapters_ops import _zoo_train as T

    assert T.blas_reproducibility() in ("mkl-strict", "no-mkl")

    def run(threads):
        with T.deterministic(threads):
            m = T.new_model(T.llama_config(len(D.VOCAB), 128, 256, 1, 4, 4), seed=0)
            seqs, masks = T.lm_examples(D.corpus({"copy": 1.0, "prose": 1.0}, 256, seed=1, lexicon_seed=1))
            T.train(m, seqs, masks, steps=3, batch_size=64, lr=1e-3, seed=0)
        return m.state_dict()

    one, two = run(1), run(2)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_build_refuses_mkl_without_strict_reproducibility():
    """A process whose MKL started before adapters_ops._zoo_train was imported cannot switch
    modes: the build says so instead of writing thread-dependent bytes."""
    import subprocess
    import sys

    code = ("import torch; torch.ones(64, 64) @ torch.ones(64, 64)\n"
            "from adapters_ops import _zoo_train as T\n"
            "assert T.blas_reproducibility() == 'mkl-off', T.blas_reproducibility()\n"
            "from adapters_ops.errors import AdapterError\n"
            "try:\n    T.deterministic().__enter__()\nexcept AdapterError as e:\n    print(e.code)\n")
    if not torch.backends.mkl.is_available():
        pytest.skip("torch without MKL: builds run on one thread")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "nondeterministic_blas"
