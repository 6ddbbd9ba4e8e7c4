"""Does a merged adapter keep each skill? Accuracy of every merge method on the
zoo's skill adapters (all trained on tiny-llama-3.0), next to each single adapter.

    .venv/bin/python benchmarks/merge_quality.py [--zoo DIR] [--skills caesar reverse]
        [--methods cat svd ties ...] [--weight 1.0] [--density 0.5] [--limit N] [--search BUDGET]

Rows: the base alone, each skill's own adapter, then one merge of all chosen
skills' adapters per method (same weight for each, default 1.0: every skill's
full update). Cells: exact match on the skill's test split (teacher-forced
completion loss in parentheses). With --search, one more row: `linear` with
weights from merge.search_weights, scored on the skills' seed examples only
(mean negative completion loss), as a Trans-LoRA/LoraHub worker would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import merge, zoo  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402
from adapters_ops.evaluate import (  # noqa: E402
    completion_loss,
    evaluate_model,
    load_model,
    load_tokenizer,
    read_examples,
)

DEFAULT_METHODS = ["cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the cached zoo)")
    ap.add_argument("--skills", nargs="+", default=None, help="skills to merge (default: the first three)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(merge.METHODS))
    ap.add_argument("--weight", type=float, default=1.0, help="weight of every adapter in the merge")
    ap.add_argument("--density", type=float, default=0.5, help="for ties / dare / magnitude_prune")
    ap.add_argument("--rank", type=int, default=None, help="output rank (default: each method's default)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--search", type=int, default=0, metavar="BUDGET", help="also search weights (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    root = args.zoo or zoo.ensure_built()
    man = zoo.manifest(root)
    skills = args.skills or [s["name"] for s in man["skills"]][:3]
    base = root / "bases" / "tiny-llama-3.0"
    tok = load_tokenizer(base)
    tests = {s: read_examples(root / "tasks" / s / "test.jsonl")[: args.limit] for s in skills}
    seeds = {s: read_examples(root / "tasks" / s / "seed.jsonl") for s in skills}
    adapters = [Adapter.load(root / "adapters" / s) for s in skills]
    weights = [args.weight] * len(adapters)

    rows: list[tuple[str, dict[str, str], str]] = []
    t0 = time.perf_counter()

    def score_row(label: str, adapter: Adapter | None, note: str = "") -> None:
        model = load_model(base, adapter)
        cells = {}
        for s in skills:
            r = evaluate_model(model, tok, tests[s], batch_size=args.batch_size)
            cells[s] = f"{r.accuracy:.2f} ({r.loss:.2f})"
        rows.append((label, cells, note))
        print(f"# {label}: {cells} {note}", file=sys.stderr, flush=True)

    score_row("base alone", None)
    for s, a in zip(skills, adapters, strict=True):
        score_row(f"{s} adapter only", a)
    for method in args.methods:
        density = args.density if merge.METHODS[method].needs_density else None
        rank = args.rank if method != "cat" else None
        m0 = time.perf_counter()
        merged, report = merge.merge_with_report(adapters, weights, method=method, density=density, rank=rank,
                                                 seed=args.seed)
        note = (f"rank {merged.config['r']}, energy kept {report.mean_energy:.2f}, "
                f"merge {time.perf_counter() - m0:.2f}s")
        score_row(f"merge: {method}", merged, note)

    if args.search:
        def seed_score(candidate: Adapter) -> float:
            model = load_model(base, candidate)
            return -sum(completion_loss(model, tok, seeds[s]) for s in skills) / len(skills)

        found = merge.search_weights(adapters, seed_score, "linear", budget=args.search, seed=args.seed)
        merged = merge.merge(adapters, found.weights, method="linear")
        score_row("merge: linear, searched weights", merged,
                  f"weights {[round(w, 2) for w in found.weights]} after {len(found.history)} evaluations")

    print(f"Merging {', '.join(skills)} (weight {args.weight} each, density {args.density} where used); "
          f"exact match on the test split (completion loss); {time.perf_counter() - t0:.0f}s")
    print()
    print("| adapter | " + " | ".join(skills) + " | notes |")
    print("|---|" + "---:|" * len(skills) + "---|")
    for label, cells, note in rows:
        print(f"| {label} | " + " | ".join(cells[s] for s in skills) + f" | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
