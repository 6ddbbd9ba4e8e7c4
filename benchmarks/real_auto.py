"""`compress --density auto` on the real lane: what the hub's search picks, what its verdict says,
and whether the 200-example test split agrees.

    .venv/bin/python benchmarks/real_auto.py [--lane DIR] [--skills json_extract ...] [--quick | --limit N]
        [--json FILE]

Per skill, what the compress job does with `density auto` (workers/ops/compress.py): the 16 seeds
split by `verdict.plan_examples` (8 choose, 8 held out), the densities of `verdict.AUTO_DENSITIES`
tried cheapest first with the scale chosen on the 8 choosing seeds (`compeft.choose_density`), the
first that keeps `verdict.PASS_RATIO` wins; then the verdict on the 8 held-out seeds
(`verdict.assess`). Next to it, the same `verdict.judge` on the test split (LoRA, compressed and
bare base on the same examples): where the two disagree, the 8 held-out seeds misjudged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_lane as L  # noqa: E402

from adapters_ops import compeft, verdict  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402


def run(root: Path, skills: list[str], base: str = L.SOURCE, limit: int | None = None,
        densities=verdict.AUTO_DENSITIES, log=print) -> dict:
    scorer = L.Scorer(root / "bases" / base)

    def evaluate_fn(_base_dir, examples, adapter):
        return scorer.accuracy(adapter, examples)

    result = {"base": base, "lane": root.name, "densities": list(densities), "tolerances": verdict.tolerances(),
              "skills": {}}
    for skill in skills:
        lora = Adapter.load(root / "adapters" / skill)
        seeds, test = L.examples(root, skill, "seed"), L.examples(root, skill, "test", limit)
        plan = verdict.plan_examples(seeds, selects=True)
        before = scorer.accuracy(lora, plan.choose)
        op = L.timed(compeft.choose_density, lora, lambda a, ex=plan.choose: scorer.accuracy(a, ex), before,
                     densities, pass_ratio=verdict.PASS_RATIO)
        found = op.value
        derived = found.compressed.decompress()
        seed_verdict = verdict.assess(plan, source=(None, lora), derived=(None, derived), bare=(None, None),
                                      evaluate_fn=evaluate_fn)
        lora_test = L.lane_score(root, skill, f"{base} + LoRA", len(test))
        lora_test = scorer.accuracy(lora, test) if lora_test is None else lora_test
        bare_test = L.lane_score(root, skill, base, len(test))
        bare_test = scorer.accuracy(None, test) if bare_test is None else bare_test
        test_verdict = verdict.judge(lora_test, scorer.accuracy(derived, test), bare_test)
        bf16 = 2 * lora.num_parameters()
        row = {"density": found.density, "passed_search": found.passed, "tried": found.tried,
               "replace_factor": found.scale.replace_factor if found.scale else None,
               "x_smaller_than_bf16": round(bf16 / len(found.compressed.to_bytes()), 1),
               "search_seconds": op.seconds, "seed_verdict": seed_verdict, "test_verdict": test_verdict,
               "agree": seed_verdict["status"] == test_verdict["status"], "n_test": len(test)}
        log(f"{skill}: density {found.density} ({row['x_smaller_than_bf16']}x), seed verdict "
            f"{seed_verdict['status']} ({seed_verdict.get('ratio')}), test {test_verdict['status']} "
            f"({test_verdict.get('ratio')}), search {op.seconds:.0f} s")
        result["skills"][skill] = row
    result["scoring"] = {"examples": scorer.examples_scored, "seconds": round(scorer.seconds, 1)}
    return result


def table(result: dict) -> str:
    lines = ["| skill | densities tried (ratio on 8 choosing seeds) | chosen (factor; x smaller) "
             "| verdict, 8 held-out seeds | same judge on the test split | agree | search s |",
             "|---|---|---|---|---|---|---|"]
    for skill, r in result["skills"].items():
        tried = ", ".join(f"{t['density']:g} ({t['ratio']:.2f})" for t in r["tried"])
        sv, tv = r["seed_verdict"], r["test_verdict"]
        lines.append(f"| {skill} | {tried} | {r['density']:g} ({L.fmt(r['replace_factor'], 1)}; "
                     f"{r['x_smaller_than_bf16']:g}x) | {sv['status']} ({sv.get('after', 0):.3f} of "
                     f"{sv.get('before', 0):.3f}) | {tv['status']} ({tv['after']:.3f} of {tv['before']:.3f}) "
                     f"| {'yes' if r['agree'] else '**no**'} | {r['search_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    L.add_common_args(ap)
    args = ap.parse_args(argv)
    root = L.lane_dir(args.lane)
    skills = args.skills or L.skills_of(root)
    def measure(log):
        return run(root, skills, limit=L.limit_of(args), log=log)

    return L.report(args, measure, table)


if __name__ == "__main__":
    sys.exit(main())
