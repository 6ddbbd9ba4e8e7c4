"""Fine-tuning transfer on the tiny model family: exact-match accuracy on each
skill's test split of the LoRA trained on tiny-llama-3.0, on its own base and
moved to 3.1 (small drift) and 3.2 (large drift), by plain rebase and by
rebase + a short recycling fine-tune on the 16 seed examples.

    .venv/bin/python benchmarks/transfer_quality.py [--steps 50] [--zoo DIR]

Builds the zoo on first use (adapters_ops.zoo.ensure_built).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="recycling fine-tune steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--zoo", help="zoo folder (default: the cached one, built if missing)")
    args = ap.parse_args()

    import torch

    from adapters_ops import transfer as T
    from adapters_ops import zoo
    from adapters_ops.adapter import Adapter
    from adapters_ops.evaluate import evaluate, read_examples

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    root = Path(args.zoo) if args.zoo else zoo.ensure_built()
    man = zoo.manifest(root)
    bases = {b["slug"]: root / b["path"] for b in man["bases"]}
    src = bases["tiny-llama-3.0"]
    rows = []
    for entry in man["adapters"]:
        skill = entry["skill"]
        test = read_examples(root / "tasks" / skill / "test.jsonl")
        seed = read_examples(root / "tasks" / skill / "seed.jsonl")
        adapter = Adapter.load(root / entry["path"])
        row = {"skill": skill, "3.0+lora": evaluate(src, test, adapter).accuracy}
        for slug in ("tiny-llama-3.1", "tiny-llama-3.2"):
            v = slug.rsplit("-", 1)[-1]
            moved, _ = T.transfer(adapter, src, bases[slug], slug)
            gate = T.quality_gate(src, bases[slug], adapter, moved, test, evaluate)
            recycled = T.recycle_finetune(moved, bases[slug], seed, steps=args.steps, lr=args.lr, seed=0)
            row[f"{v} base"] = gate["metrics"]["target_base"]
            row[f"{v}+transferred"] = gate["metrics"]["target_with_transferred"]
            row[f"{v}+recycled"] = evaluate(bases[slug], test, recycled).accuracy
            row[f"{v} verified"] = gate["verified"]
        rows.append(row)
        print(f"{skill}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    other = T.check_compatible(T.manifest_of(src), T.manifest_of(bases["tiny-other-1.0"]),
                               Adapter.load(root / man["adapters"][0]["path"]))
    print(f"\ntiny-llama-3.0 -> tiny-other-1.0: compatible={other.compatible}: {other.message}")
    print(f"recycling: {args.steps} steps, lr {args.lr}, on the seed split; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
