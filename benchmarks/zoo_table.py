"""Accuracy of every zoo skill on the bases, with and without the LoRA trained
on tiny-llama-3.0, as a markdown table (the one pasted in docs/zoo.md).

    .venv/bin/python benchmarks/zoo_table.py [--zoo DIR] [--limit N]

Without --zoo it uses the cached zoo (`adapters_ops.zoo.ensure_built()`),
building it first if needed. Columns: 3.0 base, 3.0 + its LoRA, 3.1 base,
3.1 + the 3.0 LoRA applied unchanged, 3.2 base, 3.2 + the 3.0 LoRA,
tiny-other-1.0 base. Cells: exact match on the test split (teacher-forced
completion loss in parentheses).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import zoo  # noqa: E402
from adapters_ops.evaluate import evaluate_model, load_model, load_tokenizer, read_examples  # noqa: E402

COLUMNS = [  # (header, base slug, apply the skill's 3.0 LoRA?)
    ("3.0 base", "tiny-llama-3.0", False),
    ("3.0 + LoRA", "tiny-llama-3.0", True),
    ("3.1 base", "tiny-llama-3.1", False),
    ("3.1 + 3.0 LoRA", "tiny-llama-3.1", True),
    ("3.2 base", "tiny-llama-3.2", False),
    ("3.2 + 3.0 LoRA", "tiny-llama-3.2", True),
    ("other-1.0 base", "tiny-other-1.0", False),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the cached zoo)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    root = args.zoo or zoo.ensure_built()
    man = zoo.manifest(root)
    skills = [s["name"] for s in man["skills"]]
    tests = {s: read_examples(root / "tasks" / s / "test.jsonl")[: args.limit] for s in skills}
    cells: dict[tuple[str, str], str] = {}
    t0 = time.perf_counter()
    for header, slug, with_lora in COLUMNS:
        base = root / "bases" / slug
        tok = load_tokenizer(base)
        plain = None if with_lora else load_model(base)
        for s in skills:
            model = load_model(base, root / "adapters" / s) if with_lora else plain
            r = evaluate_model(model, tok, tests[s], batch_size=args.batch_size)
            cells[(header, s)] = f"{r.accuracy:.2f} ({r.loss:.2f})"
    elapsed = time.perf_counter() - t0

    drift = {b["slug"]: b.get("drift_vs_tiny-llama-3.0") for b in man["bases"]}
    n = len(next(iter(tests.values())))
    print(f"Exact match on {n} held-out test examples per skill (mean completion loss in parentheses).\n")
    print("| skill | " + " | ".join(h for h, _, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for s in skills:
        print(f"| {s} | " + " | ".join(cells[(h, s)] for h, _, _ in COLUMNS) + " |")
    print()
    print("Weight drift ||v - 3.0|| / ||3.0||: " + ", ".join(
        f"{slug} {d:.1%}" if d is not None else f"{slug} n/a (other shapes)" for slug, d in drift.items()))
    print(f"\n(zoo {root.name}, recipe {man['recipe']}; scored in {elapsed:.1f} s on {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
