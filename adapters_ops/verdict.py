"""A quality verdict for a derived adapter (compressed, merged, transferred,
quantized): does it still do what its source did, on examples that did not
choose or train it?

    from adapters_ops import verdict
    split = verdict.plan_examples(seeds, selects=True)   # op chooses on split.choose
    v = verdict.assess(split, source=(base, lora), derived=(base, compressed), bare=(base, None))
    v["status"]  # "passed" | "degraded" | "failed" | "unverified"

Policy (the tolerances are module constants, documented in docs/jobs.md):

- `before`: exact-match accuracy of the source adapter on its own base,
  `after`: of the derived one (on its base), `base`: of the bare base the
  derived result runs on, all on the same verdict examples; `ratio = after / before`.
- passed:    ratio >= PASS_RATIO;
- degraded:  ratio >= DEGRADED_RATIO and the result still beats the bare base;
- failed:    otherwise;
- unverified: no seeds, no fair examples at all, or a source that does not
  beat the bare base on them (nothing to keep).

Examples: an op that chooses or trains on seeds (compress's scale search,
merge's weight search and distillation, Trans-LoRA, QA-LoRA recovery) gets
`choose` and the verdict scores the disjoint `held_out` part; the split is
deterministic (by a hash of each example), so a rerun uses the same halves.
An op that chooses nothing on the seeds is judged on all of them. With too few
seeds to hold any out (fewer than 2 x MIN_HELD_OUT), the verdict scores
`SYNTHETIC_N` synthetic task inputs written from the seeds and labelled by the
source adapter (Trans-LoRA's generate/filter/label stages, with a seed of its
own, `SYNTHETIC_SEED`, and no prompt that is a seed's): `before` is then the
source on its own answers (1.0 up to decoding), and `after` how many of them the
result reproduces.

Pure logic on scores, plus `assess`, which scores through adapters_ops.evaluate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

PASS_RATIO = 0.9  # keeps at least 90 % of the source's accuracy
DEGRADED_RATIO = 0.5  # keeps at least half, and still beats the bare base
HOLD_OUT_FRACTION = 0.5  # share of the seeds kept away from an op that chooses on them
MIN_HELD_OUT = 4  # fewer seeds than 2 x this: no held-out half for choosing ops (synthetic inputs instead)
SYNTHETIC_N = 32  # synthetic inputs for a verdict with too few seeds
SYNTHETIC_SEED = 7919  # not the ops' own generation seed (0 by default), so not their training inputs

# `auto` candidates, cheapest first (docs/jobs.md): compress density (file size grows with it)
# and quantize bits
AUTO_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
AUTO_BITS = (2, 3, 4, 8)
# merge method auto: data-free methods (with the hub's default densities) tried on the seeds;
# the best worst-skill ratio wins if it passes, else the op distils
AUTO_MERGE_METHODS = (("linear", None), ("ties", 0.5), ("dare_ties", 0.7), ("magnitude_prune", 0.5), ("svd", None))

STATUSES = ("passed", "degraded", "failed", "unverified")
# worst first: a combined verdict takes the worst part (an unverified part keeps it from "passed")
_SEVERITY = {"failed": 0, "degraded": 1, "unverified": 2, "passed": 3}


def tolerances() -> dict:
    return {"pass_ratio": PASS_RATIO, "degraded_ratio": DEGRADED_RATIO}


@dataclass(frozen=True)
class ExamplePlan:
    """What an op may choose or train on, and what its verdict is scored on."""

    choose: list[dict]  # the op's seeds (all of them when it chooses nothing)
    verdict: list[dict]  # the verdict's examples ([] = none that are fair)
    used: str  # "held_out_seeds" | "all_seeds" | "none"
    total: int
    indices: list[int] = field(default_factory=list)  # positions of `verdict` in the seed file


def _key(example: dict) -> str:
    text = json.dumps([example.get("prompt"), example.get("completion")], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan_examples(seeds: Sequence[dict] | None, *, selects: bool) -> ExamplePlan:
    """Split the seeds for an op: held out when it `selects` on them, all otherwise."""
    seeds = list(seeds or [])
    n = len(seeds)
    if not selects:
        return ExamplePlan(choose=seeds, verdict=seeds, used="all_seeds" if seeds else "none", total=n,
                           indices=list(range(n)))
    if n < 2 * MIN_HELD_OUT:
        return ExamplePlan(choose=seeds, verdict=[], used="none", total=n)
    k = max(MIN_HELD_OUT, round(n * HOLD_OUT_FRACTION))
    order = sorted(range(n), key=lambda i: (_key(seeds[i]), i))
    held = sorted(order[:k])
    kept = set(held)
    return ExamplePlan(choose=[s for i, s in enumerate(seeds) if i not in kept], verdict=[seeds[i] for i in held],
                       used="held_out_seeds", total=n, indices=held)


def describe(plan: ExamplePlan) -> dict:
    """The verdict's `examples` field: which examples it was scored on."""
    return {"source": plan.used, "n": len(plan.verdict), "of": plan.total, "indices": plan.indices}


