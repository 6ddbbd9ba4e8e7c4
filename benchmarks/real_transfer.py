"""Diff transfer 1.0 -> 1.1 on the real lane: does each skill's LoRA survive the base upgrade?

    .venv/bin/python benchmarks/real_transfer.py [--lane DIR] [--skills json_extract ...]
        [--finetune-steps 20] [--finetune-skills json_extract number_digits] [--quick | --limit N] [--json FILE]

Per skill, on the test split: the 1.0 LoRA on 1.0 (the source), bare 1.1, 1.1 + the unchanged
LoRA, 1.1 + the transferred adapter (`transfer.rebase`: the LoRA's update is the diff vector,
added to 1.1 with coefficient 1), and, for --finetune-skills, 1.1 + the adapter moved by the
hub's policy `moving.move(method="diff", finetune_steps=N)` (recycle-then-fine-tune on the
half of the 16 seeds that `verdict.plan_examples` gives to choosing; the verdict it returns
scores the other half). Scores the lane already holds in scores.json for the same examples
are reused, not recomputed. Prints a markdown table; --json writes every number with each
op's wall time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_lane as L  # noqa: E402

from adapters_ops import moving  # noqa: E402
from adapters_ops import transfer as T  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402

FINETUNE_STEPS = 20



def run(root: Path, skills: list[str], source: str = L.SOURCE, target: str = L.TARGET, limit: int | None = None,
        finetune_skills: list[str] | None = None, finetune_steps: int = FINETUNE_STEPS, log=print) -> dict:
    src_dir, tgt_dir = root / "bases" / source, root / "bases" / target
    src_man, tgt_man = T.manifest_of(src_dir), T.manifest_of(tgt_dir)
    scorers: dict[str, L.Scorer] = {}

    def score(base: str, adapter, items, setting: str, skill: str) -> tuple[float, str]:
        known = L.lane_score(root, skill, setting, len(items))
        if known is not None:
            return known, "scores.json"
        if base not in scorers:
            scorers[base] = L.Scorer(root / "bases" / base)
        return scorers[base].accuracy(adapter, items), "measured"

    result = {"source": source, "target": target, "lane": root.name, "finetune_steps": finetune_steps,
              "skills": {}}
    for skill in skills:
        lora = Adapter.load(root / "adapters" / skill)
        test = L.examples(root, skill, "test", limit)
        seeds = L.examples(root, skill, "seed")
        row: dict = {"n": len(test), "from": {}}
        for key, base, adapter, setting in (("source", source, lora, f"{source} + LoRA"),
                                            ("target_base", target, None, target),
                                            ("unchanged", target, lora, f"{target} + LoRA")):
            row[key], row["from"][key] = score(base, adapter, test, setting, skill)
        op = L.timed(T.rebase, lora, target)
        row["rebase_seconds"], row["rebase_peak_rss_mb"] = op.seconds, op.peak_rss_mb
        row["rebase_identical_to_unchanged"] = L.same_tensors(op.value, lora)
        if row["rebase_identical_to_unchanged"]:  # scale 1: the diff vector is the LoRA itself
            row["transferred"], row["from"]["transferred"] = row["unchanged"], "= unchanged (identical tensors)"
        else:
            row["transferred"], row["from"]["transferred"] = score(target, op.value, test, "", skill)
        if skill in (finetune_skills or []):
            op = L.timed(moving.move, lora, source_manifest=src_man, target_manifest=tgt_man, target_slug=target,
                         source_dir=lambda: src_dir, target_dir=lambda: tgt_dir, method="diff", seeds=seeds,
                         finetune_steps=finetune_steps)
            moved = op.value
            row["finetuned"], row["from"]["finetuned"] = score(target, moved.adapter, test, "", skill)
            row["finetune"] = {"method": moved.method, "seconds": op.seconds, "peak_rss_mb": op.peak_rss_mb,
                               "verdict": moved.verdict.get("status"), "verdict_detail": moved.verdict,
                               "gate": {k: v for k, v in moved.metrics.items() if isinstance(v, int | float | bool)}}
        for key in ("unchanged", "transferred", "finetuned"):
            if key in row:
                row[f"{key}_fraction"] = L.ratio(row[key], row["source"])
        result["skills"][skill] = row
        log(f"{skill}: source {row['source']:.3f}, 1.1 {row['target_base']:.3f}, unchanged {row['unchanged']:.3f}, "
            f"transferred {row['transferred']:.3f}, fine-tuned {L.fmt(row.get('finetuned'))}")
    result["scoring"] = {b: {"examples": s.examples_scored, "seconds": round(s.seconds, 1)} for b, s in scorers.items()}
    return result


def table(result: dict) -> str:
    steps = result["finetune_steps"]
    lines = ["| skill | source (1.0 + LoRA) | 1.1 base | 1.1 + unchanged LoRA | 1.1 + transferred (rebase) | "
             f"1.1 + diff + recycle fine-tune ({steps} steps) | verdict (held-out seeds) |", "|---|---|---|---|---|---|---|"]
    for skill, r in result["skills"].items():
        def cell(key, r=r):
            return "n/m" if key not in r else f"{r[key]:.3f} ({L.fmt(r.get(f'{key}_fraction'), 2)})"
        verdict = r.get("finetune", {}).get("verdict", "n/m")
        lines.append(f"| {skill} | {r['source']:.3f} | {r['target_base']:.3f} | {cell('unchanged')} | "
                     f"{cell('transferred')} | {cell('finetuned')} | {verdict} |")
    lines.append("\nCells: exact match (fraction of the source's). n/m: not measured.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    L.add_common_args(ap)
    ap.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    ap.add_argument("--finetune-skills", nargs="*", default=None,
                    help="skills that also get the recycle fine-tune (default: all measured skills)")
    args = ap.parse_args(argv)
    root = L.lane_dir(args.lane)
    skills = args.skills or L.skills_of(root)
    finetune = skills if args.finetune_skills is None else args.finetune_skills
    def measure(log):
        return run(root, skills, limit=L.limit_of(args), finetune_skills=finetune,
                   finetune_steps=args.finetune_steps, log=log)

    return L.report(args, measure, table)


if __name__ == "__main__":
    sys.exit(main())
