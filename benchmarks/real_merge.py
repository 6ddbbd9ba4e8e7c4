"""Merging on the real lane (SmolLM2-135M-Instruct 1.0): does each skill survive a merge of two LoRAs?

    .venv/bin/python benchmarks/real_merge.py [--lane DIR] [--pairs json_extract+news_section ...]
        [--methods linear ties dare_ties magnitude_prune svd cat distill] [--weight W]
        [--distill-steps 100] [--quick | --limit N] [--json FILE]

Per pair and method: `merge.merge` of the two skills' LoRAs with equal weights (default 1/n,
the hub's own default when no weights are given; --weight sets another) and the hub's
default densities (ties and magnitude_prune 0.5, dare_ties 0.7: verdict.AUTO_MERGE_METHODS),
default rank, seed 0. Each skill's exact match on its test split, as a fraction of its single
LoRA's. A method whose merged tensors are identical to an earlier method's (cat and linear
without a rank) reuses that score and says so. Prints a markdown table; --json writes every
number with the merge's wall time and the process's peak RSS. A "pair" may name more skills
(a+b+c+d). `distill` is `compose.distill_merge` (what the merge job's method distill runs): one
LoRA distilled from every input on its own skill's synthetic inputs, its seeds choosing the
kept state, in a CPU-sized setting (DISTILL below; --distill-steps moves the steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_lane as L  # noqa: E402

from adapters_ops import compose, merge, verdict  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402

PAIRS = (("json_extract", "news_section"), ("past_tense", "number_digits"))
# The library's distill defaults (1024 inputs a skill, 1000 steps of 32 a skill) take hours on 2
# cores with a 135M model; the lane's own LoRAs were trained 40-80 steps of 8 at lr 3e-3.
DISTILL = {"synthetic": 128, "steps": 100, "batch_size": 8, "lr": 3e-3}
METHODS = ("linear", "ties", "dare_ties", "magnitude_prune", "svd", "cat")
DENSITY = {**{m: d for m, d in verdict.AUTO_MERGE_METHODS}, "cat": None}
DENSITY["dare_linear"] = DENSITY["dare_ties"]  # the same random drop, without the sign election
DENSITY.update({f"{m}_svd": DENSITY[m] for m in ("ties", "dare_ties", "magnitude_prune", "dare_linear")})



def run(root: Path, pairs, methods=METHODS, base: str = L.SOURCE, limit: int | None = None,
        weight: float | None = None, distill: dict | None = None, log=print) -> dict:
    scorer = L.Scorer(root / "bases" / base)
    singles: dict[str, float] = {}
    result = {"base": base, "lane": root.name, "pairs": {}}
    for pair in pairs:
        loras = [Adapter.load(root / "adapters" / s) for s in pair]
        tests = {s: L.examples(root, s, "test", limit) for s in pair}
        for s, lora in zip(pair, loras, strict=True):
            if s not in singles:
                known = L.lane_score(root, s, f"{base} + LoRA", len(tests[s]))
                singles[s] = known if known is not None else scorer.accuracy(lora, tests[s])
        weights = [weight if weight is not None else 1.0 / len(pair)] * len(pair)
        done: list[tuple[str, Adapter, dict]] = []
        rows = {}
        for method in methods:
            density = DENSITY.get(method)
            if method == "distill":
                cfg = compose.ComposeConfig(**{**DISTILL, **(distill or {})}, seed=0)
                seeds = [L.examples(root, s, "seed") for s in pair]
                op = L.timed(lambda c=cfg, sd=seeds, ls=loras: compose.distill_merge(root / "bases" / base, ls, sd, c)[0])
            else:
                op = L.timed(merge.merge, loras, weights, method=method, density=density, seed=0)
            twin = next((name for name, other, _ in done if L.same_tensors(op.value, other)), None)
            scores = dict(next(sc for name, _, sc in done if name == twin)) if twin else {
                s: scorer.accuracy(op.value, tests[s]) for s in pair}
            done.append((method, op.value, scores))
            rows[method] = {"density": density, "weights": None if method == "distill" else weights,
                            "seconds": op.seconds,
                            "peak_rss_mb": op.peak_rss_mb, "same_tensors_as": twin,
                            "skills": {s: {"accuracy": scores[s], "fraction": L.ratio(scores[s], singles[s])}
                                       for s in pair}}
            log(f"{'+'.join(pair)} {method}: " + ", ".join(f"{s} {scores[s]:.3f}" for s in pair)
                + f" (merge {op.seconds:.1f} s{', same tensors as ' + twin if twin else ''})")
        result["pairs"]["+".join(pair)] = {"n": {s: len(t) for s, t in tests.items()}, "methods": rows}
    result["singles"] = singles
    result["scoring"] = {"examples": scorer.examples_scored, "seconds": round(scorer.seconds, 1)}
    return result


def table(result: dict) -> str:
    lines = []
    for pair, entry in result["pairs"].items():
        skills = pair.split("+")
        lines += [f"\n**{pair}** (single LoRAs: " + ", ".join(f"{s} {result['singles'][s]:.3f}" for s in skills) + ")\n",
                  "| method | density | " + " | ".join(skills) + " | worst fraction | merge s |",
                  "|---|---|" + "---|" * len(skills) + "---|---|"]
        for method, r in entry["methods"].items():
            cells = [f"{r['skills'][s]['accuracy']:.3f} ({L.fmt(r['skills'][s]['fraction'], 2)})" for s in skills]
            worst = min((r["skills"][s]["fraction"] or 0.0) for s in skills)
            note = f" (= {r['same_tensors_as']})" if r["same_tensors_as"] else ""
            lines.append(f"| {method}{note} | {r['density'] if r['density'] is not None else '-'} | "
                         + " | ".join(cells) + f" | {worst:.2f} | {r['seconds']:.1f} |")
    lines.append("\nCells: exact match (fraction of the single LoRA's).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    L.add_common_args(ap)
    ap.add_argument("--pairs", nargs="+", default=["+".join(p) for p in PAIRS], help="skill pairs, a+b")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(merge.METHODS) + ["distill"])
    ap.add_argument("--distill-steps", type=int, default=DISTILL["steps"], help="distill: training steps")
    ap.add_argument("--weight", type=float, default=None, help="weight of every adapter (default: 1/n)")
    args = ap.parse_args(argv)
    root = L.lane_dir(args.lane)
    pairs = [tuple(p.split("+")) for p in args.pairs]
    def measure(log):
        return run(root, pairs, args.methods, limit=L.limit_of(args), weight=args.weight,
                   distill={"steps": args.distill_steps}, log=log)

    return L.report(args, measure, table)


if __name__ == "__main__":
    sys.exit(main())
