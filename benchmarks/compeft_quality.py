"""Accuracy of ComPEFT-compressed zoo adapters at several densities (the table in docs/compeft.md).

    .venv/bin/python benchmarks/compeft_quality.py [--zoo DIR] [--limit N] [--scope global|tensor]

For every skill's LoRA (trained on tiny-llama-3.0) and every density, the
adapter is compressed, replace_factor is picked with `compeft.choose_scale` by
exact match on the skill's seed examples (mean loss breaks ties), and the
result is scored on the held-out test split. Cells: test exact match, with the
chosen replace_factor in brackets; the "x smaller" row is the file size ratio
against the adapter's bf16 safetensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import compeft, zoo  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402
from adapters_ops.evaluate import apply_adapter, evaluate_model, load_model, load_tokenizer, read_examples  # noqa: E402

BASE = "tiny-llama-3.0"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the cached zoo)")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--scope", default="global", choices=compeft.SCOPES)
    ap.add_argument("--candidates", default=",".join(str(c) for c in compeft.DEFAULT_CANDIDATES))
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    densities = [float(d) for d in args.densities.split(",")]
    candidates = [float(c) for c in args.candidates.split(",")]

    root = args.zoo or zoo.ensure_built()
    man = zoo.manifest(root)
    skills = [s["name"] for s in man["skills"]]
    base_dir = root / "bases" / BASE
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}

    def with_adapter(adapter: Adapter):
        model.load_state_dict(pristine)
        return apply_adapter(model, adapter)

    t0 = time.perf_counter()
    rows, ratios = {}, {d: [] for d in densities}
    for s in skills:
        adapter = Adapter.load(root / "adapters" / s)
        seed = read_examples(root / "tasks" / s / "seed.jsonl")
        test = read_examples(root / "tasks" / s / "test.jsonl")[: args.limit]
        bf16 = 2 * adapter.num_parameters()

        def seed_score(candidate: Adapter, seed=seed) -> float:
            r = evaluate_model(with_adapter(candidate), tok, seed, batch_size=args.batch_size)
            return r.accuracy - 1e-3 * r.loss  # accuracy first, lower loss breaks ties

        cells = [f"{evaluate_model(with_adapter(adapter), tok, test, batch_size=args.batch_size).accuracy:.2f}"]
        for d in densities:
            choice = compeft.choose_scale(adapter, d, seed_score, candidates=candidates, scope=args.scope)
            acc = evaluate_model(with_adapter(choice.compressed.decompress()), tok, test, batch_size=args.batch_size)
            cells.append(f"{acc.accuracy:.2f} ({choice.replace_factor:g})")
            ratios[d].append(bf16 / choice.compressed.nbytes)
        model.load_state_dict(pristine)
        cells.insert(0, f"{evaluate_model(model, tok, test, batch_size=args.batch_size).accuracy:.2f}")
        rows[s] = cells

    n = len(read_examples(root / "tasks" / skills[0] / "test.jsonl")[: args.limit])
    print(f"Exact match on {n} test examples per skill, {BASE}; ComPEFT scope={args.scope}, "
          f"replace_factor (in brackets) chosen on the seed examples from {candidates}.\n")
    heads = ["base", "LoRA"] + [f"d={d:g}" for d in densities]
    print("| skill | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for s, cells in rows.items():
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("| x smaller than bf16 | | | " + " | ".join(f"{sum(r) / len(r):.1f}" for r in ratios.values()) + " |")
    print(f"\n(zoo {root.name}; {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads, 2-core CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
