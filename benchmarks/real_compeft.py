"""ComPEFT on the real lane (SmolLM2-135M-Instruct 1.0): does each skill's LoRA survive compression?

    .venv/bin/python benchmarks/real_compeft.py [--lane DIR] [--skills json_extract ...]
        [--densities 0.05,0.1,0.2,0.3] [--quick | --limit N] [--json FILE]

Per skill: the LoRA compressed by `compeft.compress` with the paper's rule (global top-k,
ternary, scale = 1 x std: replace_factor 1, no search) at each density; at d=0.1 also the
scale chosen on the 16 seed examples (`compeft.choose_scale`, its default candidates) and
magnitude_bits=2 (four fitted magnitudes per tensor, replace_factor 1); --choose-at,
--bits-at and --bits-choose-at move or add those variants. Each cell: exact
match on the test split, its fraction of the uncompressed LoRA's, and the compressed file
(`to_bytes()`, the real .compeft file) against the LoRA in bf16 (2 bytes per parameter).
Prints a markdown table; --json writes every number with the op's wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_lane as L  # noqa: E402

from adapters_ops import compeft  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402

DENSITIES = (0.05, 0.1, 0.2, 0.3)
VARIANT_DENSITY = 0.1


def variants(densities, choose_at=(VARIANT_DENSITY,), bits_at=(VARIANT_DENSITY,), bits_choose_at=()
             ) -> list[tuple[str, float, dict]]:
    """(label, density, how) for every cell: the paper's rule (replace_factor 1) at each density, the
    scale chosen on the seeds, magnitude_bits=2 at factor 1, and magnitude_bits=2 with its levels'
    factor chosen on the seeds."""
    out = [(f"d={d:g}", d, {"replace_factor": 1.0}) for d in densities]
    out += [(f"d={d:g}, scale chosen on seeds", d, {"choose": True}) for d in choose_at]
    out += [(f"d={d:g}, magnitude_bits=2", d, {"magnitude_bits": 2}) for d in bits_at]
    out += [(f"d={d:g}, magnitude_bits=2, factor chosen on seeds", d, {"choose": True, "magnitude_bits": 2})
            for d in bits_choose_at]
    return out


def run(root: Path, skills: list[str], base: str = L.SOURCE, limit: int | None = None,
        densities=DENSITIES, choose_at=(VARIANT_DENSITY,), bits_at=(VARIANT_DENSITY,), bits_choose_at=(),
        candidates=None, log=print) -> dict:
    """Every cell for every skill; `base` is the base the LoRAs were trained on."""
    scorer = L.Scorer(root / "bases" / base)
    result = {"base": base, "lane": root.name, "skills": {}, "rule": "global top-k, keep=exact, ternary"}
    for skill in skills:
        adapter = Adapter.load(root / "adapters" / skill)
        test = L.examples(root, skill, "test", limit)
        seeds = L.examples(root, skill, "seed")
        lora = L.lane_score(root, skill, f"{base} + LoRA", len(test))
        source = "scores.json"
        if lora is None:
            lora, source = scorer.accuracy(adapter, test), "measured"
        bf16 = 2 * adapter.num_parameters()
        row = {"n": len(test), "lora": lora, "lora_from": source, "bf16_bytes": bf16,
               "lora_file_bytes": (root / "adapters" / skill / "adapter_model.safetensors").stat().st_size,
               "cells": {}}
        for label, density, how in variants(densities, choose_at, bits_at, bits_choose_at):
            if how.get("choose"):
                op = L.timed(compeft.choose_scale, adapter, density,
                             lambda cand, seeds=seeds: scorer.accuracy(cand, seeds), candidates=candidates,
                             magnitude_bits=how.get("magnitude_bits", 0))
                comp, extra = op.value.compressed, {"replace_factor": op.value.replace_factor,
                                                    "seed_scores": op.value.scores,
                                                    "magnitude_bits": how.get("magnitude_bits", 0)}
            else:
                op = L.timed(compeft.compress, adapter, density=density, **how)
                comp, extra = op.value, dict(how)
            size = len(comp.to_bytes())
            acc = scorer.accuracy(comp.decompress(), test)
            row["cells"][label] = {"density": density, "accuracy": acc, "fraction_of_lora": L.ratio(acc, lora),
                                   "file_bytes": size, "x_smaller_than_bf16": round(bf16 / size, 1),
                                   "op_seconds": op.seconds, "peak_rss_mb": op.peak_rss_mb, **extra}
            log(f"{skill} {label}: exact match {acc:.3f} (LoRA {lora:.3f}), {bf16 / size:.1f}x smaller, "
                f"op {op.seconds:.1f} s")
        result["skills"][skill] = row
    result["scoring"] = {"examples": scorer.examples_scored, "seconds": round(scorer.seconds, 1)}
    return result


def table(result: dict) -> str:
    labels = list(next(iter(result["skills"].values()))["cells"])
    lines = ["| skill | LoRA | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for skill, row in result["skills"].items():
        cells = [f"{c['accuracy']:.3f} ({L.fmt(c['fraction_of_lora'], 2)}; {c['x_smaller_than_bf16']:g}x)"
                 for c in row["cells"].values()]
        lines.append(f"| {skill} | {row['lora']:.3f} | " + " | ".join(cells) + " |")
    lines.append("\nCells: exact match (fraction of the LoRA's; file size x smaller than the LoRA in bf16).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    L.add_common_args(ap)
    ap.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES),
                    help="densities of the paper's rule at replace_factor 1 ('' for none)")
    ap.add_argument("--choose-at", default=f"{VARIANT_DENSITY:g}", help="densities with the scale chosen on the seeds")
    ap.add_argument("--bits-at", default=f"{VARIANT_DENSITY:g}", help="densities with magnitude_bits=2 at factor 1")
    ap.add_argument("--bits-choose-at", default="", help="densities with magnitude_bits=2, factor chosen on the seeds")
    ap.add_argument("--candidates", default=None, help="replace_factor candidates, comma-separated "
                    "(default: choose_scale's own for the variant)")
    args = ap.parse_args(argv)

    def floats(text):
        return [float(x) for x in text.split(",") if x.strip()] if text else []

    root = L.lane_dir(args.lane)
    skills = args.skills or L.skills_of(root)
    def measure(log):
        return run(root, skills, limit=L.limit_of(args), densities=floats(args.densities),
                   choose_at=floats(args.choose_at), bits_at=floats(args.bits_at),
                   bits_choose_at=floats(args.bits_choose_at), candidates=floats(args.candidates) or None, log=log)

    return L.report(args, measure, table)


if __name__ == "__main__":
    sys.exit(main())
