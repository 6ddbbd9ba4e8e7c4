"""QA-LoRA on the tiny model family: what merging an adapter into a 4/3-bit base costs,
per skill, as a markdown table (the one pasted in docs/qalora.md).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/qalora_quality.py [--zoo DIR] [--limit N]
        [--bits 4 3] [--group 16] [--steps 60] [--skills caesar date]

Per skill (the LoRA trained on tiny-llama-3.0) and bit width, four models, scored on the
skill's test split (exact match of greedy completions, and perplexity = exp(mean completion
loss)):
- fp merged: the fp32 base + the LoRA (no quantization: the ceiling);
- naive: W + B@A merged in fp32, then quantized (round to nearest, same bits and group);
- QA-LoRA conv.: the base quantized, the LoRA projected to its best group-constant form
  (`to_qalora`) and merged into the zero points;
- QA-LoRA rec.: the same after `recover` (--steps of QA-LoRA training on the 16 seed examples,
  with the fp merged model as teacher), merged into the zero points.
"exact" is the largest |logit| difference between each merged QA-LoRA model and the quantized
base running the QA-LoRA unmerged (the merge is exact up to float rounding). The last lines
measure the size of a 4-bit g64 14336 x 4096 expert in our packed file against bf16 safetensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import qalora as Q  # noqa: E402
from adapters_ops import zoo  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402
from adapters_ops.evaluate import evaluate_model, load_model, load_tokenizer, read_examples  # noqa: E402


def score(model, tok, examples) -> tuple[float, float]:
    r = evaluate_model(model, tok, examples)
    return r.accuracy, float(torch.tensor(r.loss).exp())


@torch.inference_mode()
def merge_gap(qm, qa, tok, examples) -> float:
    """max |logits(merged) - logits(quantized base + QA-LoRA unmerged)| on a few test prompts."""
    unmerged = qm.to_model()
    Q.attach_qalora(unmerged, qa)
    unmerged.eval()
    merged = qm.merge(qa).to_model()
    enc = tok([ex["prompt"] + ex["completion"] for ex in examples[:8]], return_tensors="pt", padding=True)
    a = merged(**enc).logits.float()
    b = unmerged(**enc).logits.float()
    return float((a - b).abs().max())


def expert_size(rows: int = 14336, cols: int = 4096, group: int = 64) -> tuple[int, int]:
    """File bytes of one 4-bit g64 expert in our format, and of the same weight as bf16 safetensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    parts = []
    for start in range(0, rows, 2048):  # row blocks keep the peak memory small
        w = torch.randn(min(2048, rows - start), cols, generator=gen) * 0.02
        parts.append(Q.quantize_weight(w, 4, group))
    qw = Q.QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), 4, group)
    with tempfile.TemporaryDirectory() as tmp:
        qm = Q.QuantizedModel({}, Q.QuantSpec(4, group), {"model.layers.0.mlp.experts.0.down_proj.weight": qw}, {})
        qm.save(tmp)
        ours = (Path(tmp) / Q.QUANT_FILE).stat().st_size
        w = torch.randn(rows, cols, generator=gen).bfloat16()
        save_file({"w": w}, str(Path(tmp) / "bf16.safetensors"))
        bf16 = (Path(tmp) / "bf16.safetensors").stat().st_size
    return ours, bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built zoo folder (default: the cached one, built if needed)")
    ap.add_argument("--base", default="tiny-llama-3.0")
    ap.add_argument("--skills", nargs="*", help="default: every skill with an adapter")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group", type=int, default=16, help="16: hidden 128 -> 8 groups a row")
    ap.add_argument("--steps", type=int, default=60, help="recovery fine-tune steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--limit", type=int, default=100, help="test examples per skill")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-size", action="store_true", help="skip the expert size measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    root = Path(args.zoo) if args.zoo else zoo.ensure_built()
    base = root / "bases" / args.base
    skills = args.skills or sorted(p.name for p in (root / "adapters").iterdir() if p.is_dir())
    tok = load_tokenizer(base)
    qbase = {bits: Q.quantize_base(base, bits, args.group) for bits in args.bits}

    print(f"# QA-LoRA on {args.base}, group {args.group}, recovery {args.steps} steps (lr {args.lr}) on the seed "
          f"split, {args.limit} test examples per skill, {args.threads} threads")
    for bits, qm in qbase.items():
        s = qm.summary()
        print(f"# base {bits}-bit: mean relative weight error {s['mean_rel_error']:.4f} over {s['layers']} layers")
    print()
    print("| skill | bits | fp merged | naive merge->quant | QA-LoRA conv. | QA-LoRA rec. | conv. error | exact |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for skill in skills:
        adapter = Adapter.load(root / "adapters" / skill)
        test = read_examples(root / "tasks" / skill / "test.jsonl")[:args.limit]
        seeds = read_examples(root / "tasks" / skill / "seed.jsonl")
        teacher = load_model(base, adapter)
        fp = score(teacher, tok, test)
        qa, conv = Q.to_qalora(adapter, args.group)
        for bits, qm in qbase.items():
            naive = score(Q.naive_merge_quantize(base, adapter, bits, args.group).to_model(), tok, test)
            converted = score(qm.merge(qa).to_model(), tok, test)
            rec, _ = Q.recover(qm, qa, seeds, steps=args.steps, lr=args.lr, teacher=teacher, tokenizer=tok)
            recovered = score(qm.merge(rec).to_model(), tok, test)
            gap = max(merge_gap(qm, qa, tok, test), merge_gap(qm, rec, tok, test))
            cells = [f"{a:.2f} (ppl {p:.3f})" for a, p in (fp, naive, converted, recovered)]
            print(f"| {skill} | {bits} | " + " | ".join(cells) + f" | {conv['rel_error']:.3f} | {gap:.1e} |",
                  flush=True)
    if not args.no_size:
        ours, bf16 = expert_size()
        print(f"\n# size of a 14336 x 4096 expert: bf16 safetensors {bf16 / 2**20:.1f} MiB, 4-bit g64 packed "
              f"{ours / 2**20:.1f} MiB -> {bf16 / ours:.2f}x smaller")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
