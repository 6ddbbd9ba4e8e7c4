"""adapters_ops.verdict: the policy as a table of accuracies, the deterministic
seed split, the combined merge verdict, and `assess` on a real tiny model."""

import pytest

from adapters_ops import verdict

P, D = verdict.PASS_RATIO, verdict.DEGRADED_RATIO

# (before, after, bare base) -> status
CASES = [
    (1.0, 1.0, 0.0, "passed"),
    (1.0, P, 0.0, "passed"),  # the pass tolerance is inclusive
    (1.0, 0.875, 0.0, "degraded"),
    (0.8, 0.4, 0.0, "degraded"),  # ratio exactly DEGRADED_RATIO
    (1.0, 0.6, 0.6, "failed"),  # kept 60 % but no better than the bare base
    (1.0, 0.25, 0.0, "failed"),
    (1.0, 0.0, 0.0, "failed"),
    (0.5, 0.75, 0.0, "passed"),  # better than the source is fine
    (0.0, 1.0, 0.0, "unverified"),  # the source itself scores nothing: no ratio
    (0.25, 0.25, 0.25, "unverified"),  # the source does not beat the bare base
    (1.0, 0.5, None, "degraded"),  # no bare-base score: judged on the ratio alone
]


@pytest.mark.parametrize("before,after,base,status", CASES)
def test_judge(before, after, base, status):
    v = verdict.judge(before, after, base)
    assert v["status"] == status, v
    assert v["before"] == before and v["after"] == after
    assert v["tolerances"] == {"pass_ratio": P, "degraded_ratio": D}
    if status == "unverified":
        assert v["ratio"] is None and "nothing to keep" in v["reason"]
    else:
        assert v["ratio"] == pytest.approx(after / before, abs=1e-4)


def _seeds(n):
    return [{"prompt": f"p{i}=", "completion": f"c{i}"} for i in range(n)]


def test_split_is_disjoint_deterministic_and_order_free():
    seeds = _seeds(16)
    a = verdict.plan_examples(seeds, selects=True)
    assert a.used == "held_out_seeds" and len(a.verdict) == 8 and len(a.choose) == 8
    assert not {s["prompt"] for s in a.verdict} & {s["prompt"] for s in a.choose}
    assert [seeds[i] for i in a.indices] == a.verdict
    # the same examples, shuffled: the same held-out set (chosen by content, not position)
    b = verdict.plan_examples(list(reversed(seeds)), selects=True)
    assert sorted(s["prompt"] for s in b.verdict) == sorted(s["prompt"] for s in a.verdict)
    # an op that chooses nothing on the seeds is judged on all of them
    c = verdict.plan_examples(seeds, selects=False)
    assert c.used == "all_seeds" and c.verdict == seeds == c.choose


def test_too_few_seeds_are_judged_on_synthetic_inputs_and_no_seeds_is_unverified():
    few = verdict.plan_examples(_seeds(2 * verdict.MIN_HELD_OUT - 1), selects=True)
    assert few.verdict == [] and len(few.choose) == 2 * verdict.MIN_HELD_OUT - 1
    made = [{"prompt": f"s{i}=", "completion": f"t{i}"} for i in range(5)]
    calls = []

    def synthesize(base_dir, adapter, seeds):
        calls.append((base_dir, adapter, seeds))
        return made

    def fake(base_dir, examples, adapter):
        assert examples == made  # only the synthetic inputs are scored
        return {"src": 1.0, "out": 0.6, None: 0.0}[adapter]

    v = verdict.assess(few, source=("b", "src"), derived=("b", "out"), bare=("b", None), evaluate_fn=fake,
                       synthesize=synthesize)
    assert calls == [("b", "src", few.choose)]  # written from the seeds, labelled by the source
    assert v["status"] == "degraded" and v["examples"]["source"] == "synthetic_labelled_by_source"
    assert v["examples"]["n"] == 5 and v["examples"]["of"] == 7

    def boom(*a):
        raise AssertionError("nothing may be scored")

    v = verdict.assess(few, source=("b", "src"), derived=("b", "out"), evaluate_fn=boom,
                       synthesize=lambda *a: [])
    assert v["status"] == "unverified" and "no synthetic input" in v["reason"] and v["examples"]["n"] == 0
    v = verdict.assess(verdict.plan_examples(None, selects=True), source=("b", None), derived=("b", None),
                       evaluate_fn=boom)
    assert v["status"] == "unverified" and "no seed examples" in v["reason"]


