"""Trans-LoRA (adapters_ops.translora) on the cached zoo with a reduced config:
the stage checkpoints resume without recomputing and give the same result as
an uninterrupted run, runs are deterministic, the discriminator rejects fake
inputs more than real ones, distillation lowers the loss on its labels, keeps
the state its seed score selects and follows the teacher's distributions with
soft labels, and the building blocks (template, mutation generator, config
checks) behave."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_ops import translora as tl
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError
from adapters_ops.evaluate import (
    completion_loss,
    evaluate_model,
    greedy_completions,
    load_model,
    load_tokenizer,
    read_examples,
)

# Small enough for ~10 s a run on one busy core; the quality benchmark uses the defaults.
FAST = dict(n_synthetic=32, generator="mutation", disc_steps=10, steps=16, eval_every=8, batch_size=8, seed=3,
            threads=1)


@pytest.fixture(scope="module")
def zoo(zoo_dir):
    return {
        "src": zoo_dir / "bases" / "tiny-llama-3.0",
        "tgt": zoo_dir / "bases" / "tiny-llama-3.1",
        "other": zoo_dir / "bases" / "tiny-other-1.0",
        "adapter": Adapter.load(zoo_dir / "adapters" / "caesar"),
        "seeds": read_examples(zoo_dir / "tasks" / "caesar" / "seed.jsonl"),
        "test": read_examples(zoo_dir / "tasks" / "caesar" / "test.jsonl"),
    }


def _same_adapter(a: Adapter, b: Adapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# --- building blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, want", [
    (["caesar abc=", "caesar qwerty=", "caesar xy="], ("caesar ", "=")),
    (["date 1987-03-12=", "date 1950-11-02="], ("date ", "=")),  # not "date 19" nor "-12="
    (["abc", "abd"], ("", "")),  # no word boundary in common: everything is content
    (["x=1", "x=1"], ("x=", "")),  # the suffix never swallows the last variable character
])
def test_template_of(prompts, want):
    assert tl.template_of(prompts) == want


def test_mutation_keeps_template_classes_and_is_seeded():
    seeds = ["date 1987-03-12=", "date 1950-11-02=", "date 2031-07-25="]
    a = tl.mutation_prompts(seeds, 200, rate=0.5, indel=0, seed=1)
    assert a == tl.mutation_prompts(seeds, 200, rate=0.5, indel=0, seed=1)
    assert a != tl.mutation_prompts(seeds, 200, rate=0.5, indel=0, seed=2)
    for p in a:  # indel=0: the same shape as a seed, digits stay digits, dashes stay dashes
        assert p.startswith("date ") and p.endswith("=") and len(p) == len(seeds[0])
        assert [c.isdigit() for c in p[5:-1]] == [c.isdigit() for c in seeds[0][5:-1]]
    assert len(set(a) - set(seeds)) > 150  # new inputs, not seed copies
    longer = tl.mutation_prompts(seeds, 200, rate=0.0, indel=3, seed=1)
    assert {len(p) for p in longer} == set(range(len(seeds[0]) - 3, len(seeds[0]) + 4))
    # in_range: insertions and deletions stay within the seeds' lengths (here all 16 characters)
    assert {len(p) for p in tl.mutation_prompts(seeds, 200, rate=0.0, indel=3, seed=1, in_range=True)} == {16}
    mixed = ["digitsum 12=", "digitsum 3456=", "digitsum 789="]
    assert {len(p) for p in tl.mutation_prompts(mixed, 300, indel=2, seed=1, in_range=True)} == {12, 13, 14}


@pytest.mark.parametrize("seeds, closure, letters", [
    # 24 of 26 letters (no l, w): the class is more than half covered and completed
    (["caesar abcde=", "caesar fghij=", "caesar kmnop=", "caesar qrstu=", "caesar vxyza="], True, 26),
    (["caesar abcde=", "caesar fghij=", "caesar kmnop=", "caesar qrstu=", "caesar vxyza="], False, 24),
    (["caesar abcde=", "caesar abcdf="], True, 6),  # a few letters: left as they are
])
def test_mutation_class_closure(seeds, closure, letters):
    out = tl.mutation_prompts(seeds, 2000, rate=1.0, indel=0, seed=0, closure=closure)
    assert len({c for p in out for c in p[len("caesar "):-1]}) == letters


@pytest.mark.parametrize("kwargs", [
    dict(generator="gpt"), dict(n_synthetic=0), dict(steps=-1), dict(top_p=0.0), dict(temperature=0),
    dict(lr=float("nan")), dict(disc_quantile=1.5), dict(rank=0), dict(min_chars=9, max_chars=3),
    dict(target_modules=()), dict(shots=True), dict(discriminator="svm"), dict(disc_slack=-1),
    dict(filter="yes"), dict(disc_quantile=0.6), dict(soft_labels=1.5), dict(soft_labels=-0.1),
    dict(soft_temperature=0), dict(soft_labels="on"), dict(select="f1"),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(AdapterError) as exc:
        tl.TransLoraConfig(**kwargs)
    assert exc.value.code == "invalid_parameter"


def test_config_from_json_parameters_round_trips():
    cfg = tl.TransLoraConfig(**{"steps": 40, "target_modules": ["q_proj", "v_proj"], "discriminator": "lora"})
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert tl.TransLoraConfig(**json.loads(json.dumps(cfg.as_dict()))) == cfg


def test_generate_sanitises_and_records_the_generator(zoo):
    cfg = tl.TransLoraConfig(**{**FAST, "generator": "auto", "auto_min_yield": 1.0})
    rows, info = tl.generate_candidates(zoo["src"], zoo["tgt"], zoo["seeds"], cfg, seed=5)
    seeds = {s["prompt"] for s in zoo["seeds"]}
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == info["generated"] == cfg.n_synthetic  # topped up by mutation to the request
    assert len(set(prompts)) == len(prompts) and not seeds & set(prompts)
    lo, hi = info["length_limits"]
    assert all(p.startswith("caesar ") and p.endswith("=") and lo <= len(p) <= hi for p in prompts)
    assert {r["generator"] for r in rows} <= {"target", "mutation"}
    assert sum(info["by_generator"].values()) == len(rows)
    assert 0.0 <= info["target_yield"] <= 1.0


# --- (b) discriminator ---------------------------------------------------------------------


@pytest.mark.parametrize("discriminator", ["likelihood"])
def test_discriminator_rejects_random_strings_more_than_real_inputs(zoo, discriminator):
    """filter_candidates as run() calls it, on candidates that are half random strings and half
    real task inputs the discriminator never saw (the test split). The paper's LoRA classifier
    ("lora") is not in the table: trained from 8 seeds it keeps random strings (docs/translora.md)."""
    import random

    cfg = tl.TransLoraConfig(**{**FAST, "discriminator": discriminator})
    rng = random.Random(9)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 =#?"
    junk = ["".join(rng.choice(chars) for _ in range(rng.randint(6, 16))) for _ in range(32)]
    real = [t["prompt"] for t in zoo["test"][:32]]
    rows = [{"prompt": p, "generator": "junk"} for p in junk] + [{"prompt": p, "generator": "real"} for p in real]
    kept, info = tl.filter_candidates(zoo["src"], zoo["tgt"], zoo["seeds"], rows, cfg, seed=0)
    by = info["kept_by_generator"]
    junk_kept, real_kept = by.get("junk", 0) / 32, by.get("real", 0) / 32
    assert junk_kept <= 0.25 and real_kept >= 0.6 and real_kept - junk_kept >= 0.4
    assert info["filter_rate"] == pytest.approx(1 - len(kept) / len(rows), abs=1e-4) and not info["fallback_top_k"]
    score = {r["prompt"]: r["disc_score"] for r in kept}
    lo, hi = info["threshold"] if discriminator == "likelihood" else (info["threshold"], float("inf"))
    assert all(lo <= score[p] <= hi for p in score)
    assert set(score) <= set(junk) | set(real)


def test_shape_check_follows_the_seeds_template_length_and_classes():
    ok = tl._shape_check(["digitsum 12=", "digitsum 3456=", "digitsum 789="])
    assert [ok(p) for p in ("digitsum 00=", "digitsum 9999=", "digitsum 1=", "digitsum 12345=", "digitsum 1a=",
                            "digitsum 12", "reverse 12=", "digitsum 1-2=")] == [True, True, False, False, False,
                                                                               False, False, False]


# --- (c) labels ------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [0.0, 0.25])
def test_labels_carry_the_teacher_loss_and_label_drop_removes_the_least_confident(zoo, drop):
    rows = [{"prompt": t["prompt"], "generator": "real"} for t in zoo["test"][:24]]
    cfg = tl.TransLoraConfig(**{**FAST, "label_drop": drop})
    out, info = tl.label(zoo["src"], zoo["adapter"], zoo["seeds"], rows, cfg)
    assert info["labelled"] == len(out) == 24 - round(24 * drop)
    want = {t["prompt"]: t["completion"] for t in zoo["test"]}
    assert all(r["completion"] == want[r["prompt"]] for r in out)  # caesar's teacher is right on real inputs
    if drop:
        everything, _ = tl.label(zoo["src"], zoo["adapter"], zoo["seeds"], rows, tl.TransLoraConfig(**FAST))
        dropped = [r for r in everything if r["prompt"] not in {o["prompt"] for o in out}]
        assert min(r["teacher_loss"] for r in dropped) >= max(r["teacher_loss"] for r in out) == info[
            "max_teacher_loss"]


# --- (d) distillation ------------------------------------------------------------------------


def test_distillation_lowers_the_loss_on_its_labels(zoo):
    cfg = tl.TransLoraConfig(**{**FAST, "steps": 30, "eval_every": 10, "patience": 10, "select": "loss"})
    seeds = zoo["seeds"]
    data = [dict(t) for t in zoo["test"][:64]]  # stand-in labels; the loss is measured on these
    out, info = tl.distill(zoo["other"], zoo["adapter"], data, seeds, cfg, seed=0, target_slug="tiny-other-1.0")
    tok = load_tokenizer(zoo["other"])
    before = completion_loss(load_model(zoo["other"]), tok, data)
    after = completion_loss(load_model(zoo["other"], out), tok, data)
    assert after < 0.85 * before
    assert info["train_loss_last"] < info["train_loss_first"]
    # A fresh LoRA of the source's rank on the narrower tiny-other width, named for its new base.
    assert out.config["base_model_name_or_path"] == "tiny-other-1.0" and out.config["r"] == 8
    assert {a.shape[1] for _, (a, _b) in out.pairs() if "q_proj" in _} == {96}
    assert info["best_seed_loss"] == min(v for _, v in info["seed_loss_history"])


def test_select_accuracy_keeps_the_latest_state_with_the_best_seed_exact_match(zoo):
    cfg = tl.TransLoraConfig(**{**FAST, "steps": 40, "eval_every": 10, "patience": 10, "batch_size": 16,
                                "lr": 1e-2, "select": "accuracy"})
    data = [dict(t) for t in zoo["test"][:64]]
    out, info = tl.distill(zoo["tgt"], zoo["adapter"], data, zoo["seeds"], cfg, seed=0)
    accs = info["seed_accuracy_history"]
    assert [s for s, _ in accs] == [s for s, _ in info["seed_loss_history"]] == [0, 10, 20, 30, 40]
    best = max(a for _, a in accs)
    assert info["best_seed_accuracy"] == best and info["select"] == "accuracy"
    assert info["best_step"] == max(s for s, a in accs if a == best)  # ties go to the later state
    got = evaluate_model(load_model(zoo["tgt"], out), load_tokenizer(zoo["tgt"]), zoo["seeds"])
    assert got.accuracy == best  # the kept state is the one that scored it
    assert got.loss == pytest.approx(dict(info["seed_loss_history"])[info["best_step"]], abs=1e-4)


def test_soft_label_loss_is_a_kl_on_completion_tokens_only():
    torch.manual_seed(0)
    teacher = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), -100)
    labels[:, 3:] = 4  # completion tokens at positions 3..5, predicted from positions 2..4
    assert tl._soft_label_loss(teacher.clone(), teacher, labels, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 6, 11)
    loss = tl._soft_label_loss(student, teacher, labels, 1.0)
    p = torch.softmax(teacher[:, 2:5], -1)
    want = (p * (p.log() - torch.log_softmax(student[:, 2:5], -1))).sum(-1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and loss.item() > 0
    context_changed = student.clone()
    context_changed[:, :2] += 5.0  # positions that predict prompt tokens do not count
    context_changed[:, 5] += 5.0  # nor the one after the last label
    assert tl._soft_label_loss(context_changed, teacher, labels, 1.0).item() == pytest.approx(loss.item())
    # softened by T and scaled by T^2
    hot = tl._soft_label_loss(student, teacher, labels, 2.0)
    pt = torch.softmax(teacher[:, 2:5] / 2, -1)
    want2 = (pt * (pt.log() - torch.log_softmax(student[:, 2:5] / 2, -1))).sum(-1).mean() * 4
    assert hot.item() == pytest.approx(want2.item(), rel=1e-5)


def test_soft_labels_follow_the_teacher_not_the_text(zoo):
    """With soft_labels=1 the student learns the teacher's distributions, so labels that are
    all wrong text ("zzzzz") still pull its first answer letter towards the teacher's; with
    text labels only it learns "z"."""
    seeds = zoo["seeds"]
    prompts = [t["prompt"] for t in zoo["test"][:48]]
    data = [{"prompt": p, "completion": "zzzzz"} for p in prompts]
    tok = load_tokenizer(zoo["other"])
    enc = tok(prompts[:16], return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1  # the position that predicts the first answer token

    def first_token_logprobs(model):
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        return torch.log_softmax(logits[torch.arange(16), last], -1)

    teacher = first_token_logprobs(load_model(zoo["src"], zoo["adapter"]))
    kl, z_first = {}, {}
    for soft in (0.0, 1.0):
        out, info = tl.distill(zoo["other"], zoo["adapter"], data, seeds, tl.TransLoraConfig(**{
            **FAST, "steps": 100, "eval_every": 100, "batch_size": 16, "lr": 1e-2, "soft_labels": soft}), seed=0,
            source_base_dir=zoo["src"])
        assert info["soft_labels"] == ("on" if soft else "off")
        student = first_token_logprobs(load_model(zoo["other"], out))
        kl[soft] = float((teacher.exp() * (teacher - student)).sum(-1).mean())
        z_first[soft] = sum(a == "z" for a in greedy_completions(load_model(zoo["other"], out), tok, prompts[:16], 1))
    assert z_first[0.0] >= 12 and z_first[1.0] <= 2
    assert kl[1.0] < 0.5 * kl[0.0]
    with pytest.raises(AdapterError) as exc:  # soft labels without the teacher's base
        tl.distill(zoo["other"], zoo["adapter"], data, seeds, tl.TransLoraConfig(**{**FAST, "soft_labels": 0.5}),
                   seed=0)
    assert exc.value.code == "invalid_parameter"


def test_soft_labels_need_the_same_vocabulary(zoo):
    a, b = load_tokenizer(zoo["src"]), load_tokenizer(zoo["other"])
    assert tl._same_vocabulary(a, b)  # the tiny families share one character vocabulary
    b.add_tokens(["<extra>"])
    assert not tl._same_vocabulary(a, b)


def test_distill_without_data_is_an_adapter_error(zoo):
    with pytest.raises(AdapterError) as exc:
        tl.distill(zoo["tgt"], zoo["adapter"], [], zoo["seeds"], tl.TransLoraConfig(**FAST), seed=0)
    assert exc.value.code == "no_synthetic_data"


# --- the whole run: checkpoints, resume, determinism ------------------------------------------------


class Stop(Exception):
    pass


def test_resume_after_label_skips_finished_stages_and_equals_an_uninterrupted_run(zoo, monkeypatch, tmp_path):
    cfg = tl.TransLoraConfig(**FAST)
    args = (zoo["src"], zoo["adapter"], zoo["tgt"], zoo["seeds"], cfg)
    calls = {name: 0 for name in ("generate_candidates", "filter_candidates", "label", "distill")}
    for name in calls:
        real = getattr(tl, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(tl, name, counted)

    seen = []

    def stop_after_label(fraction, message):
        seen.append((fraction, message))
        if message == "label: done":
            raise Stop

    store = tl.DirCheckpoint(tmp_path / "ckpt")
    with pytest.raises(Stop):
        tl.run(*args, progress=stop_after_label, checkpoint=store)
    assert calls == {"generate_candidates": 1, "filter_candidates": 1, "label": 1, "distill": 0}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["filter.ckpt", "generate.ckpt", "label.ckpt"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)

    resumed, rep = tl.run(*args, checkpoint=store)
    assert calls == {"generate_candidates": 1, "filter_candidates": 1, "label": 1, "distill": 1}
    assert rep["resumed"] == ["generate", "filter", "label"] and rep["stale"] == []

    plain, ref = tl.run(*args)  # uninterrupted, no store
    assert _same_adapter(resumed, plain) and resumed.config == plain.config
    for key in ("counts", "generate", "filter", "label", "distill", "seed_metrics"):
        assert rep[key] == ref[key], key

    again, rep2 = tl.run(*args, checkpoint=store)  # everything from the store now
    assert rep2["resumed"] == list(tl.STAGES) and _same_adapter(again, plain)
    assert calls["distill"] == 2

    c = ref["counts"]
    assert c["requested"] == 32 and c["labelled"] <= c["kept"] <= c["generated"] <= 32
    assert ref["filter_rate"] == pytest.approx(1 - c["kept"] / c["generated"], abs=1e-4)
    assert ref["generate"]["by_generator"] == {"mutation": c["generated"]}
    m = ref["seed_metrics"]
    assert set(m) == {"target_base", "result", "source"} and m["source"]["n"] == len(zoo["seeds"])
    # the diff-transfer gate's names, as the worker reads them; the whole report is JSON
    assert ref["metrics"] == {"source_with_adapter": m["source"]["accuracy"], "target_base": m["target_base"][
        "accuracy"], "target_with_transferred": m["result"]["accuracy"]}
    assert ref["verified"] == (m["result"]["accuracy"] > m["target_base"]["accuracy"])
    assert json.loads(json.dumps(ref, allow_nan=False)) == json.loads(json.dumps(ref))
    assert m["result"]["loss"] < m["target_base"]["loss"]  # a cut-down run already learns something
    assert plain.config["base_model_name_or_path"] == "tiny-llama-3.1"


def test_a_store_written_for_other_inputs_is_recomputed(zoo):
    """The fingerprint covers config, seeds, adapter and bases; a foreign or broken payload is not trusted."""
    cfg = tl.TransLoraConfig(**FAST)
    args = (zoo["seeds"], zoo["adapter"], zoo["src"], zoo["tgt"])
    fp = tl._fingerprint(cfg, *args)
    assert fp == tl._fingerprint(tl.TransLoraConfig(**FAST), *args)
    other_adapter = Adapter(zoo["adapter"].config, {k: v.clone() for k, v in zoo["adapter"].tensors.items()})
    next(iter(other_adapter.tensors.values())).view(-1)[0] += 1
    for changed in (
        tl._fingerprint(tl.TransLoraConfig(**{**FAST, "seed": 4}), *args),
        tl._fingerprint(cfg, zoo["seeds"][1:], *args[1:]),
        tl._fingerprint(cfg, zoo["seeds"], other_adapter, *args[2:]),
        tl._fingerprint(cfg, *args[:3], zoo["other"]),
    ):
        assert changed != fp

    foreign = tl.MemoryCheckpoint()
    for stage in tl.STAGES[:3]:
        foreign.save(stage, tl._jsonl_bytes("not-this-run", {}, [{"prompt": "caesar zzz=", "generator": "x",
                                                                      "completion": "ccc"}]))
    foreign.save("distill", b"\x00garbage")
    seen = []

    class Abort(Exception):
        pass

    def stop(fraction, message):
        seen.append(message)
        if message == "generate: started":  # it recomputes from the first stage: enough to know
            raise Abort

    with pytest.raises(Abort):
        tl.run(*args[2:3], zoo["adapter"], zoo["tgt"], zoo["seeds"], cfg, progress=stop, checkpoint=foreign)
    assert seen == ["generate: started"]


@pytest.mark.parametrize("bad, code", [
    (dict(seeds=[{"prompt": "caesar abc=", "completion": "def"}]), "invalid_examples"),
    (dict(target="nowhere"), "missing_base"),
])
def test_bad_inputs_are_adapter_errors(zoo, tmp_path, bad, code):
    target = tmp_path / "nowhere" if "target" in bad else zoo["tgt"]
    with pytest.raises(AdapterError) as exc:
        tl.run(zoo["src"], zoo["adapter"], target, bad.get("seeds", zoo["seeds"]), tl.TransLoraConfig(**FAST))
    assert exc.value.code == code
