"""Accuracy of ComPEFT-compressed zoo adapters at several densities (the table in docs/compeft.md).

    .venv/bin/python benchmarks/compeft_quality.py [--zoo DIR] [--limit N] [--scope global|tensor]
        [--magnitude-bits M] [--factorization as_is|balanced] [--candidates 1,1.5,2]
    .venv/bin/python benchmarks/compeft_quality.py --ablation [--densities 0.1,0.3,0.5]
    .venv/bin/python benchmarks/compeft_quality.py --product-error [variant flags]

For every skill's LoRA (trained on tiny-llama-3.0) and every density, the
adapter is compressed, replace_factor is picked with `compeft.choose_scale` by
exact match on the skill's seed examples (mean loss breaks ties), and the
result is scored on the held-out test split. Cells: test exact match, with the
chosen replace_factor in brackets; the "x smaller" row is the file size ratio
against the adapter's bf16 safetensors. --magnitude-bits and --factorization
select the variants of `compeft.compress` beyond the paper's rule.

--ablation asks where the loss comes from instead: per tensor, keep the top
`density` entries either with their exact values ("pruned") or with one
magnitude per tensor (the mean kept magnitude, the least-squares choice),
in A only, B only or both; "pruned, balanced" prunes the SVD-balanced factors.

--product-error prints the cheap proxy instead of accuracy: the mean over
modules of ||B^ A^ - B A||_F / ||B A||_F, at the candidate replace_factor that
minimises it (no model is run).
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


ABLATIONS = ("pruned", "pruned, balanced", "one magnitude in A", "one magnitude in B", "one magnitude in A and B")


def _top(t: torch.Tensor, density: float, one_magnitude: bool) -> torch.Tensor:
    flat = t.float().reshape(-1)
    keep = torch.topk(flat.abs(), compeft.keep_count(density, flat.numel())).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep].sign() * flat[keep].abs().mean() if one_magnitude else flat[keep]
    return out.reshape(t.shape).to(t.dtype)


def ablated(adapter: Adapter, density: float, kind: str) -> Adapter:
    tensors = dict(adapter.tensors)
    for module, (a, b) in adapter.pairs():
        if kind == "pruned, balanced":
            a, b = compeft.balanced_pair(a, b)
        tensors[adapter.key(module, "A")] = _top(a, density, kind.startswith("one magnitude in A"))
        tensors[adapter.key(module, "B")] = _top(b, density, kind in ("one magnitude in B", "one magnitude in A and B"))
    return Adapter(config=adapter.config, tensors=tensors)


def product_error(adapter: Adapter, restored: Adapter) -> float:
    errs = [float(torch.linalg.norm(restored.delta(m) - adapter.delta(m)) / torch.linalg.norm(adapter.delta(m)))
            for m in adapter.modules()]
    return sum(errs) / len(errs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the cached zoo)")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--scope", default="global", choices=compeft.SCOPES)
    ap.add_argument("--magnitude-bits", type=int, default=0, help="2^M magnitudes per tensor (0: ternary)")
    ap.add_argument("--factorization", default="as_is", choices=compeft.FACTORIZATIONS)
    ap.add_argument("--candidates", default=None,
                    help="replace_factor candidates, comma-separated (default: choose_scale's for the variant)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--ablation", action="store_true", help="where the loss comes from (see the docstring)")
    ap.add_argument("--product-error", action="store_true", help="the product-error proxy instead of accuracy")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    densities = [float(d) for d in args.densities.split(",")]
    candidates = [float(c) for c in args.candidates.split(",")] if args.candidates else None

    root = args.zoo or zoo.ensure_built()
    man = zoo.manifest(root)
    skills = [s["name"] for s in man["skills"]]
    options = {"scope": args.scope, "magnitude_bits": args.magnitude_bits, "factorization": args.factorization}
    if args.product_error:
        cands = candidates or (compeft.LEVEL_CANDIDATES if args.magnitude_bits else compeft.DEFAULT_CANDIDATES)
        print(f"Mean relative error of B @ A per module, {options}, best replace_factor of {cands}.\n")
        print("| skill | " + " | ".join(f"d={d:g}" for d in densities) + " |")
        print("|---|" + "---|" * len(densities))
        for s in skills:
            adapter = Adapter.load(root / "adapters" / s)
            cells = []
            for d in densities:
                comp = compeft.compress(adapter, density=d, **options)
                cells.append(f"{min(product_error(adapter, comp.with_replace_factor(c).decompress()) for c in cands):.3f}")
            print(f"| {s} | " + " | ".join(cells) + " |")
        return 0
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
        if args.ablation:
            for kind in ABLATIONS:
                accs = [evaluate_model(with_adapter(ablated(adapter, d, kind)), tok, test,
                                       batch_size=args.batch_size).accuracy for d in densities]
                rows[f"{s} | {kind}"] = [cells[0]] + [f"{a:.2f}" for a in accs]
            continue
        for d in densities:
            choice = compeft.choose_scale(adapter, d, seed_score, candidates=candidates, scope=args.scope,
                                          magnitude_bits=args.magnitude_bits, factorization=args.factorization)
            acc = evaluate_model(with_adapter(choice.compressed.decompress()), tok, test, batch_size=args.batch_size)
            cells.append(f"{acc.accuracy:.2f} ({choice.replace_factor:g})")
            ratios[d].append(bf16 / choice.compressed.nbytes)
        model.load_state_dict(pristine)
        cells.insert(0, f"{evaluate_model(model, tok, test, batch_size=args.batch_size).accuracy:.2f}")
        rows[s] = cells

    n = len(read_examples(root / "tasks" / skills[0] / "test.jsonl")[: args.limit])
    if args.ablation:
        print(f"Exact match on {n} test examples per skill, {BASE}; top-k per tensor, no scale tuning.\n")
        print("| skill | kept entries | LoRA | " + " | ".join(f"d={d:g}" for d in densities) + " |")
        print("|---|---|" + "---|" * (len(densities) + 1))
        for key, cells in rows.items():
            print(f"| {key} | " + " | ".join(cells) + " |")
        print(f"\n(zoo {root.name}; {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads)")
        return 0
    print(f"Exact match on {n} test examples per skill, {BASE}; ComPEFT scope={args.scope}, "
          f"magnitude_bits={args.magnitude_bits}, factorization={args.factorization}, "
          f"replace_factor (in brackets) chosen on the seed examples from "
          f"{candidates or (compeft.LEVEL_CANDIDATES if args.magnitude_bits else compeft.DEFAULT_CANDIDATES)}.\n")
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