def test_assess_scores_only_the_held_out_examples():
    seeds = _seeds(10)
    plan = verdict.plan_examples(seeds, selects=True)
    seen = []

    def fake(base_dir, examples, adapter):
        seen.append([e["prompt"] for e in examples])
        return {"src": 1.0, "out": 0.4, None: 0.0}[adapter]

    v = verdict.assess(plan, source=("b", "src"), derived=("b", "out"), bare=("b", None), evaluate_fn=fake)
    assert v["status"] == "failed" and v["ratio"] == 0.4
    assert v["examples"] == {"source": "held_out_seeds", "n": 5, "of": 10, "indices": plan.indices}
    held = {s["prompt"] for s in plan.verdict}
    assert all(set(s) == held for s in seen) and len(seen) == 3


def test_combine_takes_the_worst_skill():
    ok, bad = verdict.judge(1.0, 1.0, 0.0), verdict.judge(1.0, 0.2, 0.0)
    v = verdict.combine({"a/x": ok, "a/y": bad})
    assert v["status"] == "failed" and "a/y" in v["reason"] and v["skills"]["a/x"]["status"] == "passed"
    assert v["before"] == 1.0 and v["after"] == 0.6 and v["ratio"] == 0.6
    # an unverified skill keeps the whole from "passed"
    assert verdict.combine({"a/x": ok, "a/z": verdict.unverified("no seeds")})["status"] == "unverified"
    assert verdict.combine({})["status"] == "unverified"


def test_summary_line():
    line = verdict.summary(verdict.judge(1.0, 0.0, 0.0, examples={"source": "held_out_seeds", "n": 8}))
    assert line == "failed (accuracy 1.00 -> 0.00, 0% on 8 held-out seeds)"
    assert verdict.summary(verdict.unverified("the adapter has no seed examples")).startswith("unverified (the")


def test_assess_on_the_tiny_zoo(zoo_dir):
    """Real scoring: the caesar expert against itself passes, against the bare base fails."""
    from adapters_ops.evaluate import read_examples

    base, expert = zoo_dir / "bases" / "tiny-llama-3.0", zoo_dir / "adapters" / "caesar"
    seeds = read_examples(zoo_dir / "tasks" / "caesar" / "seed.jsonl")
    plan = verdict.plan_examples(seeds, selects=True)
    same = verdict.assess(plan, source=(base, expert), derived=(base, expert), bare=(base, None))
    assert same["status"] == "passed" and same["ratio"] == 1.0 and same["before"] > same["base"]
    gone = verdict.assess(plan, source=(base, expert), derived=(base, None), bare=(base, None))
    assert gone["status"] == "failed" and gone["after"] == gone["base"]
    # four seeds: too few to hold out, judged on synthetic inputs the source answered (none a seed)
    few = verdict.plan_examples(seeds[:4], selects=True)
    v = verdict.assess(few, source=(base, expert), derived=(base, expert), bare=(base, None))
    assert v["examples"]["source"] == "synthetic_labelled_by_source" and v["examples"]["n"] >= verdict.MIN_HELD_OUT
    assert v["status"] == "passed" and v["before"] == 1.0
    rows = verdict.synthetic_examples(base, expert, seeds[:4])
    assert not {r["prompt"] for r in rows} & {s["prompt"] for s in seeds[:4]}