def unverified(reason: str, examples: dict | None = None) -> dict:
    out = {"status": "unverified", "reason": reason, "tolerances": tolerances()}
    if examples is not None:
        out["examples"] = examples
    return out


def judge(before: float, after: float, base: float | None = None, *, examples: dict | None = None) -> dict:
    """The verdict from three accuracies on the same examples (see the module docstring)."""
    before, after = float(before), float(after)
    out = {"before": round(before, 4), "after": round(after, 4), "tolerances": tolerances()}
    if base is not None:
        out["base"] = round(float(base), 4)
    if examples is not None:
        out["examples"] = examples
    if before <= 0 or (base is not None and before <= base):
        floor = "0" if before <= 0 else f"the bare base's {base:.2f}"
        return {**out, "status": "unverified", "ratio": None,
                "reason": f"the source scores {before:.2f} on these examples, not above {floor}: nothing to keep"}
    ratio = after / before
    out["ratio"] = round(ratio, 4)
    beats_base = base is None or after > base
    if ratio >= PASS_RATIO:
        status, reason = "passed", f"keeps {ratio:.0%} of the source's accuracy (>= {PASS_RATIO:.0%})"
    elif ratio >= DEGRADED_RATIO and beats_base:
        status, reason = "degraded", f"keeps {ratio:.0%} of the source's accuracy (< {PASS_RATIO:.0%})"
    else:
        why = f"below {DEGRADED_RATIO:.0%}" if ratio < DEGRADED_RATIO else "no better than the bare base"
        status, reason = "failed", f"keeps {ratio:.0%} of the source's accuracy ({why})"
    return {**out, "status": status, "reason": reason}


def combine(parts: Mapping[str, dict]) -> dict:
    """One verdict over several (a merge: one per input skill): the worst status,
    mean accuracies over the scored parts, and each part under `skills`."""
    if not parts:
        return unverified("no skill has seed examples")
    status = min((p["status"] for p in parts.values()), key=_SEVERITY.__getitem__)
    scored = [p for p in parts.values() if p.get("ratio") is not None]
    out: dict = {"status": status, "skills": dict(parts), "tolerances": tolerances()}
    if scored:
        before = sum(p["before"] for p in scored) / len(scored)
        after = sum(p["after"] for p in scored) / len(scored)
        out.update(before=round(before, 4), after=round(after, 4), ratio=round(after / before, 4))
    worst = [name for name, p in parts.items() if p["status"] == status]
    out["reason"] = f"worst skill: {worst[0]} ({parts[worst[0]].get('reason', status)})"
    return out


Scorer = Callable[..., object]


def _accuracy(result) -> float:
    return float(getattr(result, "accuracy", result))


def synthetic_examples(base_dir, adapter, seeds: Sequence[dict], n: int = SYNTHETIC_N) -> list[dict]:
    """Task inputs written from the seeds by the base, answered by base + `adapter`, none of them
    a seed's prompt (adapters_ops.translora.teacher_examples, seeded with SYNTHETIC_SEED)."""
    from .translora import teacher_examples  # needs transformers; imported when used

    rows, _ = teacher_examples(base_dir, adapter, list(seeds), n=n, seed=SYNTHETIC_SEED)
    taken = {s["prompt"] for s in seeds}
    return [r for r in rows if r["prompt"] not in taken]


