"""Composition by distillation (adapters_ops.compose) on the cached zoo, with a
short schedule: the student must learn both skills that no weight-space merge
keeps (tests/ops/test_merge.py holds the merges' exactness)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters_ops import compose, merge
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, IncompatibleAdapters
from adapters_ops.evaluate import evaluate, read_examples

SKILLS = ("caesar", "date")
# Enough for both skills well above the base (0.00) and above the best weight-space merge of
# the pair on this zoo (cat: 0.00 / 0.00 on zoo adapters, docs/merge.md); the default is 1000 per skill.
# Measured here: 1.00 / 0.90 on the first 50 test examples.
FAST = compose.ComposeConfig(synthetic=256, steps=500, seed=0)


@pytest.fixture(scope="module")
def pair(zoo_dir):
    return {
        "base": zoo_dir / "bases" / "tiny-llama-3.0",
        "adapters": [Adapter.load(zoo_dir / "adapters" / s) for s in SKILLS],
        "seeds": [read_examples(zoo_dir / "tasks" / s / "seed.jsonl") for s in SKILLS],
        "test": [read_examples(zoo_dir / "tasks" / s / "test.jsonl")[:50] for s in SKILLS],
    }


@pytest.fixture(scope="module")
def composed(pair):
    seen = []
    student, report = compose.distill_merge(pair["base"], pair["adapters"], pair["seeds"], FAST,
                                            progress=lambda f, m: seen.append((f, m)), base_slug="tiny-llama-3.0")
    return student, report, seen


def test_student_keeps_both_skills_where_the_exact_sum_keeps_neither(pair, composed):
    student, _, _ = composed
    summed = merge.merge(pair["adapters"], [1.0, 1.0], "cat")
    for test in pair["test"]:
        got = evaluate(pair["base"], test, student).accuracy
        cat = evaluate(pair["base"], test, summed).accuracy
        assert got >= 0.5, (test[0]["prompt"], got)
        assert got > cat + 0.3


def test_student_shape_report_and_progress(pair, composed):
    student, report, seen = composed
    student.validate()
    assert student.config["base_model_name_or_path"] == "tiny-llama-3.0"
    assert student.config["r"] == sum(int(a.config["r"]) for a in pair["adapters"])  # the cat merge's rank
    assert set(student.target_modules) == set(pair["adapters"][0].target_modules)
    assert len(report["skills"]) == 2 and all(s["examples"] > 0 for s in report["skills"])
    assert report["distill"]["train_examples"] == 2 * max(s["examples"] for s in report["skills"])
    assert report["distill"]["best_seed_accuracy"] > 0.5
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(m.startswith("skill 2/2") for _, m in seen) and any(m.startswith("distill") for _, m in seen)


def test_deterministic_for_a_seed(pair):
    cfg = compose.ComposeConfig(synthetic=32, steps=20, seed=5)
    one, _ = compose.distill_merge(pair["base"], pair["adapters"], pair["seeds"], cfg)
    two, _ = compose.distill_merge(pair["base"], pair["adapters"], pair["seeds"], cfg)
    assert one.tensors.keys() == two.tensors.keys()
    assert all(torch.equal(t, two.tensors[k]) for k, t in one.tensors.items())
    # batch_size and lr reach the distillation: another lr, another student
    slow, _ = compose.distill_merge(pair["base"], pair["adapters"], pair["seeds"],
                                    dataclasses.replace(cfg, lr=1e-4, batch_size=8))
    assert not all(torch.equal(t, slow.tensors[k]) for k, t in one.tensors.items())


def _other_base(a: Adapter) -> Adapter:
    return Adapter(config=dict(a.config, base_model_name_or_path="elsewhere"), tensors=a.tensors)


@pytest.mark.parametrize("case,exc,code", [
    ("seed-count", AdapterError, "invalid_examples"),
    ("one-seed", AdapterError, "invalid_examples"),
    ("no-adapters", AdapterError, "invalid_weights"),
    ("other-base", IncompatibleAdapters, "different_bases"),
    ("steps", AdapterError, "invalid_parameter"),
    ("rank", AdapterError, "invalid_parameter"),
    ("lr", AdapterError, "invalid_parameter"),
    ("batch_size", AdapterError, "invalid_parameter"),
])
def test_errors(pair, case, exc, code):
    adapters, seeds, cfg = list(pair["adapters"]), list(pair["seeds"]), FAST
    if case == "seed-count":
        seeds = seeds[:1]
    elif case == "one-seed":
        seeds = [seeds[0], seeds[1][:1]]
    elif case == "no-adapters":
        adapters, seeds = [], []
    elif case == "other-base":
        adapters = [adapters[0], _other_base(adapters[1])]
    with pytest.raises(exc) as info:
        if case == "steps":
            cfg = compose.ComposeConfig(steps=0)
        elif case == "rank":
            cfg = compose.ComposeConfig(rank=True)
        elif case == "lr":
            cfg = compose.ComposeConfig(lr=0.0)
        elif case == "batch_size":
            cfg = compose.ComposeConfig(batch_size=0)
        compose.distill_merge(pair["base"], adapters, seeds, cfg)
    assert info.value.code == code and str(info.value)
