"""Trans-LoRA on the tiny zoo: every skill's LoRA moved from tiny-llama-3.0 to
tiny-llama-3.1 and to tiny-other-1.0 from its 16 seed examples alone (the tables in docs/translora.md).

    .venv/bin/python benchmarks/translora_quality.py [--zoo DIR] [--skills a,b] [--limit N] [--quick]

Table 1: test-split exact match of the target base, target + Trans-LoRA
adapter and tiny-llama-3.0 + the original adapter, with the synthetic sample
counts per stage, the generator that wrote them and the discriminator's
filter rate. Table 2 measures the filter where the teacher is wrong
off-distribution: mutation with up to 6 characters inserted or deleted gives
inputs far outside the seeds' length range, on which the source adapter
mislabels many; filtered and unfiltered distillation are compared on label
precision (the share of training labels the skill's rule agrees with) and on
test accuracy. Exit status 1 when a claim of the issue fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import translora, zoo  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402
from adapters_ops.evaluate import evaluate_model, load_model, load_tokenizer, read_examples  # noqa: E402

SOURCE = "tiny-llama-3.0"
TARGETS = ("tiny-llama-3.1", "tiny-other-1.0")


def _caesar(w):
    return "".join(chr((ord(c) - 97 + 3) % 26 + 97) if "a" <= c <= "z" else c for c in w)


def _date(s):
    parts = s.split("-")
    return "/".join(reversed(parts)) if len(parts) == 3 else None


# The skills' rules, written again from their descriptions, to grade labels of synthetic inputs.
ORACLES = {
    "caesar": _caesar,
    "reverse": lambda w: w[::-1],
    "digitsum": lambda d: str(sum(int(c) for c in d if c.isdigit())),
    "date": _date,
}


def oracle(skill: str, prompt: str) -> str | None:
    middle = prompt.split(" ", 1)[1].removesuffix("=")
    return ORACLES[skill](middle)


def label_precision(skill: str, rows) -> float:
    return sum(oracle(skill, r["prompt"]) == r["completion"] for r in rows) / max(1, len(rows))


def accuracy(base_dir, adapter, examples) -> float:
    return evaluate_model(load_model(base_dir, adapter), load_tokenizer(base_dir), examples).accuracy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the cached zoo)")
    ap.add_argument("--skills", default=None, help="comma-separated skills (default: all)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--limit", type=int, default=200, help="score the first N test examples")
    ap.add_argument("--filter-skill", default="caesar",
                    help="skill of the filtered-vs-unfiltered table ('none' skips it)")
    ap.add_argument("--quick", action="store_true", help="a cut-down config (smoke run, not the docs' figures)")
    ap.add_argument("--json", type=Path, default=None, help="also write every report here")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TransLoraConfig field: a JSON value, or a bare word for a string "
                         "(--set steps=2000 --set select=loss); repeatable")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    root = args.zoo or zoo.ensure_built()
    skills = args.skills.split(",") if args.skills else [s["name"] for s in zoo.manifest(root)["skills"]]
    targets = args.targets.split(",")
    cfg = translora.TransLoraConfig(threads=2)
    if args.quick:
        cfg = dataclasses.replace(cfg, n_synthetic=128, steps=60, eval_every=20)
    cfg = dataclasses.replace(cfg, **config_overrides(args.set))
    src_dir = root / "bases" / SOURCE
    t_all = time.perf_counter()
    failures, dump = [], {"config": cfg.as_dict(), "runs": []}

    print(f"Trans-LoRA from {SOURCE}, seeds only (16 per skill), test exact match on {args.limit} examples")
    head = ("| skill | target | target base | + Trans-LoRA | 3.0 + original | ratio | LM yield | generated "
            "| kept | filter rate | labelled | label precision | steps (kept) | s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for skill in skills:
        adapter = Adapter.load(root / "adapters" / skill)
        seeds = read_examples(root / "tasks" / skill / "seed.jsonl")
        test = read_examples(root / "tasks" / skill / "test.jsonl")[:args.limit]
        src_acc = accuracy(src_dir, adapter, test)
        for target in targets:
            tgt_dir = root / "bases" / target
            t0 = time.perf_counter()
            store = translora.MemoryCheckpoint()
            out, rep = translora.run(src_dir, adapter, tgt_dir, seeds, cfg, checkpoint=store, target_slug=target)
            secs = time.perf_counter() - t0
            prec = label_precision(skill, translora._jsonl_parse(store.load("label"))[2])
            base_acc = accuracy(tgt_dir, None, test)
            new_acc = accuracy(tgt_dir, out, test)
            ratio = new_acc / src_acc if src_acc else float("nan")
            c = rep["counts"]
            gen = rep["generate"]
            by = ", ".join(f"{k} {v}" for k, v in gen["by_generator"].items())
            print(f"| {skill} | {target} | {base_acc:.2f} | {new_acc:.2f} | {src_acc:.2f} | {ratio:.2f} "
                  f"| {gen.get('target_yield', float('nan')):.2f} | {c['generated']} ({by}) | {c['kept']} "
                  f"| {rep['filter_rate']:.2f} | {c['labelled']} | {prec:.2f} "
                  f"| {rep['distill']['steps_run']} ({rep['distill']['best_step']}) | {secs:.0f} |",
                  flush=True)
            dump["runs"].append({"skill": skill, "target": target, "base": base_acc, "translora": new_acc,
                                 "source": src_acc, "label_precision": prec, "report": rep})
            if not (new_acc >= 0.9 * src_acc and new_acc >= base_acc + 0.3):
                failures.append(f"{skill} -> {target}: {new_acc:.2f} vs source {src_acc:.2f}, base {base_acc:.2f}")

    # --- the filter where the teacher is wrong off-distribution ---
    if args.filter_skill != "none":
        _filter_table(args, root, cfg, src_dir, targets, dump, failures)
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1, default=str))
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


def config_overrides(pairs) -> dict:
    """--set FIELD=VALUE pairs as config fields; a value that is not JSON is a string."""
    fields = {f.name for f in dataclasses.fields(translora.TransLoraConfig)}
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def _filter_table(args, root, cfg, src_dir, targets, dump, failures) -> None:
    skill = args.filter_skill
    adapter = Adapter.load(root / "adapters" / skill)
    seeds = read_examples(root / "tasks" / skill / "seed.jsonl")
    test = read_examples(root / "tasks" / skill / "test.jsonl")[:args.limit]
    target = targets[-1]
    tgt_dir = root / "bases" / target
    wide = dataclasses.replace(cfg, generator="mutation", mutation_indel=6, mutation_in_range=False)
    lengths = sorted(len(s["prompt"]) for s in seeds)
    print(f"\nFilter on {skill} -> {target}: mutation with up to 6 characters inserted/deleted "
          f"(seed prompts are {lengths[0]}-{lengths[-1]} characters)")
    print("| filter | kept | filter rate | kept in seed length range | label precision | steps "
          "| test accuracy |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for use_filter in (False, True):
        store = translora.MemoryCheckpoint()
        out, rep = translora.run(src_dir, adapter, tgt_dir, seeds, dataclasses.replace(wide, filter=use_filter),
                                 checkpoint=store, target_slug=target)
        _, _, labelled = translora._jsonl_parse(store.load("label"))
        in_range = sum(lengths[0] <= len(r["prompt"]) <= lengths[-1] for r in labelled) / max(1, len(labelled))
        prec = label_precision(skill, labelled)
        acc = accuracy(tgt_dir, out, test)
        results[use_filter] = (prec, acc)
        print(f"| {'on' if use_filter else 'off'} | {rep['counts']['kept']} | {rep['filter_rate']:.2f} "
              f"| {in_range:.2f} | {prec:.2f} | {rep['distill']['steps_run']} | {acc:.2f} |", flush=True)
        dump["runs"].append({"skill": skill, "target": target, "filter_case": use_filter, "label_precision": prec,
                             "translora": acc, "report": rep})
    if not results[True][0] > results[False][0]:
        failures.append("the filter did not raise label precision")


if __name__ == "__main__":
    sys.exit(main())