def _synthetic_plan(plan: ExamplePlan, source: tuple, synthesize: Callable | None) -> ExamplePlan | str:
    """The plan with synthetic verdict examples, or why there are none."""
    from .errors import AdapterError

    try:
        rows = (synthesize or synthetic_examples)(source[0], source[1], plan.choose)
    except AdapterError as exc:
        return f"too few seeds to hold any out, and no synthetic inputs could be made: {exc}"
    if not rows:
        return "too few seeds to hold any out, and no synthetic input survived"
    return ExamplePlan(choose=plan.choose, verdict=list(rows), used="synthetic_labelled_by_source",
                       total=plan.total)


def assess(plan: ExamplePlan, *, source: tuple, derived: tuple, bare: tuple | None = None,
           evaluate_fn: Scorer | None = None, synthesize: Callable | None = None) -> dict:
    """Score (base_dir, adapter-or-None) pairs on the plan's verdict examples and judge.

    `evaluate_fn(base_dir, examples, adapter)` returns an accuracy (or an object
    with `.accuracy`); by default adapters_ops.evaluate.evaluate. A plan with
    seeds but no fair ones (too few to hold out) is judged on synthetic inputs
    labelled by the source: `synthesize(base_dir, adapter, seeds) -> examples`,
    by default `synthetic_examples`."""
    if not plan.verdict:
        if plan.total == 0:
            return unverified("the adapter has no seed examples", describe(plan))
        made = _synthetic_plan(plan, source, synthesize)
        if isinstance(made, str):
            return unverified(made, describe(plan))
        plan = made
    if evaluate_fn is None:
        from .evaluate import evaluate as evaluate_fn  # needs transformers; imported when used

    def acc(pair):
        base_dir, adapter = pair
        return _accuracy(evaluate_fn(base_dir, plan.verdict, adapter))

    return judge(acc(source), acc(derived), None if bare is None else acc(bare), examples=describe(plan))


def summary(v: dict | None) -> str:
    """One line for a job message or a log: `passed (seed accuracy 1.00 -> 0.88, 88%)`."""
    if not v:
        return "no verdict"
    status = v.get("status", "unverified")
    if v.get("ratio") is None:
        return f"{status} ({v.get('reason', 'not scored')})"
    ex = v.get("examples") or {}
    where = {"held_out_seeds": "held-out seeds", "all_seeds": "seeds",
             "synthetic_labelled_by_source": "synthetic inputs"}.get(ex.get("source"), "seeds")
    n = f" on {ex['n']} {where}" if ex.get("n") else ""
    return f"{status} (accuracy {v['before']:.2f} -> {v['after']:.2f}, {v['ratio']:.0%}{n})"


# --- `auto` settings: the cheapest result that passes ---------------------------------------------


@dataclass
class Search:
    """What an `auto` search kept: the candidate, its result, the ratio it reached on the
    examples the search may read (the plan's `choose` half), and every try."""

    candidate: object
    result: object
    ratio: float
    passed: bool
    tried: list[dict] = field(default_factory=list)


def search(candidates: Sequence, trial: Callable[[object], tuple[object, float]], *, cheapest_first: bool = True,
           pass_ratio: float = PASS_RATIO) -> Search:
    """Try `candidates` with `trial(c) -> (result, ratio)`, the ratio measured on the examples the
    op may choose on (never the verdict's).

    cheapest_first: candidates are ordered cheapest first; the first that reaches `pass_ratio`
    wins and the rest are not tried. Otherwise every candidate is tried and the best ratio wins
    (ties: the earlier). Without any passing candidate, the best one is kept and `passed` is
    False: the caller's verdict then says how far it falls short."""
    if not candidates:
        raise ValueError("search needs at least one candidate")
    best: Search | None = None
    tried: list[dict] = []
    for c in candidates:
        result, ratio = trial(c)
        ratio = float(ratio)
        tried.append({"candidate": c, "ratio": round(ratio, 4)})
        if best is None or ratio > best.ratio:
            best = Search(candidate=c, result=result, ratio=ratio, passed=ratio >= pass_ratio)
        if cheapest_first and ratio >= pass_ratio:
            break
    best.tried = tried
    return best


def ratio_of(before: float, after: float) -> float:
    """after / before for a search (a source scoring 0 keeps everything: ratio 1)."""
    return 1.0 if before <= 0 else after / before
